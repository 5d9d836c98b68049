"""Traffic simulator: sends decide and track calls to an Optimizely Agent.

It plays many users against the Agent's REST API so the notification
stream has something to carry: each round is one `POST /v1/decide` for
the chosen flags, then, with some probability, one `POST /v1/track`. It
shows progress while it runs and ends, also on Ctrl-C, with a summary of
statuses, errors, latencies and the variations handed out;
`--json-summary` writes the same summary, with every decision and every
successful track, for the demo and the tests to check against.

    python decide_testing.py --sdk-key demo_sdk_key --requests 200 --rate 20

The JSON summary has `requests` ({endpoint: {status: count}}), `errors`
({kind: count}), `latency_ms` ({all|decide|track: count, p50, p95, p99,
max}), `variations` ({flag: {variation: count}}), `decisions` (one
{user, flagKey, variationKey, enabled, ruleKey} per flag decided) and
`tracks` (one {user, eventKey, revenue} per accepted track), besides the
run's settings and timing. It never holds the SDK key.

Exit status: 0 when done, 1 when the Agent could not be used at all (no
flags found, or not one decide answered 200), 2 for bad arguments, 130
when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import requests

logger = logging.getLogger("decide_testing")

DEFAULT_BASE_URL = "http://localhost:8080"
DEFAULT_USERS = (400, 500)
DEFAULT_RATE_PER_SECOND = 10.0
DEFAULT_REQUESTS = 100
DEFAULT_CONCURRENCY = 4
DEFAULT_TRACK_PROBABILITY = 0.3
DEFAULT_REVENUE_CENTS = (500, 20_000)
DEFAULT_REVENUE_EVENTS = ("purchase",)
DEFAULT_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0
SDK_KEY_HEADER = "X-Optimizely-SDK-Key"
TTY_PROGRESS_SECONDS = 1.0
LOG_PROGRESS_SECONDS = 10.0
NO_VARIATION = "(none)"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Options:
    """What to send, where, how fast and for how long; validated."""

    base_url: str
    sdk_key: str
    flags: tuple[str, ...]  # empty: every flag in the Agent's /v1/config
    events: tuple[str, ...] | None  # None: every event in /v1/config
    users: tuple[int, int]  # inclusive range of user numbers
    bare_ids: bool
    attributes: Mapping[str, Any]
    rate_per_second: float | None  # exactly one of rate and interval is set
    interval_seconds: tuple[float, float] | None
    duration_seconds: float | None  # exactly one of duration and requests
    requests: int | None
    concurrency: int
    track_probability: float
    revenue_cents: tuple[int, int]
    revenue_events: tuple[str, ...]
    seed: int | None
    json_summary: Path | None
    timeout_seconds: float


@dataclass(frozen=True)
class Plan:
    """The flags and events a run uses, once the Agent has been asked."""

    flags: tuple[str, ...]
    events: tuple[str, ...]


# --- Arguments --------------------------------------------------------------


def parse_int_range(text: str) -> tuple[int, int]:
    """`400-500` -> (400, 500); a single `7` -> (7, 7)."""
    low, high = _split_range(text)
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a range of whole numbers like 400-500"
        ) from None
    _check_order(text, *bounds)
    return bounds


def parse_float_range(text: str) -> tuple[float, float]:
    """`0.5-2` -> (0.5, 2.0); a single `1` -> (1.0, 1.0)."""
    low, high = _split_range(text)
    try:
        bounds = float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a range of numbers like 0.5-2"
        ) from None
    if not all(math.isfinite(bound) for bound in bounds):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    _check_order(text, *bounds)
    return bounds


def _split_range(text: str) -> tuple[str, str]:
    low, separator, high = text.strip().partition("-")
    if not separator:
        high = low
    return low.strip(), high.strip()


def _check_order(text: str, low: float, high: float) -> None:
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be MIN-MAX with 0 <= MIN <= MAX"
        )


def parse_attribute(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`; numbers and true/false are sent typed, anything else as text."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        return key.strip(), raw
    if isinstance(value, bool | int) or (
        isinstance(value, float) and math.isfinite(value)
    ):
        return key.strip(), value
    return key.strip(), raw


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value

    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _key_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line; defaults for the Agent come from the environment."""
    parser = argparse.ArgumentParser(
        prog="decide_testing.py",
        description="Send decide and track traffic to an Optimizely Agent.",
    )
    agent = parser.add_argument_group("agent")
    agent.add_argument(
        "--base-url",
        default=environ.get("OPTIMIZELY_AGENT_BASE_URL") or DEFAULT_BASE_URL,
        help="the Agent's API (env OPTIMIZELY_AGENT_BASE_URL; %(default)s)",
    )
    agent.add_argument(
        "--sdk-key",
        default=environ.get("OPTIMIZELY_SDK_KEY", ""),
        help="sent as X-Optimizely-SDK-Key (env OPTIMIZELY_SDK_KEY)",
    )

    traffic = parser.add_argument_group("traffic")
    traffic.add_argument(
        "--flags",
        type=_key_list,
        action="extend",
        help="flag keys to decide, comma-separated or repeated "
        "(default: every flag in the Agent's /v1/config)",
    )
    traffic.add_argument(
        "--events",
        type=_key_list,
        action="extend",
        help="event keys to track (default: every event in /v1/config)",
    )
    traffic.add_argument(
        "--users",
        type=parse_int_range,
        default=DEFAULT_USERS,
        metavar="MIN-MAX",
        help="user numbers to pick from at random (default 400-500)",
    )
    traffic.add_argument(
        "--bare-ids",
        action="store_true",
        help="send user ids as bare numbers instead of user-<n>",
    )
    traffic.add_argument(
        "--attribute",
        type=parse_attribute,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a user attribute sent with every call (repeatable)",
    )
    traffic.add_argument(
        "--track-probability",
        type=_probability,
        default=DEFAULT_TRACK_PROBABILITY,
        help="chance of a track after each decide (default %(default)s)",
    )
    traffic.add_argument(
        "--revenue",
        type=parse_int_range,
        default=DEFAULT_REVENUE_CENTS,
        metavar="MIN-MAX",
        help="revenue in cents for revenue events (default 500-20000)",
    )
    traffic.add_argument(
        "--revenue-events",
        type=_key_list,
        default=list(DEFAULT_REVENUE_EVENTS),
        help="events that carry revenue and value tags (default purchase)",
    )
    traffic.add_argument(
        "--seed",
        type=int,
        help="seed the random choices (fully repeatable with --concurrency 1)",
    )

    pace = parser.add_argument_group("pace and length")
    speed = pace.add_mutually_exclusive_group()
    speed.add_argument(
        "--rate",
        type=_positive(float),
        help=f"decide calls per second, all workers together "
        f"(default {DEFAULT_RATE_PER_SECOND:g})",
    )
    speed.add_argument(
        "--interval",
        type=parse_float_range,
        metavar="MIN-MAX",
        help="each worker waits a random MIN-MAX seconds between rounds",
    )
    length = pace.add_mutually_exclusive_group()
    length.add_argument("--duration", type=_positive(float), help="seconds to run")
    length.add_argument(
        "--requests",
        type=_positive(int),
        help=f"decide calls to make (default {DEFAULT_REQUESTS})",
    )
    pace.add_argument(
        "--concurrency",
        type=_positive(int),
        default=DEFAULT_CONCURRENCY,
        help="worker threads (default %(default)s)",
    )
    pace.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT_SECONDS,
        help="read timeout per request in seconds (default %(default)s)",
    )

    parser.add_argument(
        "--json-summary",
        type=Path,
        metavar="PATH",
        help="also write the summary, with every decision and track, as JSON",
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Options:
    """Read the command line; exits with status 2 and a message when it is bad."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)

    base_url = args.base_url.strip().rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"--base-url {args.base_url!r} must be an http(s) URL")
    if not args.sdk_key.strip():
        parser.error("an SDK key is required: --sdk-key or OPTIMIZELY_SDK_KEY")
    if args.concurrency > 256:
        parser.error("--concurrency must be at most 256")

    rate = args.rate
    if rate is None and args.interval is None:
        rate = DEFAULT_RATE_PER_SECOND
    request_count = args.requests
    if request_count is None and args.duration is None:
        request_count = DEFAULT_REQUESTS

    return Options(
        base_url=base_url,
        sdk_key=args.sdk_key.strip(),
        flags=tuple(dict.fromkeys(args.flags or ())),
        events=None if args.events is None else tuple(dict.fromkeys(args.events)),
        users=args.users,
        bare_ids=args.bare_ids,
        attributes=dict(args.attribute),
        rate_per_second=rate,
        interval_seconds=args.interval,
        duration_seconds=args.duration,
        requests=request_count,
        concurrency=args.concurrency,
        track_probability=args.track_probability,
        revenue_cents=args.revenue,
        revenue_events=tuple(args.revenue_events),
        seed=args.seed,
        json_summary=args.json_summary,
        timeout_seconds=args.timeout,
    )


# --- Talking to the Agent ------------------------------------------------------


class AgentError(Exception):
    """The Agent could not tell us which flags and events it has."""


def make_session(options: Options) -> requests.Session:
    session = requests.Session()
    session.headers[SDK_KEY_HEADER] = options.sdk_key
    return session


def plan_run(options: Options, session: requests.Session) -> Plan:
    """Fill in flags and events from the Agent's /v1/config when not given."""
    flags, events = options.flags, options.events
    if not flags or events is None:
        config = fetch_config(options, session)
        if not flags:
            flags = tuple(config.get("featuresMap") or {})
        if events is None:
            events = tuple(
                event["key"]
                for event in config.get("events") or []
                if isinstance(event, dict) and event.get("key")
            )
    if not flags:
        raise AgentError("the Agent's /v1/config lists no flags; pass --flags")
    return Plan(flags=flags, events=events)


def fetch_config(options: Options, session: requests.Session) -> dict[str, Any]:
    url = f"{options.base_url}/v1/config"
    try:
        response = session.get(
            url, timeout=(CONNECT_TIMEOUT_SECONDS, options.timeout_seconds)
        )
    except requests.RequestException as error:
        raise AgentError(f"cannot reach {url}: {error}") from error
    if response.status_code != 200:
        raise AgentError(
            f"{url} answered {response.status_code}: {response.text.strip()[:200]}"
        )
    try:
        config = response.json()
    except ValueError:
        raise AgentError(f"{url} did not answer JSON") from None
    if not isinstance(config, dict):
        raise AgentError(f"{url} did not answer a JSON object")
    return config


def user_id_for(number: int, bare_ids: bool) -> str:
    return str(number) if bare_ids else f"user-{number}"


def decide(
    session: requests.Session,
    options: Options,
    flags: Sequence[str],
    user_id: str,
    stats: TrafficStats,
) -> None:
    """One `POST /v1/decide` for `flags`; records its outcome in `stats`."""
    answer = _post(
        session,
        options,
        "decide",
        f"{options.base_url}/v1/decide",
        # The Agent reads only repeated keys, never a comma-joined list.
        [("keys", flag) for flag in flags],
        {"userId": user_id, "userAttributes": dict(options.attributes)},
        stats,
    )
    if answer is None:
        return

    items = answer if isinstance(answer, list) else [answer]
    decisions = []
    for item in items:
        if not isinstance(item, dict):
            stats.record_error("decide_bad_json")
            return
        decisions.append(
            {
                "user": user_id,
                "flagKey": item.get("flagKey", ""),
                "variationKey": item.get("variationKey", ""),
                "enabled": bool(item.get("enabled")),
                "ruleKey": item.get("ruleKey", ""),
            }
        )
    stats.record_decisions(decisions)


def track(
    session: requests.Session,
    options: Options,
    event_key: str,
    user_id: str,
    revenue_cents: int | None,
    stats: TrafficStats,
) -> None:
    """One `POST /v1/track`; a 200 carrying `error` counts as an error."""
    body: dict[str, Any] = {
        "userId": user_id,
        "userAttributes": dict(options.attributes),
    }
    if revenue_cents is not None:
        body["eventTags"] = {"revenue": revenue_cents, "value": revenue_cents / 100}
    answer = _post(
        session,
        options,
        "track",
        f"{options.base_url}/v1/track",
        [("eventKey", event_key)],
        body,
        stats,
    )
    if answer is None:
        return
    if not isinstance(answer, dict):
        stats.record_error("track_bad_json")
    elif answer.get("error"):
        stats.record_error("track_event_error")
    else:
        stats.record_track(
            {"user": user_id, "eventKey": event_key, "revenue": revenue_cents}
        )


def _post(
    session: requests.Session,
    options: Options,
    endpoint: str,
    url: str,
    params: list[tuple[str, str]],
    body: dict[str, Any],
    stats: TrafficStats,
) -> Any | None:
    """Send one call; return its JSON on a 200, else record why not."""
    started = time.perf_counter()
    try:
        response = session.post(
            url,
            params=params,
            json=body,
            timeout=(CONNECT_TIMEOUT_SECONDS, options.timeout_seconds),
        )
    except requests.Timeout:
        stats.record_request(endpoint, "timeout", None)
        stats.record_error(f"{endpoint}_timeout")
        return None
    except requests.ConnectionError:
        stats.record_request(endpoint, "connection_error", None)
        stats.record_error(f"{endpoint}_connection_error")
        return None
    except requests.RequestException:
        stats.record_request(endpoint, "request_error", None)
        stats.record_error(f"{endpoint}_request_error")
        return None
    latency_ms = (time.perf_counter() - started) * 1000

    stats.record_request(endpoint, str(response.status_code), latency_ms)
    if response.status_code != 200:
        stats.record_error(f"{endpoint}_http_{response.status_code}")
        return None
    try:
        return response.json()
    except ValueError:
        stats.record_error(f"{endpoint}_bad_json")
        return None


# --- Counting -------------------------------------------------------------------


class TrafficStats:
    """Everything the run observed; safe to share between worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statuses: dict[str, Counter[str]] = defaultdict(Counter)
        self.errors: Counter[str] = Counter()
        self.latencies_ms: dict[str, list[float]] = defaultdict(list)
        self.decisions: list[dict[str, Any]] = []
        self.tracks: list[dict[str, Any]] = []

    def record_request(
        self, endpoint: str, status: str, latency_ms: float | None
    ) -> None:
        with self._lock:
            self.statuses[endpoint][status] += 1
            if latency_ms is not None:
                self.latencies_ms[endpoint].append(latency_ms)

    def record_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def record_decisions(self, decisions: list[dict[str, Any]]) -> None:
        with self._lock:
            self.decisions.extend(decisions)

    def record_track(self, item: dict[str, Any]) -> None:
        with self._lock:
            self.tracks.append(item)

    def snapshot(self) -> dict[str, Any]:
        """Copies of everything counted so far."""
        with self._lock:
            return {
                "statuses": {
                    endpoint: dict(sorted(counts.items()))
                    for endpoint, counts in sorted(self.statuses.items())
                },
                "errors": dict(sorted(self.errors.items())),
                "latencies_ms": {
                    endpoint: list(values)
                    for endpoint, values in sorted(self.latencies_ms.items())
                },
                "decisions": list(self.decisions),
                "tracks": list(self.tracks),
            }

    def progress(self) -> tuple[int, int, float | None]:
        """Requests sent, errors so far, and the decide p95 in ms."""
        with self._lock:
            sent = sum(sum(counts.values()) for counts in self.statuses.values())
            errors = sum(self.errors.values())
            decide_latencies = list(self.latencies_ms["decide"])
        return sent, errors, percentile(decide_latencies, 95)


def percentile(values: Sequence[float], percent: float) -> float | None:
    """Nearest-rank percentile: the smallest value with `percent`% at or below it."""
    if not values:
        return None
    return _nearest_rank(sorted(values), percent)


def _nearest_rank(ordered: Sequence[float], percent: float) -> float:
    rank = math.ceil(percent / 100 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def latency_summary(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "count": len(ordered),
        "p50": round(_nearest_rank(ordered, 50), 3),
        "p95": round(_nearest_rank(ordered, 95), 3),
        "p99": round(_nearest_rank(ordered, 99), 3),
        "max": round(ordered[-1], 3),
    }


def variation_counts(decisions: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """Flag key -> variation key -> how many decisions handed it out."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for item in decisions:
        counts[item["flagKey"]][item["variationKey"] or NO_VARIATION] += 1
    return {
        flag: dict(sorted(variations.items()))
        for flag, variations in sorted(counts.items())
    }


def summarize(
    stats: TrafficStats,
    *,
    options: Options,
    plan: Plan,
    elapsed_seconds: float,
    interrupted: bool,
) -> dict[str, Any]:
    """The run's summary as plain JSON-ready data; never holds the SDK key."""
    seen = stats.snapshot()
    statuses, latencies = seen["statuses"], seen["latencies_ms"]
    every_latency = [value for values in latencies.values() for value in values]
    decide_calls = sum(statuses.get("decide", {}).values())
    per_second = decide_calls / elapsed_seconds if elapsed_seconds > 0 else 0.0
    return {
        "base_url": options.base_url,
        "flags": list(plan.flags),
        "events": list(plan.events),
        "users": list(options.users),
        "attributes": dict(options.attributes),
        "elapsed_seconds": round(elapsed_seconds, 3),
        "interrupted": interrupted,
        "decide_calls": decide_calls,
        "decide_calls_per_second": round(per_second, 3),
        "requests": statuses,
        "errors": seen["errors"],
        "latency_ms": {
            "all": latency_summary(every_latency),
            **{
                endpoint: latency_summary(values)
                for endpoint, values in latencies.items()
            },
        },
        "variations": variation_counts(seen["decisions"]),
        "decisions": seen["decisions"],
        "tracks": seen["tracks"],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a few readable lines for the terminal."""
    lines = [
        f"decide_testing: {summary['decide_calls']} decide calls in "
        f"{summary['elapsed_seconds']:.1f} s"
        + (" (interrupted)" if summary["interrupted"] else ""),
        "requests:",
    ]
    for endpoint, counts in summary["requests"].items():
        shown = ", ".join(f"{status} x{count}" for status, count in counts.items())
        lines.append(f"  {endpoint:<8} {shown}")
    errors = summary["errors"]
    lines.append("errors:" + ("" if errors else " none"))
    lines.extend(f"  {kind:<28} {count}" for kind, count in errors.items())
    lines.append("latency (ms):     p50      p95      p99")
    for name, stats in summary["latency_ms"].items():
        if stats["count"]:
            lines.append(
                f"  {name:<10} {stats['p50']:>8.1f} {stats['p95']:>8.1f} "
                f"{stats['p99']:>8.1f}"
            )
    lines.append("variations:")
    for flag, variations in summary["variations"].items():
        shown = ", ".join(f"{key} x{count}" for key, count in variations.items())
        lines.append(f"  {flag}: {shown}")
    lines.append(f"tracks recorded: {len(summary['tracks'])}")
    return "\n".join(lines)


# --- Running ----------------------------------------------------------------------


class _Budget:
    """Hands out the right to make one more round, by count or by deadline."""

    def __init__(self, requests: int | None, deadline: float | None) -> None:
        self._lock = threading.Lock()
        self._left = requests
        self.deadline = deadline

    def claim(self) -> bool:
        with self._lock:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return False
            if self._left is not None:
                if self._left <= 0:
                    return False
                self._left -= 1
            return True


class _Pacer:
    """Spaces rounds out: a shared schedule for --rate, random waits for --interval."""

    def __init__(
        self, rate_per_second: float | None, interval: tuple[float, float] | None
    ) -> None:
        self._lock = threading.Lock()
        self._spacing = 1.0 / rate_per_second if rate_per_second else 0.0
        self._interval = interval
        self._next_slot = time.monotonic()

    def wait_turn(self, rng: random.Random, first: bool, stop: threading.Event) -> bool:
        """Sleep until this worker may go; False when stopped meanwhile."""
        if self._interval is not None:
            delay = 0.0 if first else rng.uniform(*self._interval)
        else:
            with self._lock:
                # A slow Agent lowers the rate; it never causes a burst later.
                slot = max(self._next_slot, time.monotonic())
                self._next_slot = slot + self._spacing
            delay = slot - time.monotonic()
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()


def _worker(
    index: int,
    options: Options,
    plan: Plan,
    stats: TrafficStats,
    budget: _Budget,
    pacer: _Pacer,
    stop: threading.Event,
) -> None:
    seed = None if options.seed is None else options.seed * 1_000 + index
    rng = random.Random(seed)
    session = make_session(options)
    first = True
    try:
        while not stop.is_set() and budget.claim():
            if not pacer.wait_turn(rng, first, stop):
                break
            if budget.deadline is not None and time.monotonic() >= budget.deadline:
                break
            first = False

            user_id = user_id_for(rng.randint(*options.users), options.bare_ids)
            decide(session, options, plan.flags, user_id, stats)
            if plan.events and rng.random() < options.track_probability:
                event_key = rng.choice(plan.events)
                revenue = None
                if event_key in options.revenue_events:
                    revenue = rng.randint(*options.revenue_cents)
                track(session, options, event_key, user_id, revenue, stats)
    except Exception:
        # One worker failing must not hide the others' results.
        logger.exception("worker %s stopped on an unexpected error", index)
        stats.record_error("worker_crashed")
    finally:
        session.close()


class _Progress:
    """One updating stderr line on a terminal, else a log line now and then."""

    def __init__(self, stats: TrafficStats, stream: TextIO, started: float) -> None:
        self._stats = stats
        self._stream = stream
        self._started = started
        self._tty = stream.isatty()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="decide-progress", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=2)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _run(self) -> None:
        every = TTY_PROGRESS_SECONDS if self._tty else LOG_PROGRESS_SECONDS
        while not self._done.wait(every):
            sent, errors, p95 = self._stats.progress()
            elapsed = time.monotonic() - self._started
            rate = sent / elapsed if elapsed > 0 else 0.0
            p95_text = "-" if p95 is None else f"{p95:.1f} ms"
            line = (
                f"{sent} requests ({rate:.1f}/s), {errors} errors, "
                f"decide p95 {p95_text}"
            )
            if self._tty:
                self._stream.write(f"\r{line:<72}")
                self._stream.flush()
            else:
                logger.info("progress: %s", line)


def run(
    options: Options,
    plan: Plan,
    stats: TrafficStats,
    stop: threading.Event,
    progress_stream: TextIO | None = None,
) -> bool:
    """Send the traffic; return True if it was cut short by `stop` or Ctrl-C."""
    started = time.monotonic()
    deadline = started + options.duration_seconds if options.duration_seconds else None
    budget = _Budget(options.requests, deadline)
    pacer = _Pacer(options.rate_per_second, options.interval_seconds)
    workers = [
        threading.Thread(
            target=_worker,
            args=(index, options, plan, stats, budget, pacer, stop),
            name=f"decide-worker-{index}",
            daemon=True,
        )
        for index in range(options.concurrency)
    ]
    progress = _Progress(stats, progress_stream or sys.stderr, started)
    progress.start()
    for worker in workers:
        worker.start()

    interrupted = False
    try:
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        interrupted = interrupted or stop.is_set()
        stop.set()
        # A worker may be inside a request; give it that request's timeout.
        give_up_at = time.monotonic() + options.timeout_seconds + 1
        for worker in workers:
            worker.join(max(0.0, give_up_at - time.monotonic()))
        progress.stop()
    return interrupted


def _pace_text(options: Options) -> str:
    if options.interval_seconds is not None:
        low, high = options.interval_seconds
        pace = f"waits of {low:g}-{high:g} s per worker"
    else:
        pace = f"{options.rate_per_second:g} decide calls/s"
    if options.duration_seconds is not None:
        return f"{pace} for {options.duration_seconds:g} s"
    return f"{pace}, {options.requests} decide calls"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    session = make_session(options)
    try:
        plan = plan_run(options, session)
    except AgentError as error:
        logger.error("%s", error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        session.close()
    logger.info(
        "deciding %s for users %s-%s, %s",
        ", ".join(plan.flags),
        *options.users,
        _pace_text(options),
    )

    stop = threading.Event()
    # Signal handlers can only be installed from the main thread.
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    stats = TrafficStats()
    started = time.monotonic()
    try:
        interrupted = run(options, plan, stats, stop)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    summary = summarize(
        stats,
        options=options,
        plan=plan,
        elapsed_seconds=time.monotonic() - started,
        interrupted=interrupted,
    )

    print(format_summary(summary), flush=True)
    if options.json_summary is not None:
        try:
            options.json_summary.write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as error:
            logger.error("cannot write %s: %s", options.json_summary, error)
            return EXIT_FAILED
    if interrupted:
        return EXIT_INTERRUPTED
    if summary["requests"].get("decide", {}).get("200", 0) == 0:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
