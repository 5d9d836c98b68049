"""A loopback stand-in for the GA4 Measurement Protocol.

`POST /mp/collect` answers 204 with an empty body whatever it receives, as
Google does, and records each documented rule the request breaks.
`POST /debug/mp/collect` runs the same checks and answers them as Google's
validation server does, in `validationMessages`. The checks are GA4's
published limits: 25 events of at most 25 params, 40-character names that
start with a letter and avoid reserved names and prefixes, 100-character
param values, 24/36-character user properties, a body under 130 kB and
timestamps no more than 72 hours old.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from standins._http import DestinationStandIn, Exchange

COLLECT_PATH = "/mp/collect"
DEBUG_PATH = "/debug/mp/collect"

MAX_BODY_BYTES = 130_000  # "under 130 kB", read strictly
MAX_EVENTS = 25
MAX_PARAMS = 25
MAX_USER_PROPERTIES = 25
MAX_NAME_LENGTH = 40
MAX_PARAM_VALUE_LENGTH = 100
MAX_USER_PROPERTY_NAME_LENGTH = 24
MAX_USER_PROPERTY_VALUE_LENGTH = 36
MAX_BACKDATE_MICROS = 72 * 3600 * 1_000_000
MAX_CLOCK_SKEW_MICROS = 60 * 1_000_000

RESERVED_EVENT_NAMES = frozenset(
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
        # Allowed for app streams only; this stand-in is a web stream.
        "ad_impression",
        "in_app_purchase",
        "screen_view",
    }
)
RESERVED_PARAM_NAMES = frozenset({"firebase_conversion"})
RESERVED_USER_PROPERTY_NAMES = frozenset(
    {
        "first_open_time",
        "first_visit_time",
        "last_deep_link_referrer",
        "user_id",
        "first_open_after_install",
    }
)
RESERVED_NAME_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_USER_PROPERTY_PREFIXES = ("_", "firebase_", "ga_", "google_")

# Google's tag fills these itself and they are exempt from the value limit.
_LENGTH_EXEMPT_PARAMS = frozenset({"session_id", "session_number"})
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]*\Z")
_CLIENT_ID = re.compile(r"([0-9]+)\.([0-9]+)\Z")
_CONSENT_VALUES = ("GRANTED", "DENIED")
_VALIDATION_BEHAVIORS = ("RELAXED", "ENFORCE_RECOMMENDATIONS")


@dataclass(frozen=True, slots=True)
class ValidationMessage:
    """One broken rule, shaped like an entry of `validationMessages`."""

    field_path: str
    description: str
    validation_code: str

    def to_json(self) -> dict[str, str]:
        return {
            "fieldPath": self.field_path,
            "description": self.description,
            "validationCode": self.validation_code,
        }


class Ga4Event(NamedTuple):
    """One event of a collect request, with the identity it arrived under."""

    client_id: str | None
    user_id: str | None
    event: dict[str, Any]
    timestamp_micros: int  # the event's own, else the request's, else arrival


class Ga4StandIn(DestinationStandIn):
    """GA4's collect and validation endpoints on one loopback host.

    `events()` lists every event of every collect request as it arrived,
    valid or not; `violations` says what GA4 would have ignored or
    rewritten. Requests to the debug endpoint never count as events, and
    (as at Google) its answers do not check the credentials' values.
    """

    def __init__(
        self, measurement_id: str = "G-TEST123", api_secret: str = "test_ga_secret"
    ) -> None:
        super().__init__("ga4-standin")
        self.measurement_id = measurement_id
        self.api_secret = api_secret
        self._events: list[Ga4Event] = []
        self._violations: list[ValidationMessage] = []

    @property
    def collect_url(self) -> str:
        return self.url + COLLECT_PATH

    @property
    def debug_url(self) -> str:
        return self.url + DEBUG_PATH

    def events(self) -> list[Ga4Event]:
        """Every event received on /mp/collect, in arrival order."""
        with self._changed:
            return list(self._events)

    @property
    def violations(self) -> list[ValidationMessage]:
        """Rules broken by /mp/collect requests, in arrival order."""
        with self._changed:
            return list(self._violations)

    def wait_for_events(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` collect events have arrived."""
        return self._wait(lambda: len(self._events) >= count, timeout)

    def report(self) -> dict[str, Any]:
        with self._changed:
            return {
                **self._report_counts(),
                "events": len(self._events),
                "violations": len(self._violations),
            }

    def _serve(self, exchange: Exchange, raw: bytes, body: Any) -> None:
        route = exchange.route
        if route not in (COLLECT_PATH, DEBUG_PATH) or exchange.command != "POST":
            status = 404 if route not in (COLLECT_PATH, DEBUG_PATH) else 405
            with self._changed:
                self._record(self._received(exchange, raw, body, status))
            exchange.respond(status, b"", "text/html; charset=UTF-8")
            return

        now_micros = time.time_ns() // 1000
        query = {name: values[0] for name, values in exchange.query().items()}
        checks = _Checks(now_micros)
        checks.request(raw, body, query)

        if route == DEBUG_PATH:
            answer = {"validationMessages": [m.to_json() for m in checks.messages]}
            with self._changed:
                self._record(self._received(exchange, raw, body, 200, answer))
            exchange.respond_json(200, answer)
            return

        # Google takes wrong credentials without complaint and drops the data.
        if query.get("measurement_id", self.measurement_id) != self.measurement_id:
            checks.add("measurement_id", "VALUE_INVALID", "Unknown measurement_id.")
        if query.get("api_secret", self.api_secret) != self.api_secret:
            checks.add("api_secret", "VALUE_INVALID", "Unknown api_secret.")
        events = _events_of(body, now_micros)
        with self._changed:
            self._events.extend(events)
            self._violations.extend(checks.messages)
            self._record(self._received(exchange, raw, body, 204))
        exchange.respond(204)


