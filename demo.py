"""`make demo`: the whole pipeline on one machine, checked end to end.

It starts three loopback stand-ins in this process (an Optimizely Agent
that decides with the real Python SDK over the bundled datafile, GA4 and
Amplitude), runs the daemon (`main.py`) against them as a subprocess, and
drives traffic with the simulator (`decide_testing.py`). When the traffic
ends it stops the daemon with SIGTERM, as Kubernetes would, and prints what
was decided, streamed, delivered and rejected. Then it checks that every
exposure and every conversion arrived at both destinations exactly as the
Agent handed it out, and exits 0 only if every check passes.

    python demo.py                    # about 20 s (or DEMO_SECONDS)
    python demo.py --seconds 60 --rate 50 --keep-dir

Nothing is written into the repository: the daemon runs in a temporary
directory that also holds its log, its dead-letter file and the
simulator's output (`--keep-dir` keeps it). Nothing leaves 127.0.0.1.

Exit status: 0 when every check passed, 1 when one failed or something
could not start, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from optimizely.helpers import enums

from settings import DEFAULT_EXPOSURE_EVENT_TYPE
from standins.agent_sdk import SAMPLE_DATAFILE_PATH, AgentSdkStandIn
from standins.amplitude import AmplitudeStandIn
from standins.ga4 import Ga4StandIn

ROOT = Path(__file__).resolve().parent

DEFAULT_SECONDS = 20.0
DEFAULT_RATE_PER_SECOND = 10.0
# Users from the US see pricing_page's A/B test; everyone else only its
# rollout, which is never an exposure.
SIMULATOR_ATTRIBUTES = ("country=us",)

# Demo credentials: the stand-ins accept exactly these.
SDK_KEY = "demo_sdk_key"
GA_MEASUREMENT_ID = "G-DEMO0001"
GA_API_SECRET = "demo_ga_secret"
AMPLITUDE_API_KEY = "demo_amplitude_key"

STREAM_ATTACH_TIMEOUT_SECONDS = 15.0
# The simulator may be inside a request when its duration ends.
SIMULATOR_GRACE_SECONDS = 20.0
DELIVERY_TIMEOUT_SECONDS = 15.0
DAEMON_SHUTDOWN_TIMEOUT_SECONDS = 10.0
# SIGTERM, then this long for the drain and the exit, then SIGKILL.
DAEMON_STOP_TIMEOUT_SECONDS = DAEMON_SHUTDOWN_TIMEOUT_SECONDS + 10.0
CHILD_KILL_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.2
_DETAIL_EXAMPLES = 3
_LOG_TAIL_LINES = 15

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

GA4_EXPOSURE_EVENT = "experience_impression"

# (user, flag, variation) and (user, event, revenue in currency units).
Exposure = tuple[str, str, str]
Conversion = tuple[str, str, float | None]


class DemoError(Exception):
    """A part of the demo could not start or run; the message says which."""


class _Stopped(Exception):
    """SIGTERM or SIGHUP arrived; handled like Ctrl-C."""


@dataclass(frozen=True)
class Options:
    seconds: float
    rate_per_second: float
    keep_dir: bool
    json_report: Path | None


@dataclass(frozen=True)
class Check:
    """One PASS/FAIL line of the closing report."""

    name: str
    passed: bool
    detail: str = ""


# --- What counts as an exposure and a conversion ---------------------------


def exposure_rule_keys(datafile: Mapping[str, Any]) -> frozenset[str]:
    """Keys of the datafile's A/B-test rules (experiments, grouped or not).

    With `sendFlagDecisions: false`, only a decision made by one of these
    rules dispatches an impression, so only these decisions are exposures
    under the daemon's default EXPOSURE_MODE=dispatched.
    """
    experiments = list(datafile.get("experiments") or [])
    for group in datafile.get("groups") or []:
        experiments.extend(group.get("experiments") or [])
    return frozenset(item["key"] for item in experiments if item.get("key"))


def expected_exposures(
    decisions: Iterable[Mapping[str, Any]], rule_keys: frozenset[str]
) -> Counter[Exposure]:
    """The simulator's decisions that were exposures, as a multiset."""
    return Counter(
        (item["user"], item["flagKey"], item["variationKey"])
        for item in decisions
        if item.get("ruleKey") in rule_keys and item.get("variationKey")
    )


