"""The operator endpoint of a real daemon run, asked over HTTP.

Each test starts `python main.py` with the endpoint on a free loopback
port and follows /healthz and /readyz through one part of the daemon's
life: waiting for the Agent, connected, cut off, refused, draining and
wedged. The container health check script is run against it too.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import requests

from standins.agent_stream import AgentStreamStandIn
from tests.harness import (
    ROOT,
    SDK_KEY,
    DaemonProcess,
    assert_no_secrets,
    destination_env,
    flag_notification,
    free_port,
    wait_until,
)

# Long enough for a loaded machine to start an interpreter and connect.
START_SECONDS = 15.0


class Endpoint:
    """The daemon's operator endpoint; no proxy, short timeouts."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self._session = requests.Session()
        self._session.trust_env = False

    def get(self, path: str) -> requests.Response | None:
        """The answer, or None while nothing listens."""
        try:
            return self._session.get(self.base + path, timeout=2)
        except requests.ConnectionError:
            return None

    def status(self, path: str) -> int | None:
        response = self.get(path)
        return response.status_code if response is not None else None

    def wait_for(
        self,
        path: str,
        status: int,
        timeout: float,
        where: Callable[[dict[str, Any]], bool] = lambda body: True,
    ) -> dict[str, Any]:
        """Poll until `path` answers `status` with a body `where` accepts.

        Returns that body: the state it describes may change a moment later.
        """
        seen: list[requests.Response | None] = [None]

        def answered() -> bool:
            seen[0] = response = self.get(path)
            return (
                response is not None
                and response.status_code == status
                and where(response.json())
            )

        # A Response is falsy for 4xx and 5xx, so test for None instead.
        ok = wait_until(answered, timeout)
        last = seen[0]
        assert ok and last is not None, f"{path} never answered {status}; last: " + (
            f"{last.status_code} {last.text}" if last is not None else "no answer"
        )
        return last.json()


def _env(agent_url: str, amplitude, port: int, **extra: str) -> dict[str, str]:
    return {
        "OPTIMIZELY_SDK_KEY": SDK_KEY,
        "OPTIMIZELY_AGENT_BASE_URL": agent_url,
        **destination_env(None, amplitude),
        "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": str(port),
        **extra,
    }


def test_readiness_follows_the_agent_through_a_daemon_run(agent, amplitude, tmp_path):
    # The Agent is not up yet: its port is closed when the daemon starts.
    agent.stop()
    port = free_port()
    endpoint = Endpoint(port)
    with DaemonProcess(tmp_path, _env(agent.url, amplitude, port)) as daemon:
        body = endpoint.wait_for("/readyz", 503, START_SECONDS)
        assert body["ready"] == "no"
        assert body["stream"] in ("connecting", "failing")
        assert endpoint.status("/healthz") == 200

        # Connected: ready before the first notification, which is when the
        # Agent sends its status line.
        agent.start()
        assert agent.wait_for_connected(1, 10)
        body = endpoint.wait_for("/readyz", 200, 10)
        assert body == {
            "ready": "yes",
            "configuration": "loaded",
            "stream": "awaiting_first_notification",
        }
        agent.publish(flag_notification("user-1", "checkout", "on"))
        assert amplitude.wait_for_unique(1, 10)
        assert endpoint.wait_for("/readyz", 200, 5)["stream"] == "streaming"

        # The Agent goes away, then comes back on the same address.
        agent.stop()
        body = endpoint.wait_for("/readyz", 503, 10)
        assert body["stream"] in ("connecting", "failing")
        assert endpoint.status("/healthz") == 200
        agent.restart()
        assert agent.wait_for_connected(1, 10)
        endpoint.wait_for("/readyz", 200, 10)

        assert daemon.terminate() == 0
    assert_no_secrets(daemon.stderr)


def test_readiness_gives_the_agents_reason_for_refusing(amplitude, tmp_path):
    port = free_port()
    endpoint = Endpoint(port)
    with (
        AgentStreamStandIn(sdk_key=SDK_KEY, notifications_enabled=False) as agent,
        DaemonProcess(tmp_path, _env(agent.url, amplitude, port)) as daemon,
    ):
        body = endpoint.wait_for(
            "/readyz", 503, START_SECONDS, lambda body: "stream_detail" in body
        )
        assert body["stream"] == "failing"
        assert "403" in body["stream_detail"]
        assert "Notification stream not enabled" in body["stream_detail"]
        assert endpoint.status("/healthz") == 200

        # Once the Agent allows the stream, the next attempt makes it ready.
        agent.notifications_enabled = True
        assert agent.wait_for_connected(1, 10)
        assert "stream_detail" not in endpoint.wait_for("/readyz", 200, 10)
        assert daemon.terminate() == 0


