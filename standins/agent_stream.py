"""A scripted Optimizely Agent notification stream on 127.0.0.1.

`AgentStreamStandIn` answers `GET /v1/notifications/event-stream` the way
Agent v4.4 does on the wire: the same status codes and bodies for a bad SDK
key or a disabled stream, the same `filter` and `raw` semantics, one
`data: <json>\\n\\n` chunk per notification, and nothing at all (not even the
status line) before the first notification that passes the filter. Tests
drive it with `publish()`; like the Agent, a publish returns only once every
open stream has taken the notification, so a stalled reader stalls it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from standins._http import Exchange, LoopbackServer, http_date

STREAM_PATH = "/v1/notifications/event-stream"
CATEGORIES = ("decision", "track", "project_config_update")
SAMPLE_FRAMES_PATH = (
    Path(__file__).resolve().parent.parent
    / "tests"
    / "fixtures"
    / "agent-sse-sample.txt"
)

DEFAULT_PUBLISH_TIMEOUT_SECONDS = 5.0

# The Agent's default client.sdkKeyRegex; Go's `$` never matches before "\n".
_SDK_KEY_PATTERN = re.compile(r"[a-zA-Z0-9+/=_]+(:[a-zA-Z0-9+/=_]+)?\Z")
_ALLOWED_HOSTS = ("127.0.0.1", "localhost")

# Frames a flood hands to each stream at once; keeps publish_many fast while
# a stalled reader still stalls it within a few hundred frames.
_HANDOFF_FRAMES = 256

# How often an idle stream checks whether its client has gone away. The Agent
# learns it at once from a background read; this stand-in polls.
_LIVENESS_POLL_SECONDS = 0.1

# Go's encoder escapes these even inside strings; Python's does not.
_GO_ESCAPES = {
    ord("<"): "\\u003c",
    ord(">"): "\\u003e",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}

_Frame = tuple[bytes, str]  # JSON payload, category


def go_json(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON as Go's `json.Marshal` writes it (HTML-escaped, raw UTF-8)."""
    text = json.dumps(
        _go_numbers(value),
        separators=(",", ":"),
        ensure_ascii=False,
        sort_keys=sort_keys,
    )
    return text.translate(_GO_ESCAPES).encode()


def notification_category(notification: Mapping[str, Any]) -> str:
    """The Agent's category for a payload, told apart by shape as the Agent does.

    Shapes the Agent never produces count as decisions.
    """
    if "DecisionInfo" in notification:
        return "decision"
    if "EventKey" in notification:
        return "track"
    if "Revision" in notification:
        return "project_config_update"
    return "decision"


def load_sample_frames(path: Path | str = SAMPLE_FRAMES_PATH) -> list[bytes]:
    """The JSON payload of every `data: ` line of a captured stream, in order."""
    prefix = b"data: "
    return [
        line[len(prefix) :]
        for line in Path(path).read_bytes().split(b"\n")
        if line.startswith(prefix)
    ]


