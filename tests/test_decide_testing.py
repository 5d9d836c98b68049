"""The traffic simulator: arguments, summary math and the requests it sends."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

import decide_testing
from decide_testing import (
    Options,
    Plan,
    TrafficStats,
    latency_summary,
    parse_args,
    parse_attribute,
    parse_float_range,
    parse_int_range,
    percentile,
    summarize,
    variation_counts,
)
from standins.agent_sdk import AgentSdkStandIn

ROOT = Path(__file__).resolve().parent.parent
ENV = {"OPTIMIZELY_SDK_KEY": "env_key"}


def _options(**changes: Any) -> Options:
    return dataclasses.replace(parse_args(["--sdk-key", "test_key"], {}), **changes)


# --- Arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("400-500", (400, 500)), ("7", (7, 7)), (" 3 - 9 ", (3, 9)), ("0-0", (0, 0))],
)
def test_int_ranges(text, expected):
    assert parse_int_range(text) == expected


@pytest.mark.parametrize("text", ["9-3", "a-b", "-5", "", "1.5-2", "1-2-3"])
def test_bad_int_ranges(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_int_range(text)


def test_float_ranges():
    assert parse_float_range("0.5-2") == (0.5, 2.0)
    assert parse_float_range("1") == (1.0, 1.0)
    for bad in ("2-1", "x", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_float_range(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("country=us", ("country", "us")),
        ("age=34", ("age", 34)),
        ("score=1.5", ("score", 1.5)),
        ("beta=true", ("beta", True)),
        ("x=NaN", ("x", "NaN")),
        ("ref=a=b", ("ref", "a=b")),
        ("empty=", ("empty", "")),
    ],
)
def test_attributes(text, expected):
    assert parse_attribute(text) == expected


def test_defaults_come_from_the_environment():
    environ = {
        "OPTIMIZELY_AGENT_BASE_URL": "http://127.0.0.1:9999/",
        "OPTIMIZELY_SDK_KEY": "env_key",
    }

    options = parse_args([], environ)

    assert options.base_url == "http://127.0.0.1:9999"
    assert options.sdk_key == "env_key"
    assert options.users == (400, 500)
    assert options.rate_per_second == decide_testing.DEFAULT_RATE_PER_SECOND
    assert options.requests == decide_testing.DEFAULT_REQUESTS
    assert options.duration_seconds is None and options.interval_seconds is None
    assert options.flags == () and options.events is None


def test_command_line_wins_over_the_environment():
    options = parse_args(
        [
            "--base-url",
            "http://localhost:8080",
            "--sdk-key",
            "cli_key",
            "--flags",
            "a,b",
            "--flags",
            "c",
            "--events",
            "",
            "--interval",
            "0.1-0.5",
            "--duration",
            "3",
            "--attribute",
            "country=us",
            "--attribute",
            "beta=true",
        ],
        ENV,
    )

    assert options.sdk_key == "cli_key"
    assert options.flags == ("a", "b", "c")
    assert options.events == ()
    assert options.interval_seconds == (0.1, 0.5)
    assert options.rate_per_second is None
    assert options.duration_seconds == 3.0 and options.requests is None
    assert options.attributes == {"country": "us", "beta": True}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--users", "9-3"], "--users"),
        (["--rate", "0"], "must be above 0"),
        (["--track-probability", "2"], "between 0 and 1"),
        (["--rate", "5", "--interval", "1-2"], "not allowed with"),
        (["--duration", "5", "--requests", "3"], "not allowed with"),
        (["--base-url", "ftp://agent"], "http(s) URL"),
        (["--attribute", "novalue"], "KEY=VALUE"),
        (["--concurrency", "1000"], "at most 256"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("OPTIMIZELY_SDK_KEY", "env_key")

    assert decide_testing.main(argv) == 2

    assert message in capsys.readouterr().err


def test_missing_sdk_key_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("OPTIMIZELY_SDK_KEY", raising=False)

    assert decide_testing.main([]) == 2

    assert "SDK key is required" in capsys.readouterr().err


# --- Summary math ----------------------------------------------------------------


def test_percentiles_use_the_nearest_rank():
    values = [float(n) for n in range(100, 0, -1)]

    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2


def test_latency_summary():
    assert latency_summary([3.0, 1.0, 2.0]) == {
        "count": 3,
        "p50": 2.0,
        "p95": 3.0,
        "p99": 3.0,
        "max": 3.0,
    }
    assert latency_summary([])["p50"] is None


def test_summary_counts_statuses_errors_and_variations():
    stats = TrafficStats()
    for latency in (1.0, 2.0, 3.0):
        stats.record_request("decide", "200", latency)
    stats.record_request("decide", "500", 9.0)
    stats.record_request("track", "timeout", None)
    stats.record_error("decide_http_500")
    stats.record_error("track_timeout")
    stats.record_decisions(
        [
            _decision("u1", "f", "on"),
            _decision("u2", "f", "on"),
            _decision("u3", "f", ""),
            _decision("u1", "g", "b"),
        ]
    )
    stats.record_track({"user": "u1", "eventKey": "purchase", "revenue": 1200})

    summary = summarize(
        stats,
        options=_options(),
        plan=Plan(flags=("f", "g"), events=("purchase",)),
        elapsed_seconds=2.0,
        interrupted=False,
    )

    assert summary["requests"] == {
        "decide": {"200": 3, "500": 1},
        "track": {"timeout": 1},
    }
    assert summary["errors"] == {"decide_http_500": 1, "track_timeout": 1}
    assert summary["decide_calls"] == 4
    assert summary["decide_calls_per_second"] == 2.0
    assert summary["latency_ms"]["decide"]["p50"] == 2.0
    assert summary["latency_ms"]["all"]["count"] == 4
    assert summary["variations"] == {"f": {"(none)": 1, "on": 2}, "g": {"b": 1}}
    assert summary["tracks"] == [
        {"user": "u1", "eventKey": "purchase", "revenue": 1200}
    ]
    assert "test_key" not in json.dumps(summary)
    assert "decide   200 x3, 500 x1" in decide_testing.format_summary(summary)


def test_variation_counts_label_no_variation():
    assert variation_counts([_decision("u", "f", "")]) == {"f": {"(none)": 1}}


def _decision(user: str, flag: str, variation: str) -> dict[str, Any]:
    return {
        "user": user,
        "flagKey": flag,
        "variationKey": variation,
        "enabled": bool(variation),
        "ruleKey": "",
    }


# --- Request shapes against a recording fake ------------------------------------------


class _RecordingAgent(ThreadingHTTPServer):
    """Records every request and answers what the test queued, else 200 {}."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers: list[tuple[int, Any]] = []
        super().__init__(("127.0.0.1", 0), _Recorder)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RecordingAgent

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.received.append(
            {
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": json.loads(self.rfile.read(length)),
            }
        )
        status, answer = (
            self.server.answers.pop(0) if self.server.answers else (200, {})
        )
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[_RecordingAgent]:
    server = _RecordingAgent()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="recorder"
    )
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_decide_repeats_keys_and_sends_the_agents_body(recorder):
    options = _options(base_url=recorder.url, attributes={"country": "us"})
    stats = TrafficStats()
    recorder.answers.append(
        (
            200,
            [
                {"flagKey": "a", "variationKey": "on", "enabled": True, "ruleKey": "r"},
                {"flagKey": "b", "variationKey": "", "enabled": False, "ruleKey": ""},
            ],
        )
    )

    with decide_testing.make_session(options) as session:
        decide_testing.decide(session, options, ["a", "b"], "user-401", stats)

    [request] = recorder.received
    assert request["path"] == "/v1/decide?keys=a&keys=b"
    assert request["headers"]["X-Optimizely-SDK-Key"] == "test_key"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {
        "userId": "user-401",
        "userAttributes": {"country": "us"},
    }
    assert stats.decisions == [
        {
            "user": "user-401",
            "flagKey": "a",
            "variationKey": "on",
            "enabled": True,
            "ruleKey": "r",
        },
        {
            "user": "user-401",
            "flagKey": "b",
            "variationKey": "",
            "enabled": False,
            "ruleKey": "",
        },
    ]


