"""A loopback stand-in for Amplitude's HTTP V2 API (`POST /2/httpapi`).

It answers as Amplitude does: 400 with the documented error bodies for a bad
request or bad events, 413 over 2000 events or 1 MB, and 200 with
`events_ingested` otherwise. A rejected request ingests none of its events.
Ingested events are deduplicated like Amplitude's 7-day `insert_id` window
(per device, or per user when there is no device id). Tests can also script
Amplitude's per-event answers: field rejections, 429 throttling, silenced
devices and a lower size limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from standins._http import DestinationStandIn, Exchange, status_phrase

TRACKING_PATH = "/2/httpapi"

MAX_EVENTS = 2000
MAX_BODY_BYTES = 1_000_000
MAX_STRING_LENGTH = 1024
DEFAULT_MIN_ID_LENGTH = 5
EPS_THRESHOLD = 30

RESERVED_EVENT_TYPES = frozenset(
    {
        "[Amplitude] Start Session",
        "[Amplitude] End Session",
        "[Amplitude] Revenue",
        "[Amplitude] Revenue (Verified)",
        "[Amplitude] Revenue (Unverified)",
        "[Amplitude] Merged User",
    }
)
# Compared lower-cased; Amplitude refuses these as user or device ids.
INVALID_IDS = frozenset(
    {
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "lmy47d",
        "0",
        "-1",
    }
)
_INTEGER_FIELDS = ("time", "session_id", "event_id")
_OBJECT_FIELDS = ("event_properties", "user_properties", "groups", "group_properties")

# A canned answer: given the request's events, the status and JSON to send.
_Canned = Callable[[list[Any]], tuple[int, dict[str, Any]]]
# Status, JSON answer, and the events to ingest (only with a 200).
_Judgement = tuple[int, dict[str, Any], list[dict[str, Any]]]


class AmplitudeStandIn(DestinationStandIn):
    """Amplitude HTTP V2 on a loopback port, with scriptable answers.

    `events()` holds every ingested event in arrival order, duplicates
    included; `unique_events()` keeps the first per dedup key, as Amplitude
    would show them. Scripted faults (from the base class) come first, then
    canned answers, then the real validation.
    """

    def __init__(self, api_key: str = "test_amplitude_key") -> None:
        super().__init__("amplitude-standin")
        self.api_key = api_key
        self._events: list[dict[str, Any]] = []
        self._unique: list[dict[str, Any]] = []
        self._seen: set[tuple[str, str, str]] = set()
        self._duplicates = 0
        self._rejections: list[dict[str, Any]] = []
        self._canned: list[_Canned] = []
        self._too_large_over: int | None = None

    @property
    def tracking_url(self) -> str:
        return self.url + TRACKING_PATH

    def events(self) -> list[dict[str, Any]]:
        """Every ingested event, duplicates included, in arrival order."""
        with self._changed:
            return list(self._events)

    def unique_events(self) -> list[dict[str, Any]]:
        """The first ingested event per dedup key, in arrival order."""
        with self._changed:
            return list(self._unique)

    @property
    def duplicates(self) -> int:
        """Ingested events that Amplitude would have ignored as repeats."""
        with self._changed:
            return self._duplicates

    @property
    def rejections(self) -> list[dict[str, Any]]:
        """The JSON of every non-200 answer the service itself gave."""
        with self._changed:
            return list(self._rejections)

    def wait_for_unique(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` distinct events have been ingested."""
        return self._wait(lambda: len(self._unique) >= count, timeout)

    def wait_for_events(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` events (duplicates too) were ingested."""
        return self._wait(lambda: len(self._events) >= count, timeout)

    def report(self) -> dict[str, Any]:
        with self._changed:
            return {
                **self._report_counts(),
                "events_ingested": len(self._events),
                "unique": len(self._unique),
                "duplicates": self._duplicates,
                "rejections": len(self._rejections),
            }

    # Canned answers, each used by the next well-formed request.

    def reject_fields_next(
        self,
        invalid_indexes: list[int],
        missing_indexes: list[int] | None = None,
        field: str = "time",
        missing_field: str = "event_type",
    ) -> None:
        """Answer the next request 400 naming these event indexes as bad."""
        body = {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {field: list(invalid_indexes)}
            if invalid_indexes
            else {},
            "events_with_missing_fields": {missing_field: list(missing_indexes)}
            if missing_indexes
            else {},
        }
        self._queue_canned(lambda events: (400, body))

    def throttle_next(
        self,
        users: dict[str, int],
        devices: dict[str, int] | None = None,
        daily_quota_users: dict[str, int] | None = None,
        daily_quota_devices: dict[str, int] | None = None,
    ) -> None:
        """Answer the next request 429 for these users and devices.

        `throttled_events` lists the indexes of events from any of them. A
        429 ingests nothing, throttled or not.
        """
        devices = devices or {}
        user_ids = set(users) | set(daily_quota_users or {})
        device_ids = set(devices) | set(daily_quota_devices or {})

        def answer(events: list[Any]) -> tuple[int, dict[str, Any]]:
            body: dict[str, Any] = {
                "code": 429,
                "error": "Too many requests for some devices and users",
                "eps_threshold": EPS_THRESHOLD,
                "throttled_devices": dict(devices),
                "throttled_users": dict(users),
                "throttled_events": [
                    index
                    for index, event in enumerate(events)
                    if isinstance(event, dict)
                    and (
                        event.get("user_id") in user_ids
                        or event.get("device_id") in device_ids
                    )
                ],
            }
            if daily_quota_users is not None:
                body["exceeded_daily_quota_users"] = dict(daily_quota_users)
            if daily_quota_devices is not None:
                body["exceeded_daily_quota_devices"] = dict(daily_quota_devices)
            return 429, body

        self._queue_canned(answer)

    def silence_next(self, indexes: list[int]) -> None:
        """Answer the next request 400 with these events' devices silenced."""

        def answer(events: list[Any]) -> tuple[int, dict[str, Any]]:
            devices = {
                events[index].get("device_id") or events[index].get("user_id")
                for index in indexes
                if index < len(events) and isinstance(events[index], dict)
            }
            return 400, {
                "code": 400,
                "error": "Events silenced for device_id",
                "eps_threshold": EPS_THRESHOLD,
                "exceeded_daily_quota_devices": {},
                "silenced_devices": sorted(str(device) for device in devices),
                "silenced_events": list(indexes),
                "throttled_devices": {},
                "throttled_events": [],
            }

        self._queue_canned(answer)

    def too_large_over(self, count: int | None) -> None:
        """Answer 413 to any request with more than `count` events; None resets."""
        with self._changed:
            self._too_large_over = count

    def _queue_canned(self, answer: _Canned) -> None:
        with self._changed:
            self._canned.append(answer)

    # Serving.

    def _error_body(self, status: int) -> tuple[bytes, str]:
        answer = {"code": status, "error": status_phrase(status)}
        return json.dumps(answer).encode(), "application/json"

    def _serve(self, exchange: Exchange, raw: bytes, body: Any) -> None:
        status, answer, events = self._judge(exchange, raw, body)
        with self._changed:
            if status == 200:
                self._ingest(events)
            else:
                self._rejections.append(answer)
            self._record(self._received(exchange, raw, body, status, answer))
        exchange.respond_json(status, answer)

    def _judge(self, exchange: Exchange, raw: bytes, body: Any) -> _Judgement:
        """The status and JSON Amplitude would answer, and the events to ingest."""
        if exchange.route != TRACKING_PATH:
            return _refuse(400, "Invalid request path")
        if exchange.command != "POST":
            return _refuse(405, "Method not allowed")
        if not raw:
            return _refuse(400, "Missing request body")
        if len(raw) >= MAX_BODY_BYTES:
            return _refuse(413, "Payload too large")
        if not isinstance(body, dict):
            return _refuse(400, "Invalid JSON request body")
        if not isinstance(body.get("api_key"), str) or not body["api_key"]:
            return _missing("api_key")
        if body["api_key"] != self.api_key:
            return _refuse(400, f"Invalid API key: {body['api_key']}")
        events = body.get("events")
        if events is None or events == []:
            return _missing("events")
        if not isinstance(events, list):
            return _refuse(400, "Invalid event JSON")
        with self._changed:
            limit = self._too_large_over
            canned = self._canned.pop(0) if self._canned else None
        if len(events) > MAX_EVENTS or (limit is not None and len(events) > limit):
            return _refuse(413, "Payload too large")
        if canned is not None:
            status, answer = canned(events)
            return status, answer, []

        if not all(isinstance(event, dict) for event in events):
            return _refuse(400, "Invalid event JSON")
        options = body.get("options")
        min_id_length = DEFAULT_MIN_ID_LENGTH
        if isinstance(options, dict) and isinstance(options.get("min_id_length"), int):
            min_id_length = options["min_id_length"]
        problems = _event_problems(events, min_id_length)
        if problems is not None:
            return 400, problems, []
        answer = {
            "code": 200,
            "events_ingested": len(events),
            "payload_size_bytes": len(raw),
            "server_upload_time": time.time_ns() // 1_000_000,
        }
        return 200, answer, events

    def _ingest(self, events: list[dict[str, Any]]) -> None:
        """Record accepted events; call with `_changed` held."""
        for event in events:
            self._events.append(event)
            insert_id = event.get("insert_id")
            if insert_id is None:
                self._unique.append(event)
                continue
            # Without a device id Amplitude derives one from the user id.
            device_id = event.get("device_id")
            key = (
                ("device", str(device_id), str(insert_id))
                if device_id
                else ("user", str(event.get("user_id")), str(insert_id))
            )
            if key in self._seen:
                self._duplicates += 1
            else:
                self._seen.add(key)
                self._unique.append(event)


def _event_problems(
    events: list[dict[str, Any]], min_id_length: int
) -> dict[str, Any] | None:
    """Amplitude's 400 body for events it would refuse, or None if all pass."""
    invalid: dict[str, list[int]] = {}
    missing: dict[str, list[int]] = {}
    short_ids: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        event_type = event.get("event_type")
        if event_type is None or event_type == "":
            missing.setdefault("event_type", []).append(index)
        elif not isinstance(event_type, str) or event_type in RESERVED_EVENT_TYPES:
            invalid.setdefault("event_type", []).append(index)

        has_id = False
        for field in ("user_id", "device_id"):
            value = event.get(field)
            if value is None:
                continue
            has_id = True
            if not isinstance(value, str) or value.lower() in INVALID_IDS:
                invalid.setdefault(field, []).append(index)
            elif len(value) < min_id_length:
                short_ids.setdefault(field, []).append(index)
        if not has_id:
            missing.setdefault("user_id", []).append(index)

        for field in _INTEGER_FIELDS:
            value = event.get(field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                invalid.setdefault(field, []).append(index)
        for field in _OBJECT_FIELDS:
            if event.get(field) is not None and not isinstance(event[field], dict):
                invalid.setdefault(field, []).append(index)
        insert_id = event.get("insert_id")
        if insert_id is not None and not isinstance(insert_id, str):
            invalid.setdefault("insert_id", []).append(index)
        for field, value in event.items():
            if _has_long_string(value) and index not in invalid.get(field, ()):
                invalid.setdefault(field, []).append(index)

    if not (invalid or missing or short_ids):
        return None
    answer: dict[str, Any] = {"code": 400}
    if invalid or missing:
        answer["error"] = "Invalid field values on some events"
        answer["events_with_invalid_fields"] = invalid
        answer["events_with_missing_fields"] = missing
    else:
        answer["error"] = "Invalid id length for user_id or device_id"
    if short_ids:
        answer["events_with_invalid_id_lengths"] = short_ids
    return answer


def _has_long_string(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > MAX_STRING_LENGTH
    if isinstance(value, dict):
        return any(_has_long_string(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_long_string(item) for item in value)
    return False


def _refuse(status: int, message: str) -> _Judgement:
    return status, {"code": status, "error": message}, []


def _missing(field: str) -> _Judgement:
    body = {"code": 400, "error": "Request missing required field"}
    return 400, {**body, "missing_field": field}, []
