"""Builds the daemon's parts from the settings and runs their lifecycle.

`Daemon` owns every thread: the listener, the workers, one dispatcher per
destination, the operator endpoint and the periodic summary. `main.py`
only starts it, waits for a signal and asks it to drain.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import replace
from typing import TextIO

import requests

from amplitude import AmplitudeDestination
from dead_letter import DeadLetterFile
from delivery import Answer, CompletionTracker, Dispatcher, Poster, http_poster
from destination import Destination
from event_buffer import EventBuffer, MemoryBuffer
from google_analytics import Ga4Destination
from logger_config import SecretMasker
from metrics import Metrics
from notification_listener import NotificationListener, StreamState
from notification_processor import NotificationProcessor
from settings import VERSION, Settings
from spool import SpoolBuffer
from workers import WorkerPool

logger = logging.getLogger(__name__)

# Stand-in credentials so a dry run can show complete requests; masked
# like real secrets wherever they appear.
_DRY_RUN_GA_ID = "G-DRYRUN"
_DRY_RUN_SECRET = "dry-run-ga-secret"
_DRY_RUN_KEY = "dry-run-amplitude-key"

# The stream is open once connected with the request sent and not refused;
# no byte need have arrived, as the Agent answers with its first notification.
_OPEN_STATES = frozenset(
    {StreamState.AWAITING_FIRST_NOTIFICATION, StreamState.STREAMING}
)


def dry_run_poster(out: TextIO, mask: SecretMasker) -> Poster:
    """Print each request as one JSON line instead of sending it."""
    lock = threading.Lock()

    def post(session: requests.Session, url: str, safe_url: str, body: bytes) -> Answer:
        destination = "ga4" if "measurement_id=" in url else "amplitude"
        line = mask(
            json.dumps(
                {"destination": destination, "url": safe_url, "body": json.loads(body)},
                ensure_ascii=False,
            )
        )
        with lock:
            out.write(line + "\n")
            out.flush()
        return 200, b'{"code":200,"validationMessages":[]}', {}

    return post


def effective_settings(settings: Settings) -> Settings:
    """In a dry run, fill missing credentials with placeholders."""
    if not settings.dry_run:
        return settings
    return replace(
        settings,
        ga_measurement_id=settings.ga_measurement_id or _DRY_RUN_GA_ID,
        ga_api_secret=settings.ga_api_secret or _DRY_RUN_SECRET,
        amplitude_api_key=settings.amplitude_api_key or _DRY_RUN_KEY,
    )


def secrets_of(settings: Settings) -> tuple[str, ...]:
    placeholders = (_DRY_RUN_SECRET, _DRY_RUN_KEY) if settings.dry_run else ()
    return settings.secrets + placeholders


def build_destinations(settings: Settings) -> list[Destination]:
    destinations: list[Destination] = []
    if "ga4" in settings.destinations:
        destinations.append(Ga4Destination(settings))
    if "amplitude" in settings.destinations:
        destinations.append(AmplitudeDestination(settings))
    return destinations


def build_dispatchers(
    settings: Settings,
    destinations: list[Destination],
    metrics: Metrics,
    dead_letters: DeadLetterFile,
    tracker: CompletionTracker,
    poster: Poster,
    *,
    keep_on_shutdown: bool = False,
) -> list[Dispatcher]:
    dispatchers = []
    for destination in destinations:
        is_ga = destination.name == "ga4"
        dispatchers.append(
            Dispatcher(
                destination,
                settings,
                metrics,
                dead_letters,
                tracker,
                poster=poster,
                concurrency=settings.ga_concurrency
                if is_ga
                else settings.amplitude_concurrency,
                wait_seconds=settings.ga_grouping_window_seconds
                if is_ga
                else settings.amplitude_flush_interval_seconds,
                keep_on_shutdown=keep_on_shutdown,
                block_when_full=keep_on_shutdown,
            )
        )
    return dispatchers


class Daemon:
    """The running pipeline: listener → buffer → workers → dispatchers."""

    def __init__(
        self, settings: Settings, mask: SecretMasker, *, out: TextIO = sys.stdout
    ) -> None:
        self.settings = settings = effective_settings(settings)
        self.mask = mask
        self.metrics = metrics = Metrics(VERSION)
        self.started_at = time.monotonic()
        self.draining = threading.Event()

        self.spooled = bool(settings.spool_path)
        self.buffer: EventBuffer
        if self.spooled:
            self.buffer = SpoolBuffer(
                settings.spool_path,
                settings.spool_max_bytes,
                settings.buffer_overflow_policy,
                metrics,
                memory_capacity=settings.buffer_capacity,
            )
        else:
            self.buffer = MemoryBuffer(
                settings.buffer_capacity, settings.buffer_overflow_policy, metrics
            )
        metrics.buffer_capacity.set(settings.buffer_capacity)
        metrics.watch(metrics.buffer_depth, self.buffer.depth)

        self.dead_letters = DeadLetterFile(settings.dead_letter_path, metrics, mask)
        self.tracker = CompletionTracker(self.buffer.ack)
        self.destinations = build_destinations(settings)
        for destination in self.destinations:
            adjustments = getattr(destination, "adjustments", None)
            if adjustments is not None:
                destination.adjustments = _CountingAdjustments(
                    metrics, destination.name
                )
        poster = (
            dry_run_poster(out, mask) if settings.dry_run else http_poster(settings)
        )
        self.dispatchers = build_dispatchers(
            settings,
            self.destinations,
            metrics,
            self.dead_letters,
            self.tracker,
            poster,
            keep_on_shutdown=self.spooled,
        )
        self.processor = NotificationProcessor(settings.exposure_mode, metrics)
        self.workers = WorkerPool(
            settings.worker_threads,
            self.buffer,
            self.processor,
            list(zip(self.destinations, self.dispatchers, strict=True)),
            self.tracker,
            self.dead_letters,
            metrics,
        )
        self.listener = NotificationListener(settings, self.buffer, metrics)
        # Not set by the listener itself, which learns of the Agent's answer
        # only with the first notification: "open" here is what /readyz says.
        metrics.watch(
            metrics.stream_connected, lambda: self.listener.state in _OPEN_STATES
        )
        self._summary_stop = threading.Event()
        self._summary = threading.Thread(
            target=self._summarise, name="summary", daemon=True
        )

    def start(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.start()
        self.workers.start()
        self.listener.start()
        if self.settings.summary_interval_seconds > 0:
            self._summary.start()
        names = ", ".join(d.name for d in self.dispatchers) or "none"
        logger.info(
            "started %s: forwarding to %s%s",
            VERSION,
            names,
            " (dry run: printing requests)" if self.settings.dry_run else "",
        )

    # -- health ----------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        threshold = self.settings.wedged_after_seconds
        # A drain ends the listener and the workers on purpose; only a stuck
        # sender means the process needs a restart then.
        draining = self.draining.is_set()
        if not self.listener.is_alive() and not draining:
            return False, "listener thread is not running"
        problems = [] if draining else self.workers.dead()
        now = time.monotonic()
        problems += [
            b.name for b in self.workers.heartbeats if b.stuck_for(now) > threshold
        ]
        for dispatcher in self.dispatchers:
            problems += dispatcher.wedged(threshold)
        if problems:
            return False, "stuck or dead threads: " + ", ".join(problems)
        return True, "ok"

    def readiness(self) -> tuple[bool, dict[str, str]]:
        parts = {"configuration": "loaded"}
        state = self.listener.state
        parts["stream"] = state.value
        if self.listener.state_detail:
            parts["stream_detail"] = self.mask(self.listener.state_detail)
        ready = state in _OPEN_STATES
        if self.draining.is_set():
            parts["lifecycle"] = "draining"
            ready = False
        return ready, parts

    # -- shutdown --------------------------------------------------------------

    def drain(self, timeout_seconds: float) -> None:
        """Stop reading, deliver what is buffered, give up at the deadline."""
        deadline = time.monotonic() + timeout_seconds
        self.draining.set()
        logger.info(
            "stopping: draining %d buffered notifications within %.0f s",
            self.buffer.depth(),
            timeout_seconds,
        )
        self.listener.stop(timeout_seconds=min(2.0, timeout_seconds))
        self.buffer.close()
        # From now on every batch goes out at once, without batching windows.
        for dispatcher in self.dispatchers:
            dispatcher.flush()
        self.workers.join(max(0.0, deadline - time.monotonic()))
        for dispatcher in self.dispatchers:
            dispatcher.wait_idle(max(0.0, deadline - time.monotonic()))
        for dispatcher in self.dispatchers:
            left = dispatcher.abort()
            if left:
                logger.warning(
                    "%s: %d events undelivered at the deadline", dispatcher.name, left
                )
        self.buffer.report_drops()
        unprocessed = self.buffer.depth()
        if isinstance(self.buffer, SpoolBuffer):
            self.buffer.shutdown()
            if unprocessed:
                logger.info("%d notifications stay in the spool", unprocessed)
        elif unprocessed:
            self.metrics.buffer_dropped.labels("shutdown").inc(unprocessed)
            logger.error(
                "%d notifications were never processed before the deadline", unprocessed
            )
        self._summary_stop.set()

    def summary(self) -> str:
        m = self.metrics
        received = m.by_label("listener_notifications_received", "type")
        lines = [
            "received: "
            + (
                ", ".join(f"{k}={int(v)}" for k, v in sorted(received.items()))
                or "none"
            ),
        ]
        for dispatcher in self.dispatchers:
            name = dispatcher.name
            counts = {
                label: int(m.total(f"listener_events_{label}", destination=name))
                for label in ("delivered", "retried", "dead_lettered", "dropped")
            }
            lines.append(f"{name}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
        for label, name in (
            ("rejected", "listener_notifications_rejected"),
            ("buffer dropped", "listener_buffer_dropped"),
        ):
            counts = m.by_label(name, "reason")
            if counts:
                lines.append(
                    f"{label}: "
                    + ", ".join(f"{k}={int(v)}" for k, v in sorted(counts.items()))
                )
        return "; ".join(lines)

    def _summarise(self) -> None:
        interval = self.settings.summary_interval_seconds
        while not self._summary_stop.wait(interval):
            m = self.metrics
            logger.info(
                "summary: received %d, delivered %d, retried %d, dead-lettered %d, "
                "buffer depth %d",
                m.total("listener_notifications_received"),
                m.total("listener_events_delivered"),
                m.total("listener_events_retried"),
                m.total("listener_events_dead_lettered"),
                self.buffer.depth(),
                extra={"buffer_depth": self.buffer.depth()},
            )


class _CountingAdjustments(dict):
    """A Counter-like dict whose increments also feed the adjustments metric."""

    def __init__(self, metrics: Metrics, destination: str) -> None:
        super().__init__()
        self._metric = metrics.adjusted
        self._destination = destination

    def __missing__(self, key: str) -> int:
        return 0

    def __setitem__(self, key: str, value: int) -> None:
        increase = value - self.get(key, 0)
        if increase > 0:
            self._metric.labels(self._destination, key).inc(increase)
        super().__setitem__(key, value)