class _Checks:
    """The validation messages for one request, gathered check by check."""

    def __init__(self, now_micros: int) -> None:
        self.now_micros = now_micros
        self.messages: list[ValidationMessage] = []

    def add(self, field_path: str, code: str, description: str) -> None:
        self.messages.append(ValidationMessage(field_path, description, code))

    def request(self, raw: bytes, body: Any, query: dict[str, str]) -> None:
        if len(raw) >= MAX_BODY_BYTES:
            self.add(
                "",
                "VALUE_OUT_OF_BOUNDS",
                f"Request body is {len(raw)} bytes; it must be under "
                f"{MAX_BODY_BYTES} bytes.",
            )
        if "measurement_id" not in query and "firebase_app_id" not in query:
            self.add(
                "measurement_id",
                "VALUE_REQUIRED",
                "Query parameter [measurement_id] is required.",
            )
        if "api_secret" not in query:
            self.add(
                "api_secret",
                "VALUE_REQUIRED",
                "Query parameter [api_secret] is required.",
            )
        if not isinstance(body, dict):
            self.add("", "VALUE_INVALID", "Request body must be a JSON object.")
            return

        self.identity(body, app_stream="firebase_app_id" in query)
        if "timestamp_micros" in body:
            self.timestamp("timestamp_micros", body["timestamp_micros"])
        self.settings(body)
        if "user_properties" in body:
            self.user_properties(body["user_properties"])
        self.events(body.get("events"))

    def identity(self, body: dict[str, Any], app_stream: bool) -> None:
        field = "app_instance_id" if app_stream else "client_id"
        value = body.get(field)
        if value is None or value == "":
            self.add(field, "VALUE_REQUIRED", f"Field [{field}] is required.")
        elif not app_stream and not _is_client_id(value):
            self.add(
                field,
                "VALUE_INVALID",
                f"Field [client_id] has invalid value [{value}]. It must be two "
                "positive integers joined by a period.",
            )
        user_id = body.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            self.add("user_id", "VALUE_INVALID", "Field [user_id] must be a string.")

    def settings(self, body: dict[str, Any]) -> None:
        consent = body.get("consent")
        if consent is not None:
            if not isinstance(consent, dict):
                self.add(
                    "consent", "VALUE_INVALID", "Field [consent] must be an object."
                )
            else:
                for key in ("ad_user_data", "ad_personalization"):
                    if key in consent and consent[key] not in _CONSENT_VALUES:
                        self.add(
                            f"consent.{key}",
                            "VALUE_INVALID",
                            f"Field [consent.{key}] must be GRANTED or DENIED.",
                        )
        behavior = body.get("validation_behavior")
        if behavior is not None and behavior not in _VALIDATION_BEHAVIORS:
            self.add(
                "validation_behavior",
                "VALUE_INVALID",
                "Field [validation_behavior] must be RELAXED or "
                "ENFORCE_RECOMMENDATIONS.",
            )

    def events(self, events: Any) -> None:
        if events is None or events == []:
            self.add("events", "VALUE_REQUIRED", "Field [events] is required.")
            return
        if not isinstance(events, list):
            self.add("events", "VALUE_INVALID", "Field [events] must be an array.")
            return
        if len(events) > MAX_EVENTS:
            self.add(
                "events",
                "EXCEEDED_MAX_ENTITIES",
                f"Request has {len(events)} events; at most {MAX_EVENTS} are allowed.",
            )
        for index, event in enumerate(events):
            self.event(index, event)

    def event(self, index: int, event: Any) -> None:
        path = f"events[{index}]"
        if not isinstance(event, dict):
            self.add(
                path, "VALUE_INVALID", f"Event at index: [{index}] is not an object."
            )
            return
        name = event.get("name")
        if name is None or name == "":
            self.add(
                f"{path}.name",
                "VALUE_REQUIRED",
                f"Event at index: [{index}] has no name.",
            )
        else:
            self.name(
                f"{path}.name",
                f"Event at index: [{index}] has invalid name [{name}].",
                name,
                MAX_NAME_LENGTH,
                RESERVED_EVENT_NAMES,
                RESERVED_NAME_PREFIXES,
            )
        if "timestamp_micros" in event:
            self.timestamp(f"{path}.timestamp_micros", event["timestamp_micros"])
        params = event.get("params")
        if params is None:
            return
        if not isinstance(params, dict):
            self.add(
                f"{path}.params", "VALUE_INVALID", "Event params must be an object."
            )
            return
        if len(params) > MAX_PARAMS:
            self.add(
                f"{path}.params",
                "EXCEEDED_MAX_ENTITIES",
                f"Event at index: [{index}] has {len(params)} params; at most "
                f"{MAX_PARAMS} are allowed.",
            )
        for param_name, value in params.items():
            self.param(f"{path}.params", param_name, value, allow_items=True)

    def param(self, path: str, name: str, value: Any, allow_items: bool) -> None:
        where = f"{path}.{name}"
        self.name(
            where,
            f"Param [{name}] has an invalid name.",
            name,
            MAX_NAME_LENGTH,
            RESERVED_PARAM_NAMES,
            RESERVED_NAME_PREFIXES,
        )
        if allow_items and name == "items":
            if not isinstance(value, list) or not all(
                isinstance(item, dict) for item in value
            ):
                self.add(
                    where, "VALUE_INVALID", "Param [items] must be an array of objects."
                )
                return
            for position, item in enumerate(value):
                for item_name, item_value in item.items():
                    self.param(f"{where}[{position}]", item_name, item_value, False)
            return
        if isinstance(value, str):
            if (
                len(value) > MAX_PARAM_VALUE_LENGTH
                and name not in _LENGTH_EXEMPT_PARAMS
            ):
                self.add(
                    where,
                    "VALUE_OUT_OF_BOUNDS",
                    f"Param [{name}] has a value of {len(value)} characters; at most "
                    f"{MAX_PARAM_VALUE_LENGTH} are allowed.",
                )
        elif not isinstance(value, bool | int | float):
            self.add(
                where,
                "VALUE_INVALID",
                f"Param [{name}] must be a string or a number.",
            )

    def user_properties(self, properties: Any) -> None:
        if not isinstance(properties, dict):
            self.add(
                "user_properties",
                "VALUE_INVALID",
                "Field [user_properties] must be an object.",
            )
            return
        if len(properties) > MAX_USER_PROPERTIES:
            self.add(
                "user_properties",
                "EXCEEDED_MAX_ENTITIES",
                f"Request has {len(properties)} user properties; at most "
                f"{MAX_USER_PROPERTIES} are allowed.",
            )
        for name, entry in properties.items():
            where = f"user_properties.{name}"
            self.name(
                where,
                f"User property [{name}] has an invalid name.",
                name,
                MAX_USER_PROPERTY_NAME_LENGTH,
                RESERVED_USER_PROPERTY_NAMES,
                RESERVED_USER_PROPERTY_PREFIXES,
            )
            if not isinstance(entry, dict) or "value" not in entry:
                self.add(
                    where,
                    "VALUE_REQUIRED",
                    f"User property [{name}] must be an object with a value.",
                )
                continue
            value = entry["value"]
            if isinstance(value, str) and len(value) > MAX_USER_PROPERTY_VALUE_LENGTH:
                self.add(
                    f"{where}.value",
                    "VALUE_OUT_OF_BOUNDS",
                    f"User property [{name}] has a value of {len(value)} characters; "
                    f"at most {MAX_USER_PROPERTY_VALUE_LENGTH} are allowed.",
                )
            elif value is not None and not isinstance(value, str | bool | int | float):
                self.add(
                    f"{where}.value",
                    "VALUE_INVALID",
                    f"User property [{name}] must be a string or a number.",
                )
            if "timestamp_micros" in entry:
                self.timestamp(f"{where}.timestamp_micros", entry["timestamp_micros"])

    def name(
        self,
        path: str,
        context: str,
        name: Any,
        max_length: int,
        reserved: frozenset[str],
        prefixes: tuple[str, ...],
    ) -> None:
        if not isinstance(name, str):
            self.add(path, "VALUE_INVALID", f"{context} Names must be strings.")
        elif len(name) > max_length:
            self.add(
                path,
                "VALUE_OUT_OF_BOUNDS",
                f"{context} Names may be at most {max_length} characters.",
            )
        elif name.startswith(prefixes):
            self.add(
                path, "NAME_RESERVED", f"{context} The name uses a reserved prefix."
            )
        elif not name[:1].isascii() or not name[:1].isalpha():
            self.add(
                path,
                "NAME_INVALID",
                f"{context} Names must start with an alphabetic character.",
            )
        elif not _NAME_CHARS.match(name):
            self.add(
                path,
                "NAME_INVALID",
                f"{context} Names may only contain alphanumeric characters and "
                "underscores.",
            )
        elif name in reserved:
            self.add(path, "NAME_RESERVED", f"{context} The name is reserved.")

    def timestamp(self, path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(path, "VALUE_INVALID", f"Field [{path}] must be a number.")
        elif value < self.now_micros - MAX_BACKDATE_MICROS:
            self.add(
                path,
                "VALUE_OUT_OF_BOUNDS",
                f"Field [{path}] is more than 72 hours in the past.",
            )
        elif value > self.now_micros + MAX_CLOCK_SKEW_MICROS:
            self.add(path, "VALUE_OUT_OF_BOUNDS", f"Field [{path}] is in the future.")


def _is_client_id(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    match = _CLIENT_ID.match(value)
    return match is not None and int(match[1]) > 0 and int(match[2]) > 0


def _events_of(body: Any, now_micros: int) -> list[Ga4Event]:
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        return []
    client_id = body.get("client_id") or body.get("app_instance_id")
    user_id = body.get("user_id")
    request_micros = _micros(body.get("timestamp_micros"), now_micros)
    return [
        Ga4Event(
            client_id if isinstance(client_id, str) else None,
            user_id if isinstance(user_id, str) else None,
            event,
            _micros(event.get("timestamp_micros"), request_micros),
        )
        for event in body["events"]
        if isinstance(event, dict)
    ]


def _micros(value: Any, fallback: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return fallback
    return int(value)
