"""The real daemon between the Agent stand-in and both destination stand-ins.

Each test counts what truly arrived at the stand-ins: every exposure and
conversion delivered once to Amplitude (by insert_id) and at least once to
GA4, each failure mode handled as specified, nothing lost in silence.
"""

from __future__ import annotations

import time

from tests.harness import (
    SDK_KEY,
    DaemonProcess,
    assert_no_secrets,
    destination_env,
    flag_notification,
    track_notification,
    wait_until,
)


def _env(agent, ga, amplitude, **extra: str) -> dict[str, str]:
    return {
        "OPTIMIZELY_SDK_KEY": SDK_KEY,
        "OPTIMIZELY_AGENT_BASE_URL": agent.url,
        **destination_env(ga, amplitude),
        **extra,
    }


def _traffic(users: int, per_user: int) -> list[dict]:
    """Interleaved exposures and a conversion per user, in a known order."""
    notes = []
    for step in range(per_user):
        for user in range(users):
            notes.append(flag_notification(f"user-{user}", f"flag_{step}", f"v{step}"))
    for user in range(users):
        notes.append(track_notification(f"user-{user}", "purchase", revenue=1999))
    return notes


def _amplitude_order(amplitude) -> dict[str, list[str]]:
    order: dict[str, list[str]] = {}
    for event in amplitude.unique_events():
        label = event["event_properties"].get("flag_key") or event["event_type"]
        order.setdefault(event["user_id"], []).append(label)
    return order


def test_every_event_arrives_once_in_order_per_user(agent, ga, amplitude, tmp_path):
    notes = _traffic(users=20, per_user=5)
    with DaemonProcess(tmp_path, _env(agent, ga, amplitude)) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(notes)
        assert amplitude.wait_for_unique(len(notes), 20)
        assert ga.wait_for_events(len(notes), 20)
        assert daemon.terminate() == 0

    assert amplitude.duplicates == 0
    expected = [f"flag_{step}" for step in range(5)] + ["purchase"]
    assert all(labels == expected for labels in _amplitude_order(amplitude).values())
    purchases = [e for e in amplitude.unique_events() if e["event_type"] == "purchase"]
    assert {e["revenue"] for e in purchases} == {19.99}

    ga_events = ga.events()
    assert len(ga_events) == len(notes)
    ga_purchases = [e.event for e in ga_events if e.event["name"] == "purchase"]
    assert {(e["params"]["value"], e["params"]["currency"]) for e in ga_purchases} == {
        (19.99, "USD")
    }
    assert not ga.violations
    by_client: dict[str, list[str]] = {}
    for item in ga_events:
        name = item.event["params"].get("optimizely_flag", item.event["name"])
        by_client.setdefault(item.client_id, []).append(name)
    assert len(by_client) == 20
    assert all(names == expected for names in by_client.values())
    # A user's simultaneous exposures share requests: far fewer than events.
    assert len(ga.requests) < len(notes)
    assert daemon.dead_letters() == []
    assert_no_secrets(daemon.stdout, daemon.stderr)


def test_amplitude_outage_does_not_delay_ga4(agent, ga, amplitude, tmp_path):
    amplitude.outage(503)
    with DaemonProcess(tmp_path, _env(agent, ga, amplitude)) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(_traffic(users=10, per_user=2))
        # GA4 gets everything while Amplitude is still answering 503.
        assert ga.wait_for_events(30, 10)
        assert amplitude.unique_events() == []
        assert wait_until(lambda: len(amplitude.faulted) >= 3, 10)

        amplitude.recover()
        assert amplitude.wait_for_unique(30, 15)
        assert daemon.terminate() == 0

    assert "amplitude answered 503; retrying" in daemon.stderr
    assert daemon.dead_letters() == []


def test_ga4_outage_does_not_delay_amplitude(agent, ga, amplitude, tmp_path):
    ga.outage(500)
    with DaemonProcess(tmp_path, _env(agent, ga, amplitude)) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(_traffic(users=10, per_user=2))
        assert amplitude.wait_for_unique(30, 10)
        assert ga.events() == []
        ga.recover()
        assert ga.wait_for_events(30, 15)
        assert daemon.terminate() == 0
    assert daemon.dead_letters() == []


def test_invalid_events_are_dead_lettered_and_the_rest_resent(
    agent, ga, amplitude, tmp_path
):
    amplitude.reject_fields_next([1, 3])
    env = _env(agent, None, amplitude, AMPLITUDE_FLUSH_INTERVAL_SECONDS="0.5")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(
            [flag_notification(f"user-{i}", "checkout", "on") for i in range(6)]
        )
        assert amplitude.wait_for_unique(4, 10)
        assert wait_until(lambda: len(daemon.dead_letters()) == 2, 10)
        assert daemon.terminate() == 0

    letters = daemon.dead_letters()
    assert {letter["reason"] for letter in letters} == {"invalid_fields"}
    assert {letter["status"] for letter in letters} == {400}
    delivered = {e["user_id"] for e in amplitude.unique_events()}
    rejected = {letter["event"]["user_id"] for letter in letters}
    assert delivered | rejected == {f"user-{i}" for i in range(6)}
    assert not delivered & rejected
    assert_no_secrets(daemon.dead_letter_text())