def expected_conversions(tracks: Iterable[Mapping[str, Any]]) -> Counter[Conversion]:
    """The simulator's accepted tracks, revenue turned from cents into units."""
    return Counter(
        (item["user"], item["eventKey"], _units(item.get("revenue"), 100))
        for item in tracks
    )


def ga4_exposures(events: Iterable[Mapping[str, Any]]) -> Counter[Exposure]:
    """`experience_impression` events as (user, flag, variation)."""
    return Counter(
        (
            event.get("user_id") or "",
            event["params"].get("optimizely_flag", ""),
            event["params"].get("optimizely_variation", ""),
        )
        for event in events
        if event["name"] == GA4_EXPOSURE_EVENT
    )


def ga4_conversions(events: Iterable[Mapping[str, Any]]) -> Counter[Conversion]:
    """Every other GA4 event as (user, event name, `value` param)."""
    return Counter(
        (
            event.get("user_id") or "",
            event["name"],
            _units(event["params"].get("value")),
        )
        for event in events
        if event["name"] != GA4_EXPOSURE_EVENT
    )


def amplitude_exposures(
    events: Iterable[Mapping[str, Any]],
    exposure_type: str = DEFAULT_EXPOSURE_EVENT_TYPE,
) -> Counter[Exposure]:
    """Amplitude exposure events as (user, flag, variation)."""
    counts: Counter[Exposure] = Counter()
    for event in events:
        if event.get("event_type") == exposure_type:
            properties = event.get("event_properties") or {}
            counts[
                (
                    str(event.get("user_id") or ""),
                    properties.get("flag_key", ""),
                    properties.get("variation_key", ""),
                )
            ] += 1
    return counts


def amplitude_conversions(
    events: Iterable[Mapping[str, Any]],
    exposure_type: str = DEFAULT_EXPOSURE_EVENT_TYPE,
) -> Counter[Conversion]:
    """Every other Amplitude event as (user, event type, revenue)."""
    return Counter(
        (
            str(event.get("user_id") or ""),
            event.get("event_type", ""),
            _units(event.get("revenue")),
        )
        for event in events
        if event.get("event_type") != exposure_type
    )


def _units(value: Any, divisor: int = 1) -> float | None:
    # Cents to units, and rounded, so 123.45 from JSON equals 12345 / 100.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return round(value / divisor, 2)


def compare(name: str, expected: Counter, received: Counter) -> Check:
    """PASS when `received` holds exactly `expected`, duplicates counted."""
    missing = expected - received
    unexpected = received - expected
    total = sum(expected.values())
    if not missing and not unexpected:
        return Check(name, True, f"{total} of {total}")
    parts = []
    if missing:
        parts.append(
            f"{sum(missing.values())} of {total} missing, e.g. " + _examples(missing)
        )
    if unexpected:
        parts.append(
            f"{sum(unexpected.values())} unexpected, e.g. " + _examples(unexpected)
        )
    return Check(name, False, "; ".join(parts))


def _examples(counts: Counter) -> str:
    return ", ".join(
        "/".join("-" if part is None else str(part) for part in key)
        for key in list(counts)[:_DETAIL_EXAMPLES]
    )


# --- Processes ---------------------------------------------------------------


