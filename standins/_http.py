"""Server plumbing shared by the loopback stand-ins.

`LoopbackServer` runs one threaded HTTP/1.1 server on 127.0.0.1 and keeps its
port across restarts. `DestinationStandIn` adds what the GA4 and Amplitude
stand-ins share: scripted faults, request records and waits on them. Nothing
here ever listens on anything but the loopback address.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"

# How often serve_forever looks for a shutdown request; stop() waits this long.
_SHUTDOWN_POLL_SECONDS = 0.02


class Exchange(BaseHTTPRequestHandler):
    """One request on a keep-alive connection, with helpers to answer it.

    Every answer goes out in a single write with a Content-Length, so clients
    can reuse the connection and no small write waits on a delayed ACK.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    _body: bytes | None = None

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The benchmark sends tens of thousands of requests; no access log.
        pass

    def do_GET(self) -> None:
        self.server.owner._dispatch(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def parse_request(self) -> bool:
        # One handler serves every request of a keep-alive connection.
        self._body = None
        return super().parse_request()

    @property
    def route(self) -> str:
        """The request path without its query string."""
        return urlsplit(self.path).path

    def query(self) -> dict[str, list[str]]:
        """Query parameters as Go reads them: repeatable, blanks kept."""
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)

    def read_body(self) -> bytes:
        """The whole request body (Content-Length or chunked), read once."""
        if self._body is None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._body = self._read_chunked()
            else:
                length = int(self.headers.get("Content-Length") or 0)
                self._body = self.rfile.read(length) if length > 0 else b""
        return self._body

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send a complete answer: status line, headers and body in one write."""
        self.read_body()  # an unread body would be taken for the next request
        lines = [f"HTTP/1.1 {status} {status_phrase(status)}", f"Date: {http_date()}"]
        if body or status not in (204, 304):
            lines.append(f"Content-Type: {content_type}")
        if status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.connection.sendall(head + body)

    def respond_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.respond(status, body, "application/json", headers)

    def hang_up(self) -> None:
        """Close the connection without another byte: no answer, no end chunk."""
        self.close_connection = True
        _shut(self.connection)

    def peer_gone(self) -> bool:
        """True once the client has closed its side of the connection."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: LoopbackServer, port: int) -> None:
        self.owner = owner
        super().__init__((LOOPBACK, port), Exchange)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{self.owner.name}-connection",
            daemon=True,
        )
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-exchange, and stop() cutting them off, are
        # routine here; anything else is a bug worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """A stand-in's HTTP server on 127.0.0.1 in a named background thread.

    The port is chosen by the kernel on the first `start()` and kept, so
    `stop()` then `start()` (or `restart()`) comes back on the same URL.
    `stop()` also cuts every open connection and is safe to call twice.
    Subclasses answer requests in `_dispatch`, one thread per connection.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{self.name} has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        """Listen and serve; a no-op when already running."""
        with self._lifecycle:
            if self._server is not None:
                return self
            self._stopping.clear()
            server = _Server(self, self._port)
            self._port = server.server_address[1]
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _SHUTDOWN_POLL_SECONDS},
                name=f"{self.name}-server",
                daemon=True,
            )
            self._server = server
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection; idempotent."""
        with self._lifecycle:
            server, self._server = self._server, None
            if server is None:
                return
            self._stopping.set()
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join()
            self._on_stop()
            with self._open_lock:
                open_sockets = list(self._open)
            for sock in open_sockets:
                _shut(sock)

    def restart(self) -> Self:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _on_stop(self) -> None:
        """Hook for subclasses to release what their handlers wait on."""

    def _dispatch(self, exchange: Exchange) -> None:
        raise NotImplementedError

    def _track(self, sock: socket.socket) -> None:
        with self._open_lock:
            self._open.add(sock)
        # A connection accepted just before stop() must not outlive it.
        if self._stopping.is_set():
            _shut(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(sock)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What a destination stand-in got, and what it answered."""

    method: str
    path: str
    query: dict[str, str]  # first value of each parameter
    headers: dict[str, str]
    body: Any  # parsed JSON; None when the body was not JSON
    size_bytes: int
    received_at: float  # wall-clock seconds
    status: int  # 0 when the connection was dropped unanswered
    answer: Any = None  # the JSON answered, if any


@dataclass(frozen=True, slots=True)
class _Fault:
    status: int  # 0: hang up without answering
    body: bytes = b""
    retry_after: str | None = None