def test_payload_too_large_is_split_until_it_fits(agent, amplitude, tmp_path):
    amplitude.too_large_over(3)
    env = _env(agent, None, amplitude, AMPLITUDE_FLUSH_INTERVAL_SECONDS="0.5")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(
            [flag_notification(f"user-{i}", "checkout", "on") for i in range(10)]
        )
        assert amplitude.wait_for_unique(10, 15)
        assert daemon.terminate() == 0
    assert amplitude.requests_by_status.get(413, 0) >= 1
    assert amplitude.duplicates == 0
    assert daemon.dead_letters() == []


def test_throttled_users_wait_while_others_go_at_once(agent, amplitude, tmp_path):
    amplitude.throttle_next({"user-0": 40})
    env = _env(
        agent,
        None,
        amplitude,
        AMPLITUDE_FLUSH_INTERVAL_SECONDS="0.5",
        AMPLITUDE_THROTTLE_SECONDS="3",
    )
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(
            [flag_notification(f"user-{i % 3}", f"flag_{i}", "on") for i in range(9)]
        )
        assert amplitude.wait_for_unique(6, 10)
        first_others = time.monotonic()
        assert {e["user_id"] for e in amplitude.unique_events()} == {"user-1", "user-2"}
        assert amplitude.wait_for_unique(9, 15)
        held_for = time.monotonic() - first_others
        assert daemon.terminate() == 0
    assert held_for > 1.0
    assert _amplitude_order(amplitude)["user-0"] == ["flag_0", "flag_3", "flag_6"]
    assert "throttled" in daemon.stderr


def test_daily_quota_users_are_dead_lettered(agent, amplitude, tmp_path):
    amplitude.throttle_next({}, daily_quota_users={"user-0": 500_001})
    env = _env(agent, None, amplitude, AMPLITUDE_FLUSH_INTERVAL_SECONDS="0.5")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(
            [flag_notification(f"user-{i}", "f", "on") for i in range(3)]
        )
        assert amplitude.wait_for_unique(2, 10)
        assert wait_until(daemon.dead_letters, 10)
        assert daemon.terminate() == 0
    assert [letter["reason"] for letter in daemon.dead_letters()] == ["daily_quota"]


def test_server_errors_and_dropped_connections_are_retried(
    agent, ga, amplitude, tmp_path
):
    amplitude.fail_next(2, 500)
    amplitude.drop_next(1)
    ga.fail_next(1, 429, retry_after=0.2)
    ga.drop_next(1)
    with DaemonProcess(tmp_path, _env(agent, ga, amplitude)) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many([flag_notification("user-1", "f", "on")])
        assert amplitude.wait_for_unique(1, 15)
        assert ga.wait_for_events(1, 15)
        assert daemon.terminate() == 0
    assert len(amplitude.faulted) == 3
    assert len(ga.faulted) == 2
    assert daemon.stderr.count("retrying 1 events") == 5
    assert daemon.dead_letters() == []


def test_retry_horizon_dead_letters_and_replay_sends_them(agent, amplitude, tmp_path):
    amplitude.outage(503)
    env = _env(agent, None, amplitude, RETRY_HORIZON_SECONDS="1")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(
            [flag_notification(f"user-{i}", "f", "on") for i in range(4)]
        )
        assert wait_until(lambda: len(daemon.dead_letters()) == 4, 15)
        assert daemon.terminate() == 0
    letters = daemon.dead_letters()
    assert {letter["reason"] for letter in letters} == {"retries_exhausted"}
    assert {letter["status"] for letter in letters} == {503}
    assert "gave up on" in daemon.stderr

    amplitude.recover()
    dead_letter_file = daemon.env["DEAD_LETTER_PATH"]
    with DaemonProcess(tmp_path, env, "replay", dead_letter_file) as replay:
        assert replay.wait(30) == 0
    assert amplitude.wait_for_unique(4, 5)
    assert "4 delivered, 0 still failing" in replay.stderr


def test_sigterm_during_an_outage_dead_letters_everything_undelivered(
    agent, ga, amplitude, tmp_path
):
    amplitude.outage(503)
    ga.outage(503)
    env = _env(agent, ga, amplitude, SHUTDOWN_TIMEOUT_SECONDS="2")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many(
            [flag_notification(f"user-{i}", "f", "on") for i in range(5)]
        )
        assert wait_until(lambda: len(amplitude.faulted) and len(ga.faulted), 10)
        started = time.monotonic()
        assert daemon.terminate() == 0
        took = time.monotonic() - started
    assert took < 2 + 3  # the timeout, plus start-up of the interpreter's exit
    letters = daemon.dead_letters()
    assert sorted((x["destination"], x["reason"]) for x in letters) == sorted(
        [("amplitude", "shutdown")] * 5 + [("ga4", "shutdown")] * 5
    )
    assert "amplitude: delivered=0" in daemon.stderr


def test_ga4_validation_messages_are_logged_and_counted(agent, ga, tmp_path):
    env = _env(agent, ga, None, GA_DEBUG_MODE="true")
    # A client id attribute GA would refuse: the daemon derives its own, so
    # the validation server finds nothing; send an event key GA may dislike.
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, 10)
        agent.publish_many([track_notification("user-1", "purchase", revenue=100)])
        assert wait_until(lambda: ga.requests, 10)
        assert daemon.terminate() == 0
    request = ga.requests[0]
    assert request.path == "/debug/mp/collect"
    assert ga.events() == []  # the validation server never reaches reports
