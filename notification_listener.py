"""Reads the Agent's notification stream into the buffer, forever.

The Agent has sharp edges that shape this thread:
- it sends its status line and headers only together with the first
  notification and never sends heartbeats, so there is a connect timeout
  but no read timeout, and TCP keepalive finds a dead peer instead;
- a reader that stalls blocks the Agent's own decide and track calls, so
  this thread only reads, splits frames and hands them over, never waiting
  on the buffer;
- it keeps no history, so every reconnect is a gap worth logging.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from enum import Enum
from urllib.parse import urlencode

import requests
import sseclient
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_when_event_set,
    wait_random_exponential,
)
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from event_buffer import EventBuffer
from metrics import Metrics
from settings import VERSION, Settings

logger = logging.getLogger(__name__)

STREAM_PATH = "/v1/notifications/event-stream"

# A stream that lived this long before failing was healthy: the next
# reconnect starts again from the shortest backoff.
HEALTHY_PERIOD_SECONDS = 60.0

# The Agent's default server.writeTimeout cuts streams this long after the
# request began; streams that keep ending near it point at that setting.
_WRITE_TIMEOUT_WINDOW = (9.0, 12.0)
_WRITE_TIMEOUT_HINT_AFTER = 2

# Most frames handed to the buffer in one batch during a burst.
_HAND_OVER_BATCH = 512

_KEEPALIVE_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *(
        [
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        ]
        if hasattr(socket, "TCP_KEEPIDLE")
        else []
    ),
]


class StreamState(Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    AWAITING_FIRST_NOTIFICATION = "awaiting_first_notification"
    STREAMING = "streaming"
    FAILING = "failing"
    STOPPED = "stopped"


class StreamError(Exception):
    """The stream could not be opened or ended; the listener reconnects."""

    def __init__(self, message: str, *, kind: str, hint: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


class NotificationListener:
    """Owns the stream thread; `start()` once, `stop()` from anywhere."""

    def __init__(
        self,
        settings: Settings,
        buffer: EventBuffer,
        metrics: Metrics,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._settings = settings
        self._buffer = buffer
        self._metrics = metrics
        self._clock_ns = clock_ns
        self._last_ns = 0
        self._pending: list[tuple[bytes, int]] = []
        self._stopping = threading.Event()
        self._socket: socket.socket | None = None
        self._socket_lock = threading.Lock()
        self._connections = 0
        self._write_timeout_cuts = 0
        self._last_failure = ""
        self.state = StreamState.STARTING
        self.state_detail = ""
        self.received = 0
        self._thread = threading.Thread(
            target=self._run, name="notification-listener", daemon=True
        )

        query = (
            "?" + urlencode({"filter": ",".join(settings.notification_filter)})
            if settings.notification_filter
            else ""
        )
        self._url = settings.agent_base_url + STREAM_PATH + query

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop reading: close the socket so a blocked read returns at once."""
        self._stopping.set()
        with self._socket_lock:
            sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_seconds)

    def _run(self) -> None:
        while not self._stopping.is_set():
            retrying = Retrying(
                retry=retry_if_exception(_should_reconnect),
                wait=wait_random_exponential(
                    multiplier=0.5, max=self._settings.reconnect_max_seconds
                ),
                stop=stop_when_event_set(self._stopping),
                sleep=self._stopping.wait,
                before_sleep=self._before_reconnect,
                reraise=True,
            )
            try:
                # Returns only after a healthy period, so the backoff resets.
                retrying(self._stream_once)
            except StreamError:
                pass  # raised only once stopping; the loop ends
            except Exception:
                logger.exception("listener failed unexpectedly; reconnecting")
                self._stopping.wait(1.0)
        self._set_state(StreamState.STOPPED)

    def _stream_once(self) -> None:
        """Open the stream and read it until it ends.

        Raises StreamError when the stream failed or ended early; returns when
        it ended after a healthy period.
        """
        if self._stopping.is_set():
            raise StreamError("stopping", kind="stopping")
        if self._connections:
            self._metrics.reconnects.inc()
        self._connections += 1
        self._set_state(StreamState.CONNECTING)

        started = time.monotonic()
        session = requests.Session()
        # The Agent is a neighbour; a proxy meant for GA4 and Amplitude
        # (HTTPS_PROXY in the environment) must not carry this stream.
        session.trust_env = False
        session.mount("http://", _stream_adapter(self._remember_socket))
        session.mount("https://", _stream_adapter(self._remember_socket))
        try:
            response = self._open(session)
            self._set_state(StreamState.STREAMING)
            self._last_failure = ""
            self._read(response)
            ended_by = "the Agent closed the stream"
        except requests.RequestException as error:
            ended_by = f"the stream broke ({type(error).__name__})"
            if self.state is StreamState.CONNECTING:
                raise StreamError(
                    f"cannot reach the Agent at {self._settings.agent_base_url}: "
                    f"{type(error).__name__}",
                    kind="unreachable",
                ) from None
        finally:
            self._flush()
            with self._socket_lock:
                self._socket = None
            session.close()

        lived = time.monotonic() - started
        if self._stopping.is_set():
            raise StreamError("stopping", kind="stopping")
        if lived >= HEALTHY_PERIOD_SECONDS:
            logger.warning("%s after %.0f s; reconnecting", ended_by, lived)
            return
        hint = ""
        if _WRITE_TIMEOUT_WINDOW[0] <= lived <= _WRITE_TIMEOUT_WINDOW[1]:
            self._write_timeout_cuts += 1
            if self._write_timeout_cuts >= _WRITE_TIMEOUT_HINT_AFTER:
                hint = (
                    "streams keep ending about 10 s after connecting: the Agent's "
                    "write timeout is cutting them; set "
                    "OPTIMIZELY_SERVER_WRITETIMEOUT=0 on the Agent"
                )
        else:
            # Counted across reconnects: a write-timeout cut usually comes
            # after the stream opened and delivered a few notifications.
            self._write_timeout_cuts = 0
        raise StreamError(f"{ended_by} after {lived:.1f} s", kind="ended", hint=hint)

    def _open(self, session: requests.Session) -> requests.Response:
        headers = {
            "X-Optimizely-SDK-Key": self._settings.sdk_key,
            "Accept": "text/event-stream",
            "User-Agent": f"optimizely-agent-listener/{VERSION}",
        }
        # The Agent answers only with its first notification: no read timeout.
        response = session.get(
            self._url,
            headers=headers,
            stream=True,
            timeout=(self._settings.stream_connect_timeout_seconds, None),
        )
        if response.status_code // 100 != 2:
            # Only the start of the body: an error page need not end soon.
            head = next(response.iter_content(chunk_size=300), b"")
            text = head.decode("utf-8", "replace").strip()
            response.close()
            raise _refusal(response.status_code, text)
        return response

    def _read(self, response: requests.Response) -> None:
        client = sseclient.SSEClient(self._chunks(response), char_enc="latin-1")
        for event in client.events():
            # latin-1 maps bytes 1:1, so this restores the frame's exact bytes;
            # invalid UTF-8 is then the processor's to count, not a crash here.
            self._pending.append((event.data.encode("latin-1"), self._receipt_ns()))
            self.received += 1

    def _chunks(self, response: requests.Response) -> Iterator[bytes]:
        """Whole network chunks, with parsed frames handed over before a wait.

        The Agent sends every notification in its own chunk. Frames are
        handed over in one batch when the next read would wait for the
        network (or the batch is large): a burst becomes one write to the
        spool, and a frame is durable before the listener waits for more.
        """
        chunks = response.iter_content(chunk_size=None)
        while True:
            if self._pending and (
                len(self._pending) >= _HAND_OVER_BATCH or not self._more_arrived()
            ):
                self._flush()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            yield chunk

    def _more_arrived(self) -> bool:
        """Whether the socket holds bytes, so reading them will not wait."""
        sock = self._socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def _flush(self) -> None:
        if self._pending:
            frames, self._pending = self._pending, []
            self._buffer.put_many(frames)
            self._metrics.note_notification()

    def _receipt_ns(self) -> int:
        now = self._clock_ns()
        if now <= self._last_ns:
            now = self._last_ns + 1
        self._last_ns = now
        return now

    def _remember_socket(self, sock: socket.socket) -> None:
        with self._socket_lock:
            self._socket = sock
        if self._stopping.is_set():
            sock.shutdown(socket.SHUT_RDWR)
            return
        self._set_state(StreamState.AWAITING_FIRST_NOTIFICATION)

    def _before_reconnect(self, retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if not isinstance(error, StreamError) or self._stopping.is_set():
            return
        wait = retry_state.upcoming_sleep
        failure = f"{error.kind}: {error}"
        self._set_state(StreamState.FAILING, failure)
        # Every attempt passes through CONNECTING, so the state alone cannot
        # tell a repeat; the last failure is remembered until a stream opens.
        repeated, self._last_failure = failure == self._last_failure, failure
        if repeated and error.kind != "ended":
            return  # the same failure again: said once already
        if error.hint:
            logger.error("%s; %s (retrying in %.1f s)", error, error.hint, wait)
        elif error.kind in ("ended", "unreachable"):
            logger.warning("%s; retrying in %.1f s", error, wait)
        else:
            logger.error("%s; retrying in %.1f s", error, wait)

    def _set_state(self, state: StreamState, detail: str = "") -> bool:
        changed = (state, detail) != (self.state, self.state_detail)
        self.state, self.state_detail = state, detail
        if changed and state is StreamState.STREAMING:
            logger.info("stream open, reading notifications")
        return changed


def _should_reconnect(error: BaseException) -> bool:
    # A stop ends the retrying at once; tenacity's sleep would not block.
    return isinstance(error, StreamError) and error.kind != "stopping"


def _refusal(status: int, text: str) -> StreamError:
    """Turn the Agent's refusal into an error whose message says what to fix."""
    lowered = text.lower()
    if status == 403 and "not enabled" in lowered:
        hint = "enable it on the Agent with OPTIMIZELY_API_ENABLENOTIFICATIONS=true"
    elif status == 400 and "failed validation" in lowered:
        hint = "the Agent rejects the SDK key's format (hyphens are not allowed)"
    elif status == 400 and "missing required" in lowered:
        hint = "the SDK key header was not sent; check OPTIMIZELY_SDK_KEY"
    elif "failed to instantiate" in lowered or "unable to fetch" in lowered:
        hint = "the Agent cannot load a datafile for OPTIMIZELY_SDK_KEY; check the key"
    elif status == 404 and "invalid request host" in lowered:
        hint = "add this host to the Agent's OPTIMIZELY_SERVER_ALLOWEDHOSTS"
    elif status == 401:
        hint = "the Agent requires authentication, which this daemon does not send"
    else:
        hint = ""
    kind = "server_error" if status >= 500 and not hint else "refused"
    message = f"the Agent answered {status}: {text or '(no body)'}"
    return StreamError(message, kind=kind, hint=hint)


def _stream_adapter(on_socket: Callable[[socket.socket], None]) -> HTTPAdapter:
    """An adapter whose connections use TCP keepalive and report their socket.

    The socket is needed to stop a read blocked before the first byte: the
    Agent may send nothing for hours, and only closing it interrupts recv.
    """

    class _Connection(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            on_socket(self.sock)

    class _SecureConnection(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            on_socket(self.sock)

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Connection

    class _SecurePool(HTTPSConnectionPool):
        ConnectionCls = _SecureConnection

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[override]
            kwargs["socket_options"] = HTTPConnection.default_socket_options + list(
                _KEEPALIVE_OPTIONS
            )
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {
                "http": _Pool,
                "https": _SecurePool,
            }

    return _Adapter(pool_connections=1, pool_maxsize=1, max_retries=0)