def test_track_sends_revenue_tags_and_counts_an_error_answer(recorder):
    options = _options(base_url=recorder.url)
    stats = TrafficStats()
    recorder.answers += [
        (200, {"userId": "u", "eventKey": "purchase"}),
        (200, {"userId": "u", "eventKey": "nope", "error": "not found"}),
        (500, {"error": "boom"}),
    ]

    with decide_testing.make_session(options) as session:
        decide_testing.track(session, options, "purchase", "u", 1234, stats)
        decide_testing.track(session, options, "nope", "u", None, stats)
        decide_testing.track(session, options, "signup", "u", None, stats)

    first, second, _ = recorder.received
    path = urlsplit(first["path"])
    assert (path.path, parse_qsl(path.query)) == (
        "/v1/track",
        [("eventKey", "purchase")],
    )
    assert first["body"] == {
        "userId": "u",
        "userAttributes": {},
        "eventTags": {"revenue": 1234, "value": 12.34},
    }
    assert "eventTags" not in second["body"]
    assert stats.tracks == [{"user": "u", "eventKey": "purchase", "revenue": 1234}]
    assert stats.errors == {"track_event_error": 1, "track_http_500": 1}
    assert stats.statuses["track"] == {"200": 2, "500": 1}


def test_unreachable_agent_is_a_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = _options(base_url=f"http://127.0.0.1:{port}")
    stats = TrafficStats()

    with decide_testing.make_session(options) as session:
        decide_testing.decide(session, options, ["a"], "u", stats)
        with pytest.raises(decide_testing.AgentError):
            decide_testing.plan_run(options, session)

    assert stats.errors == {"decide_connection_error": 1}


