"""Batches, sends and retries one destination's events.

Each destination has its own `Dispatcher`: its own queue, its own sender
threads, its own sessions, so one destination's outage or slowness never
delays the other. Within a dispatcher, events that share a key (a user, or
a GA client) go out in the order they were received: a key is never in two
requests at once, and everything sent back for another try goes to the
front of its key's line.

A request that fails transiently (transport error, timeout, 408, 429, 5xx)
is retried with jittered exponential backoff until the retry horizon; the
destination module decides, from the answer, which events are delivered,
rejected for good, sent again at once, held for a while or split. Events
that cannot be delivered are written to the dead-letter file, never lost
in silence.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from dead_letter import DeadLetter, DeadLetterFile
from destination import Destination, Mapped, SendResult
from metrics import Metrics
from settings import VERSION, Settings

logger = logging.getLogger(__name__)

USER_AGENT = f"optimizely-agent-listener/{VERSION}"

# (status, body, headers) as the destination answered.
Answer = tuple[int, bytes, dict[str, str]]
Poster = Callable[[requests.Session, str, str, bytes], Answer]

_ERROR_LOG_INTERVAL_SECONDS = 60.0
_OVERFLOW_LOG_INTERVAL_SECONDS = 10.0


@dataclass(slots=True, eq=False)
class Outbound:
    """One destination event on its way, with what delivery needs to know."""

    mapped: Mapped
    envelope_id: int
    received_ns: int
    enqueued: float = 0.0  # monotonic
    first_attempt: float | None = None  # monotonic; starts the retry horizon

    @property
    def key(self) -> str:
        return self.mapped.key


class TransientError(Exception):
    """A request that may succeed if sent again."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class CompletionTracker:
    """Acknowledges a notification once every destination has settled it."""

    def __init__(self, ack: Callable[[list[int]], None]) -> None:
        self._ack = ack
        self._remaining: dict[int, int] = {}
        self._lock = threading.Lock()

    def expect(self, expected: list[tuple[int, int]]) -> None:
        """Each (envelope id, events made of it); none made means settled."""
        settled = []
        with self._lock:
            for envelope_id, count in expected:
                if count:
                    self._remaining[envelope_id] = count
                else:
                    settled.append(envelope_id)
        if settled:
            self._ack(settled)

    def done(self, envelope_ids: Iterable[int]) -> None:
        finished = []
        with self._lock:
            for envelope_id in envelope_ids:
                left = self._remaining.get(envelope_id, 1) - 1
                if left <= 0:
                    self._remaining.pop(envelope_id, None)
                    finished.append(envelope_id)
                else:
                    self._remaining[envelope_id] = left
        if finished:
            self._ack(finished)

    def outstanding(self) -> int:
        return len(self._remaining)


class Heartbeat:
    """When a thread last started a unit of work; None while it is idle."""

    __slots__ = ("busy_since", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.busy_since: float | None = None

    def busy(self) -> None:
        self.busy_since = time.monotonic()

    def idle(self) -> None:
        self.busy_since = None

    def stuck_for(self, now: float) -> float:
        return 0.0 if self.busy_since is None else now - self.busy_since


def http_poster(settings: Settings) -> Poster:
    """POST with the configured timeouts; transport failures become transient."""
    timeout = (
        settings.http_connect_timeout_seconds,
        settings.http_read_timeout_seconds,
    )
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}

    def post(session: requests.Session, url: str, safe_url: str, body: bytes) -> Answer:
        if session.trust_env:
            # Read the environment's proxies once per session rather than on
            # every request; with .netrc lookups that costs more than a send.
            session.trust_env = False
            session.proxies.update(requests.utils.get_environ_proxies(url))
            session.headers.update(headers)
        try:
            response = session.post(url, data=body, timeout=timeout)
            content = response.content
        except requests.RequestException as error:
            # The exception text can hold the URL with GA's api_secret in it:
            # keep only its type and where it went.
            raise TransientError(
                f"request to {safe_url} failed: {type(error).__name__}"
            ) from None
        return response.status_code, content, dict(response.headers)

    return post


