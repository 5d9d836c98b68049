"""The real daemon in dry run against the scripted Agent stand-in."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from standins.agent_stream import AgentStreamStandIn, load_sample_frames
from tests.harness import ROOT, SDK_KEY, DaemonProcess, assert_no_secrets, wait_until


def _events(lines: list[dict], destination: str) -> list[dict]:
    return [
        event
        for line in lines
        if line["destination"] == destination
        for event in line["body"]["events"]
    ]


def test_every_sample_frame_becomes_the_expected_payloads(agent, tmp_path):
    env = {"OPTIMIZELY_SDK_KEY": SDK_KEY, "OPTIMIZELY_AGENT_BASE_URL": agent.url}
    with DaemonProcess(tmp_path, {**env, "DRY_RUN": "true"}) as daemon:
        assert agent.wait_for_connected(1, 10)
        frames = load_sample_frames()
        half = len(frames) // 2
        for frame in frames[:half]:
            agent.publish(frame)

        # The stream is cut mid-way; the daemon must come back for the rest.
        agent.cut_streams()
        assert agent.wait_for_connections_total(2, 10)
        assert agent.wait_for_connected(1, 10)
        for frame in frames[half:]:
            agent.publish(frame)

        assert wait_until(
            lambda: len(_events(daemon.stdout_lines(), "amplitude")) >= 5, 10
        )
        assert daemon.terminate() == 0

    lines = daemon.stdout_lines()
    amplitude = _events(lines, "amplitude")
    ga = _events(lines, "ga4")
    # Exposures: the dispatched flag, the bucketed ab-test and the
    # all-feature-variables from a feature test; conversions: both tracks.
    assert [(e["event_type"], e["user_id"]) for e in amplitude] == [
        ("[Optimizely] Exposure", "user-123"),
        ("[Optimizely] Exposure", "user-123"),
        ("[Optimizely] Exposure", "user-123"),
        ("purchase", "user-123"),
        ("signup", "user-789"),
    ]
    assert [e["event_properties"].get("flag_key") for e in amplitude[:3]] == [
        "checkout_flow",
        "homepage_banner",
        "checkout_flow",
    ]
    assert amplitude[3]["revenue"] == 42.0
    assert len({e["insert_id"] for e in amplitude}) == 5

    assert [e["name"] for e in ga] == [
        "experience_impression",
        "experience_impression",
        "experience_impression",
        "purchase",
        "signup",
    ]
    assert ga[0]["params"]["exp_variant_string"] == "OPTLY-checkout_flow-treatment"
    assert ga[3]["params"]["value"] == 42.0
    assert ga[3]["params"]["currency"] == "USD"

    for line in lines:
        if line["destination"] == "ga4":
            assert "api_secret=***" in line["url"]
        else:
            assert line["body"]["api_key"] == "***"

    assert "project config updated to revision 43" in daemon.stderr
    assert "received SIGTERM" in daemon.stderr
    assert_no_secrets(daemon.stdout, daemon.stderr)


def test_malformed_frames_are_counted_and_the_stream_goes_on(agent, tmp_path):
    env = {
        "OPTIMIZELY_SDK_KEY": SDK_KEY,
        "OPTIMIZELY_AGENT_BASE_URL": agent.url,
        "DRY_RUN": "true",
    }
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish(b'{"Type":"flag","UserContext":')
        agent.publish(b"\xff\xfe not utf-8")
        agent.publish(b'{"Type":"mystery","DecisionInfo":{},"UserContext":{"ID":"u"}}')
        agent.publish(load_sample_frames()[0])
        assert wait_until(lambda: daemon.stdout_lines(), 10)
        assert daemon.terminate() == 0

    assert len(_events(daemon.stdout_lines(), "amplitude")) == 1
    assert "rejected notification" in daemon.stderr
    assert "not_json" in daemon.stderr
    assert "unknown_decision_type" in daemon.stderr


def test_bad_configuration_exits_2_listing_every_problem(tmp_path):
    env = {
        "PATH": "",
        "OPTIMIZELY_SDK_KEY": "has-a-hyphen-secret",
        "GA_API_SECRET": "only_half_of_ga_secret",
        "NOTIFICATION_FILTER": "decision,bogus",
        "LOG_FORMAT": "xml",
        "AMPLITUDE_BATCH_SIZE": "5000",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    for variable in (
        "OPTIMIZELY_SDK_KEY",
        "GA_MEASUREMENT_ID",
        "NOTIFICATION_FILTER",
        "LOG_FORMAT",
        "AMPLITUDE_BATCH_SIZE",
    ):
        assert variable in result.stderr
    assert "has-a-hyphen-secret" not in result.stderr
    assert "only_half_of_ga_secret" not in result.stderr
    assert result.stdout == ""


def test_no_destination_and_no_dry_run_says_how_to_configure_one(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=tmp_path,
        env={"PATH": "", "OPTIMIZELY_SDK_KEY": SDK_KEY},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "DRY_RUN=true" in result.stderr
    assert "AMPLITUDE_API_KEY" in result.stderr


def test_refusals_are_explained_once_with_the_key_masked(tmp_path):
    with AgentStreamStandIn(sdk_key="some_other_key") as agent:
        env = {
            "OPTIMIZELY_SDK_KEY": SDK_KEY,
            "OPTIMIZELY_AGENT_BASE_URL": agent.url,
            "DRY_RUN": "true",
            "LOG_FORMAT": "json",
        }
        with DaemonProcess(tmp_path, env) as daemon:
            assert wait_until(lambda: agent.requests_by_status.get(500, 0) >= 3, 15)
            assert daemon.terminate() == 0

    records = [json.loads(line) for line in daemon.stderr.splitlines()]
    refusals = [r for r in records if "failed to instantiate" in r["message"]]
    assert len(refusals) == 1
    assert refusals[0]["level"] == "ERROR"
    assert "check the key" in refusals[0]["message"]
    assert_no_secrets(daemon.stderr)


def test_unknown_arguments_exit_2_with_the_usage(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "serve"],
        cwd=tmp_path,
        env={"PATH": "", "OPTIMIZELY_SDK_KEY": SDK_KEY, "DRY_RUN": "true"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "usage: python main.py [replay FILE]" in result.stderr


def test_a_busy_health_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py")],
            cwd=tmp_path,
            env={
                "PATH": "",
                "OPTIMIZELY_SDK_KEY": SDK_KEY,
                "DRY_RUN": "true",
                "HEALTH_PORT": str(port),
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot serve the operator endpoint on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
