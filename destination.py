"""What every destination module provides to the delivery machinery.

A destination turns the processor's records into its own events, builds
one HTTP request from a batch of them, and reads the answer into a
`SendResult`. It never performs I/O: the dispatcher sends, times, retries
and dead-letters, so that policy lives in one place for every destination.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from notifications import Notification

# Sizes are measured exactly as the dispatcher must send a body: compact
# separators, UTF-8 rather than \u escapes.
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), check_circular=False
)

# Stands where `with_events` splices the list of events into an envelope.
EVENTS = "\x00events\x00"
_EVENTS_JSON = _ENCODER.encode(EVENTS)


@dataclass(slots=True)
class Mapped:
    """One destination event made from a notification, ready to batch.

    `key` orders delivery: events with the same key go out in receipt order
    and never in two requests at once (the user id for Amplitude, the GA
    client id for GA4). `size` is the compact JSON size of `event` in bytes;
    `encoded` is that JSON when `of` made it, so a request body can reuse it
    instead of encoding every event a second time. Nothing changes a Mapped;
    it is not frozen because one is built per event and freezing costs.
    """

    key: str
    event: dict[str, Any]
    size: int
    encoded: bytes = b""

    @classmethod
    def of(cls, key: str, event: dict[str, Any]) -> Mapped:
        """Wrap `event`, measuring its size."""
        text = _ENCODER.encode(event)
        try:
            data = text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (JSON "\ud800") has no UTF-8 form, so no body
            # holding it could be sent; "?" in its place keeps the event.
            data = text.encode(errors="replace")
            return cls(key, json.loads(data), len(data), data)
        return cls(key, event, len(data), data)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A notification this destination cannot accept, and why."""

    reason: str  # short snake_case, used as a metric label
    detail: str = ""  # one line for the log and the dead-letter file


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP POST ready to go. `url` may carry a secret; log `safe_url`."""

    url: str
    safe_url: str
    body: dict[str, Any]
    payload: bytes = b""  # `body` as sent; empty: encode `body`

    def encoded(self) -> bytes:
        if self.payload:
            return self.payload
        return _ENCODER.encode(self.body).encode()


def with_events(envelope: dict[str, Any], events: list[Mapped]) -> bytes:
    """`envelope`'s JSON with the events' own encodings spliced in as "events".

    The envelope holds `EVENTS` where the list goes, which keeps its key
    order; events made without `Mapped.of` are encoded here.
    """
    head, tail = _ENCODER.encode(envelope).split(_EVENTS_JSON)
    parts = [m.encoded or _ENCODER.encode(m.event).encode() for m in events]
    return b"".join((head.encode(), b"[", b",".join(parts), b"]", tail.encode()))


@dataclass(slots=True)
class SendResult:
    """How the destination's answer affects each event of the batch.

    Indexes refer to the batch as passed to `build_request`. An index
    named nowhere is delivered. `retry` means the whole request failed
    transiently and is retried with backoff; the lists are then ignored.
    """

    retry: bool = False
    retry_after_seconds: float | None = None
    rejected: dict[int, str] = field(default_factory=dict)  # index -> reason
    resend: list[int] = field(default_factory=list)  # collateral, send again now
    held: dict[int, float] = field(default_factory=dict)  # index -> seconds to wait
    split: bool = False  # too large: halve the batch and send each half
    config_error: str = ""  # a problem only the operator can fix; log at error
    warnings: list[str] = field(default_factory=list)  # e.g. GA validation messages


class Destination(Protocol):
    name: str  # "ga4" or "amplitude"; a metric label
    max_batch_events: int
    max_batch_bytes: int  # for the events' summed `size`, overhead excluded
    one_key_per_batch: bool  # GA4: one client per request

    def map(self, notification: Notification) -> list[Mapped | Rejected]:
        """The events this notification becomes here (possibly none)."""
        ...

    def build_request(self, events: list[Mapped]) -> Request: ...

    def read_response(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        count: int,
        *,
        events: list[Mapped] | None = None,
    ) -> SendResult:
        """Classify an HTTP answer to a request of `count` events.

        `events` is the batch itself: Amplitude's throttling answers name
        users rather than indexes.
        """
        ...


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """The wait a `Retry-After` header asks for, or None if it names none.

    HTTP allows a number of seconds or a date; a date is read against `now`
    (Unix seconds) and one in the past means no wait.
    """
    raw = next(
        (value for name, value in headers.items() if name.lower() == "retry-after"),
        "",
    ).strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # HTTP dates are always GMT
        return max(0.0, when.timestamp() - now)
    return max(0.0, seconds) if math.isfinite(seconds) else None