class _Child:
    """A subprocess the demo started, in its own session.

    Its own session keeps the terminal's Ctrl-C away from it: the demo
    decides the order of shutdown (the daemon must drain while the
    destination stand-ins still answer) and a second signal would make the
    daemon skip its drain.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdout: Path,
        stderr: Path | None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env)
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.process: subprocess.Popen[bytes] | None = None
        self.killed = False

    def start(self) -> _Child:
        with ExitStack() as files:
            stdout = files.enter_context(open(self.stdout_path, "wb"))
            stderr = None  # None: the demo's own stderr
            if self.stderr_path is not None:
                stderr = files.enter_context(open(self.stderr_path, "wb"))
            try:
                # The child keeps its own copies of the descriptors.
                self.process = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
            except OSError as error:
                raise DemoError(f"cannot start the {self.name}: {error}") from error
        return self

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout_seconds: float) -> int | None:
        """The exit status, or None if it still runs after the timeout."""
        if self.process is None:
            return None
        try:
            return self.process.wait(max(0.0, timeout_seconds))
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_seconds: float) -> int | None:
        """SIGTERM, wait, and SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.wait(timeout_seconds)
        if code is None:
            self.kill()
            code = self.process.returncode
        return code

    def kill(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.killed = True
        self.process.kill()
        self.wait(CHILD_KILL_WAIT_SECONDS)

    def stderr_text(self) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A minimal environment: nothing from the user's shell (an exported
    EXPOSURE_MODE or SPOOL_PATH, say) can change what the demo shows."""
    env = {
        name: os.environ[name]
        for name in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "TMPDIR")
        if name in os.environ
    }
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def daemon_env(
    workdir: Path, agent_url: str, ga4_url: str, amplitude_url: str
) -> dict[str, str]:
    """Every setting the demo's daemon runs with."""
    return _child_env(
        {
            "OPTIMIZELY_SDK_KEY": SDK_KEY,
            "OPTIMIZELY_AGENT_BASE_URL": agent_url,
            "GA_MEASUREMENT_ID": GA_MEASUREMENT_ID,
            "GA_API_SECRET": GA_API_SECRET,
            "GA_COLLECT_URL": ga4_url,
            "AMPLITUDE_API_KEY": AMPLITUDE_API_KEY,
            "AMPLITUDE_TRACKING_URL": amplitude_url,
            "AMPLITUDE_EXPOSURE_EVENT_TYPE": DEFAULT_EXPOSURE_EVENT_TYPE,
            "AMPLITUDE_FLUSH_INTERVAL_SECONDS": "0.5",
            "EXPOSURE_MODE": "dispatched",
            "DEAD_LETTER_PATH": str(workdir / "dead-letter.jsonl"),
            "HEALTH_PORT": "0",
            "SUMMARY_INTERVAL_SECONDS": "0",
            "SHUTDOWN_TIMEOUT_SECONDS": f"{DAEMON_SHUTDOWN_TIMEOUT_SECONDS:g}",
            "RECONNECT_MAX_SECONDS": "2",
            "DRY_RUN": "false",
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "text",
        }
    )


class _ImpressionRecorder:
    """What the Agent's SDK itself counted as an impression.

    A second listener on the stand-in's SDK client: each flag decision for
    which the SDK dispatched an impression event, the ground truth the
    datafile-based expectation is checked against.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._impressions: Counter[Exposure] = Counter()

    def attach(self, agent: AgentSdkStandIn) -> None:
        agent.client.notification_center.add_notification_listener(
            enums.NotificationTypes.DECISION, self._on_decision
        )

    def impressions(self) -> Counter[Exposure]:
        with self._lock:
            return Counter(self._impressions)

    def _on_decision(
        self,
        decision_type: str,
        user_id: str,
        attributes: Mapping[str, Any],
        info: Mapping[str, Any],
    ) -> None:
        flag = enums.DecisionNotificationTypes.FLAG
        if decision_type == flag and info.get("decision_event_dispatched"):
            key = (user_id, info.get("flag_key") or "", info.get("variation_key") or "")
            with self._lock:
                self._impressions[key] += 1


# --- The run -------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything the run observed, for the report and the checks."""

    simulator_exit: int | None = None
    simulator: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    sdk_impressions: Counter[Exposure] = field(default_factory=Counter)
    rule_keys: frozenset[str] = frozenset()
    ga4: dict[str, Any] = field(default_factory=dict)
    ga4_events: list[dict[str, Any]] = field(default_factory=list)
    ga4_violations: list[dict[str, str]] = field(default_factory=list)
    amplitude: dict[str, Any] = field(default_factory=dict)
    amplitude_events: list[dict[str, Any]] = field(default_factory=list)
    amplitude_rejections: list[dict[str, Any]] = field(default_factory=list)
    daemon_exit: int | None = None
    daemon_killed: bool = False
    daemon_summary: str = ""
    dead_letters: int = 0


