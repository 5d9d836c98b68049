"""Google Analytics 4: exposures and conversions as Measurement Protocol events.

An exposure becomes GA's recommended `experience_impression` event; a
conversion becomes an event named after its Optimizely event key. GA's
collect endpoint answers 2xx to anything and silently drops what breaks its
rules, so names and values are fitted to those rules here, and every fit is
counted in `Ga4Destination.adjustments`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

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
from settings import Settings

_MAX_EVENTS = 25
_MAX_BODY_BYTES = 130_000  # GA refuses bodies of this size or more
# The envelope around the events: a client id of at most 41 characters, a
# user id of at most 256 characters (6 bytes each if JSON-escaped), the
# timestamp, the keys, and 24 commas between events. Rounded up.
_ENVELOPE_BYTES = 2_048

_MAX_PARAMS = 25
_SAFE_INTEGER = 2**53
_NAME_LENGTH = 40
_VALUE_LENGTH = 100
_USER_ID_LENGTH = 256
_NAME_PREFIX = "optly_"
_NAME_CACHE_SIZE = 10_000

# Event names GA keeps for itself. The last three are allowed for app
# streams only, and this destination sends to a web stream.
_RESERVED_EVENT_NAMES = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_query",
        "ad_reward",
        "adunit_exposure",
        "app_clear_data",
        "app_exception",
        "app_install",
        "app_remove",
        "app_store_refund",
        "app_update",
        "app_upgrade",
        "dynamic_link_app_open",
        "dynamic_link_app_update",
        "dynamic_link_first_open",
        "error",
        "firebase_campaign",
        "firebase_in_app_message_action",
        "firebase_in_app_message_dismiss",
        "firebase_in_app_message_impression",
        "first_open",
        "first_visit",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "notification_send",
        "os_update",
        "session_start",
        "user_engagement",
        "ad_impression",
        "in_app_purchase",
        "screen_view",
    }
)
_RESERVED_PARAM_NAMES = frozenset({"firebase_conversion"})
_RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")

_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_]")
# A gtag client id, alone or inside a `_ga` cookie value (GA1.1.<id>).
_CLIENT_ID = re.compile(r"(?:GA\d\.\d+\.)?([1-9][0-9]{0,19}\.[1-9][0-9]{0,19})")

# Optimizely's reserved tags, which the records carry as `revenue`/`value`,
# and a `currency` tag, which goes with the value when there is one.
_VALUE_TAGS = frozenset({"revenue", "value"})
_VALUE_AND_CURRENCY_TAGS = _VALUE_TAGS | {"currency"}
# Always ours; a tag sanitised into it is dropped.
_ENGAGEMENT_PARAM = "engagement_time_msec"
_DROP = object()


class Ga4Destination:
    """Maps notifications to GA4 events and reads the collect endpoint's answers.

    A mapped event's `key` is the GA client id, followed by a space and the
    user id when one is sent: GA takes one `user_id` per request, so only
    events sharing both may share a request. Only a notification with an
    empty user id and no client id attribute is rejected, because every
    such user would otherwise become one and the same GA client.

    Timestamps are sent as received, however old: GA moves events older
    than 72 hours to 72 hours ago, which beats losing them. `adjustments`
    is updated without a lock, so under threads a count may rarely miss one.
    """

    name = "ga4"
    max_batch_events = _MAX_EVENTS
    max_batch_bytes = _MAX_BODY_BYTES - 1 - _ENVELOPE_BYTES
    one_key_per_batch = True

    def __init__(
        self, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.adjustments: Counter[str] = Counter()
        self._settings = settings
        self._clock = clock
        self._url, self._safe_url = _collect_urls(settings)
        self._event_names: dict[str, str] = {}
        self._param_names: dict[str, str] = {}

    def map(self, notification: Notification) -> list[Mapped | Rejected]:
        """One GA event for the notification, or why it cannot be sent."""
        client_id = self._client_id(notification)
        if client_id is None:
            return [
                Rejected(
                    "no_client_id",
                    "empty user id and no valid "
                    f"{self._settings.ga_client_id_attribute!r} attribute",
                )
            ]
        user_id = self._user_id(notification.user_id)
        key = f"{client_id} {user_id}" if user_id else client_id

        if isinstance(notification, Exposure):
            event = self._exposure(notification)
        else:
            event = self._conversion(notification)
        return [Mapped.of(key, event)]

    def build_request(self, events: list[Mapped]) -> Request:
        """One collect request for a non-empty batch sharing one key."""
        client_id, _, user_id = events[0].key.partition(" ")
        body: dict[str, Any] = {"client_id": client_id}
        if user_id:
            body["user_id"] = user_id
        body["timestamp_micros"] = min(m.event["timestamp_micros"] for m in events)
        body["events"] = EVENTS
        payload = with_events(body, events)
        body["events"] = [m.event for m in events]
        return Request(self._url, self._safe_url, body, payload)

    def read_response(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        count: int,
        *,
        events: list[Mapped] | None = None,
    ) -> SendResult:
        """Classify GA's answer; `events` is accepted for symmetry and unused.

        A 2xx proves only that GA received the request, never that it kept
        the events; in debug mode its validation messages become warnings.
        """
        if 200 <= status < 300:
            result = SendResult()
            if self._settings.ga_debug_mode:
                result.warnings = _validation_warnings(body)
            return result
        if status in (408, 429) or status >= 500:
            wait = retry_after_seconds(headers, self._clock())
            return SendResult(retry=True, retry_after_seconds=wait)
        if status == 413 and count > 1:
            # Sizes are kept under GA's limit, so this means a proxy with a
            # smaller one; halves still get through.
            return SendResult(split=True)
        return SendResult(
            rejected=dict.fromkeys(range(count), f"http_{status}"),
            config_error=self._explain(status),
        )

    def _client_id(self, notification: Notification) -> str | None:
        attribute = self._settings.ga_client_id_attribute
        if attribute:
            raw = notification.attributes.get(attribute)
            if raw is not None:
                match = _CLIENT_ID.fullmatch(raw) if isinstance(raw, str) else None
                if match:
                    return match.group(1)
                self.adjustments["client_id_attribute_invalid"] += 1
        if not notification.user_id:
            return None
        return _derived_client_id(notification.user_id)

    def _user_id(self, user_id: str) -> str:
        if not (self._settings.ga_send_user_id and user_id):
            return ""
        if len(user_id) > _USER_ID_LENGTH or not _is_utf8(user_id):
            self.adjustments["user_id_omitted"] += 1
            return ""
        return user_id

    def _exposure(self, exposure: Exposure) -> dict[str, Any]:
        variant = f"OPTLY-{exposure.flag_key}-{exposure.variation_key}"
        params: dict[str, Any] = {
            "exp_variant_string": self._clip(variant),
            "optimizely_flag": self._clip(exposure.flag_key),
        }
        # Empty keys (no rule matched, no variation) would show in GA as a
        # blank value; left out they show as "(not set)".
        if exposure.rule_key:
            params["optimizely_rule"] = self._clip(exposure.rule_key)
        if exposure.variation_key:
            params["optimizely_variation"] = self._clip(exposure.variation_key)
        params[_ENGAGEMENT_PARAM] = 1
        return {
            "name": "experience_impression",
            "params": params,
            "timestamp_micros": exposure.received_ns // 1000,
        }

    def _conversion(self, conversion: Conversion) -> dict[str, Any]:
        value = self._value(conversion)
        tags = conversion.tags
        room = _MAX_PARAMS - (1 if value is None else 3)
        skipped = _VALUE_TAGS if value is None else _VALUE_AND_CURRENCY_TAGS

        params: dict[str, Any] = {}
        for raw_name, raw_value in tags.items():
            if raw_name in skipped:
                continue
            param = self._param_value(raw_value)
            if param is _DROP:
                continue
            name = self._name(raw_name, self._param_names, _RESERVED_PARAM_NAMES)
            if name in params or name == _ENGAGEMENT_PARAM:
                self.adjustments["param_dropped_duplicate"] += 1
            elif len(params) >= room:
                self.adjustments["param_dropped_limit"] += 1
            else:
                params[name] = param

        if value is not None:
            params["value"] = value
            params["currency"] = _currency(tags.get("currency"), self._settings)
        params[_ENGAGEMENT_PARAM] = 1
        name = self._name(
            conversion.event_key, self._event_names, _RESERVED_EVENT_NAMES
        )
        return {
            "name": name,
            "params": params,
            "timestamp_micros": conversion.received_ns // 1000,
        }

    def _value(self, conversion: Conversion) -> float | None:
        if conversion.revenue is not None:
            return conversion.revenue / 100  # Optimizely records cents
        if conversion.value is None:
            return None
        if math.isfinite(conversion.value):
            return conversion.value
        self.adjustments["param_dropped_non_finite"] += 1
        return None

    def _param_value(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            return self._clip(value)
        if kind is bool:
            # GA params are strings or numbers; 1/0 can still be summed.
            return int(value)
        if kind is int:
            if -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
                return value
            # Beyond what a JSON reader keeps exactly: send the nearest float.
            value, kind = _as_float(value), float
            self.adjustments["param_huge_integer"] += 1
        if kind is float:
            if math.isfinite(value):
                return value
            self.adjustments["param_dropped_non_finite"] += 1
        elif value is None:
            self.adjustments["param_dropped_null"] += 1
        elif isinstance(value, Mapping | list | tuple):
            self.adjustments["param_dropped_nested"] += 1
        else:
            self.adjustments["param_dropped_type"] += 1
        return _DROP

    def _name(self, raw: str, cache: dict[str, str], reserved: frozenset[str]) -> str:
        # Event keys and tag names repeat endlessly; each is fitted once.
        name = cache.get(raw)
        if name is None:
            name = _ga_name(raw, reserved)
            if len(cache) >= _NAME_CACHE_SIZE:
                cache.clear()
            cache[raw] = name
        if name != raw:
            kind = "event" if cache is self._event_names else "param"
            self.adjustments[f"{kind}_name_sanitised"] += 1
        return name

    def _clip(self, value: str) -> str:
        if len(value) <= _VALUE_LENGTH:
            return value
        self.adjustments["param_value_truncated"] += 1
        return value[:_VALUE_LENGTH]

    def _explain(self, status: int) -> str:
        if status in (401, 403):
            advice = "check GA_API_SECRET and GA_MEASUREMENT_ID"
        elif status in (404, 405):
            advice = "check GA_COLLECT_URL"
        elif status == 413:
            advice = "a single event is over a limit on the way to GA"
        else:
            advice = "check GA_COLLECT_URL and GA_MEASUREMENT_ID"
        return f"GA4 answered HTTP {status} at {self._safe_url}: {advice}"


def _ga_name(raw: str, reserved: frozenset[str]) -> str:
    """`raw` as a GA event or param name: [A-Za-z0-9_], a letter first, ≤40."""
    name = _NOT_NAME_CHAR.sub("_", raw)
    lowered = name.lower()
    if (
        not name[:1].isalpha()
        or lowered in reserved
        or lowered.startswith(_RESERVED_PREFIXES)
    ):
        name = _NAME_PREFIX + name
    return name[:_NAME_LENGTH]


def _derived_client_id(user_id: str) -> str:
    """A stable gtag-style client id for a user: two 10-digit numbers.

    A pseudonym, not anonymisation: anyone holding a user id can compute it.
    """
    digest = hashlib.blake2b(
        user_id.encode(errors="surrogatepass"), digest_size=10, person=b"optly-ga-cid"
    ).digest()
    first = int.from_bytes(digest[:5]) % 9_000_000_000 + 1_000_000_000
    second = int.from_bytes(digest[5:]) % 9_000_000_000 + 1_000_000_000
    return f"{first}.{second}"


def _currency(tag: Any, settings: Settings) -> str:
    """The event's own `currency` tag when it is a 3-letter code."""
    if isinstance(tag, str) and len(tag) == 3 and tag.isascii() and tag.isalpha():
        return tag.upper()
    return settings.ga_currency


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _collect_urls(settings: Settings) -> tuple[str, str]:
    """The collect URL with its query, and the same with the secret masked.

    Debug mode needs a URL ending in /mp/collect, as GA's own hosts do; a
    relay with another path is left as it is.
    """
    base = settings.ga_collect_url
    parts = urlsplit(base)
    path = parts.path
    if (
        settings.ga_debug_mode
        and path.endswith("/mp/collect")
        and not path.endswith("/debug/mp/collect")
    ):
        path = path.removesuffix("/mp/collect") + "/debug/mp/collect"
        base = urlunsplit(parts._replace(path=path))
    separator = "&" if parts.query else "?"
    query = f"measurement_id={quote(settings.ga_measurement_id, safe='')}"
    secret = quote(settings.ga_api_secret, safe="")
    return (
        f"{base}{separator}{query}&api_secret={secret}",
        f"{base}{separator}{query}&api_secret=***",
    )


def _validation_warnings(body: bytes) -> list[str]:
    """One line per message of the validation server's answer."""
    try:
        answer = json.loads(body)
    except ValueError:
        return ["GA4 validation answer is not JSON"]
    messages = answer.get("validationMessages") if isinstance(answer, dict) else None
    if not isinstance(messages, list):
        return ["GA4 validation answer has no validationMessages"]
    return [
        f"{message.get('validationCode', '?')} at {message.get('fieldPath', '?')}: "
        f"{message.get('description', '')}"
        for message in messages
        if isinstance(message, dict)
    ]


def _as_float(value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf
