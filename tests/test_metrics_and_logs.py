"""What an operator reads from a real daemon run: /metrics and its stderr.

The counters are scraped over HTTP, parsed as Prometheus would parse them
and compared with what the stand-ins actually received. The logs are read
line by line from the daemon's stderr, with failures arranged so that
secrets would leak if anything printed them unmasked.
"""

from __future__ import annotations

import json
import re
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from settings import VERSION
from standins.agent_stream import AgentStreamStandIn
from tests.harness import (
    SDK_KEY,
    SECRETS,
    DaemonProcess,
    assert_no_secrets,
    destination_env,
    flag_notification,
    free_port,
    track_notification,
    wait_until,
)

START_SECONDS = 15.0

_JSON_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_SUMMARY = re.compile(
    r"summary: received \d+, delivered \d+, retried \d+, "
    r"dead-lettered \d+, buffer depth \d+"
)


def _env(agent_url: str, ga, amplitude, **extra: str) -> dict[str, str]:
    return {
        "OPTIMIZELY_SDK_KEY": SDK_KEY,
        "OPTIMIZELY_AGENT_BASE_URL": agent_url,
        **destination_env(ga, amplitude),
        **extra,
    }


class Scrape:
    """One /metrics answer, parsed by Prometheus's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample with this name and exactly these labels."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, f"{name} {labels} is ambiguous"
        return found[0] if found else None

    def count(self, name: str, **labels: str) -> float:
        """A counter's value, 0 when the labelled child was never touched."""
        return self.value(name + "_total", **labels) or 0.0

    def label_values(self) -> set[str]:
        return {value for s in self.samples for value in s.labels.values()}


def _scrape(port: int) -> Scrape | None:
    session = requests.Session()
    session.trust_env = False
    try:
        response = session.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except requests.ConnectionError:
        return None
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(response.text)


def _scrape_when(port: int, ready, timeout: float = 10.0) -> Scrape:
    """Scrape until `ready(scrape)` holds; the last scrape is returned."""
    last: list[Scrape | None] = [None]

    def check() -> bool:
        last[0] = scrape = _scrape(port)
        return scrape is not None and bool(ready(scrape))

    wait_until(check, timeout)
    assert last[0] is not None, "/metrics never answered"
    return last[0]