class Demo:
    """One demo run: start the parts, send traffic, stop, collect.

    `run()` returns the Outcome; `close()` stops whatever is still running
    and removes the temporary directory. `close()` is safe to call twice
    and after a failure or an interruption at any point of `run()`.
    """

    def __init__(self, options: Options, out: TextIO) -> None:
        self.options = options
        self.out = out
        self.workdir = Path(tempfile.mkdtemp(prefix="agent-listener-demo-"))
        self.ga4 = Ga4StandIn(GA_MEASUREMENT_ID, GA_API_SECRET)
        self.amplitude = AmplitudeStandIn(AMPLITUDE_API_KEY)
        self.agent: AgentSdkStandIn | None = None
        self.recorder = _ImpressionRecorder()
        self.daemon: _Child | None = None
        self.simulator: _Child | None = None
        self._closed = False

    def run(self) -> Outcome:
        outcome = Outcome()
        datafile = json.loads(SAMPLE_DATAFILE_PATH.read_text(encoding="utf-8"))
        outcome.rule_keys = exposure_rule_keys(datafile)

        self._say("Starting")
        self.ga4.start()
        self.amplitude.start()
        self.agent = AgentSdkStandIn(SDK_KEY, port=0).start()
        self.recorder.attach(self.agent)
        self._row("Agent stand-in (Python SDK)", self.agent.url)
        self._row("GA4 stand-in", self.ga4.collect_url)
        self._row("Amplitude stand-in", self.amplitude.tracking_url)

        self.daemon = _Child(
            "daemon",
            [sys.executable, str(ROOT / "main.py")],
            cwd=self.workdir,
            env=daemon_env(
                self.workdir,
                self.agent.url,
                self.ga4.collect_url,
                self.amplitude.tracking_url,
            ),
            stdout=self.workdir / "daemon.stdout",
            stderr=self.workdir / "daemon.log",
        ).start()
        self._wait_for_stream()
        self._row("daemon (main.py)", f"pid {self.daemon.pid}, stream attached")
        kept = "kept" if self.options.keep_dir else "removed at the end"
        self._row("work directory", f"{self.workdir} ({kept})")

        self._run_simulator(outcome)
        outcome.agent = self.agent.report()

        # Delivery is asynchronous: give the daemon time to hand everything
        # over before SIGTERM, so the check sees the steady state, not a race.
        wanted = sum(
            expected_exposures(
                outcome.simulator.get("decisions", []), outcome.rule_keys
            ).values()
        ) + len(outcome.simulator.get("tracks", []))
        deadline = time.monotonic() + DELIVERY_TIMEOUT_SECONDS
        self.ga4.wait_for_events(wanted, DELIVERY_TIMEOUT_SECONDS)
        self.amplitude.wait_for_unique(wanted, max(0.0, deadline - time.monotonic()))

        self._say("Stopping the daemon with SIGTERM (it drains, then exits)")
        self._stop_daemon(outcome)

        outcome.sdk_impressions = self.recorder.impressions()
        outcome.agent = self.agent.report()
        outcome.ga4 = self.ga4.report()
        outcome.ga4_events = [
            {"user_id": item.user_id, **item.event} for item in self.ga4.events()
        ]
        outcome.ga4_violations = [item.to_json() for item in self.ga4.violations]
        outcome.amplitude = self.amplitude.report()
        outcome.amplitude_events = self.amplitude.unique_events()
        outcome.amplitude_rejections = self.amplitude.rejections
        return outcome

    def close(self) -> None:
        """Stop every process and stand-in; remove the directory unless kept."""
        if self._closed:
            return
        self._closed = True
        # The daemon goes before the stand-ins: its drain needs them.
        for child, timeout in (
            (self.simulator, CHILD_KILL_WAIT_SECONDS),
            (self.daemon, DAEMON_STOP_TIMEOUT_SECONDS),
        ):
            if child is not None and child.poll() is None:
                child.stop(timeout)
        for standin in (self.agent, self.ga4, self.amplitude):
            if standin is not None:
                standin.stop()
        if not self.options.keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_children(self) -> None:
        """SIGKILL every child at once: for a second Ctrl-C during close()."""
        for child in (self.simulator, self.daemon):
            if child is not None:
                child.kill()

    def log_tail(self) -> str:
        if self.daemon is None:
            return ""
        lines = self.daemon.stderr_text().splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    # The steps.

    def _wait_for_stream(self) -> None:
        assert self.agent is not None and self.daemon is not None
        deadline = time.monotonic() + STREAM_ATTACH_TIMEOUT_SECONDS
        while not self.agent.wait_for_streams(1, _POLL_SECONDS):
            code = self.daemon.poll()
            if code is not None:
                raise DemoError(f"the daemon exited with status {code} at start-up")
            if time.monotonic() >= deadline:
                raise DemoError(
                    "the daemon did not open the Agent's notification stream "
                    f"within {STREAM_ATTACH_TIMEOUT_SECONDS:g} s"
                )

    def _run_simulator(self, outcome: Outcome) -> None:
        assert self.agent is not None
        options = self.options
        summary_path = self.workdir / "simulator-summary.json"
        argv = [
            sys.executable,
            str(ROOT / "decide_testing.py"),
            "--base-url",
            self.agent.url,
            "--sdk-key",
            SDK_KEY,
            "--duration",
            f"{options.seconds:g}",
            "--rate",
            f"{options.rate_per_second:g}",
            "--json-summary",
            str(summary_path),
        ]
        for attribute in SIMULATOR_ATTRIBUTES:
            argv += ["--attribute", attribute]
        self._say(
            f"Sending traffic for {options.seconds:g} s at "
            f"{options.rate_per_second:g} decide calls/s "
            f"(decide_testing.py, {', '.join(SIMULATOR_ATTRIBUTES)})"
        )
        self.out.flush()

        # The simulator's progress goes straight to the demo's stderr.
        self.simulator = _Child(
            "traffic simulator",
            argv,
            cwd=self.workdir,
            env=_child_env({}),
            stdout=self.workdir / "simulator.log",
            stderr=None,
        ).start()
        code = self.simulator.wait(options.seconds + SIMULATOR_GRACE_SECONDS)
        if code is None:
            code = self.simulator.stop(CHILD_KILL_WAIT_SECONDS)
        outcome.simulator_exit = code
        try:
            outcome.simulator = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            outcome.simulator = {}

    def _stop_daemon(self, outcome: Outcome) -> None:
        assert self.daemon is not None
        outcome.daemon_exit = self.daemon.stop(DAEMON_STOP_TIMEOUT_SECONDS)
        outcome.daemon_killed = self.daemon.killed
        marker = " main: stopped: "
        for line in reversed(self.daemon.stderr_text().splitlines()):
            if marker in line:
                outcome.daemon_summary = line.split(marker, 1)[1]
                break
        dead_letter_path = self.workdir / "dead-letter.jsonl"
        if dead_letter_path.exists():
            with dead_letter_path.open(encoding="utf-8", errors="replace") as file:
                outcome.dead_letters = sum(1 for line in file if line.strip())

    def _say(self, heading: str) -> None:
        print(f"\n{heading}", file=self.out, flush=True)

    def _row(self, label: str, value: Any) -> None:
        print(f"  {label:<30} {value}", file=self.out, flush=True)


