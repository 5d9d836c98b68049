"""`make demo` end to end, and the demo's own checks.

The end-to-end test runs `demo.py` as `make demo` does: the SDK-backed
Agent stand-in, the traffic simulator, the daemon and the GA4 and
Amplitude stand-ins. It does not take the demo's PASS lines on trust: it
recomputes from the raw data of `--json-report` which decide answers were
exposures (from the datafile's A/B rules) and matches them, and every
track, against what each destination received.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import demo
from demo import Check, Outcome, checks_for, compare
from standins.agent_sdk import SAMPLE_DATAFILE_PATH
from tests.harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEMO_SECONDS = 4
# 100 decide calls: a purchase (the only revenue event) is all but certain.
DEMO_RATE = 25
EXPOSURE_TYPE = "[Optimizely] Exposure"


def _run_demo(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start `demo.py` in `tmp_path`, its output going to demo.out/demo.err."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DEMO_SECONDS", None)
    with (
        open(tmp_path / "demo.out", "wb") as stdout,
        open(tmp_path / "demo.err", "wb") as stderr,
    ):
        return subprocess.Popen(
            [sys.executable, str(ROOT / "demo.py"), *args],
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )


def _ab_rule_keys() -> set[str]:
    datafile = json.loads(SAMPLE_DATAFILE_PATH.read_text(encoding="utf-8"))
    assert not datafile["sendFlagDecisions"], "exposures would include rollouts"
    return {experiment["key"] for experiment in datafile["experiments"]}


def _cents_to_units(value: Any) -> float | None:
    return None if value is None else round(value / 100, 2)


def test_demo_delivers_every_exposure_and_conversion(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    started = time.monotonic()
    process = _run_demo(
        tmp_path,
        "--seconds",
        str(DEMO_SECONDS),
        "--rate",
        str(DEMO_RATE),
        "--json-report",
        str(report_path),
    )
    try:
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = (tmp_path / "demo.out").read_text()
    assert code == 0, output + (tmp_path / "demo.err").read_text()
    assert time.monotonic() - started < 30
    assert "Result: PASS" in output
    assert "FAIL" not in output
    # The demo writes nothing where it runs, only into its temporary directory.
    assert {path.name for path in tmp_path.iterdir()} == {
        "demo.out",
        "demo.err",
        "report.json",
    }

    report = json.loads(report_path.read_text())
    assert report["passed"] and all(check["passed"] for check in report["checks"])
    simulator, agent = report["simulator"], report["agent"]
    decisions, tracks = simulator["decisions"], simulator["tracks"]

    # The simulator's counts are the requests the Agent saw.
    assert simulator["exit_code"] == 0 and simulator["errors"] == {}
    assert simulator["decide_calls"] == agent["decide_requests"] > 0
    assert sum(simulator["requests"]["decide"].values()) == agent["decide_requests"]
    assert len(decisions) == agent["decisions"] == 4 * agent["decide_requests"]
    assert len(tracks) == agent["tracks"] == agent["track_requests"] > 0
    assert sum(simulator["requests"]["track"].values()) == agent["track_requests"]
    assert agent["notifications_streamed"] == {
        "flag": agent["decisions"],
        "track": agent["tracks"],
    }

    # Exposures: the decide answers made by an A/B rule, which are exactly
    # the decisions for which the Agent's SDK dispatched an impression.
    ab_rules = _ab_rule_keys()
    exposures = Counter(
        (item["user"], item["flagKey"], item["variationKey"])
        for item in decisions
        if item["ruleKey"] in ab_rules
    )
    assert {flag for _, flag, _ in exposures} == {"checkout_redesign", "pricing_page"}
    assert Counter(tuple(item) for item in report["sdk_impressions"]) == exposures
    assert sum(exposures.values()) < len(decisions)  # rollouts are not exposures

    ga4_events = report["ga4"]["events"]
    ga4_exposures = Counter(
        (
            event["user_id"],
            event["params"]["optimizely_flag"],
            event["params"]["optimizely_variation"],
        )
        for event in ga4_events
        if event["name"] == "experience_impression"
    )
    assert ga4_exposures == exposures

    amplitude_events = report["amplitude"]["unique_events"]
    amplitude_exposures = Counter(
        (
            event["user_id"],
            event["event_properties"]["flag_key"],
            event["event_properties"]["variation_key"],
        )
        for event in amplitude_events
        if event["event_type"] == EXPOSURE_TYPE
    )
    assert amplitude_exposures == exposures

    # Conversions: every accepted track, with its revenue in currency units.
    conversions = Counter(
        (item["user"], item["eventKey"], _cents_to_units(item["revenue"]))
        for item in tracks
    )
    assert any(revenue for _, _, revenue in conversions), "no revenue track ran"
    ga4_conversions = Counter(
        (event["user_id"], event["name"], event["params"].get("value"))
        for event in ga4_events
        if event["name"] != "experience_impression"
    )
    assert ga4_conversions == conversions
    amplitude_conversions = Counter(
        (event["user_id"], event["event_type"], event.get("revenue"))
        for event in amplitude_events
        if event["event_type"] != EXPOSURE_TYPE
    )
    assert amplitude_conversions == conversions

    assert report["ga4"]["violations"] == []
    assert report["amplitude"]["rejections"] == []
    assert report["daemon"]["exit_code"] == 0
    assert report["daemon"]["dead_letters"] == 0
    assert not report["daemon"]["killed"]


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    process = _run_demo(tmp_path, "--seconds", "30", "--keep-dir")
    out_path = tmp_path / "demo.out"
    kept: Path | None = None
    try:
        assert wait_until(lambda: "Sending traffic" in out_path.read_text(), 20)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
        output = out_path.read_text()
        assert code == 130, output
        assert "Interrupted" in output

        kept = Path(re.search(r"simulator's output: (\S+)", output).group(1))
        daemon_pid = int(re.search(r"daemon \(main\.py\)\s+pid (\d+)", output)[1])
        # The daemon drained and logged its exit summary: it was not killed.
        assert " main: stopped: " in (kept / "daemon.log").read_text()
        assert "(interrupted)" in (kept / "simulator.log").read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(daemon_pid, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if kept is not None and kept.name.startswith("agent-listener-demo-"):
            shutil.rmtree(kept, ignore_errors=True)


def test_bad_arguments_exit_2() -> None:
    assert demo.main(["--seconds", "0"]) == 2
    assert demo.main(["--rate", "fast"]) == 2


def test_seconds_default_from_the_environment() -> None:
    assert demo.parse_args([], {"DEMO_SECONDS": "7"}).seconds == 7
    assert demo.parse_args([], {}).seconds == demo.DEFAULT_SECONDS
    assert demo.parse_args(["--seconds", "3"], {"DEMO_SECONDS": "7"}).seconds == 3


# --- The checks themselves: they must fail when the data is wrong ------------


def _consistent_outcome() -> Outcome:
    decisions = [
        {
            "user": "user-1",
            "flagKey": "pricing_page",
            "variationKey": "annual_first",
            "enabled": True,
            "ruleKey": "pricing_page_test",
        },
        {
            "user": "user-1",
            "flagKey": "dark_mode",
            "variationKey": "on",
            "enabled": True,
            "ruleKey": "default-rollout-70004-10004",
        },
    ]
    tracks = [
        {"user": "user-1", "eventKey": "purchase", "revenue": 12345},
        {"user": "user-1", "eventKey": "signup", "revenue": None},
    ]
    exposure = ("user-1", "pricing_page", "annual_first")
    return Outcome(
        simulator_exit=0,
        simulator={
            "decide_calls": 1,
            "errors": {},
            "decisions": decisions,
            "tracks": tracks,
        },
        agent={
            "decide_requests": 1,
            "decisions": 2,
            "tracks": 2,
            "notifications_streamed": {"flag": 2, "track": 2},
            "notifications_dropped": 0,
        },
        sdk_impressions=Counter([exposure]),
        rule_keys=frozenset({"pricing_page_test", "checkout_redesign_ab"}),
        ga4_events=[
            {
                "user_id": "user-1",
                "name": "experience_impression",
                "params": {
                    "optimizely_flag": "pricing_page",
                    "optimizely_variation": "annual_first",
                },
            },
            {"user_id": "user-1", "name": "purchase", "params": {"value": 123.45}},
            {"user_id": "user-1", "name": "signup", "params": {}},
        ],
        amplitude_events=[
            {
                "user_id": "user-1",
                "event_type": EXPOSURE_TYPE,
                "event_properties": {
                    "flag_key": "pricing_page",
                    "variation_key": "annual_first",
                },
            },
            {"user_id": "user-1", "event_type": "purchase", "revenue": 123.45},
            {"user_id": "user-1", "event_type": "signup"},
        ],
        daemon_exit=0,
    )


def _failed(checks: list[Check]) -> list[str]:
    return [check.name for check in checks if not check.passed]


def test_checks_pass_on_consistent_data() -> None:
    assert _failed(checks_for(_consistent_outcome())) == []


def test_checks_catch_a_wrong_variation() -> None:
    outcome = _consistent_outcome()
    outcome.ga4_events[0]["params"]["optimizely_variation"] = "control"

    failed = _failed(checks_for(outcome))

    assert failed == ["GA4 exposures match the decide answers (user, flag, variation)"]


def test_checks_catch_a_missing_exposure_and_a_wrong_revenue() -> None:
    outcome = _consistent_outcome()
    del outcome.amplitude_events[0]
    outcome.ga4_events[1]["params"]["value"] = 12345  # cents, not units

    failed = _failed(checks_for(outcome))

    assert failed == [
        "Amplitude exposures match the decide answers",
        "GA4 conversions match the tracks (user, event, value)",
    ]


def test_checks_catch_a_rollout_forwarded_as_exposure() -> None:
    outcome = _consistent_outcome()
    outcome.amplitude_events.append(
        {
            "user_id": "user-1",
            "event_type": EXPOSURE_TYPE,
            "event_properties": {"flag_key": "dark_mode", "variation_key": "on"},
        }
    )

    assert _failed(checks_for(outcome)) == [
        "Amplitude exposures match the decide answers"
    ]


def test_checks_catch_a_dirty_stop() -> None:
    outcome = _consistent_outcome()
    outcome.dead_letters = 1
    outcome.daemon_exit = -9
    outcome.daemon_killed = True

    assert _failed(checks_for(outcome)) == [
        "nothing rejected or dead-lettered",
        "the daemon stopped cleanly on SIGTERM",
    ]


def test_compare_counts_duplicates() -> None:
    twice = Counter({("u", "f", "v"): 2})
    once = Counter({("u", "f", "v"): 1})

    check = compare("exposures", twice, once)

    assert not check.passed
    assert check.detail == "1 of 2 missing, e.g. u/f/v"
