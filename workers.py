"""Worker threads: drain the buffer through the processor to the dispatchers.

Workers parse and map in parallel but hand their results to the
dispatchers strictly in the order they took them from the buffer, so a
user's events keep their order even when two workers hold consecutive
slices of the stream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from dead_letter import DeadLetter, DeadLetterFile
from delivery import CompletionTracker, Dispatcher, Heartbeat, Outbound
from destination import Destination, Rejected
from event_buffer import EventBuffer
from metrics import Metrics
from notification_processor import NotificationProcessor

logger = logging.getLogger(__name__)

TAKE_BATCH = 256
TAKE_TIMEOUT_SECONDS = 0.5


class WorkerPool:
    """`count` named threads that run until the buffer is closed and empty."""

    def __init__(
        self,
        count: int,
        buffer: EventBuffer,
        processor: NotificationProcessor,
        routes: Sequence[tuple[Destination, Dispatcher]],
        tracker: CompletionTracker,
        dead_letters: DeadLetterFile,
        metrics: Metrics,
    ) -> None:
        self._buffer = buffer
        self._processor = processor
        self._routes = routes
        self._tracker = tracker
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._take_lock = threading.Lock()
        self._turn = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self.heartbeats = [Heartbeat(f"worker-{i}") for i in range(count)]
        self._threads = [
            threading.Thread(
                target=self._run, args=(beat,), name=beat.name, daemon=True
            )
            for beat in self.heartbeats
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout_seconds: float) -> bool:
        for thread in self._threads:
            thread.join(timeout_seconds)
        return not any(thread.is_alive() for thread in self._threads)

    def dead(self) -> list[str]:
        return [t.name for t in self._threads if t.ident and not t.is_alive()]

    def _run(self, beat: Heartbeat) -> None:
        while True:
            with self._take_lock:
                envelopes = self._buffer.take(TAKE_BATCH, TAKE_TIMEOUT_SECONDS)
                if not envelopes:
                    if self._buffer.closed_and_empty:
                        return
                    continue
                ticket = self._next_ticket
                self._next_ticket += 1
            beat.busy()
            try:
                self._handle(envelopes, ticket)
            finally:
                beat.idle()

    def _handle(self, envelopes: list, ticket: int) -> None:
        per_route: list[list[Outbound]] = [[] for _ in self._routes]
        expected: list[tuple[int, int]] = []
        refused: list[DeadLetter] = []
        for envelope in envelopes:
            count = 0
            try:
                notification = self._processor.process(envelope)
                if notification is not None:
                    for index, (destination, _) in enumerate(self._routes):
                        for made in destination.map(notification):
                            if isinstance(made, Rejected):
                                refused.append(
                                    _refusal(
                                        destination.name, made, envelope.received_ns
                                    )
                                )
                                continue
                            per_route[index].append(
                                Outbound(made, envelope.id, envelope.received_ns)
                            )
                            count += 1
            except Exception:
                # One bad notification must not take the worker down with it.
                logger.exception("could not process notification %d", envelope.id)
                self._metrics.rejected.labels("processing_error").inc()
            expected.append((envelope.id, count))

        for letter in refused:
            self._metrics.dropped.labels(letter.destination, letter.reason).inc()
        if refused:
            logger.warning(
                "%d events could not be made for their destination (%s)",
                len(refused),
                ", ".join(sorted({f"{r.destination}: {r.reason}" for r in refused})),
            )
            self._dead_letters.write(refused)

        with self._turn:
            while self._serving != ticket:
                self._turn.wait()
        try:
            self._tracker.expect(expected)
            for (_, dispatcher), outbounds in zip(self._routes, per_route, strict=True):
                if outbounds:
                    dispatcher.submit(outbounds)
        finally:
            with self._turn:
                self._serving += 1
                self._turn.notify_all()


def _refusal(destination: str, rejected: Rejected, received_ns: int) -> DeadLetter:
    return DeadLetter(
        destination=destination,
        key="",
        event={"detail": rejected.detail},
        reason=rejected.reason,
        status=None,
        received_ns=received_ns,
    )