# --- Against the SDK-backed stand-in -------------------------------------------------


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentSdkStandIn]:
    with AgentSdkStandIn("demo_sdk_key") as standin:
        yield standin


def test_a_run_matches_what_the_agent_decided(agent, tmp_path, capsys):
    before = agent.report()
    summary_path = tmp_path / "summary.json"

    code = decide_testing.main(
        [
            "--base-url",
            agent.url,
            "--sdk-key",
            "demo_sdk_key",
            "--requests",
            "40",
            "--rate",
            "1000",
            "--concurrency",
            "3",
            "--attribute",
            "country=us",
            "--track-probability",
            "0.5",
            "--seed",
            "7",
            "--json-summary",
            str(summary_path),
        ]
    )

    assert code == 0
    summary = json.loads(summary_path.read_text())
    after = agent.report()
    assert summary["flags"] == sorted(agent.flag_keys)
    assert summary["events"] == agent.event_keys
    assert summary["requests"]["decide"] == {"200": 40}
    assert summary["errors"] == {}
    assert after["decide_requests"] - before["decide_requests"] == 40
    assert len(summary["decisions"]) == 40 * len(agent.flag_keys)
    assert len(summary["tracks"]) == after["tracks"] - before["tracks"]
    for item in summary["tracks"]:
        assert (item["revenue"] is not None) == (item["eventKey"] == "purchase")

    # Every reported decision is what the SDK decides for that user.
    for item in summary["decisions"][:12]:
        user = agent.client.create_user_context(item["user"], {"country": "us"})
        assert (user.decide(item["flagKey"]).variation_key or "") == item[
            "variationKey"
        ]
    assert "variations:" in capsys.readouterr().out


def test_unknown_flags_and_events_show_as_errors(agent, tmp_path):
    summary_path = tmp_path / "summary.json"

    code = decide_testing.main(
        [
            "--base-url",
            agent.url,
            "--sdk-key",
            "demo_sdk_key",
            "--flags",
            "dark_mode",
            "--events",
            "no_such_event",
            "--requests",
            "5",
            "--rate",
            "1000",
            "--track-probability",
            "1",
            "--json-summary",
            str(summary_path),
        ]
    )

    summary = json.loads(summary_path.read_text())
    assert code == 0
    assert summary["errors"] == {"track_event_error": 5}
    assert summary["tracks"] == []
    assert set(summary["variations"]) == {"dark_mode"}


def test_wrong_sdk_key_fails_before_sending_traffic(agent, caplog):
    argv = ["--base-url", agent.url, "--sdk-key", "not_the_key", "--requests", "3"]
    before = agent.report()["decide_requests"]

    assert decide_testing.main(argv) == 1

    assert "answered 500" in caplog.text
    assert agent.report()["decide_requests"] == before


def test_duration_run_stops_on_time_and_stop_cuts_it_short(agent):
    options = _options(
        base_url=agent.url,
        sdk_key="demo_sdk_key",
        requests=None,
        duration_seconds=0.3,
        rate_per_second=200.0,
    )
    plan = Plan(flags=("dark_mode",), events=())
    stop = threading.Event()

    started = time.monotonic()
    interrupted = decide_testing.run(options, plan, TrafficStats(), stop, io.StringIO())
    assert not interrupted
    assert time.monotonic() - started < 2

    stop_later = threading.Timer(0.2, stop.set)
    stop_later.start()
    started = time.monotonic()
    long_run = dataclasses.replace(options, duration_seconds=30.0)
    assert decide_testing.run(long_run, plan, TrafficStats(), stop, io.StringIO())
    assert time.monotonic() - started < 3


def test_progress_is_one_updating_line_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(decide_testing, "TTY_PROGRESS_SECONDS", 0.02)
    terminal = Terminal()
    stats = TrafficStats()
    stats.record_request("decide", "200", 4.0)

    progress = decide_testing._Progress(stats, terminal, time.monotonic())
    progress.start()
    time.sleep(0.1)
    progress.stop()

    output = terminal.getvalue()
    assert output.startswith("\r1 requests") and output.endswith("\n")
    assert "\n" not in output[:-1]


def test_ctrl_c_ends_with_a_summary(agent, tmp_path):
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "decide_testing.py"),
            "--base-url",
            agent.url,
            "--sdk-key",
            "demo_sdk_key",
            "--duration",
            "30",
            "--rate",
            "50",
            "--json-summary",
            str(summary_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        before = agent.report()["decide_requests"]
        deadline = time.monotonic() + 10
        while agent.report()["decide_requests"] < before + 5:
            assert time.monotonic() < deadline, "no traffic arrived"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait(5)

    assert process.returncode == 130
    assert "(interrupted)" in out
    assert json.loads(summary_path.read_text())["interrupted"] is True
