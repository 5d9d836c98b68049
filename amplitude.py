"""Amplitude: exposures and conversions as HTTP V2 API events.

An exposure becomes an event of the configured exposure type and sets the
user property `[Optimizely] <flag_key>` to the variation; a conversion
becomes an event named after its Optimizely event key, with its tags as
event properties. Values are fitted to Amplitude's limits here, and every
fit is counted in `AmplitudeDestination.adjustments`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from destination import (
    EVENTS,
    Mapped,
    Rejected,
    Request,
    SendResult,
    retry_after_seconds,
    with_events,
)
from notifications import Conversion, Exposure, Notification
from settings import AMPLITUDE_MAX_BATCH_SIZE, Settings

_MAX_BODY_BYTES = 1_000_000  # the API answers 413 from 1 MB on
_STRING_LENGTH = 1024
_MAX_KEYS = 1024
_SAFE_INTEGER = 2**53
_MAX_DEPTH = 40
_RENAME_PREFIX = "[Optimizely] "
_OPTIMIZELY_ATTRIBUTE = "$opt_"

# User ids Amplitude refuses outright (compared in lower case).
_INVALID_USER_IDS = frozenset(
    {
        "",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "lmy47d",
        "0",
        "-1",
    }
)
# Event types with a meaning of their own in Amplitude, which a conversion
# must not take on by accident; every `[Amplitude] ...` type counts too.
_RESERVED_EVENT_TYPES = frozenset({"$identify", "$groupidentify"})
_AMPLITUDE_PREFIX = "[amplitude]"

# 400 answers that reject single events, by the reason given to each.
_EVENT_ERRORS = (
    ("events_with_invalid_fields", "invalid_fields"),
    ("events_with_missing_fields", "missing_fields"),
    ("events_with_invalid_id_lengths", "invalid_id_length"),
    ("silenced_events", "silenced"),
)
# Amplitude's documented 400 error texts: safe to repeat, unlike an unknown
# text, which might quote the API key back.
_KNOWN_ERRORS = frozenset(
    {
        "Invalid request path",
        "Missing request body",
        "Invalid JSON request body",
        "Request missing required field",
        "Invalid event JSON",
        "Invalid field values on some events",
        "Events silenced for device_id",
    }
)
_DROP = object()


class AmplitudeDestination:
    """Maps notifications to Amplitude events and reads the API's answers.

    `insert_id` comes from the notification's identity, so Amplitude drops
    a resend of an event it already has. A conversion whose key is one of
    Amplitude's own event types gets `[Optimizely] ` put in front rather
    than being lost. `adjustments` is updated without a lock, so under
    threads a count may rarely miss one.
    """

    name = "amplitude"
    one_key_per_batch = False

    def __init__(
        self, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.adjustments: Counter[str] = Counter()
        self.max_batch_events = min(
            settings.amplitude_batch_size, AMPLITUDE_MAX_BATCH_SIZE
        )
        self._api_key = settings.amplitude_api_key
        self._url = settings.amplitude_tracking_url
        self._clock = clock
        # Amplitude asks a throttled user or device to pause this long.
        self._throttle_seconds = settings.amplitude_throttle_seconds

        # The envelope with no events, plus one comma per event.
        envelope = Mapped.of("", self._body([])).size + self.max_batch_events
        self.max_batch_bytes = _MAX_BODY_BYTES - 1 - envelope
        configured = settings.amplitude_exposure_event_type
        self._exposure_type = self._event_type(configured)
        self._exposure_renamed = self._exposure_type != configured
        # Counted per event instead, as every other fit is.
        self.adjustments.clear()

    def map(self, notification: Notification) -> list[Mapped | Rejected]:
        """One Amplitude event for the notification, or why it cannot be sent."""
        user_id = notification.user_id
        if (
            len(user_id) > _STRING_LENGTH
            or user_id.strip().lower() in _INVALID_USER_IDS
        ):
            return [Rejected("invalid_user_id", f"Amplitude refuses {user_id[:64]!r}")]

        if isinstance(notification, Exposure):
            event = self._exposure(notification)
        else:
            if not notification.event_key:
                return [Rejected("invalid_event_type", "the event key is empty")]
            event = self._conversion(notification)

        mapped = Mapped.of(user_id, event)
        if mapped.size > self.max_batch_bytes:
            return [
                Rejected(
                    "too_large",
                    f"the event is {mapped.size} bytes; a request holds "
                    f"{self.max_batch_bytes}",
                )
            ]
        return [mapped]

    def build_request(self, events: list[Mapped]) -> Request:
        """One HTTP V2 upload; the key is in the body, so the URL is safe."""
        return Request(
            self._url,
            self._url,
            self._body([m.event for m in events]),
            with_events(self._body(EVENTS), events),
        )

    def read_response(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        count: int,
        *,
        events: list[Mapped] | None = None,
    ) -> SendResult:
        """Classify Amplitude's answer; `events` lets a 429 be read per user.

        Without `events`, a 429 can only hold the events it lists by index,
        and no daily-quota user can be told apart.
        """
        if 200 <= status < 300:
            return SendResult()
        if status == 400:
            return _bad_request(_json_object(body), count)
        if status == 413:
            if count > 1:
                return SendResult(split=True)
            return SendResult(rejected={0: "too_large"})
        if status == 429:
            wait = retry_after_seconds(headers, self._clock())
            if wait is None:
                wait = self._throttle_seconds
            return _throttled(_json_object(body), count, events, wait)
        if status == 408 or status >= 500:
            wait = retry_after_seconds(headers, self._clock())
            return SendResult(retry=True, retry_after_seconds=wait)
        if status == 403:
            return _reject_all(
                count,
                "forbidden",
                "Amplitude's firewall refused the request (HTTP 403): check "
                "AMPLITUDE_TRACKING_URL and where the listener runs from",
            )
        return _reject_all(
            count,
            f"http_{status}",
            f"Amplitude answered HTTP {status} at {self._url}: "
            "check AMPLITUDE_TRACKING_URL",
        )

    def _body(self, events: Any) -> dict[str, Any]:
        # min_id_length 1: Amplitude would silently strip user ids shorter
        # than its default of 5 characters.
        return {
            "api_key": self._api_key,
            "events": events,
            "options": {"min_id_length": 1},
        }

    def _exposure(self, exposure: Exposure) -> dict[str, Any]:
        if self._exposure_renamed:
            self.adjustments["event_type_renamed"] += 1
        event = self._common(exposure, self._exposure_type)
        event["event_properties"] = {
            "flag_key": self._clip(exposure.flag_key),
            "rule_key": self._clip(exposure.rule_key),
            "variation_key": self._clip(exposure.variation_key),
            "enabled": exposure.enabled,
        }

        # No variation means the user is in none; a blank would read as one.
        room = _MAX_KEYS - 1 if exposure.variation_key else _MAX_KEYS
        properties = self._properties(exposure.attributes, 1, room=room, internal=True)
        if exposure.variation_key:
            name = self._clip(f"[Optimizely] {exposure.flag_key}")
            properties[name] = self._clip(exposure.variation_key)
        if properties:
            event["user_properties"] = properties
        return event

    def _conversion(self, conversion: Conversion) -> dict[str, Any]:
        event = self._common(conversion, self._event_type(conversion.event_key))

        properties = self._properties(conversion.tags, 1)
        if properties:
            event["event_properties"] = properties
        if conversion.revenue is not None:
            event["revenue"] = conversion.revenue / 100  # Optimizely records cents
        properties = self._properties(conversion.attributes, 1, internal=True)
        if properties:
            event["user_properties"] = properties
        return event

    def _common(self, notification: Notification, event_type: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "user_id": notification.user_id,
            "event_type": event_type,
            "time": notification.received_ns // 1_000_000,
        }
        if notification.identity:
            event["insert_id"] = f"optly-{notification.identity[:40]}"
        return event

    def _properties(
        self,
        source: Mapping[str, Any],
        depth: int,
        *,
        room: int = _MAX_KEYS,
        internal: bool = False,
    ) -> dict[str, Any]:
        """`source` fitted to Amplitude's limits, at nesting `depth` (1 = top).

        `internal` leaves out Optimizely's own `$opt_` attributes.
        """
        properties: dict[str, Any] = {}
        for key, value in source.items():
            if type(key) is not str:
                key = str(key)
            if internal and key.startswith(_OPTIMIZELY_ATTRIBUTE):
                continue
            value = self._value(value, depth + 1)
            if value is _DROP:
                continue
            if len(properties) >= room:
                self.adjustments["property_dropped_keys"] += 1
                continue
            properties[self._clip(key)] = value
        return properties

    def _value(self, value: Any, depth: int) -> Any:
        """`value` fitted to the limits, as a container at `depth` would be."""
        kind = type(value)
        if kind is str:
            return self._clip(value)
        if kind is bool or value is None:
            return value
        if kind is int:
            if -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
                return value
            # Beyond what a JSON reader keeps exactly: keep the digits as text.
            self.adjustments["property_huge_integer"] += 1
            return self._clip(str(value))
        if kind is float:
            if math.isfinite(value):
                return value
            self.adjustments["property_dropped_non_finite"] += 1
            return _DROP
        if isinstance(value, Mapping | list | tuple):
            if depth > _MAX_DEPTH:
                return self._stringified(value)
            if isinstance(value, Mapping):
                return self._properties(value, depth)
            cleaned = (self._value(item, depth + 1) for item in value)
            return [item for item in cleaned if item is not _DROP]
        return self._clip(str(value))

    def _stringified(self, value: Any) -> Any:
        # Deeper than Amplitude reads: keep the content as text instead.
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            self.adjustments["property_dropped_deep"] += 1
            return _DROP
        self.adjustments["property_stringified_deep"] += 1
        return self._clip(text)

    def _event_type(self, name: str) -> str:
        lowered = name.lower()
        if lowered in _RESERVED_EVENT_TYPES or lowered.startswith(_AMPLITUDE_PREFIX):
            self.adjustments["event_type_renamed"] += 1
            name = _RENAME_PREFIX + name
        return self._clip(name)

    def _clip(self, text: str) -> str:
        if len(text) <= _STRING_LENGTH:
            return text
        self.adjustments["string_truncated"] += 1
        return text[:_STRING_LENGTH]


def _bad_request(answer: dict[str, Any], count: int) -> SendResult:
    """A 400: either the whole request is wrong, or some named events are."""
    error = answer.get("error")
    error = error if isinstance(error, str) else ""

    if "missing_field" in answer:
        field = answer["missing_field"]
        named = f" {field!r}" if field in ("api_key", "events") else ""
        return _reject_all(
            count,
            "missing_field",
            f"Amplitude says the request lacks the required field{named}",
        )
    if error.startswith("Invalid API key"):
        # The error text may quote the key, so it is never repeated.
        return _reject_all(
            count,
            "invalid_api_key",
            "Amplitude refused AMPLITUDE_API_KEY: check the key, and that "
            "AMPLITUDE_TRACKING_URL is in the project's region (US or EU)",
        )
    if error.startswith(("Invalid JSON request body", "Missing request body")):
        return _reject_all(
            count, "invalid_json", "Amplitude could not read the request body"
        )

    rejected: dict[int, str] = {}
    for field, reason in _EVENT_ERRORS:
        for index in _indexes(answer.get(field), count):
            rejected.setdefault(index, reason)
    if not rejected:
        # Nothing named: resending would only meet the same answer.
        said = f" ({error})" if error in _KNOWN_ERRORS else ""
        return _reject_all(
            count,
            "http_400",
            f"Amplitude refused the request without naming events{said}",
        )
    resend = [index for index in range(count) if index not in rejected]
    return SendResult(rejected=rejected, resend=resend)


def _throttled(
    answer: dict[str, Any],
    count: int,
    events: list[Mapped] | None,
    hold: float,
) -> SendResult:
    """A 429: over-quota users' events are dropped, throttled ones held.

    An event is throttled when listed by index or when its user or device
    is listed; the rest were refused only as company and go again now.
    """
    listed = set(_indexes(answer.get("throttled_events"), count))
    users = _names(answer.get("throttled_users"))
    devices = _names(answer.get("throttled_devices"))
    quota_users = _names(answer.get("exceeded_daily_quota_users"))
    quota_devices = _names(answer.get("exceeded_daily_quota_devices"))

    result = SendResult()
    for index in range(count):
        event = events[index].event if events and index < len(events) else {}
        user = event.get("user_id")
        device = event.get("device_id")
        if user in quota_users or device in quota_devices:
            result.rejected[index] = "daily_quota"
        elif index in listed or user in users or device in devices:
            result.held[index] = hold
        else:
            result.resend.append(index)
    if not (result.held or result.rejected):
        # No event of this batch was named (a proxy's 429, say): resending
        # at once would only be refused again, so back off with all of it.
        return SendResult(retry=True, retry_after_seconds=hold)
    return result


def _reject_all(count: int, reason: str, explanation: str) -> SendResult:
    return SendResult(
        rejected=dict.fromkeys(range(count), reason), config_error=explanation
    )


def _json_object(body: bytes) -> dict[str, Any]:
    """The answer's JSON object, or {} for anything else (an HTML error page)."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _indexes(value: Any, count: int) -> list[int]:
    """Event indexes from a list, or from a dict of field name -> list."""
    lists = value.values() if isinstance(value, dict) else [value]
    return [
        index
        for indexes in lists
        if isinstance(indexes, list)
        for index in indexes
        if type(index) is int and 0 <= index < count
    ]


def _names(value: Any) -> frozenset[str]:
    """User or device ids from a dict keyed by them, or from a list."""
    if isinstance(value, dict | list):
        return frozenset(name for name in value if isinstance(name, str))
    return frozenset()
