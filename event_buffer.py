"""The bounded hand-over between the listener thread and the workers.

The listener must never wait here: the Agent blocks its own decide and
track calls while a stream reader stalls. So `put_many` always returns at
once and a full buffer applies its overflow policy instead, counting and
logging every drop. Workers `take` batches with a timeout and `ack` what
every destination has settled; the in-memory buffer forgets an envelope as
soon as it is taken, while the disk spool (spool.py) keeps it until acked.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from metrics import Metrics

logger = logging.getLogger(__name__)

_DROP_LOG_INTERVAL_SECONDS = 10.0


@dataclass(slots=True)
class Envelope:
    """One notification as read from the stream, before any parsing."""

    id: int
    received_ns: int  # wall clock, strictly increasing within a process
    data: bytes  # the frame's payload exactly as the Agent sent it


class EventBuffer(Protocol):
    capacity: int

    def put_many(self, frames: list[tuple[bytes, int]]) -> None:
        """Hand over (payload, received_ns) pairs; never blocks."""
        ...

    def take(self, max_items: int, timeout_seconds: float) -> list[Envelope]:
        """Up to `max_items` envelopes, waiting at most the timeout for one."""
        ...

    def ack(self, envelope_ids: list[int]) -> None:
        """Every destination has delivered or dead-lettered these."""
        ...

    def depth(self) -> int: ...

    def report_drops(self) -> None:
        """Log drops the rate limit has held back; called at shutdown."""
        ...

    def close(self) -> None:
        """No more puts; `take` returns [] at once when empty."""
        ...

    @property
    def closed_and_empty(self) -> bool: ...


class DropReporter:
    """Counts drops by reason and logs them at most every ten seconds."""

    def __init__(self, metrics: Metrics, what: str) -> None:
        self._metrics = metrics
        self._what = what
        self._lock = threading.Lock()
        self._unreported: dict[str, int] = {}
        self._last_log = -math.inf  # the first drop is always logged

    def report_now(self) -> None:
        """Log drops not yet reported, e.g. at shutdown."""
        with self._lock:
            report, self._unreported = self._unreported, {}
        self._log(report)

    def dropped(self, reason: str, count: int = 1) -> None:
        self._metrics.buffer_dropped.labels(reason).inc(count)
        with self._lock:
            self._unreported[reason] = self._unreported.get(reason, 0) + count
            now = time.monotonic()
            if now - self._last_log < _DROP_LOG_INTERVAL_SECONDS:
                return
            report, self._unreported = self._unreported, {}
            self._last_log = now
        self._log(report)

    def _log(self, report: dict[str, int]) -> None:
        for why, n in report.items():
            logger.warning(
                "%s dropped %d notifications (%s)",
                self._what,
                n,
                why,
                extra={"reason": why, "count": n},
            )


class MemoryBuffer:
    """A bounded in-memory FIFO with a drop-oldest or drop-newest policy."""

    def __init__(self, capacity: int, overflow_policy: str, metrics: Metrics) -> None:
        self.capacity = capacity
        self._drop_oldest = overflow_policy == "drop_oldest"
        self._items: deque[Envelope] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._next_id = 1
        self._closed = False
        self._drops = DropReporter(metrics, "buffer")

    def put_many(self, frames: list[tuple[bytes, int]]) -> None:
        dropped_oldest = dropped_newest = 0
        with self._ready:
            if self._closed:
                # The workers may be gone already: nobody would take these.
                self._drops.dropped("after_shutdown", len(frames))
                return
            for data, received_ns in frames:
                if len(self._items) >= self.capacity:
                    if not self._drop_oldest:
                        dropped_newest += 1
                        continue
                    self._items.popleft()
                    dropped_oldest += 1
                self._items.append(Envelope(self._next_id, received_ns, data))
                self._next_id += 1
            self._ready.notify(len(frames))
        if dropped_oldest:
            self._drops.dropped("overflow_drop_oldest", dropped_oldest)
        if dropped_newest:
            self._drops.dropped("overflow_drop_newest", dropped_newest)

    def take(self, max_items: int, timeout_seconds: float) -> list[Envelope]:
        with self._ready:
            if not self._items and not self._closed:
                self._ready.wait(timeout_seconds)
            count = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(count)]

    def ack(self, envelope_ids: list[int]) -> None:
        # Nothing to do: an in-memory envelope is gone once taken.
        pass

    def depth(self) -> int:
        return len(self._items)

    def report_drops(self) -> None:
        self._drops.report_now()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    @property
    def closed_and_empty(self) -> bool:
        return self._closed and not self._items