class _FaultScript:
    """Queued and standing misbehaviour, consulted once per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: deque[_Fault] = deque()
        self._outage: _Fault | None = None
        self._outage_until: float | None = None  # monotonic; None = until recover
        self._delay_seconds = 0.0

    def queue(self, count: int, fault: _Fault) -> None:
        with self._lock:
            self._queued.extend([fault] * count)

    def outage(self, fault: _Fault, duration_seconds: float | None) -> None:
        with self._lock:
            self._outage = fault
            self._outage_until = (
                None
                if duration_seconds is None
                else time.monotonic() + duration_seconds
            )

    def recover(self) -> None:
        with self._lock:
            self._outage = None
            self._outage_until = None

    def set_delay(self, seconds: float) -> None:
        with self._lock:
            self._delay_seconds = max(0.0, seconds)

    def take(self) -> tuple[_Fault | None, float]:
        """The fault for the next request (if any) and the delay to apply."""
        with self._lock:
            until = self._outage_until
            if until is not None and time.monotonic() >= until:
                self._outage = None
                self._outage_until = None
            if self._outage is not None:
                return self._outage, self._delay_seconds
            fault = self._queued.popleft() if self._queued else None
            return fault, self._delay_seconds


class DestinationStandIn(LoopbackServer):
    """Base of the destination stand-ins: faults first, then the real answer.

    Every request is read whole. A scripted fault answers it (or drops it)
    and records it in `faulted`; otherwise `_serve` answers as the service
    would and records it in `requests`. Waits run on one condition that is
    notified whenever a record changes.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._faults = _FaultScript()
        self._changed = threading.Condition()
        self._requests: list[ReceivedRequest] = []
        self._faulted: list[ReceivedRequest] = []
        self._by_status: Counter[int] = Counter()
        self._dropped = 0

    # Fault scripting.

    def fail_next(
        self,
        count: int,
        status: int,
        body: bytes = b"",
        retry_after: float | str | None = None,
    ) -> None:
        """Answer the next `count` requests with `status` instead of serving.

        An empty `body` means the service's usual error body for that status.
        """
        self._faults.queue(count, _Fault(status, body, _header_value(retry_after)))

    def drop_next(self, count: int = 1) -> None:
        """Read the next `count` requests, then close without answering."""
        self._faults.queue(count, _Fault(0))

    def set_delay(self, seconds: float) -> None:
        """Hold every answer (faults included) for `seconds`; 0 to stop."""
        self._faults.set_delay(seconds)

    def outage(
        self,
        status: int,
        body: bytes = b"",
        retry_after: float | str | None = None,
    ) -> None:
        """Answer every request with `status` until `recover()`; 0 drops them."""
        self._faults.outage(_Fault(status, body, _header_value(retry_after)), None)

    def set_status_for(self, duration_seconds: float, status: int) -> None:
        """An outage that ends by itself after `duration_seconds`."""
        self._faults.outage(_Fault(status), duration_seconds)

    def recover(self) -> None:
        """End an outage; queued faults stay queued."""
        self._faults.recover()

    # Records.

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Requests the service itself answered, valid or not, in order."""
        with self._changed:
            return list(self._requests)

    @property
    def faulted(self) -> list[ReceivedRequest]:
        """Requests answered by a scripted fault or dropped (status 0)."""
        with self._changed:
            return list(self._faulted)

    @property
    def requests_by_status(self) -> dict[int, int]:
        """Answers sent, by status code; dropped requests are not answers."""
        with self._changed:
            return dict(self._by_status)

    @property
    def dropped(self) -> int:
        with self._changed:
            return self._dropped

    def _report_counts(self) -> dict[str, Any]:
        return {
            "requests": len(self._requests),
            "requests_by_status": dict(sorted(self._by_status.items())),
            "faulted": len(self._faulted),
            "dropped": self._dropped,
        }

    def _wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(ready, timeout)

    # Serving.

    def _dispatch(self, exchange: Exchange) -> None:
        raw = exchange.read_body()
        fault, delay_seconds = self._faults.take()
        if delay_seconds:
            self._stopping.wait(delay_seconds)
        if fault is None:
            self._serve(exchange, raw, _parse_json(raw))
            return

        record = self._received(exchange, raw, _parse_json(raw), fault.status)
        with self._changed:
            self._faulted.append(record)
            if fault.status:
                self._by_status[fault.status] += 1
            else:
                self._dropped += 1
            self._changed.notify_all()
        if not fault.status:
            exchange.hang_up()
            return
        body, content_type = (
            (fault.body, _sniff_type(fault.body))
            if fault.body
            else self._error_body(fault.status)
        )
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        exchange.respond(fault.status, body, content_type, headers)

    def _serve(self, exchange: Exchange, raw: bytes, body: Any) -> None:
        """Answer as the real service would, and record the request."""
        raise NotImplementedError

    def _error_body(self, status: int) -> tuple[bytes, str]:
        """The body and content type the service sends with an error status."""
        return b"", "text/plain"

    def _record(self, record: ReceivedRequest) -> None:
        """Record an answered request; call with `_changed` held."""
        self._requests.append(record)
        self._by_status[record.status] += 1
        self._changed.notify_all()

    @staticmethod
    def _received(
        exchange: Exchange, raw: bytes, body: Any, status: int, answer: Any = None
    ) -> ReceivedRequest:
        return ReceivedRequest(
            method=exchange.command,
            path=exchange.route,
            query={name: values[0] for name, values in exchange.query().items()},
            headers=dict(exchange.headers.items()),
            body=body,
            size_bytes=len(raw),
            received_at=time.time(),
            status=status,
            answer=answer,
        )


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _sniff_type(body: bytes) -> str:
    return "application/json" if body.lstrip()[:1] in (b"{", b"[") else "text/plain"


def _header_value(value: float | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return f"{value:g}"


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def http_date() -> str:
    """The current time as an HTTP Date header value."""
    return formatdate(usegmt=True)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