def test_counters_match_what_the_stand_ins_received(agent, ga, amplitude, tmp_path):
    users = [f"metric-user-{i:02d}" for i in range(8)]
    exposures = [flag_notification(user, "checkout", "on") for user in users]
    tracks = [track_notification(user, "purchase", revenue=500) for user in users[:3]]
    total = len(exposures) + len(tracks)
    ga.fail_next(2, 500)
    amplitude.reject_fields_next([0])

    port = free_port()
    env = _env(
        agent.url,
        ga,
        amplitude,
        HEALTH_HOST="127.0.0.1",
        HEALTH_PORT=str(port),
        BUFFER_CAPACITY="5000",
    )
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, START_SECONDS)

        # Connected, nothing received yet.
        before = _scrape_when(port, lambda s: s.value("listener_stream_connected") == 1)
        assert before.value("listener_seconds_since_last_notification") == -1
        assert before.value("listener_build_info", version=VERSION) == 1
        assert before.value("listener_buffer_capacity") == 5000
        assert before.value("listener_buffer_depth") == 0
        assert before.count("listener_events_delivered", destination="ga4") == 0

        agent.publish_many(exposures + tracks)
        assert ga.wait_for_events(total, 15)
        assert amplitude.wait_for_unique(total - 1, 15)
        assert wait_until(lambda: len(daemon.dead_letters()) == 1, 10)

        def settled(scrape: Scrape) -> bool:
            return scrape.count("listener_events_delivered", destination="ga4") == len(
                ga.events()
            ) and scrape.count(
                "listener_events_delivered", destination="amplitude"
            ) == len(amplitude.unique_events())

        after = _scrape_when(port, settled)
        assert settled(after), after.text

        # What each stand-in received and answered.
        assert amplitude.duplicates == 0
        assert after.count("listener_notifications_received", type="flag") == len(
            exposures
        )
        assert after.count("listener_notifications_received", type="track") == len(
            tracks
        )
        ga_failed_events = sum(len(r.body["events"]) for r in ga.faulted)
        assert (
            after.count("listener_http_responses", destination="ga4", status="500") == 2
        )
        assert after.count(
            "listener_http_responses", destination="ga4", status="204"
        ) == len(ga.requests)
        assert (
            after.count("listener_events_retried", destination="ga4", reason="500")
            == ga_failed_events
        )
        assert after.count(
            "listener_http_responses", destination="amplitude", status="400"
        ) == amplitude.requests_by_status.get(400)
        assert after.count(
            "listener_http_responses", destination="amplitude", status="200"
        ) == amplitude.requests_by_status.get(200)
        assert (
            after.count(
                "listener_events_dead_lettered",
                destination="amplitude",
                reason="invalid_fields",
            )
            == 1
        )
        assert after.count("listener_events_retried", destination="amplitude") == 0

        # Every delivered event's latency was observed once.
        for name in ("ga4", "amplitude"):
            assert after.value(
                "listener_delivery_latency_seconds_count", destination=name
            ) == after.count("listener_events_delivered", destination=name)
            depth = after.value("listener_destination_queue_depth", destination=name)
            assert depth == 0
        assert after.value("listener_buffer_depth") == 0
        assert after.value("listener_seconds_since_last_notification") >= 0

        # The stream breaks and is opened again.
        agent.cut_streams()
        reopened = _scrape_when(
            port,
            lambda s: (
                s.count("listener_stream_reconnects") == 1
                and s.value("listener_stream_connected") == 1
            ),
        )
        assert reopened.count("listener_stream_reconnects") == 1
        assert reopened.value("listener_stream_connected") == 1
        agent.stop()
        gone = _scrape_when(port, lambda s: s.value("listener_stream_connected") == 0)
        assert gone.value("listener_stream_connected") == 0

        assert daemon.terminate() == 0

    # No label carries a user id or a key, and no key appears anywhere.
    for scrape in (before, after, reopened, gone):
        assert not scrape.label_values() & {*users, *SECRETS}
        assert_no_secrets(scrape.text)
        assert not [user for user in users if user in scrape.text]


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object with the four fixed fields."""
    entries = []
    for line in stderr.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert _JSON_TIME.fullmatch(entry["time"]), line
        assert entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert entry["logger"] and isinstance(entry["message"], str), line
        entries.append(entry)
    return entries


def test_json_logs_have_structured_retries_and_periodic_summaries(agent, ga, tmp_path):
    ga.fail_next(1, 503)
    env = _env(agent.url, ga, None, LOG_FORMAT="json", SUMMARY_INTERVAL_SECONDS="0.5")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, START_SECONDS)
        agent.publish(flag_notification("user-1", "checkout", "on"))
        assert ga.wait_for_events(1, 10)
        # Two summaries after the delivery show that they keep coming.
        assert wait_until(
            lambda: daemon.stderr.count("delivered 1, retried 1") >= 2, 10
        )
        assert daemon.terminate() == 0

    entries = _json_lines(daemon.stderr)
    [retry] = [e for e in entries if "retrying" in e["message"]]
    assert retry["level"] == "WARNING"
    assert retry["destination"] == "ga4"
    assert str(retry["status"]) == "503"
    assert retry["count"] == 1

    summaries = [e for e in entries if e["message"].startswith("summary:")]
    assert len(summaries) >= 2
    for summary in summaries:
        assert summary["level"] == "INFO"
        assert _SUMMARY.fullmatch(summary["message"]), summary["message"]
    assert any(
        "received 1, delivered 1, retried 1, dead-lettered 0, buffer depth 0"
        in summary["message"]
        for summary in summaries
    )
    assert_no_secrets(daemon.stderr)


def test_text_summaries_are_info_lines(agent, ga, tmp_path):
    env = _env(agent.url, ga, None, SUMMARY_INTERVAL_SECONDS="0.5")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, START_SECONDS)
        assert daemon.wait_for_stderr("summary: received 0", 10)
        assert daemon.terminate() == 0
    [line, *_] = [x for x in daemon.stderr.splitlines() if "summary:" in x]
    assert re.search(r" INFO +daemon: " + _SUMMARY.pattern + r"\Z", line), line


def test_a_refused_sdk_key_never_reaches_the_logs(ga, tmp_path):
    wrong_key = "wrong_key_Pq77"
    with AgentStreamStandIn(sdk_key=SDK_KEY) as agent:
        env = _env(agent.url, ga, None, OPTIMIZELY_SDK_KEY=wrong_key, LOG_LEVEL="DEBUG")
        for log_format in ("text", "json"):
            env["LOG_FORMAT"] = log_format
            with DaemonProcess(tmp_path, env) as daemon:
                # The Agent echoes the key: "... for SDK Key: <key>".
                assert daemon.wait_for_stderr("failed to instantiate", START_SECONDS)
                assert daemon.terminate() == 0
            assert wrong_key not in daemon.stderr
            assert "***" in daemon.stderr
            assert_no_secrets(daemon.stderr)
    assert agent.requests_by_status.get(500, 0) >= 2


def test_a_ga4_outage_never_prints_the_api_secret(agent, ga, tmp_path):
    # Dropped connections make requests raise errors that quote the full
    # URL, api_secret included.
    ga.outage(0)
    env = _env(agent.url, ga, None, LOG_LEVEL="DEBUG", RETRY_HORIZON_SECONDS="1")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, START_SECONDS)
        agent.publish_many(
            [flag_notification(f"user-{i}", "checkout", "on") for i in range(3)]
        )
        assert wait_until(lambda: len(daemon.dead_letters()) == 3, 15)
        assert daemon.terminate() == 0

    assert ga.dropped >= 3
    assert "retrying" in daemon.stderr
    assert "gave up on" in daemon.stderr
    assert_no_secrets(daemon.stderr, daemon.stdout, daemon.dead_letter_text())