class Dispatcher:
    """Delivers one destination's events; see the module docstring."""

    def __init__(
        self,
        destination: Destination,
        settings: Settings,
        metrics: Metrics,
        dead_letters: DeadLetterFile,
        tracker: CompletionTracker,
        *,
        poster: Poster,
        concurrency: int,
        wait_seconds: float,
        keep_on_shutdown: bool = False,
        block_when_full: bool = False,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.name = destination.name
        self._destination = destination
        self._settings = settings
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._tracker = tracker
        self._poster = poster
        self._wait_seconds = wait_seconds
        self._keep_on_shutdown = keep_on_shutdown
        self._block_when_full = block_when_full
        self._capacity = settings.destination_queue_capacity
        self._limit = destination.max_batch_events

        self._cond = threading.Condition(threading.Lock())
        self._pending: OrderedDict[str, deque[Outbound]] = OrderedDict()
        self._count = 0
        self._busy: set[str] = set()
        self._held: dict[str, float] = {}
        self._in_flight = 0
        self._sending: dict[int, list[Outbound]] = {}  # batches in requests
        self._flushing = False
        self._abort = threading.Event()
        self._sleep = sleep or self._abort.wait
        self._error_logged: dict[str, float] = {}
        self._overflow_unreported = 0
        self._overflow_logged_at = -math.inf

        self._delivered = metrics.delivered.labels(self.name)
        self._latency = metrics.latency.labels(self.name)
        self._http_duration = metrics.http_duration.labels(self.name)
        metrics.watch(metrics.queue_depth.labels(self.name), lambda: self._count)

        self.heartbeats = [
            Heartbeat(f"{self.name}-sender-{i}") for i in range(concurrency)
        ]
        self._threads = [
            threading.Thread(
                target=self._send_loop, args=(beat,), name=beat.name, daemon=True
            )
            for beat in self.heartbeats
        ]

    # -- the workers' side -------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, outbounds: list[Outbound]) -> None:
        """Queue events; a full queue drops its oldest (or waits, with a spool).

        Events that arrive after `abort()` are settled as the shutdown says:
        kept in the spool, or dead-lettered.
        """
        overflow: list[Outbound] = []
        late: list[Outbound] = []
        now = time.monotonic()
        with self._cond:
            for index, outbound in enumerate(outbounds):
                if self._abort.is_set() or (
                    self._count >= self._capacity and not self._make_room(overflow)
                ):
                    late = outbounds[index:]
                    break
                outbound.enqueued = now
                line = self._pending.get(outbound.key)
                if line is None:
                    line = self._pending[outbound.key] = deque()
                line.append(outbound)
                self._count += 1
            self._cond.notify()
        if overflow:
            self._give_up(overflow, "queue_overflow", None)
            self._report_overflow(len(overflow))
        if late:
            self._abandon(late)

    def _make_room(self, overflow: list[Outbound]) -> bool:
        """With the lock held, free a place; False once shutdown has come."""
        while self._count >= self._capacity:
            if self._abort.is_set():
                return False
            if self._block_when_full:
                # Only the senders make room, and they may be asleep until
                # told that this queue is no longer empty.
                self._cond.notify_all()
                self._cond.wait(1.0)
                continue
            dropped = self._pop_oldest()
            if dropped is None:
                return True  # every key is in flight: exceed the bound briefly
            overflow.append(dropped)
        return True

    def depth(self) -> int:
        return self._count

    # -- shutdown ------------------------------------------------------------

    def flush(self) -> None:
        """Send everything now, ignoring batching windows."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def wait_idle(self, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._count or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def abort(self, join_seconds: float = 1.0) -> int:
        """Stop retrying; settle whatever is left as `shutdown`. Returns its count.

        A sender still inside a request after `join_seconds` is not waited
        for: its batch is settled here too, as the process is about to end.
        """
        self._abort.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + join_seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = [outbound for line in self._pending.values() for outbound in line]
            for batch in self._sending.values():
                left.extend(batch)
            self._pending.clear()
            self._sending.clear()
            self._count = 0
        self._abandon(left)
        return len(left)

    def wedged(self, threshold_seconds: float) -> list[str]:
        now = time.monotonic()
        stuck = [
            b.name for b in self.heartbeats if b.stuck_for(now) > threshold_seconds
        ]
        dead = [t.name for t in self._threads if t.ident and not t.is_alive()]
        return stuck + dead if not self._abort.is_set() else []

    # -- the senders' side ---------------------------------------------------

    def _send_loop(self, beat: Heartbeat) -> None:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            while True:
                batch = self._next_batch(beat)
                if batch is None:
                    return
                try:
                    self._deliver(session, batch, beat)
                except Exception:
                    logger.exception(
                        "%s: unexpected failure delivering a batch", self.name
                    )
                    self._give_up(batch, "internal_error", None)
                    self._finish(batch, [], {})
        finally:
            beat.idle()
            session.close()

    def _next_batch(self, beat: Heartbeat) -> list[Outbound] | None:
        with self._cond:
            while not self._abort.is_set():
                now = time.monotonic()
                batch, wake_at = self._form_batch(now)
                if batch:
                    beat.busy()
                    self._in_flight += 1
                    self._sending[id(batch)] = batch
                    if self._count:
                        self._cond.notify()  # more may be ready for another sender
                    return batch
                beat.idle()
                self._cond.wait(None if wake_at is None else max(0.0, wake_at - now))
        return None

    def _form_batch(self, now: float) -> tuple[list[Outbound], float | None]:
        """Take a ready batch, or say when the next one will be ready."""
        wake_at: float | None = None
        one_key = self._destination.one_key_per_batch
        ready = self._flushing or (not one_key and self._count >= self._limit)
        batch: list[Outbound] = []
        size = 0
        max_bytes = self._destination.max_batch_bytes

        emptied: list[str] = []
        for key, line in self._pending.items():
            if key in self._busy:
                continue
            until = self._held.get(key)
            if until is not None:
                if until > now:
                    wake_at = until if wake_at is None else min(wake_at, until)
                    continue
                del self._held[key]
            if not ready and not batch:
                due = line[0].enqueued + self._wait_seconds
                if due > now and not (one_key and len(line) >= self._limit):
                    # Keys are in arrival order: later ones are due later still.
                    wake_at = due if wake_at is None else min(wake_at, due)
                    break
            while line and len(batch) < self._limit:
                item_size = line[0].mapped.size
                if batch and size + item_size > max_bytes:
                    break
                batch.append(line.popleft())
                size += item_size
            self._busy.add(key)
            if not line:
                emptied.append(key)
            if one_key or len(batch) >= self._limit or (line and batch):
                break
        for key in emptied:
            del self._pending[key]
        self._count -= len(batch)
        return batch, wake_at

    def _deliver(
        self, session: requests.Session, batch: list[Outbound], beat: Heartbeat
    ) -> None:
        events = [outbound.mapped for outbound in batch]
        request = self._destination.build_request(events)
        payload = request.encoded()
        started = time.monotonic()
        for outbound in batch:
            if outbound.first_attempt is None:
                outbound.first_attempt = started
        give_up_at = (
            min(o.first_attempt or started for o in batch)
            + self._settings.retry_horizon_seconds
        )

        def attempt() -> tuple[int, SendResult]:
            beat.busy()
            status, content, headers = self._timed_post(
                session, request.url, request.safe_url, payload
            )
            result = self._destination.read_response(
                status, content, headers, len(events), events=events
            )
            if result.retry:
                raise TransientError(
                    f"{self.name} answered {status}", status, result.retry_after_seconds
                )
            return status, result

        backoff = wait_random_exponential(
            multiplier=self._settings.retry_initial_seconds,
            max=self._settings.retry_max_seconds,
        )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            seconds = backoff(state)
            if isinstance(error, TransientError) and error.retry_after is not None:
                seconds = error.retry_after
            return max(0.0, min(seconds, give_up_at - time.monotonic()))

        def stop(state: RetryCallState) -> bool:
            return self._abort.is_set() or time.monotonic() >= give_up_at

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            reason = str(getattr(error, "status", None) or "transport")
            self._metrics.retried.labels(self.name, reason).inc(len(batch))
            logger.warning(
                "%s; retrying %d events in %.1f s (attempt %d)",
                error,
                len(batch),
                state.upcoming_sleep,
                state.attempt_number,
                extra={"destination": self.name, "status": reason, "count": len(batch)},
            )

        def sleep(seconds: float) -> None:
            # Waiting out a backoff or a Retry-After is not being stuck.
            beat.idle()
            self._sleep(seconds)

        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait,
            stop=stop,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            status, result = retrying(attempt)
        except TransientError as error:
            if self._abort.is_set():
                if self._claim(batch):
                    self._abandon(batch)
                return
            logger.error(
                "%s: gave up on %d events after %.0f s: %s",
                self.name,
                len(batch),
                time.monotonic() - (batch[0].first_attempt or started),
                error,
                extra={"destination": self.name, "count": len(batch)},
            )
            self._give_up(batch, "retries_exhausted", error.status)
            self._finish(batch, [], {})
            return
        if self._abort.is_set() and id(batch) not in self._sending:
            return  # abort() gave up on it while the answer was on its way
        self._settle(batch, status, result)

    def _timed_post(
        self, session: requests.Session, url: str, safe_url: str, payload: bytes
    ) -> Answer:
        started = time.perf_counter()
        try:
            status, content, headers = self._poster(session, url, safe_url, payload)
        except TransientError:
            self._metrics.http_responses.labels(self.name, "error").inc()
            raise
        finally:
            self._http_duration.observe(time.perf_counter() - started)
        self._metrics.http_responses.labels(self.name, str(status)).inc()
        return status, content, headers

    def _settle(self, batch: list[Outbound], status: int, result: SendResult) -> None:
        if result.config_error:
            self._log_error_once(result.config_error)
        for warning in result.warnings:
            code = warning.split("validationCode=", 1)[-1].split()[0].strip(",;")
            self._metrics.validation_messages.labels(
                code if "=" not in code else ""
            ).inc()
            logger.warning(
                "%s validation: %s",
                self.name,
                warning,
                extra={"destination": self.name},
            )

        if result.split:
            if len(batch) == 1:
                self._give_up(batch, "too_large", status)
                self._finish(batch, [], {})
            else:
                with self._cond:
                    self._limit = max(1, min(self._limit, len(batch) // 2))
                self._finish(batch, batch, {})
            return

        now = time.monotonic()
        delivered: list[Outbound] = []
        again: list[Outbound] = []
        holds: dict[str, float] = {}
        rejected: dict[str, list[Outbound]] = {}
        resend = set(result.resend)
        for index, outbound in enumerate(batch):
            if index in result.rejected:
                rejected.setdefault(result.rejected[index], []).append(outbound)
            elif index in result.held:
                again.append(outbound)
                until = now + result.held[index]
                holds[outbound.key] = max(holds.get(outbound.key, 0.0), until)
            elif index in resend:
                again.append(outbound)
            else:
                delivered.append(outbound)

        for reason, outbounds in rejected.items():
            self._give_up(outbounds, reason, status)
        if delivered:
            self._delivered.inc(len(delivered))
            now_ns = time.time_ns()
            for outbound in delivered:
                self._latency.observe((now_ns - outbound.received_ns) / 1e9)
            self._tracker.done(o.envelope_id for o in delivered)
            if self._limit < self._destination.max_batch_events:
                with self._cond:
                    self._limit = min(
                        self._destination.max_batch_events, self._limit * 2
                    )
        if holds:
            logger.warning(
                "%s throttled %d keys; holding their events %.0f s",
                self.name,
                len(holds),
                max(holds.values()) - now,
                extra={"destination": self.name, "count": len(holds)},
            )
        self._finish(batch, again, holds)

    def _finish(
        self, batch: list[Outbound], again: list[Outbound], holds: dict[str, float]
    ) -> None:
        """Release the batch's keys, putting `again` back at the front."""
        with self._cond:
            self._in_flight -= 1
            if self._sending.pop(id(batch), None) is None:
                return  # abort() has settled this batch already
            for outbound in reversed(again):
                line = self._pending.get(outbound.key)
                if line is None:
                    line = self._pending[outbound.key] = deque()
                line.appendleft(outbound)
                self._pending.move_to_end(outbound.key, last=False)
            self._count += len(again)
            self._held.update(holds)
            for outbound in batch:
                self._busy.discard(outbound.key)
            self._cond.notify_all()

    def _claim(self, batch: list[Outbound]) -> bool:
        """Take the batch back from the in-flight set; False if abort() has it."""
        with self._cond:
            self._in_flight -= 1
            for outbound in batch:
                self._busy.discard(outbound.key)
            self._cond.notify_all()
            return self._sending.pop(id(batch), None) is not None

    def _pop_oldest(self) -> Outbound | None:
        for key, line in self._pending.items():
            if key in self._busy:
                continue
            outbound = line.popleft()
            if not line:
                del self._pending[key]
            self._count -= 1
            return outbound
        return None

    def _abandon(self, outbounds: list[Outbound]) -> None:
        """Shutdown came first: keep them in the spool, or dead-letter them."""
        if not outbounds:
            return
        if self._keep_on_shutdown:
            logger.warning(
                "%s: %d undelivered events stay in the spool for the next start",
                self.name,
                len(outbounds),
            )
            return
        self._give_up(outbounds, "shutdown", None)

    def _give_up(
        self, outbounds: list[Outbound], reason: str, status: int | None
    ) -> None:
        self._dead_letters.write(
            [
                DeadLetter(
                    destination=self.name,
                    key=o.key,
                    event=o.mapped.event,
                    reason=reason,
                    status=status,
                    received_ns=o.received_ns,
                )
                for o in outbounds
            ]
        )
        self._tracker.done(o.envelope_id for o in outbounds)

    def _report_overflow(self, count: int) -> None:
        """Log overflow at most every ten seconds, with the count since."""
        now = time.monotonic()
        with self._cond:
            self._overflow_unreported += count
            if now - self._overflow_logged_at < _OVERFLOW_LOG_INTERVAL_SECONDS:
                return
            count, self._overflow_unreported = self._overflow_unreported, 0
            self._overflow_logged_at = now
        logger.warning(
            "%s queue full: dead-lettered its %d oldest events (queue_overflow)",
            self.name,
            count,
            extra={"destination": self.name, "count": count},
        )

    def _log_error_once(self, message: str) -> None:
        now = time.monotonic()
        if now - self._error_logged.get(message, -1e9) >= _ERROR_LOG_INTERVAL_SECONDS:
            self._error_logged[message] = now
            logger.error("%s: %s", self.name, message, extra={"destination": self.name})