# --- Checking and reporting -----------------------------------------------------


def checks_for(outcome: Outcome) -> list[Check]:
    """Every PASS/FAIL line, in the order a reader follows the data."""
    sim, agent = outcome.simulator, outcome.agent
    decisions = sim.get("decisions", [])
    tracks = sim.get("tracks", [])
    streamed = agent.get("notifications_streamed", {})
    exposures = expected_exposures(decisions, outcome.rule_keys)
    conversions = expected_conversions(tracks)
    ga4_events = outcome.ga4_events
    amp_events = outcome.amplitude_events

    checks = [
        Check(
            "the simulator ran without errors",
            outcome.simulator_exit == EXIT_OK and bool(sim) and not sim.get("errors"),
            f"exit {outcome.simulator_exit}, errors {sim.get('errors') or 'none'}",
        ),
        _equal(
            "decide calls = decide requests the Agent served",
            sim.get("decide_calls"),
            agent.get("decide_requests"),
        ),
        _equal(
            "flag decisions = decisions the Agent made",
            len(decisions),
            agent.get("decisions"),
        ),
        _equal("tracks = tracks the Agent made", len(tracks), agent.get("tracks")),
        Check(
            "the Agent streamed every decision and track",
            streamed.get("flag", 0) == agent.get("decisions")
            and streamed.get("track", 0) == agent.get("tracks")
            and not agent.get("notifications_dropped"),
            f"flag {streamed.get('flag', 0)}, track {streamed.get('track', 0)}, "
            f"dropped {agent.get('notifications_dropped', 0)}",
        ),
        compare(
            "A/B-rule decisions = impressions the SDK dispatched",
            exposures,
            outcome.sdk_impressions,
        ),
        compare(
            "GA4 exposures match the decide answers (user, flag, variation)",
            exposures,
            ga4_exposures(ga4_events),
        ),
        compare(
            "Amplitude exposures match the decide answers",
            exposures,
            amplitude_exposures(amp_events),
        ),
        compare(
            "GA4 conversions match the tracks (user, event, value)",
            conversions,
            ga4_conversions(ga4_events),
        ),
        compare(
            "Amplitude conversions match the tracks (user, event, revenue)",
            conversions,
            amplitude_conversions(amp_events),
        ),
        Check(
            "nothing rejected or dead-lettered",
            not outcome.ga4_violations
            and not outcome.amplitude_rejections
            and outcome.dead_letters == 0,
            f"GA4 violations {len(outcome.ga4_violations)}, Amplitude rejections "
            f"{len(outcome.amplitude_rejections)}, dead letters "
            f"{outcome.dead_letters}",
        ),
        Check(
            "the daemon stopped cleanly on SIGTERM",
            outcome.daemon_exit == 0 and not outcome.daemon_killed,
            "killed after the timeout"
            if outcome.daemon_killed
            else f"exit {outcome.daemon_exit}",
        ),
    ]
    return checks