def test_readiness_masks_the_sdk_key_the_agent_echoes(amplitude, tmp_path):
    wrong_key = "wrong_key_Pq77"
    port = free_port()
    endpoint = Endpoint(port)
    with AgentStreamStandIn(sdk_key=SDK_KEY) as agent:
        env = _env(agent.url, amplitude, port, OPTIMIZELY_SDK_KEY=wrong_key)
        with DaemonProcess(tmp_path, env) as daemon:
            # The Agent answers 500 "failed to instantiate ... SDK Key: <key>".
            body = endpoint.wait_for(
                "/readyz", 503, START_SECONDS, lambda body: "stream_detail" in body
            )
            assert agent.requests_by_status.get(500)
            assert body["stream"] == "failing"
            assert "failed to instantiate" in body["stream_detail"]
            assert "***" in body["stream_detail"]
            assert wrong_key not in str(body)
            assert daemon.terminate() == 0
    assert wrong_key not in daemon.stderr


def test_draining_is_not_ready_but_still_alive(agent, amplitude, tmp_path):
    amplitude.outage(503)
    port = free_port()
    endpoint = Endpoint(port)
    env = _env(agent.url, amplitude, port, SHUTDOWN_TIMEOUT_SECONDS="3")
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, START_SECONDS)
        endpoint.wait_for("/readyz", 200, 10)
        agent.publish_many(
            [flag_notification(f"user-{i}", "checkout", "on") for i in range(3)]
        )
        # Amplitude keeps failing, so the drain lasts until its deadline.
        assert wait_until(lambda: amplitude.faulted, 10)

        assert daemon.process is not None
        daemon.process.terminate()
        body = endpoint.wait_for("/readyz", 503, 3)
        assert body["lifecycle"] == "draining"
        assert endpoint.status("/healthz") == 200
        assert daemon.wait(10) == 0

    assert "received SIGTERM" in daemon.stderr
    assert {x["reason"] for x in daemon.dead_letters()} == {"shutdown"}


def test_a_stuck_sender_fails_liveness_until_it_returns(agent, amplitude, tmp_path):
    # The answer is held past WEDGED_AFTER_SECONDS but well inside the read
    # timeout, so the sender thread is busy on one request all that time.
    amplitude.set_delay(4)
    port = free_port()
    endpoint = Endpoint(port)
    env = _env(
        agent.url,
        amplitude,
        port,
        WEDGED_AFTER_SECONDS="1",
        HTTP_READ_TIMEOUT_SECONDS="60",
    )
    with DaemonProcess(tmp_path, env) as daemon:
        assert agent.wait_for_connected(1, START_SECONDS)
        assert endpoint.wait_for("/healthz", 200, 10) == {"status": "ok"}
        agent.publish(flag_notification("user-1", "checkout", "on"))

        body = endpoint.wait_for("/healthz", 503, 4)
        assert "amplitude-sender-0" in body["status"]
        assert amplitude.unique_events() == []

        # The held answer comes when its 4 s are up; later ones come at once.
        amplitude.set_delay(0)
        assert endpoint.wait_for("/healthz", 200, 10) == {"status": "ok"}
        assert amplitude.wait_for_unique(1, 5)
        agent.publish(flag_notification("user-2", "checkout", "on"))
        assert amplitude.wait_for_unique(2, 5)
        assert endpoint.status("/healthz") == 200
        assert daemon.terminate() == 0


def _healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "healthcheck.py")],
        env={"HEALTH_PORT": str(port)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_container_health_check_against_the_live_daemon(agent, amplitude, tmp_path):
    port = free_port()
    endpoint = Endpoint(port)
    with DaemonProcess(tmp_path, _env(agent.url, amplitude, port)) as daemon:
        endpoint.wait_for("/healthz", 200, START_SECONDS)
        alive = _healthcheck(port)
        assert alive.returncode == 0, alive.stderr
        assert endpoint.status("/nope") == 404
        assert daemon.terminate() == 0

    gone = _healthcheck(port)
    assert gone.returncode == 1
    assert "did not answer" in gone.stderr
