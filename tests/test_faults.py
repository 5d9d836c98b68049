"""The real daemon under faults: nothing published is lost, or its loss is recorded.

Each test runs `python main.py` against the loopback stand-ins and breaks
something on purpose: the Agent restarting mid-flood, a destination down
for longer than memory can hold, `kill -9`, SIGTERM in an outage, slow or
hanging-up destinations, a spool that cannot be written. Then it counts
what the stand-ins received. Every test also checks that no secret reached
stdout, stderr, the dead-letter file, the spool or /metrics.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from standins.amplitude import AmplitudeStandIn
from tests.harness import (
    SDK_KEY,
    DaemonProcess,
    assert_no_secrets,
    destination_env,
    flag_notification,
    free_port,
    track_notification,
    wait_until,
)

RECEIVED = "listener_notifications_received_total"
DELIVERED = "listener_events_delivered_total"
DROPPED = "listener_buffer_dropped_total"
GAP_LINE = re.compile(
    r"(the stream broke \(\w+\)|the Agent closed the stream) after [\d.]+ s; "
    r"retrying in [\d.]+ s"
)
UNREACHABLE = "cannot reach the Agent"
BUFFER_DROP_LINE = re.compile(r"buffer dropped (\d+) notifications \(overflow_drop")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _env(agent, ga, amplitude, **extra: str) -> dict[str, str]:
    return {
        "OPTIMIZELY_SDK_KEY": SDK_KEY,
        "OPTIMIZELY_AGENT_BASE_URL": agent.url,
        "RECONNECT_MAX_SECONDS": "0.3",
        "RETRY_INITIAL_SECONDS": "0.05",
        "RETRY_MAX_SECONDS": "0.2",
        "SHUTDOWN_TIMEOUT_SECONDS": "5",
        "HEALTH_PORT": str(free_port()),
        **destination_env(ga, amplitude),
        **extra,
    }


def _users(count: int, prefix: str = "user") -> list[dict]:
    """One exposure per user, so each is a distinct event at every destination."""
    return [flag_notification(f"{prefix}-{i}", "checkout", "on") for i in range(count)]


def _scrape(daemon: DaemonProcess) -> str:
    """The /metrics text, or "" while the endpoint is not up."""
    url = f"http://127.0.0.1:{daemon.env['HEALTH_PORT']}/metrics"
    try:
        with _NO_PROXY.open(url, timeout=2) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return ""


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample, _, value = line.rpartition(" ")
        if sample.split("{", 1)[0] != name:
            continue
        if all(f'{key}="{wanted}"' in sample for key, wanted in labels.items()):
            total += float(value)
    return total


def _wait_metrics(
    daemon: DaemonProcess, ready: Callable[[str], bool], timeout: float = 15
) -> str:
    """The /metrics text once `ready(text)` holds; fails the test at the timeout."""
    text = wait_until(lambda: (t := _scrape(daemon)) and ready(t) and t, timeout)
    assert text, f"metrics not ready within {timeout} s"
    return text


def _wait_received(daemon: DaemonProcess, count: int) -> str:
    """Wait until the workers have read exactly `count` notifications.

    With a spool, a notification is on disk before any worker can read it.
    """
    text = _wait_metrics(daemon, lambda t: _metric(t, RECEIVED) >= count)
    assert _metric(text, RECEIVED) == count
    return text


def _spool_bytes(directory: Path) -> str:
    if not directory.exists():
        return ""
    return "".join(
        path.read_bytes().decode("latin-1")
        for path in sorted(directory.iterdir())
        if path.is_file()
    )


def _spool_rows(directory: Path) -> int:
    """Rows in the spool, read as another process would while the daemon runs."""
    with contextlib.closing(sqlite3.connect(directory / "spool.sqlite3")) as db:
        return db.execute("SELECT COUNT(*) FROM notifications").fetchone()[0]


def _assert_clean(*daemons: DaemonProcess, spool: Path | None = None, metrics=()):
    """No secret in anything an operator or an attacker could read."""
    for daemon in daemons:
        assert_no_secrets(daemon.stdout, daemon.stderr, daemon.dead_letter_text())
    assert_no_secrets(*metrics)
    if spool is not None:
        assert_no_secrets(_spool_bytes(spool))


def _assert_once_by_insert_id(amplitude: AmplitudeStandIn, count: int) -> None:
    """Exactly `count` events; any repeat is a repeat of a known insert_id."""
    unique = amplitude.unique_events()
    assert len(unique) == count
    assert len({(e["user_id"], e["event_type"]) for e in unique}) == count
    unique_ids = {e["insert_id"] for e in unique}
    assert {e["insert_id"] for e in amplitude.events()} == unique_ids


# -- the Agent restarting --------------------------------------------------------

ROUNDS = 11
BURST = 50


def test_agent_restarting_ten_times_during_a_flood(agent, amplitude, tmp_path):
    sent = 0
    with DaemonProcess(tmp_path, _env(agent, None, amplitude)) as daemon:
        for round_number in range(ROUNDS):
            assert agent.wait_for_connected(1, 10), f"round {round_number}"
            notes = _users(BURST, prefix=f"r{round_number}")
            assert agent.publish_many(notes) == BURST
            sent += BURST
            # Everything sent must be read before the Agent goes away again.
            _wait_received(daemon, sent)
            if round_number == ROUNDS - 1:
                break
            agent.stop()
            # The listener notices the gap, then fails to reach the Agent
            # at least once, before the Agent comes back.
            gaps = round_number + 1
            assert wait_until(
                lambda n=gaps: (
                    len(GAP_LINE.findall(daemon.stderr)) >= n
                    and daemon.stderr.count(UNREACHABLE) >= n
                ),
                10,
            )
            agent.start()

        assert amplitude.wait_for_unique(sent, 20)
        metrics = _scrape(daemon)
        assert daemon.terminate() == 0

    assert agent.connections_total >= ROUNDS
    assert len(GAP_LINE.findall(daemon.stderr)) == ROUNDS - 1
    # Said once per gap, however many attempts the gap took.
    assert daemon.stderr.count(UNREACHABLE) == ROUNDS - 1
    assert _metric(metrics, "listener_stream_reconnects_total") >= ROUNDS - 1
    _assert_once_by_insert_id(amplitude, sent)
    assert amplitude.duplicates == 0
    assert daemon.dead_letters() == []
    _assert_clean(daemon, metrics=[metrics])


# -- a destination down for longer than memory can hold ----------------------------

N = 200
TINY = {"BUFFER_CAPACITY": "20", "DESTINATION_QUEUE_CAPACITY": "20"}


def test_a_long_amplitude_outage_loses_nothing_with_a_spool(agent, amplitude, tmp_path):
    spool = tmp_path / "spool"
    amplitude.outage(503)
    env = _env(agent, None, amplitude, SPOOL_PATH=str(spool), **TINY)
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(N)) == N
        assert wait_until(lambda: len(amplitude.faulted) >= 3, 10)
        # All of it on disk, none acknowledged, while the outage lasts.
        assert wait_until(lambda: _spool_rows(spool) == N, 10)

        amplitude.recover()
        assert amplitude.wait_for_unique(N, 30)
        metrics = _scrape(daemon)
        assert daemon.terminate() == 0

    _assert_once_by_insert_id(amplitude, N)
    assert daemon.dead_letters() == []
    assert _metric(metrics, DROPPED) == 0
    assert _spool_rows(spool) == 0
    _assert_clean(daemon, spool=spool, metrics=[metrics])


def test_a_long_ga4_outage_loses_nothing_with_a_spool(agent, ga, tmp_path):
    spool = tmp_path / "spool"
    ga.outage(500)
    env = _env(agent, ga, None, SPOOL_PATH=str(spool), GA_CONCURRENCY="8", **TINY)
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(N)) == N
        assert wait_until(lambda: len(ga.faulted) >= 8, 10)
        assert wait_until(lambda: _spool_rows(spool) == N, 10)

        ga.recover()
        assert ga.wait_for_events(N, 30)
        metrics = _scrape(daemon)
        assert daemon.terminate() == 0

    events = ga.events()
    assert len({item.client_id for item in events}) == N
    assert not ga.violations
    assert daemon.dead_letters() == []
    assert _metric(metrics, DROPPED) == 0
    _assert_clean(daemon, spool=spool, metrics=[metrics])


def test_without_a_spool_the_loss_is_recorded_never_silent(agent, amplitude, tmp_path):
    amplitude.outage(503)
    with DaemonProcess(tmp_path, _env(agent, None, amplitude, **TINY)) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(N)) == N
        # Every notification read is either processed or dropped by now.
        _wait_metrics(daemon, lambda t: _metric(t, RECEIVED) + _metric(t, DROPPED) == N)

        amplitude.recover()

        def accounted(text: str) -> bool:
            delivered = len(amplitude.unique_events())
            return delivered + len(daemon.dead_letters()) + _metric(text, DROPPED) == N

        metrics = _wait_metrics(daemon, accounted, 30)
        assert daemon.terminate() == 0

    letters = daemon.dead_letters()
    dropped = _metric(metrics, DROPPED)
    delivered = amplitude.unique_events()
    assert letters or dropped
    assert {letter["reason"] for letter in letters} <= {"queue_overflow"}
    # Each dead letter is the event itself, ready for `main.py replay`.
    lost_users = {letter["event"]["user_id"] for letter in letters}
    assert not lost_users & {e["user_id"] for e in delivered}
    assert amplitude.duplicates == 0
    # The counters agree with what the stand-in and the file saw ...
    assert _metric(metrics, DELIVERED) == len(delivered)
    assert _metric(
        metrics, "listener_events_dead_lettered_total", reason="queue_overflow"
    ) == len(letters)
    # ... and so does the log: every buffer drop in a warning (the last ones
    # at shutdown), and both kinds of loss in the exit summary.
    logged_drops = sum(int(n) for n in BUFFER_DROP_LINE.findall(daemon.stderr))
    assert logged_drops == dropped
    assert f"delivered={len(delivered)} " in daemon.stderr
    assert f"dead_lettered={len(letters)} " in daemon.stderr
    if dropped:
        assert f"overflow_drop_oldest={int(dropped)}" in daemon.stderr
    _assert_clean(daemon, metrics=[metrics])


# -- kill -9 and SIGTERM ---------------------------------------------------------------


def test_kill_9_with_events_waiting_resends_them_after_a_restart(
    agent, amplitude, tmp_path
):
    spool = tmp_path / "spool"
    env = _env(agent, None, amplitude, SPOOL_PATH=str(spool))
    first = DaemonProcess(tmp_path, env)
    with first:
        assert agent.wait_for_connected(1, 10)
        # Some delivered (their acknowledgements may still be batched) ...
        assert agent.publish_many(_users(20, prefix="early")) == 20
        assert amplitude.wait_for_unique(20, 10)
        # ... and some waiting on an outage.
        amplitude.outage(503)
        assert agent.publish_many(_users(30, prefix="late")) == 30
        _wait_received(first, 50)
        assert wait_until(lambda: len(amplitude.faulted) >= 2, 10)
        first.kill()

    waiting = _spool_rows(spool)
    assert 30 <= waiting <= 50
    second = DaemonProcess(tmp_path, {**env, "HEALTH_PORT": str(free_port())})
    with second:
        assert second.wait_for_stderr(
            f"spool holds {waiting} unacknowledged notifications", 10
        )
        amplitude.recover()
        assert amplitude.wait_for_unique(50, 20)
        metrics = _scrape(second)
        assert second.terminate() == 0

    _assert_once_by_insert_id(amplitude, 50)
    assert second.dead_letters() == []
    assert _spool_rows(spool) == 0
    _assert_clean(first, second, spool=spool, metrics=[metrics])


def test_sigterm_in_an_outage_keeps_everything_in_the_spool(agent, amplitude, tmp_path):
    spool = tmp_path / "spool"
    amplitude.outage(503)
    env = _env(
        agent,
        None,
        amplitude,
        SPOOL_PATH=str(spool),
        SHUTDOWN_TIMEOUT_SECONDS="2",
        **TINY,
    )
    count = 100
    with DaemonProcess(tmp_path, env) as first:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(count)) == count
        assert wait_until(lambda: len(amplitude.faulted) >= 2, 10)
        assert wait_until(lambda: _spool_rows(spool) == count, 10)
        started = time.monotonic()
        assert first.terminate() == 0
        took = time.monotonic() - started

    assert took < 2 + 3
    assert first.dead_letters() == []
    assert "stay in the spool" in first.stderr
    assert _spool_rows(spool) == count

    amplitude.recover()
    env["HEALTH_PORT"] = str(free_port())
    with DaemonProcess(tmp_path, env) as second:
        assert second.wait_for_stderr(
            f"spool holds {count} unacknowledged notifications", 10
        )
        assert amplitude.wait_for_unique(count, 20)
        metrics = _scrape(second)
        assert second.terminate() == 0

    _assert_once_by_insert_id(amplitude, count)
    assert second.dead_letters() == []
    _assert_clean(first, second, spool=spool, metrics=[metrics])


def test_sigterm_in_an_outage_without_a_spool_dead_letters_the_rest(
    agent, ga, amplitude, tmp_path
):
    amplitude.outage(503)
    env = _env(agent, ga, amplitude, SHUTDOWN_TIMEOUT_SECONDS="2")
    count = 20
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(count)) == count
        assert ga.wait_for_events(count, 10)
        assert wait_until(lambda: len(amplitude.faulted) >= 2, 10)
        metrics = _scrape(daemon)
        started = time.monotonic()
        assert daemon.terminate() == 0
        took = time.monotonic() - started

    assert took < 2 + 3
    letters = daemon.dead_letters()
    assert [letter["reason"] for letter in letters] == ["shutdown"] * count
    assert {letter["destination"] for letter in letters} == {"amplitude"}
    assert {letter["event"]["user_id"] for letter in letters} == {
        f"user-{i}" for i in range(count)
    }
    assert "amplitude: delivered=0 " in daemon.stderr
    assert f"dead_lettered={count} " in daemon.stderr
    _assert_clean(daemon, metrics=[metrics])


# -- slow and rude destinations --------------------------------------------------


def test_slow_destinations_get_everything_once(agent, ga, amplitude, tmp_path):
    amplitude.set_delay(1.5)
    ga.set_delay(1.5)
    env = _env(
        agent,
        ga,
        amplitude,
        HTTP_READ_TIMEOUT_SECONDS="5",
        GA_CONCURRENCY="16",
    )
    count = 12
    notes = [
        *_users(count - 2),
        track_notification("user-0", "purchase", revenue=500),
        track_notification("user-1", "purchase", revenue=700),
    ]
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(notes) == count
        assert amplitude.wait_for_unique(count, 20)
        assert ga.wait_for_events(count, 20)
        metrics = _scrape(daemon)
        assert daemon.terminate() == 0

    _assert_once_by_insert_id(amplitude, count)
    assert amplitude.duplicates == 0
    assert len(ga.events()) == count
    assert daemon.dead_letters() == []
    assert "retrying" not in daemon.stderr
    _assert_clean(daemon, metrics=[metrics])


def test_connections_dropped_mid_response_are_retried(agent, ga, amplitude, tmp_path):
    amplitude.drop_next(4)
    ga.drop_next(4)
    count = 10
    with DaemonProcess(tmp_path, _env(agent, ga, amplitude)) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(count)) == count
        assert amplitude.wait_for_unique(count, 20)
        assert ga.wait_for_events(count, 20)
        metrics = _scrape(daemon)
        assert daemon.terminate() == 0

    assert amplitude.dropped == 4 and ga.dropped == 4
    _assert_once_by_insert_id(amplitude, count)
    assert amplitude.duplicates == 0
    assert len({item.client_id for item in ga.events()}) == count
    assert daemon.dead_letters() == []
    assert _metric(metrics, "listener_http_responses_total", status="error") == 8
    _assert_clean(daemon, metrics=[metrics])


def test_a_timed_out_request_that_arrived_anyway_is_deduplicated(
    agent, amplitude, tmp_path
):
    # Amplitude ingests the request after the daemon gave up waiting for the
    # answer: the resend carries the same insert_ids, so it counts once.
    amplitude.set_delay(1.0)
    env = _env(agent, None, amplitude, HTTP_READ_TIMEOUT_SECONDS="0.3")
    count = 10
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(count)) == count
        assert amplitude.wait_for_events(count, 10)  # ingested, answer too late
        amplitude.set_delay(0)
        assert wait_until(lambda: amplitude.duplicates >= count, 10)
        metrics = _wait_metrics(daemon, lambda t: _metric(t, DELIVERED) == count)
        assert daemon.terminate() == 0

    _assert_once_by_insert_id(amplitude, count)
    assert daemon.dead_letters() == []
    assert "retrying" in daemon.stderr
    _assert_clean(daemon, metrics=[metrics])


# -- a spool that cannot be written ---------------------------------------------------


def test_an_unwritable_spool_falls_back_to_memory_and_delivers(
    agent, amplitude, tmp_path
):
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("the spool directory cannot be created under this")
    env = _env(agent, None, amplitude, SPOOL_PATH=str(blocker / "spool"))
    count = 20
    with DaemonProcess(tmp_path, env) as daemon:
        assert daemon.wait_for_stderr("keeping notifications in memory", 10)
        assert agent.wait_for_connected(1, 10)
        assert agent.publish_many(_users(count)) == count
        assert amplitude.wait_for_unique(count, 15)
        metrics = _scrape(daemon)
        assert daemon.terminate() == 0

    assert "spool open failed" in daemon.stderr
    assert daemon.stderr.count("keeping notifications in memory") == 1
    assert _metric(metrics, "listener_spool_errors_total") == 1
    _assert_once_by_insert_id(amplitude, count)
    assert daemon.dead_letters() == []
    assert blocker.read_text().startswith("the spool directory")
    _assert_clean(daemon, metrics=[metrics])