def _equal(name: str, left: Any, right: Any) -> Check:
    return Check(name, left == right and left is not None, f"{left} and {right}")


def format_report(outcome: Outcome, checks: Sequence[Check]) -> str:
    """The closing report: a few headed sections of aligned counts."""
    sim, agent = outcome.simulator, outcome.agent
    decisions = sim.get("decisions", [])
    exposures = sum(expected_exposures(decisions, outcome.rule_keys).values())
    streamed = agent.get("notifications_streamed", {})
    ga4_events, amp_events = outcome.ga4_events, outcome.amplitude_events
    ga4_exposure_count = sum(ga4_exposures(ga4_events).values())
    amp_exposure_count = sum(amplitude_exposures(amp_events).values())
    lines: list[str] = []

    def section(title: str) -> None:
        lines.extend(["", title])

    def row(label: str, *values: Any) -> None:
        lines.append(f"  {label:<34}" + "".join(f"{v!s:>11}" for v in values))

    section("Decisions (what the simulator asked, what the Agent answered)")
    row("decide calls", sim.get("decide_calls", 0))
    row("flag decisions", len(decisions))
    row("  of which A/B-test exposures", exposures)
    row("tracks accepted", len(sim.get("tracks", [])))
    for flag, variations in (sim.get("variations") or {}).items():
        shown = ", ".join(f"{key} {count}" for key, count in variations.items())
        lines.append(f"    {flag:<20} {shown}")

    section("Notifications streamed by the Agent")
    row("flag decisions", streamed.get("flag", 0))
    row("tracks", streamed.get("track", 0))
    row("dropped (no reader in time)", agent.get("notifications_dropped", 0))

    section("Delivered")
    row("", "GA4", "Amplitude")
    row("exposures", ga4_exposure_count, amp_exposure_count)
    ga4_names = Counter(
        event["name"] for event in ga4_events if event["name"] != GA4_EXPOSURE_EVENT
    )
    amp_types = Counter(
        event.get("event_type", "")
        for event in amp_events
        if event.get("event_type") != DEFAULT_EXPOSURE_EVENT_TYPE
    )
    row("conversions", ga4_names.total(), amp_types.total())
    for name in sorted(ga4_names | amp_types):
        row(f"  {name}", ga4_names[name], amp_types[name])
    row(
        "requests", outcome.ga4.get("requests", 0), outcome.amplitude.get("requests", 0)
    )
    if outcome.amplitude.get("duplicates"):
        row("duplicates Amplitude ignored", "", outcome.amplitude["duplicates"])
    lines.append(
        f"  (exposures are {GA4_EXPOSURE_EVENT} events in GA4 and "
        f'"{DEFAULT_EXPOSURE_EVENT_TYPE}" events in Amplitude)'
    )

    section("Rejected")
    row("GA4 validation messages", len(outcome.ga4_violations))
    for message in outcome.ga4_violations[:_DETAIL_EXAMPLES]:
        lines.append(f"    {message['fieldPath']}: {message['description']}")
    row("Amplitude rejections", len(outcome.amplitude_rejections))
    for answer in outcome.amplitude_rejections[:_DETAIL_EXAMPLES]:
        lines.append(f"    {json.dumps(answer)[:100]}")
    row("dead letters (daemon)", outcome.dead_letters)
    row("requests the Agent refused", sum(agent.get("rejected", {}).values()))
    lines.append("  the daemon's exit summary:")
    for part in (outcome.daemon_summary or "(none logged)").split("; "):
        lines.append(f"    {part}")

    section("Checks")
    lines.extend(
        f"  {'PASS' if check.passed else 'FAIL'}  {check.name}"
        + (f" ({check.detail})" if check.detail else "")
        for check in checks
    )
    failed = sum(not check.passed for check in checks)
    lines.append("")
    lines.append(
        f"Result: PASS, all {len(checks)} checks"
        if not failed
        else f"Result: FAIL, {failed} of {len(checks)} checks failed"
    )
    return "\n".join(lines)


