"""A local stand-in for Optimizely Agent that makes real decisions.

A development tool, never a replacement for the real Agent: it lets the
listener, the traffic simulator and the demo run on one machine without
Docker or network access. Decisions come from Optimizely's own Python SDK
over a local datafile (`sample_datafile.json` unless told otherwise); the
SDK's event dispatching is a no-op and ODP is off, so nothing leaves
127.0.0.1.

It serves the Agent's API on 127.0.0.1 with the Agent's request checks,
status codes and byte-level JSON (Go's `encoding/json`: compact, `<`, `>`
and `&` escaped, maps sorted, whole floats printed without `.0`):

- `POST /v1/decide?keys=..` (repeated keys; one key answers an object,
  none or several an array), `POST /v1/track?eventKey=..`,
  `GET /v1/config` (the SDK's OptimizelyConfig), `GET /health`;
- `GET /v1/notifications/event-stream`, fed by the SDK's own DECISION and
  TRACK listeners translated to the Agent's notification JSON. Like the
  Agent, it sends no headers before the first frame that passes the
  filter, one chunk per `data: <json>\\n\\n` frame, no heartbeats, and a
  decide or track call returns only after every open stream has taken its
  notification (here bounded by `hand_off_timeout_seconds`, after which
  the notification is dropped for that stream and counted).

Where it is knowingly different: `reasons` holds only what the Python SDK
reports (Go adds error messages even without INCLUDE_REASONS);
`/v1/activate`, overrides, ODP segments and `project_config_update`
notifications (the datafile never changes) are not served; decide-all
answers in datafile order where the Agent's order is random.

The bundled datafile sets `sendFlagDecisions: false`: A/B-rule decisions
then dispatch an impression (`decisionEventDispatched: true`) and
delivery-rule decisions do not, so the stream carries both kinds, which is
what the listener's EXPOSURE_MODE has to tell apart.

Run `python -m standins.agent_sdk --port 8080` to serve it by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from optimizely import optimizely
from optimizely.decision.optimizely_decide_option import OptimizelyDecideOption
from optimizely.decision.optimizely_decision import OptimizelyDecision
from optimizely.event.event_processor import ForwardingEventProcessor
from optimizely.helpers import enums
from optimizely.helpers.sdk_settings import OptimizelySdkSettings
from optimizely.notification_center import NotificationCenter
from optimizely.optimizely_user_context import OptimizelyUserContext

from standins._http import Exchange, LoopbackServer, http_date, status_phrase

DEFAULT_SDK_KEY = "demo_sdk_key"
SAMPLE_DATAFILE_PATH = Path(__file__).with_name("sample_datafile.json")
SDK_KEY_HEADER = "X-Optimizely-SDK-Key"
STREAM_PATH = "/v1/notifications/event-stream"
DEFAULT_HAND_OFF_TIMEOUT_SECONDS = 5.0

# The Agent's default `client.sdkKeyRegex`; it is why hyphens are refused.
_SDK_KEY_PATTERN = re.compile(r"[a-zA-Z0-9+/=_]+(:[a-zA-Z0-9+/=_]+)?")
_ALLOWED_HOSTS = ("127.0.0.1", "localhost")
_DECIDE_OPTIONS = frozenset(
    value
    for name, value in vars(OptimizelyDecideOption).items()
    if name.isupper() and isinstance(value, str)
)
_STREAM_CATEGORIES = ("decision", "track", "project_config_update")
_BOT_FILTERING = "$opt_bot_filtering"
# How often an idle stream looks for shutdown and for a vanished client.
_STREAM_POLL_SECONDS = 0.1

_ROUTES = {
    "/health": ("GET",),
    "/v1/config": ("GET",),
    STREAM_PATH: ("GET",),
    "/v1/decide": ("POST",),
    "/v1/track": ("POST",),
}


class _BadRequest(Exception):
    """The request cannot be served; carries the Agent's status and body.

    A JSON message goes out as `{"error": message}`, a plain-text one as is,
    and no message as an empty body without a Content-Type.
    """

    def __init__(
        self,
        status: int,
        message: str | None,
        content_type: str = "application/json",
    ) -> None:
        super().__init__(message or str(status))
        self.status = status
        self.message = message
        self.content_type = content_type if message is not None else None

    def body(self) -> bytes:
        if self.message is None:
            return b""
        if self.content_type == "application/json":
            return _go_body({"error": self.message})
        return self.message.encode()


# --- Go's encoding/json, as far as the Agent's payloads need it -----------


def go_json(value: Any) -> str:
    """Serialize like Go's `json.Marshal`: compact, HTML-safe, floats as Go.

    Dict order is kept as given, so structs are built in field order and
    maps are sorted by the caller (see `_go_value`).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, Mapping):
        items = (f"{_go_string(str(k))}:{go_json(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(item) for item in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _go_string(text: str) -> str:
    encoded = json.dumps(text, ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        encoded = encoded.replace(char, escape)
    return encoded


def _go_float(number: float) -> str:
    if not math.isfinite(number):
        raise ValueError(f"Go cannot encode {number!r} as JSON")
    magnitude = abs(number)
    if number.is_integer() and magnitude < 1e21:
        return str(int(number))
    if 1e-6 <= magnitude < 1e21:
        return format(Decimal(repr(number)), "f")
    # Go's exponent form drops the leading zero Python keeps: 1e-07 -> 1e-7.
    mantissa, exponent = repr(number).split("e")
    sign = exponent[0]
    return f"{mantissa}e{sign}{exponent[1:].lstrip('0') or '0'}"


def _go_value(value: Any) -> Any:
    """A decoded JSON value as Go re-encodes it: every map's keys sorted."""
    if isinstance(value, Mapping):
        return {key: _go_value(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [_go_value(item) for item in value]
    return value


def _go_body(value: Any) -> bytes:
    # chi's render.JSON uses json.Encoder, which ends every body with "\n".
    return (go_json(value) + "\n").encode()


# --- The per-stream hand-off ----------------------------------------------


class _HandOff:
    """A one-slot rendezvous, like the Agent's unbuffered per-stream channel.

    `offer` returns True once the stream thread has taken the item. It
    gives up after its timeout and withdraws the item, so a stalled stream
    delays API calls by a bounded time instead of forever.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._slot: tuple[int, Any] | None = None
        self._issued = 0
        self._taken = 0
        self._closed = False

    def offer(self, item: Any, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            # Another producer's item may still be waiting to be taken.
            while self._slot is not None and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            if self._closed:
                return False

            self._issued += 1
            ticket = self._issued
            self._slot = (ticket, item)
            self._changed.notify_all()

            while self._taken < ticket:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    if self._slot is not None and self._slot[0] == ticket:
                        self._slot = None
                        self._changed.notify_all()
                    return self._taken >= ticket
                self._changed.wait(remaining)
            return True

    def take(self, timeout_seconds: float) -> Any | None:
        with self._changed:
            if self._slot is None and not self._closed:
                self._changed.wait(timeout_seconds)
            if self._slot is None:
                return None
            ticket, item = self._slot
            self._slot = None
            self._taken = ticket
            self._changed.notify_all()
            return item

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


# --- The stand-in -----------------------------------------------------------


class AgentSdkStandIn(LoopbackServer):
    """Optimizely Agent's decide/track/config/stream API over the Python SDK.

    Serves on 127.0.0.1; port 0 lets the kernel pick one, which is then kept
    across `stop()`/`start()`, so a test can restart "the Agent" on the same
    URL. Use it as a context manager in tests. `report()` counts what it
    served; `wait_for_streams()` tells a test that a stream is attached,
    which the stream itself cannot say before its first frame.
    """

    def __init__(
        self,
        sdk_key: str = DEFAULT_SDK_KEY,
        *,
        datafile: str | None = None,
        port: int = 0,
        enable_notifications: bool = True,
        hand_off_timeout_seconds: float = DEFAULT_HAND_OFF_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__("agent-sdk-standin")
        # LoopbackServer keeps the port it was first given; 0 means any.
        self._port = port
        if datafile is None:
            datafile = SAMPLE_DATAFILE_PATH.read_text(encoding="utf-8")
        self.sdk_key = sdk_key
        self.enable_notifications = enable_notifications
        self.hand_off_timeout_seconds = hand_off_timeout_seconds

        parsed = json.loads(datafile)
        self.flag_keys = [flag["key"] for flag in parsed.get("featureFlags", [])]
        self.event_keys = [event["key"] for event in parsed.get("events", [])]
        self._everyone_else_rules = _everyone_else_rules(parsed)

        self._lock = threading.Lock()
        self._streams_changed = threading.Condition(self._lock)
        self._subscribers: list[_HandOff] = []
        self._counts: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._streamed: Counter[str] = Counter()

        self.client = _make_client(datafile)
        center = self.client.notification_center
        center.add_notification_listener(
            enums.NotificationTypes.DECISION, self._on_decision
        )
        center.add_notification_listener(enums.NotificationTypes.TRACK, self._on_track)

    def wait_for_streams(self, count: int, timeout_seconds: float) -> bool:
        """Wait until at least `count` streams are attached."""
        with self._streams_changed:
            return self._streams_changed.wait_for(
                lambda: len(self._subscribers) >= count, timeout_seconds
            )

    def report(self) -> dict[str, Any]:
        """What the stand-in saw, for tests and the demo's closing summary."""
        with self._lock:
            statuses = sorted(self._statuses.items())
            return {
                "decide_requests": self._counts["decide_requests"],
                "decisions": self._counts["decisions"],
                "track_requests": self._counts["track_requests"],
                "tracks": self._counts["tracks"],
                "unknown_events": self._counts["unknown_events"],
                "rejected": {str(status): count for status, count in statuses},
                "streams_opened": self._counts["streams_opened"],
                "streams_open": len(self._subscribers),
                "notifications_streamed": dict(sorted(self._streamed.items())),
                "notifications_filtered": self._counts["notifications_filtered"],
                "notifications_dropped": self._counts["notifications_dropped"],
            }

    def _on_stop(self) -> None:
        # Wakes producers blocked on a stream; the streams see `_stopping`.
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.close()

    # The SDK's listeners: they run inside decide() and track().

    def _on_decision(
        self,
        decision_type: str,
        user_id: str,
        attributes: Mapping[str, Any],
        decision_info: Mapping[str, Any],
    ) -> None:
        # Only flag decisions can happen: nothing here calls activate().
        if decision_type != enums.DecisionNotificationTypes.FLAG:
            return
        self._count("decisions")
        notification = {
            "Type": decision_type,
            "UserContext": _user_context(user_id, attributes),
            "DecisionInfo": _flag_decision_info(decision_info),
        }
        self._publish("decision", decision_type, notification)

    def _on_track(
        self,
        event_key: str,
        user_id: str,
        attributes: Mapping[str, Any] | None,
        event_tags: Mapping[str, Any] | None,
        log_event: Mapping[str, Any],
    ) -> None:
        self._count("tracks")
        notification = {
            "EventKey": event_key,
            "UserContext": _user_context(user_id, attributes),
            "EventTags": None if event_tags is None else _go_value(event_tags),
            "ConversionEvent": _conversion_event(event_key, event_tags, log_event),
        }
        self._publish("track", "track", notification)

    def _publish(self, category: str, label: str, notification: dict) -> None:
        payload = go_json(notification).encode()
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            item = (category, label, payload)
            if not subscriber.offer(item, self.hand_off_timeout_seconds):
                self._count("notifications_dropped")

    # Serving: the Agent's routes and checks, in its middleware order.

    def _dispatch(self, exchange: Exchange) -> None:
        request_id = exchange.headers.get("X-Request-Id") or str(uuid.uuid4())
        try:
            self._route(exchange, request_id)
        except _BadRequest as error:
            with self._lock:
                self._statuses[error.status] += 1
            _answer(
                exchange, request_id, error.status, error.body(), error.content_type
            )

    def _route(self, exchange: Exchange, request_id: str) -> None:
        route, method = exchange.route, exchange.command
        # The host check wraps the whole router; only /health skips it.
        if route == "/health" and method == "GET":
            _answer(exchange, request_id, 200, _go_body({"status": "ok"}))
            return
        host = exchange.headers.get("X-Forwarded-Host") or exchange.headers.get(
            "Host", ""
        )
        if host.rsplit(":", 1)[0] not in _ALLOWED_HOSTS:
            raise _BadRequest(404, "invalid request host")
        if route not in _ROUTES:
            raise _BadRequest(404, "404 page not found\n", "text/plain; charset=utf-8")
        if method not in _ROUTES[route]:
            raise _BadRequest(405, None)
        self._check_sdk_key(exchange.headers.get(SDK_KEY_HEADER))

        if route == "/v1/config":
            body = _go_body(_optimizely_config(self.client))
            _answer(exchange, request_id, 200, body)
        elif route == STREAM_PATH:
            if not self.enable_notifications:
                raise _BadRequest(
                    403,
                    "Notification stream not enabled\n",
                    "text/plain; charset=utf-8",
                )
            self._stream(exchange, request_id)
        else:
            payload = _json_object(exchange)
            if route == "/v1/decide":
                answer = self._decide_flags(exchange.query(), payload)
            else:
                answer = self._track_event(exchange.query(), payload)
            _answer(exchange, request_id, 200, _go_body(answer))

    def _check_sdk_key(self, header: str | None) -> None:
        if not header:
            raise _BadRequest(400, "missing required X-Optimizely-SDK-Key header")
        if not _SDK_KEY_PATTERN.fullmatch(header):
            raise _BadRequest(400, "sdkKey failed validation")
        # The Agent strips ":<datafile token>"; any token passes here.
        if header.split(":", 1)[0] != self.sdk_key:
            raise _BadRequest(
                500, f"failed to instantiate Optimizely for SDK Key: {header}"
            )

    def _decide_flags(
        self, query: Mapping[str, list[str]], payload: Mapping[str, Any]
    ) -> Any:
        user_id = _typed(_field(payload, "userId"), str)
        attributes = _typed(_field(payload, "userAttributes"), dict) or {}
        options = _typed(_field(payload, "decideOptions"), list) or []
        forced = _typed(_field(payload, "forcedDecisions"), list) or []
        if not user_id:
            raise _BadRequest(400, 'missing "userId" in request payload')
        for option in options:
            if option not in _DECIDE_OPTIONS:
                raise _BadRequest(400, f"invalid option: {option}")
        if _field(payload, "fetchSegments") is True:
            # ODP is off, so fetching segments fails as in the Agent.
            raise _BadRequest(500, "failed to fetch qualified segments")

        user = self.client.create_user_context(user_id, dict(attributes))
        if user is None:
            raise _BadRequest(400, "error parsing request body")
        _force_decisions(user, forced)

        keys = query.get("keys", [])
        self._count("decide_requests")
        if len(keys) == 1:
            return self._decide_out(user.decide(keys[0], options))
        if keys:
            decisions = user.decide_for_keys(keys, options)
        else:
            decisions = user.decide_all(options)
        return [self._decide_out(decision) for decision in decisions.values()]

    def _decide_out(self, decision: OptimizelyDecision) -> dict[str, Any]:
        user = decision.user_context
        out: dict[str, Any] = {
            "variationKey": decision.variation_key or "",
            "enabled": bool(decision.enabled),
            "ruleKey": decision.rule_key or "",
            "flagKey": decision.flag_key or "",
            "userContext": {
                "userId": user.user_id if user else "",
                "attributes": _go_value(user.get_user_attributes() if user else {}),
            },
            "reasons": list(decision.reasons),
        }
        # Go reports an unknown flag even without INCLUDE_REASONS; Python's
        # decide_for_keys drops that reason.
        if not out["reasons"] and decision.flag_key not in self.flag_keys:
            out["reasons"] = [f'No flag was found for key "{decision.flag_key}".']
        if decision.variables:
            out["variables"] = _go_value(decision.variables)
        # The "Everyone Else" rule is always the last rule of a rollout.
        out["isEveryoneElseVariation"] = (
            decision.rule_key is not None
            and self._everyone_else_rules.get(decision.flag_key) == decision.rule_key
        )
        return out

    def _track_event(
        self, query: Mapping[str, list[str]], payload: Mapping[str, Any]
    ) -> dict[str, Any]:
        user_id = _typed(_field(payload, "userId"), str) or ""
        attributes = _typed(_field(payload, "userAttributes"), dict)
        tags = _typed(_field(payload, "eventTags"), dict)
        event_key = (query.get("eventKey") or [""])[0]
        if not event_key:
            raise _BadRequest(400, "missing required path parameter: eventKey")

        self._count("track_requests")
        answer = {"userId": user_id, "eventKey": event_key}
        if event_key not in self.event_keys:
            self._count("unknown_events")
            answer["error"] = f'event with key "{event_key}" not found'
        else:
            self.client.track(event_key, user_id, attributes, tags)
        return answer

    def _stream(self, exchange: Exchange, request_id: str) -> None:
        params = exchange.query()
        wanted = _stream_filter(params)
        raw = "raw" in params
        subscriber = _HandOff()
        with self._streams_changed:
            self._subscribers.append(subscriber)
            self._counts["streams_opened"] += 1
            self._streams_changed.notify_all()
        try:
            self._write_stream(exchange, request_id, subscriber, wanted, raw)
        finally:
            with self._streams_changed:
                self._subscribers.remove(subscriber)
                self._streams_changed.notify_all()
            subscriber.close()
            exchange.hang_up()

    def _write_stream(
        self,
        exchange: Exchange,
        request_id: str,
        subscriber: _HandOff,
        wanted: frozenset[str] | None,
        raw: bool,
    ) -> None:
        head_sent = False
        while not self._stopping.is_set():
            item = subscriber.take(_STREAM_POLL_SECONDS)
            if item is None:
                if exchange.peer_gone():
                    return
                continue

            # Filtering happens after the hand-off, as in the Agent, so
            # filtered notifications still hold up the API call.
            category, label, payload = item
            if wanted is not None and category not in wanted:
                self._count("notifications_filtered")
                continue

            frame = payload + b"\n" if raw else b"data: " + payload + b"\n\n"
            chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
            if not head_sent:
                # The Agent's first write carries the status line too.
                chunk = _stream_head(request_id) + chunk
                head_sent = True
            try:
                exchange.connection.sendall(chunk)
            except OSError:
                return
            with self._lock:
                self._streamed[label] += 1

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


def _make_client(datafile: str) -> optimizely.Optimizely:
    """An SDK client that decides locally and never touches the network."""
    logger = _silent_logger()
    center = NotificationCenter(logger)
    dispatcher = _NoOpDispatcher()
    # The forwarding processor works inline; the default batching one
    # would start a thread that flushes to the (no-op) dispatcher.
    processor = ForwardingEventProcessor(
        dispatcher, logger=logger, notification_center=center
    )
    client = optimizely.Optimizely(
        datafile=datafile,
        event_dispatcher=dispatcher,
        logger=logger,
        notification_center=center,
        event_processor=processor,
        settings=OptimizelySdkSettings(odp_disabled=True),
    )
    if not client.is_valid or client.config_manager.get_config() is None:
        raise ValueError("the datafile is not a valid Optimizely datafile")
    return client


def _silent_logger() -> logging.Logger:
    # The SDK's NoOpLogger still propagates to the root logger, so a host
    # process that configures logging would print every bucketing step.
    sdk_logger = logging.getLogger(f"{__name__}.sdk")
    sdk_logger.propagate = False
    sdk_logger.setLevel(logging.CRITICAL + 1)
    if not sdk_logger.handlers:
        sdk_logger.addHandler(logging.NullHandler())
    return sdk_logger


class _NoOpDispatcher:
    """Receives the SDK's impression and conversion batches and drops them."""

    def dispatch_event(self, event: object) -> None:
        return None


def _everyone_else_rules(datafile: Mapping[str, Any]) -> dict[str, str]:
    """Flag key -> key of its rollout's last ("Everyone Else") rule."""
    rollouts = {rollout["id"]: rollout for rollout in datafile.get("rollouts", [])}
    rules = {}
    for flag in datafile.get("featureFlags", []):
        rollout = rollouts.get(flag.get("rolloutId"))
        if rollout and rollout["experiments"]:
            rules[flag["key"]] = rollout["experiments"][-1]["key"]
    return rules


# --- Python listener arguments -> the Agent's notification JSON -------------


def _user_context(user_id: str, attributes: Mapping[str, Any] | None) -> dict:
    return {
        "ID": user_id,
        "Attributes": None if attributes is None else _go_value(attributes),
        "QualifiedSegments": None,
    }


def _flag_decision_info(info: Mapping[str, Any]) -> dict[str, Any]:
    # A Go map, so the keys go out sorted; Go has "" where Python has None.
    return {
        "decisionEventDispatched": bool(info.get("decision_event_dispatched")),
        "enabled": bool(info.get("enabled")),
        "experimentId": info.get("experiment_id") or "",
        "flagKey": info.get("flag_key") or "",
        "reasons": list(info.get("reasons") or []),
        "ruleKey": info.get("rule_key") or "",
        "variables": _go_value(info.get("variables") or {}),
        "variationId": info.get("variation_id") or "",
        "variationKey": info.get("variation_key") or "",
    }


def _conversion_event(
    event_key: str,
    event_tags: Mapping[str, Any] | None,
    log_event: Mapping[str, Any],
) -> dict[str, Any]:
    """go-sdk's ConversionEvent, rebuilt from the SDK's event batch."""
    visitor = log_event["params"]["visitors"][0]
    snapshot_event = visitor["snapshots"][0]["events"][0]
    attributes = [
        {
            "value": attribute["value"],
            "key": attribute["key"],
            "type": attribute["type"],
            "entity_id": attribute["entity_id"],
        }
        for attribute in visitor["attributes"]
    ]
    # Go always ends the list with bot filtering; Python only when the
    # datafile sets it.
    if not attributes or attributes[-1]["key"] != _BOT_FILTERING:
        attributes.append(
            {
                "value": False,
                "key": _BOT_FILTERING,
                "type": "custom",
                "entity_id": _BOT_FILTERING,
            }
        )

    conversion: dict[str, Any] = {
        "entity_id": snapshot_event["entity_id"],
        "key": event_key,
        "Attributes": attributes,
    }
    if event_tags:
        conversion["tags"] = _go_value(event_tags)
        # Go truncates a fractional revenue; Python would drop it.
        revenue = _number(event_tags.get("revenue"))
        if revenue is not None:
            conversion["revenue"] = int(revenue)
        value = _number(event_tags.get("value"))
        if value is not None:
            conversion["value"] = float(value)
    return conversion


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


# --- The Agent's responses ---------------------------------------------------


def _optimizely_config(client: optimizely.Optimizely) -> dict[str, Any]:
    """go-sdk's OptimizelyConfig JSON, from the Python SDK's snapshot."""
    config = client.get_optimizely_config()
    if config is None:
        raise _BadRequest(500, "optimizely config is not available")

    def variable(item: Any) -> dict[str, Any]:
        value = item.value if isinstance(item.value, str) else go_json(item.value)
        return {"id": item.id, "key": item.key, "type": item.type, "value": value}

    def variables(mapping: Mapping[str, Any]) -> dict[str, Any]:
        return {key: variable(mapping[key]) for key in sorted(mapping)}

    def experiment(item: Any) -> dict[str, Any]:
        return {
            "id": item.id,
            "key": item.key,
            "audiences": item.audiences or "",
            "variationsMap": {
                key: {
                    "id": variation.id,
                    "key": variation.key,
                    "featureEnabled": bool(variation.feature_enabled),
                    "variablesMap": variables(variation.variables_map or {}),
                }
                for key, variation in sorted(item.variations_map.items())
            },
        }

    def feature(item: Any) -> dict[str, Any]:
        return {
            "id": item.id,
            "key": item.key,
            "experimentRules": [experiment(rule) for rule in item.experiment_rules],
            "deliveryRules": [experiment(rule) for rule in item.delivery_rules],
            "variablesMap": variables(item.variables_map or {}),
            "experimentsMap": {
                key: experiment(value)
                for key, value in sorted(item.experiments_map.items())
            },
        }

    def audience(item: Any) -> dict[str, Any]:
        conditions = item.conditions
        if not isinstance(conditions, str):
            conditions = "" if conditions is None else go_json(conditions)
        return {"id": item.id or "", "name": item.name or "", "conditions": conditions}

    return {
        "environmentKey": config.environment_key,
        "sdkKey": config.sdk_key,
        "revision": config.revision,
        "experimentsMap": {
            key: experiment(value)
            for key, value in sorted(config.experiments_map.items())
        },
        "featuresMap": {
            key: feature(value) for key, value in sorted(config.features_map.items())
        },
        "attributes": [{"id": item.id, "key": item.key} for item in config.attributes],
        "audiences": [audience(item) for item in config.audiences],
        "events": [
            {"id": item.id, "key": item.key, "experimentIds": list(item.experiment_ids)}
            for item in config.events
        ],
    }


def _field(body: Mapping[str, Any], name: str) -> Any:
    """A body field the way Go decodes it: exact name first, else any case."""
    if name in body:
        return body[name]
    folded = name.casefold()
    found = None
    for key, value in body.items():
        if key.casefold() == folded:
            found = value
    return found


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    # Go refuses a JSON value of the wrong type for a field, failing the
    # whole body; null leaves the field at its zero value.
    if value is not None and not isinstance(value, kind):
        raise _BadRequest(400, "error parsing request body")
    return value


def _stream_filter(query: Mapping[str, list[str]]) -> frozenset[str] | None:
    """The categories a stream wants; None for all of them.

    A `filter` with no valid value wants nothing, exactly as in the Agent.
    """
    if "filter" not in query:
        return None
    wanted = set()
    for value in query["filter"]:
        wanted.update(part for part in value.split(",") if part in _STREAM_CATEGORIES)
    return frozenset(wanted)


# --- HTTP details ------------------------------------------------------------


def _answer(
    exchange: Exchange,
    request_id: str,
    status: int,
    body: bytes,
    content_type: str | None = "application/json",
) -> None:
    """A whole answer in one write, with the headers the Agent's middleware adds."""
    exchange.read_body()  # an unread body would be taken for the next request
    headers = [("Date", http_date())]
    if content_type:
        headers.append(("Content-Type", content_type))
        if content_type.startswith("text/plain"):
            headers.append(("X-Content-Type-Options", "nosniff"))
    headers += [
        ("Content-Length", str(len(body))),
        ("Vary", "Origin"),
        ("X-Request-Id", request_id),
    ]
    exchange.connection.sendall(_head(status, headers) + body)


def _stream_head(request_id: str) -> bytes:
    return _head(
        200,
        [
            ("Cache-Control", "no-cache"),
            ("Connection", "keep-alive"),
            ("Content-Type", "text/event-stream"),
            ("Date", http_date()),
            ("Vary", "Origin"),
            ("X-Request-Id", request_id),
            ("Transfer-Encoding", "chunked"),
        ],
    )


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {status_phrase(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_object(exchange: Exchange) -> dict[str, Any]:
    """The request body as Go's handlers see it; {} when there is none."""
    body = exchange.read_body()
    if not body:
        return {}
    content_type = exchange.headers.get("Content-Type") or ""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise _BadRequest(415, None)
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except ValueError:
        raise _BadRequest(400, "error parsing request body") from None
    if not isinstance(payload, dict):
        raise _BadRequest(400, "error parsing request body")
    return payload


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Go's decoder refuses them.
    raise ValueError(f"{name} is not valid JSON")


def _force_decisions(user: OptimizelyUserContext, forced: list[Any]) -> None:
    for item in forced:
        if not isinstance(item, dict):
            raise _BadRequest(400, "error parsing request body")
        context = OptimizelyUserContext.OptimizelyDecisionContext(
            _field(item, "flagKey") or "", _field(item, "ruleKey") or None
        )
        decision = OptimizelyUserContext.OptimizelyForcedDecision(
            _field(item, "variationKey") or ""
        )
        user.set_forced_decision(context, decision)


# --- Command line --------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (or --max-seconds), then print the report."""
    parser = argparse.ArgumentParser(
        prog="python -m standins.agent_sdk",
        description="Local Optimizely Agent stand-in (development tool only).",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--sdk-key", default=DEFAULT_SDK_KEY)
    parser.add_argument("--datafile", type=Path, help="default: the bundled sample")
    parser.add_argument(
        "--hand-off-seconds",
        type=float,
        default=DEFAULT_HAND_OFF_TIMEOUT_SECONDS,
        help="how long a decide/track waits for each stream to take a frame",
    )
    parser.add_argument("--disable-notifications", action="store_true")
    parser.add_argument("--max-seconds", type=float, help="stop after this long")
    args = parser.parse_args(argv)

    datafile = args.datafile.read_text(encoding="utf-8") if args.datafile else None
    standin = AgentSdkStandIn(
        args.sdk_key,
        datafile=datafile,
        port=args.port,
        enable_notifications=not args.disable_notifications,
        hand_off_timeout_seconds=args.hand_off_seconds,
    )
    try:
        standin.start()
    except OSError as error:
        print(f"cannot listen on 127.0.0.1:{args.port}: {error}", file=sys.stderr)
        return 1
    print(standin.url, flush=True)

    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        stop.wait(args.max_seconds)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        standin.stop()
    print(json.dumps(standin.report()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
