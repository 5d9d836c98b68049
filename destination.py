"""What every destination module provides to the delivery machinery.

A destination turns the processor's records into its own events, builds
one HTTP request from a batch of them, and reads the answer into a
`SendResult`. It never performs I/O: the dispatcher sends, times, retries
and dead-letters, so that policy lives in one place for every destination.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from notifications import Notification


@dataclass(frozen=True, slots=True)
class Mapped:
    """One destination event made from a notification, ready to batch.

    `key` orders delivery: events with the same key go out in receipt order
    and never in two requests at once (the user id for Amplitude, the GA
    client id for GA4). `size` is the compact JSON size of `event` in bytes.
    """

    key: str
    event: dict[str, Any]
    size: int


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
        self, status: int, body: bytes, headers: dict[str, str], count: int
    ) -> SendResult:
        """Classify an HTTP answer to a request of `count` events."""
        ...