def json_report(outcome: Outcome, checks: Sequence[Check]) -> dict[str, Any]:
    """Machine-readable result: the verdicts and the raw data behind them."""
    sim = outcome.simulator
    return {
        "passed": all(check.passed for check in checks),
        "checks": [
            {"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks
        ],
        "simulator": {
            "exit_code": outcome.simulator_exit,
            "decide_calls": sim.get("decide_calls"),
            "requests": sim.get("requests", {}),
            "errors": sim.get("errors", {}),
            "decisions": sim.get("decisions", []),
            "tracks": sim.get("tracks", []),
        },
        "agent": outcome.agent,
        "exposure_rule_keys": sorted(outcome.rule_keys),
        "sdk_impressions": [
            list(key)
            for key, count in sorted(outcome.sdk_impressions.items())
            for _ in range(count)
        ],
        "ga4": {
            "report": outcome.ga4,
            "events": outcome.ga4_events,
            "violations": outcome.ga4_violations,
        },
        "amplitude": {
            "report": outcome.amplitude,
            "unique_events": outcome.amplitude_events,
            "rejections": outcome.amplitude_rejections,
        },
        "daemon": {
            "exit_code": outcome.daemon_exit,
            "killed": outcome.daemon_killed,
            "summary": outcome.daemon_summary,
            "dead_letters": outcome.dead_letters,
        },
    }


# --- Command line --------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="demo.py",
        description="Run the Agent stand-in, the daemon and the analytics "
        "stand-ins on this machine, send traffic, and check what arrived.",
    )
    parser.add_argument(
        "--seconds",
        type=_positive_float,
        default=environ.get("DEMO_SECONDS") or str(DEFAULT_SECONDS),
        help="how long to send traffic (env DEMO_SECONDS; default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=DEFAULT_RATE_PER_SECOND,
        help="decide calls per second (default %(default)s)",
    )
    parser.add_argument(
        "--keep-dir",
        action="store_true",
        help="keep the temporary directory with the logs and the dead letters",
    )
    parser.add_argument(
        "--json-report",
        type=Path,
        metavar="PATH",
        help="also write the checks and the data behind them as JSON",
    )
    args = parser.parse_args(argv)
    return Options(
        seconds=args.seconds,
        rate_per_second=args.rate,
        keep_dir=args.keep_dir,
        json_report=args.json_report,
    )


