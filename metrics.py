"""Every counter the daemon keeps, in one Prometheus registry.

The exit summary, the periodic log summary and `/metrics` all read from
here, so they can never disagree. Labels carry only destination names,
notification types, reasons and status codes: never a user id or a key.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self.received = Counter(
            "listener_notifications_received",
            "Notifications read from the Agent stream, by type.",
            ["type"],
            registry=r,
        )
        self.rejected = Counter(
            "listener_notifications_rejected",
            "Frames that could not be used (malformed, unknown type), by reason.",
            ["reason"],
            registry=r,
        )
        self.buffer_dropped = Counter(
            "listener_buffer_dropped",
            "Notifications dropped by the buffer's overflow policy, by reason.",
            ["reason"],
            registry=r,
        )
        self.delivered = Counter(
            "listener_events_delivered",
            "Events acknowledged by a destination.",
            ["destination"],
            registry=r,
        )
        self.retried = Counter(
            "listener_events_retried",
            "Events sent again after a transient failure, by reason.",
            ["destination", "reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "listener_events_dead_lettered",
            "Events given up on and written to the dead-letter file, by reason.",
            ["destination", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "listener_events_dropped",
            "Events a destination could not accept at all, by reason.",
            ["destination", "reason"],
            registry=r,
        )
        self.adjusted = Counter(
            "listener_events_adjusted",
            "Fields trimmed or renamed to fit a destination's limits.",
            ["destination", "reason"],
            registry=r,
        )
        self.validation_messages = Counter(
            "listener_ga4_validation_messages",
            "Messages from the GA4 validation server, by validation code.",
            ["code"],
            registry=r,
        )
        self.dead_letter_write_errors = Counter(
            "listener_dead_letter_write_errors",
            "Failed writes to the dead-letter file.",
            registry=r,
        )
        self.spool_errors = Counter(
            "listener_spool_errors",
            "Spool failures (unwritable, corrupt, full), by reason.",
            ["reason"],
            registry=r,
        )
        self.buffer_depth = Gauge(
            "listener_buffer_depth",
            "Notifications waiting to be processed.",
            registry=r,
        )
        self.buffer_capacity = Gauge(
            "listener_buffer_capacity",
            "Capacity of the notification buffer.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "listener_destination_queue_depth",
            "Events waiting for delivery, by destination.",
            ["destination"],
            registry=r,
        )
        self.stream_connected = Gauge(
            "listener_stream_connected",
            "1 while the stream request to the Agent is open.",
            registry=r,
        )
        self.reconnects = Counter(
            "listener_stream_reconnects",
            "Times the stream was opened again after ending or failing.",
            registry=r,
        )
        self.last_notification = Gauge(
            "listener_seconds_since_last_notification",
            "Seconds since the last notification was read (-1 before the first).",
            registry=r,
        )
        self.latency = Histogram(
            "listener_delivery_latency_seconds",
            "Time from receipt of a notification to the destination's acknowledgement.",
            ["destination"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_duration = Histogram(
            "listener_http_request_duration_seconds",
            "Duration of HTTP requests to a destination.",
            ["destination"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.http_responses = Counter(
            "listener_http_responses",
            "HTTP answers from a destination by status ('error': no answer).",
            ["destination", "status"],
            registry=r,
        )
        Info("listener_build", "Version of the daemon.", registry=r).info(
            {"version": version}
        )

        self._last_notification_at: float | None = None
        self.last_notification.set_function(self._seconds_since_last_notification)

    def note_notification(self) -> None:
        self._last_notification_at = time.monotonic()

    def _seconds_since_last_notification(self) -> float:
        if self._last_notification_at is None:
            return -1.0
        return time.monotonic() - self._last_notification_at

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        gauge.set_function(read)

    def total(self, name: str, **labels: str) -> float:
        """Sum of a counter's samples whose labels match `labels`."""
        total = 0.0
        for metric in self.registry.collect():
            if metric.name != name:
                continue
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """A counter's totals grouped by one label, for summaries."""
        grouped: dict[str, float] = {}
        for metric in self.registry.collect():
            if metric.name != name:
                continue
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    key = sample.labels.get(label, "")
                    grouped[key] = grouped.get(key, 0.0) + sample.value
        return grouped