class AgentStreamStandIn(LoopbackServer):
    """The Agent's notification endpoint, scripted by the test.

    `sdk_key` is the only key with a datafile; any other well-formed key gets
    the Agent's 500. `redis_mode` re-sorts every object's keys, as an Agent
    with Redis-synced notifications does. `write_timeout_seconds` imitates the
    Agent's `server.writeTimeout`: a frame due after that many seconds from
    the request is lost and the connection closed. `GET /health` answers too.
    """

    def __init__(
        self,
        sdk_key: str = "test_sdk_key",
        notifications_enabled: bool = True,
        *,
        redis_mode: bool = False,
        write_timeout_seconds: float | None = None,
        publish_timeout_seconds: float = DEFAULT_PUBLISH_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__("agent-standin")
        self.sdk_key = sdk_key
        self.notifications_enabled = notifications_enabled
        self.redis_mode = redis_mode
        self.write_timeout_seconds = write_timeout_seconds
        self.publish_timeout_seconds = publish_timeout_seconds
        self._state = threading.Condition()
        self._streams: list[_Stream] = []
        self._connections_total = 0
        self._by_status: Counter[int] = Counter()
        self._published = 0
        self._delivered = 0
        self._lost = 0

    @property
    def stream_url(self) -> str:
        return self.url + STREAM_PATH

    @property
    def connections_total(self) -> int:
        """Streams ever accepted (answered 200, or due to be)."""
        with self._state:
            return self._connections_total

    @property
    def connected(self) -> int:
        """Streams open now."""
        with self._state:
            return len(self._streams)

    @property
    def requests_by_status(self) -> dict[int, int]:
        with self._state:
            return dict(self._by_status)

    def wait_for_connected(self, count: int, timeout: float) -> bool:
        """Wait until exactly `count` streams are open."""
        with self._state:
            return self._state.wait_for(lambda: len(self._streams) == count, timeout)

    def wait_for_connections_total(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` streams have ever been accepted."""
        with self._state:
            return self._state.wait_for(
                lambda: self._connections_total >= count, timeout
            )

    def publish(
        self,
        notification: Mapping[str, Any] | bytes,
        category: str | None = None,
        *,
        timeout_seconds: float | None = None,
    ) -> int:
        """Send one notification to every open stream; return how many took it.

        A mapping is serialized as Go would; bytes are the exact payload, sent
        as given (malformed ones included). `category` drives `filter`; when
        omitted it comes from the payload's shape, and bytes that are not a
        JSON object count as a decision. Each stream gets `timeout_seconds`
        to take it, else it is skipped.
        """
        frame = self._frame(notification, category)
        with self._state:
            self._published += 1
        return self._hand_off([frame], timeout_seconds)

    def publish_many(
        self,
        notifications: Iterable[Mapping[str, Any] | bytes],
        category: str | None = None,
        *,
        timeout_seconds: float | None = None,
    ) -> int:
        """Publish a flood in order; return frames taken, summed over streams.

        A stream that lets one hand-off time out gets none of the rest, so a
        stalled reader costs the flood one timeout rather than one per batch.
        """
        frames = [self._frame(item, category) for item in notifications]
        with self._state:
            self._published += len(frames)
        stalled: set[_Stream] = set()
        taken = 0
        for start in range(0, len(frames), _HANDOFF_FRAMES):
            batch = frames[start : start + _HANDOFF_FRAMES]
            taken += self._hand_off(batch, timeout_seconds, stalled)
        return taken

    def cut_streams(self) -> int:
        """Close every open stream abruptly, with no terminating chunk."""
        with self._state:
            streams, self._streams = self._streams, []
            self._state.notify_all()
        for stream in streams:
            stream.close()
            stream.exchange.hang_up()
        return len(streams)

    def report(self) -> dict[str, Any]:
        with self._state:
            return {
                "connections_total": self._connections_total,
                "connected": len(self._streams),
                "requests_by_status": dict(sorted(self._by_status.items())),
                "published": self._published,
                "delivered": self._delivered,
                "lost": self._lost,
            }

    def _on_stop(self) -> None:
        self.cut_streams()

    def _frame(
        self, notification: Mapping[str, Any] | bytes, category: str | None
    ) -> _Frame:
        if isinstance(notification, bytes | bytearray):
            payload = bytes(notification)
            if category is None:
                category = _category_of_payload(payload)
        else:
            payload = go_json(notification, sort_keys=self.redis_mode)
            if category is None:
                category = notification_category(notification)
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {', '.join(CATEGORIES)}")
        return payload, category

    def _hand_off(
        self,
        frames: list[_Frame],
        timeout_seconds: float | None,
        stalled: set[_Stream] | None = None,
    ) -> int:
        with self._state:
            streams = list(self._streams)
        if timeout_seconds is None:
            timeout_seconds = self.publish_timeout_seconds

        # One stream after another, as the Agent's notification center calls
        # its handlers; each must take the frames before the next is offered.
        taken = 0
        for stream in streams:
            if stalled is not None and stream in stalled:
                continue
            if stream.offer(frames, time.monotonic() + timeout_seconds):
                taken += len(frames)
            elif stalled is not None:
                stalled.add(stream)
        with self._state:
            self._delivered += taken
        return taken

    # Serving.

    def _dispatch(self, exchange: Exchange) -> None:
        request_id = exchange.headers.get("X-Request-Id") or str(uuid.uuid4())
        headers = {"Vary": "Origin", "X-Request-Id": request_id}

        if exchange.route == "/health" and exchange.command == "GET":
            self._answer(exchange, 200, b'{"status":"ok"}\n', headers)
            return
        host = exchange.headers.get("X-Forwarded-Host") or exchange.headers.get(
            "Host", ""
        )
        if host.rsplit(":", 1)[0] not in _ALLOWED_HOSTS:
            self._answer(exchange, 404, _error("invalid request host"), headers)
            return
        if exchange.route != STREAM_PATH:
            body = b"404 page not found\n"
            self._answer(exchange, 404, body, headers, "text/plain; charset=utf-8")
            return
        if exchange.command != "GET":
            self._answer(exchange, 405, b"", headers)
            return

        # The Agent's checks, in its middleware order.
        key = exchange.headers.get("X-Optimizely-SDK-Key", "")
        if not key:
            body = _error("missing required X-Optimizely-SDK-Key header")
            self._answer(exchange, 400, body, headers)
            return
        if not _SDK_KEY_PATTERN.match(key):
            self._answer(exchange, 400, _error("sdkKey failed validation"), headers)
            return
        if key.split(":", 1)[0] != self.sdk_key:
            body = _error(f"failed to instantiate Optimizely for SDK Key: {key}")
            self._answer(exchange, 500, body, headers)
            return
        if not self.notifications_enabled:
            body = b"Notification stream not enabled\n"
            headers["X-Content-Type-Options"] = "nosniff"
            self._answer(exchange, 403, body, headers, "text/plain; charset=utf-8")
            return

        params = exchange.query()
        stream = _Stream(
            exchange,
            categories=_filter_categories(params.get("filter")),
            raw="raw" in params,
            request_id=request_id,
        )
        with self._state:
            self._streams.append(stream)
            self._connections_total += 1
            self._by_status[200] += 1
            self._state.notify_all()
        try:
            self._write_stream(stream)
        finally:
            with self._state:
                if stream in self._streams:
                    self._streams.remove(stream)
                    self._state.notify_all()
            exchange.hang_up()

    def _write_stream(self, stream: _Stream) -> None:
        exchange = stream.exchange
        head_sent = False
        while True:
            batch = stream.take(_LIVENESS_POLL_SECONDS)
            if stream.closed:
                return
            if batch is None:
                if exchange.peer_gone():
                    return
                continue

            # Like the Agent, filter after the hand-off: a filtered-out
            # notification still holds up the publisher until taken.
            payloads = [payload for payload, kind in batch if kind in stream.categories]
            if not payloads:
                continue
            limit = self.write_timeout_seconds
            if limit is not None and time.monotonic() - stream.started > limit:
                self._count_lost(len(payloads))
                return

            data = b"".join(_chunk(payload, stream.raw) for payload in payloads)
            if not head_sent:
                data = _stream_head(stream.request_id) + data
                head_sent = True
            try:
                exchange.connection.sendall(data)
            except OSError:
                self._count_lost(len(payloads))
                return

    def _count_lost(self, count: int) -> None:
        with self._state:
            self._lost += count

    def _answer(
        self,
        exchange: Exchange,
        status: int,
        body: bytes,
        headers: dict[str, str],
        content_type: str = "application/json",
    ) -> None:
        with self._state:
            self._by_status[status] += 1
        exchange.respond(status, body, content_type, headers)


class _Stream:
    """One open stream and its unbuffered hand-off slot (Go's channel)."""

    def __init__(
        self,
        exchange: Exchange,
        categories: frozenset[str],
        raw: bool,
        request_id: str,
    ) -> None:
        self.exchange = exchange
        self.categories = categories
        self.raw = raw
        self.request_id = request_id
        self.started = time.monotonic()
        self.closed = False
        self._slot = threading.Condition()
        self._pending: list[_Frame] | None = None

    def offer(self, frames: list[_Frame], deadline: float) -> bool:
        """Block until the writer has taken `frames`; False on timeout or close."""
        with self._slot:
            if not self._slot.wait_for(
                lambda: self.closed or self._pending is None,
                deadline - time.monotonic(),
            ):
                return False
            if self.closed:
                return False
            self._pending = frames
            self._slot.notify_all()
            self._slot.wait_for(
                lambda: self.closed or self._pending is not frames,
                deadline - time.monotonic(),
            )
            if self._pending is frames:
                # Not taken in time: withdraw it, as a Go select with a timeout would.
                self._pending = None
                self._slot.notify_all()
                return False
            return True

    def take(self, timeout: float) -> list[_Frame] | None:
        """The next offered frames, or None after `timeout` or on close."""
        with self._slot:
            self._slot.wait_for(
                lambda: self.closed or self._pending is not None, timeout
            )
            if self.closed:
                # Left in the slot, so the publisher sees it was never taken.
                return None
            frames, self._pending = self._pending, None
            self._slot.notify_all()
            return frames

    def close(self) -> None:
        with self._slot:
            self.closed = True
            self._slot.notify_all()


def _filter_categories(values: list[str] | None) -> frozenset[str]:
    # No filter means everything; a filter with nothing valid means nothing.
    if values is None:
        return frozenset(CATEGORIES)
    return frozenset(
        part for value in values for part in value.split(",") if part in CATEGORIES
    )


def _category_of_payload(payload: bytes) -> str:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: absurd nesting
        return "decision"
    return notification_category(value) if isinstance(value, dict) else "decision"


def _chunk(payload: bytes, raw: bool) -> bytes:
    frame = payload + b"\n" if raw else b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def _stream_head(request_id: str) -> bytes:
    return (
        "HTTP/1.1 200 OK\r\n"
        "Cache-Control: no-cache\r\n"
        "Connection: keep-alive\r\n"
        "Content-Type: text/event-stream\r\n"
        f"Date: {http_date()}\r\n"
        "Transfer-Encoding: chunked\r\n"
        "Vary: Origin\r\n"
        f"X-Request-Id: {request_id}\r\n"
        "\r\n"
    ).encode("latin-1")


def _error(message: str) -> bytes:
    # The Agent's JSON encoder ends every body with a newline.
    return go_json({"error": message}) + b"\n"


def _go_numbers(value: Any) -> Any:
    # Go prints a whole float64 as an integer ("34", not "34.0").
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e21 else value
    if isinstance(value, dict):
        return {key: _go_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_go_numbers(item) for item in value]
    return value