@contextmanager
def _signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP to `handler` inside the block.

    Only the main thread may install handlers; elsewhere the block runs
    with the handlers as they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        numbers.append(signal.SIGHUP)
    previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _raise_stop(number: int, frame: Any) -> None:
    raise _Stopped(signal.Signals(number).name)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(argv, os.environ)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    out = sys.stdout

    print(
        "Optimizely Agent listener demo: decide -> stream -> GA4 and Amplitude",
        file=out,
    )
    demo = Demo(options, out)
    outcome: Outcome | None = None
    failure = ""
    code = EXIT_FAILED
    try:
        with _signals(_raise_stop):
            try:
                outcome = demo.run()
            except (KeyboardInterrupt, _Stopped):
                print("\nInterrupted: stopping everything", file=out, flush=True)
                code = EXIT_INTERRUPTED
            except DemoError as error:
                print(f"\nFAIL: {error}", file=out, flush=True)
                failure = str(error)
                tail = demo.log_tail()
                if tail:
                    print("  the daemon's last log lines:", file=out)
                    print("    " + tail.replace("\n", "\n    "), file=out, flush=True)
    finally:
        # A second Ctrl-C while stopping cuts the waits short.
        with _signals(lambda _number, _frame: demo.kill_children()):
            demo.close()

    if code == EXIT_INTERRUPTED:
        print("Everything the demo started has stopped.", file=out, flush=True)
    result: dict[str, Any] = {"passed": False, "error": failure or "interrupted"}
    if outcome is not None:
        checks = checks_for(outcome)
        print(format_report(outcome, checks), file=out, flush=True)
        result = json_report(outcome, checks)
        code = EXIT_OK if result["passed"] else EXIT_FAILED
    if options.json_report is not None:
        options.json_report.write_text(
            json.dumps(result, indent=2) + "\n", encoding="utf-8"
        )
    if options.keep_dir:
        print(
            f"\nLogs, dead letters and the simulator's output: {demo.workdir}", file=out
        )
    elif code == EXIT_FAILED:
        print("\nRun with --keep-dir to keep the daemon's log.", file=out)
    return code


if __name__ == "__main__":
    sys.exit(main())
