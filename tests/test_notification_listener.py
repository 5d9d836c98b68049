"""Tests for notification_listener.py against Agents on 127.0.0.1 port 0.

`ScriptedAgent` is a raw-socket imitation that lets a test decide every byte
and every HTTP chunk; the `AgentStreamStandIn` plays the Agent's own rules
(status codes, filters, one chunk per notification).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest

import notification_listener
from event_buffer import MemoryBuffer
from logger_config import configure_logging
from metrics import Metrics
from notification_listener import STREAM_PATH, NotificationListener, StreamState
from settings import Settings
from standins.agent_stream import AgentStreamStandIn, load_sample_frames

SDK_KEY = "test_key"
FAST_RECONNECT_SECONDS = 0.05

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: keep-alive\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def wait_until(condition, timeout_seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def wait_for_failure(listener: NotificationListener) -> str:
    """The detail of the first FAILING state seen (only FAILING has one)."""
    seen: list[str] = []

    def failing() -> bool:
        # The detail is assigned after the state, so read it first.
        detail = listener.state_detail
        if detail and listener.state is StreamState.FAILING:
            seen.append(detail)
        return bool(seen)

    assert wait_until(failing), listener.state
    return seen[0]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased


class Connection:
    """One accepted stream request; the test writes its answer byte by byte."""

    def __init__(self, sock: socket.socket, request: Request) -> None:
        self.sock = sock
        self.request = request

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cut(self) -> None:
        """Close with no terminating chunk, as a dying Agent would."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class ScriptedAgent:
    """Accepts connections on 127.0.0.1:0 and records each request.

    With `refusal` set, every request gets that answer at once; otherwise the
    connection is handed to the test through `next_connection()`.
    """

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.requests: list[Request] = []
        self.refusal: bytes | None = None
        self._accepted: queue.Queue[Connection] = queue.Queue()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(
            target=self._serve, name="scripted-agent", daemon=True
        )
        self._thread.start()

    def next_connection(self, timeout_seconds: float = 5.0) -> Connection:
        return self._accepted.get(timeout=timeout_seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            self._sockets.append(sock)
            request = _read_request(sock)
            if request is None:
                sock.close()
                continue
            self.requests.append(request)
            if self.refusal is not None:
                sock.sendall(self.refusal)
                sock.close()
            else:
                self._accepted.put(Connection(sock, request))


def _read_request(sock: socket.socket) -> Request | None:
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            return None
        head += data
    request_line, *lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    return Request(method, parts.path, parse_qs(parts.query), headers)


def refusal(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body


@dataclass
class Running:
    listener: NotificationListener
    buffer: MemoryBuffer
    metrics: Metrics

    def payloads(self, count: int, timeout_seconds: float = 5.0) -> list:
        """Wait until `count` envelopes are buffered, then take them all."""
        assert wait_until(lambda: self.buffer.depth() >= count, timeout_seconds), (
            f"{self.buffer.depth()} of {count} frames arrived"
        )
        return self.buffer.take(10_000, 0)


@pytest.fixture
def agent():
    server = ScriptedAgent()
    yield server
    server.close()


@pytest.fixture
def standin():
    with AgentStreamStandIn(sdk_key=SDK_KEY) as server:
        yield server


@pytest.fixture
def start_listener():
    started: list[NotificationListener] = []

    def start(url: str, **overrides) -> Running:
        clock_ns = overrides.pop("clock_ns", time.time_ns)
        settings = Settings(
            **{
                "sdk_key": SDK_KEY,
                "agent_base_url": url,
                "dry_run": True,
                "reconnect_max_seconds": FAST_RECONNECT_SECONDS,
                "stream_connect_timeout_seconds": 2.0,
                **overrides,
            }
        )
        metrics = Metrics("test")
        buffer = MemoryBuffer(1000, "drop_oldest", metrics)
        listener = NotificationListener(settings, buffer, metrics, clock_ns=clock_ns)
        listener.start()
        started.append(listener)
        return Running(listener, buffer, metrics)

    yield start
    for listener in started:
        listener.stop(5)


class CapturedLogging:
    """configure_logging's output for one test, captured in memory."""

    def __init__(self) -> None:
        self._stream = io.StringIO()

    def configure(self, **kwargs) -> None:
        configure_logging(**kwargs)
        logging.getLogger().handlers[0].setStream(self._stream)

    def text(self) -> str:
        return self._stream.getvalue()


@pytest.fixture
def log_output():
    """Captured logging; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    urllib3_level = logging.getLogger("urllib3").level
    yield CapturedLogging()

    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logging.getLogger("urllib3").setLevel(urllib3_level)


# The request.


def test_request_carries_the_key_and_the_filter(agent, start_listener):
    start_listener(agent.url, notification_filter=("decision", "track"))

    request = agent.next_connection().request

    assert (request.method, request.path) == ("GET", STREAM_PATH)
    assert request.query == {"filter": ["decision,track"]}
    assert request.headers["x-optimizely-sdk-key"] == SDK_KEY
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["user-agent"].startswith("optimizely-agent-listener/")


def test_no_filter_means_no_query(agent, start_listener):
    start_listener(agent.url)

    assert agent.next_connection().request.query == {}


def test_the_filter_is_honoured_by_the_agent(standin, start_listener):
    running = start_listener(standin.url, notification_filter=("track",))
    assert standin.wait_for_connected(1, 5)
    decision, purchase = load_sample_frames()[0], load_sample_frames()[5]

    standin.publish(decision)
    standin.publish(purchase)

    assert [e.data for e in running.payloads(1)] == [purchase]


# Framing.


def test_frames_in_every_chunk_layout_arrive_exactly(agent, start_listener):
    running = start_listener(agent.url)
    connection = agent.next_connection()
    payloads = [
        b'{"n":1}',
        b'{"n":2}',
        b'{"n":3}',
        b'{"split":"across chunks"}',
        b'{"split":"before the blank line"}',
        b'{"bytes":"\xff\xfe not utf-8 \\u0026 \xc3\xa9"}',
        b'{"n":7}',
    ]

    # The status line and headers come only with the first frame.
    connection.send(STREAM_HEAD + chunk(frame(payloads[0])))
    connection.send(chunk(frame(payloads[1]) + frame(payloads[2])))
    connection.send(chunk(b'data: {"split":"acr'))
    connection.send(chunk(b'oss chunks"}\n\n'))
    connection.send(chunk(frame(payloads[4])[:-1]))
    connection.send(chunk(b"\n"))
    connection.send(chunk(frame(payloads[5]) + frame(payloads[6])[:5]))
    connection.send(chunk(frame(payloads[6])[5:]))

    taken = running.payloads(len(payloads))
    assert [e.data for e in taken] == payloads
    times = [e.received_ns for e in taken]
    assert all(a < b for a, b in itertools.pairwise(times))
    assert running.listener.received == len(payloads)


def test_receipt_times_rise_even_when_the_clock_stands_still(agent, start_listener):
    running = start_listener(agent.url, clock_ns=lambda: 5_000)
    connection = agent.next_connection()

    connection.send(STREAM_HEAD + chunk(frame(b"{}") * 3))
    connection.send(chunk(frame(b"[]")))

    assert [e.received_ns for e in running.payloads(4)] == [5000, 5001, 5002, 5003]


def test_sample_frames_arrive_byte_for_byte(standin, start_listener):
    running = start_listener(standin.url)
    assert standin.wait_for_connected(1, 5)
    frames = load_sample_frames()
    assert len(frames) == 9

    for payload in frames:
        standin.publish(payload)

    assert [e.data for e in running.payloads(len(frames))] == frames


# States.


def test_state_before_and_after_the_first_notification(agent, start_listener):
    running = start_listener(agent.url)
    connection = agent.next_connection()

    # The Agent sends nothing, not even headers, until a notification.
    assert wait_until(
        lambda: running.listener.state is StreamState.AWAITING_FIRST_NOTIFICATION
    )

    connection.send(STREAM_HEAD + chunk(frame(b"{}")))

    assert wait_until(lambda: running.listener.state is StreamState.STREAMING)
    running.listener.stop(5)
    assert running.listener.state is StreamState.STOPPED


def test_stop_returns_promptly_while_waiting_for_the_first_byte(agent, start_listener):
    running = start_listener(agent.url)
    agent.next_connection()
    assert wait_until(
        lambda: running.listener.state is StreamState.AWAITING_FIRST_NOTIFICATION
    )

    started = time.monotonic()
    running.listener.stop(5)

    assert time.monotonic() - started < 1.0
    assert not running.listener.is_alive()
    assert running.listener.state is StreamState.STOPPED
    assert len(agent.requests) == 1


def test_stop_returns_promptly_while_streaming(agent, start_listener):
    running = start_listener(agent.url)
    connection = agent.next_connection()
    connection.send(STREAM_HEAD + chunk(frame(b"{}")))
    running.payloads(1)

    started = time.monotonic()
    running.listener.stop(5)

    assert time.monotonic() - started < 1.0
    assert not running.listener.is_alive()
    assert len(agent.requests) == 1


def test_stop_is_safe_twice_and_before_start(agent):
    metrics = Metrics("test")
    settings = Settings(sdk_key=SDK_KEY, agent_base_url=agent.url, dry_run=True)
    listener = NotificationListener(
        settings, MemoryBuffer(10, "drop_oldest", metrics), metrics
    )

    listener.stop(1)
    listener.stop(1)

    assert not listener.is_alive()


# Reconnecting.


def test_reconnects_after_the_stream_is_cut(agent, start_listener, caplog):
    caplog.set_level(logging.INFO, logger="notification_listener")
    running = start_listener(agent.url)
    first = agent.next_connection()
    first.send(STREAM_HEAD + chunk(frame(b'{"n":1}') + b'data: {"partial'))
    assert [e.data for e in running.payloads(1)] == [b'{"n":1}']

    first.cut()
    second = agent.next_connection()
    second.send(STREAM_HEAD + chunk(frame(b'{"n":2}')))

    # The frame cut in half is never handed over.
    assert [e.data for e in running.payloads(1)] == [b'{"n":2}']
    assert running.metrics.total("listener_stream_reconnects") == 1
    assert second.request.headers["x-optimizely-sdk-key"] == SDK_KEY
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("the stream broke")


def test_reconnects_after_the_agent_ends_the_stream(agent, start_listener, caplog):
    caplog.set_level(logging.WARNING, logger="notification_listener")
    running = start_listener(agent.url)
    first = agent.next_connection()
    first.send(STREAM_HEAD + chunk(frame(b'{"n":1}')) + b"0\r\n\r\n")
    first.cut()

    second = agent.next_connection()
    second.send(STREAM_HEAD + chunk(frame(b'{"n":2}')))

    assert [e.data for e in running.payloads(2)] == [b'{"n":1}', b'{"n":2}']
    assert any(
        r.getMessage().startswith("the Agent closed the stream") for r in caplog.records
    )


def test_reconnects_after_the_standin_cuts_streams(standin, start_listener):
    running = start_listener(standin.url)
    assert standin.wait_for_connected(1, 5)
    frames = load_sample_frames()
    standin.publish(frames[0])
    assert [e.data for e in running.payloads(1)] == [frames[0]]

    assert standin.cut_streams() == 1
    assert standin.wait_for_connected(1, 5)
    standin.publish(frames[5])

    assert [e.data for e in running.payloads(1)] == [frames[5]]
    assert standin.connections_total == 2
    assert running.metrics.total("listener_stream_reconnects") == 1


def test_streams_cut_like_the_write_timeout_get_the_hint(
    agent, start_listener, caplog, monkeypatch
):
    # Streams that end about 10 s after connecting point at the Agent's
    # server.writeTimeout; widen that window so instant cuts fall in it.
    monkeypatch.setattr(notification_listener, "_WRITE_TIMEOUT_WINDOW", (0.0, 60.0))
    caplog.set_level(logging.WARNING, logger="notification_listener")
    running = start_listener(agent.url)

    for n in range(3):
        connection = agent.next_connection()
        connection.send(STREAM_HEAD + chunk(frame(b'{"n":%d}' % n)))
        running.payloads(1)
        connection.cut()
    agent.next_connection()

    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(messages) == 3
    assert messages[0][0] == logging.WARNING
    assert "WRITETIMEOUT" not in messages[0][1]
    for level, message in messages[1:]:
        assert level == logging.ERROR
        assert "OPTIMIZELY_SERVER_WRITETIMEOUT=0" in message


def test_the_stream_socket_uses_tcp_keepalive(agent, start_listener):
    # With no read timeout, keepalive is what notices a vanished Agent.
    running = start_listener(agent.url)
    agent.next_connection()
    assert wait_until(
        lambda: running.listener.state is StreamState.AWAITING_FIRST_NOTIFICATION
    )

    sock = running.listener._socket
    assert sock is not None
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    # urllib3 swaps the connect timeout for the read timeout (none) once the
    # request is out, which may be just after the Agent has read it.
    assert wait_until(lambda: sock.gettimeout() is None), sock.gettimeout()


def test_an_unreachable_agent_is_logged_once_and_retried(start_listener, caplog):
    caplog.set_level(logging.INFO, logger="notification_listener")
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
    # The port is closed now: every connect is refused.
    running = start_listener(url)

    assert wait_until(lambda: running.metrics.total("listener_stream_reconnects") >= 3)
    assert wait_for_failure(running.listener).startswith("unreachable: ")
    running.listener.stop(5)

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith(f"cannot reach the Agent at {url}")


# Refusals.

REFUSALS = {
    "disabled": (
        403,
        "Forbidden",
        b"Notification stream not enabled\n",
        "text/plain; charset=utf-8",
        "OPTIMIZELY_API_ENABLENOTIFICATIONS=true",
    ),
    "bad_key": (
        400,
        "Bad Request",
        b'{"error":"sdkKey failed validation"}\n',
        "application/json",
        "hyphens are not allowed",
    ),
    "unknown_key": (
        500,
        "Internal Server Error",
        b'{"error":"failed to instantiate Optimizely for SDK Key: test_key"}\n',
        "application/json",
        "cannot load a datafile",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal_is_logged_once_with_its_hint(name, agent, start_listener, caplog):
    caplog.set_level(logging.INFO, logger="notification_listener")
    status, reason, body, content_type, hint = REFUSALS[name]
    agent.refusal = refusal(status, reason, body, content_type)

    running = start_listener(agent.url)

    assert wait_until(lambda: len(agent.requests) >= 4)
    assert f"answered {status}" in wait_for_failure(running.listener)
    running.listener.stop(5)
    records = [r for r in caplog.records if r.name == "notification_listener"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.ERROR
    assert hint in records[0].getMessage()
    assert body.decode().strip() in records[0].getMessage()
    assert running.buffer.depth() == 0


@pytest.mark.parametrize(
    ("standin_options", "sdk_key", "status", "hint"),
    [
        ({"notifications_enabled": False}, SDK_KEY, 403, "ENABLENOTIFICATIONS"),
        ({}, "bad-key", 400, "hyphens are not allowed"),
        ({}, "unknown_key", 500, "cannot load a datafile"),
    ],
)
def test_standin_refusals(
    standin_options, sdk_key, status, hint, start_listener, caplog
):
    caplog.set_level(logging.INFO, logger="notification_listener")
    with AgentStreamStandIn(sdk_key=SDK_KEY, **standin_options) as agent:
        running = start_listener(agent.url, sdk_key=sdk_key)

        assert wait_until(lambda: agent.requests_by_status.get(status, 0) >= 3)
        detail = wait_for_failure(running.listener)
        started = time.monotonic()
        running.listener.stop(5)
        assert time.monotonic() - started < 1.0
        assert not running.listener.is_alive()

    assert detail.startswith(f"refused: the Agent answered {status}")
    [record] = caplog.records
    assert hint in record.getMessage()


def test_refused_key_is_masked_in_the_log(standin, start_listener, log_output):
    key = "wrong_key_SECRET42"
    log_output.configure(log_format="text", secrets=[key])

    running = start_listener(standin.url, sdk_key=key)

    assert wait_until(lambda: standin.requests_by_status.get(500, 0) >= 3)
    running.listener.stop(5)
    text = log_output.text()
    assert "SECRET42" not in text
    assert "failed to instantiate Optimizely for SDK Key: ***" in text
    assert "cannot load a datafile" in text
    assert text.count("the Agent answered 500") == 1
