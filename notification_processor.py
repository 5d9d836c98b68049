"""Turns the Agent's notification JSON into exposures and conversions.

Notifications are told apart by shape, never by key order: the Agent's
Redis-synchronised mode re-sorts every key. A frame that is not JSON, has
the wrong shape or an unknown type is counted and logged with a short
summary (never the payload) and the stream goes on. Config updates are
logged when the revision changes; the Agent repeats them while it loads a
key, so repeats are ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from event_buffer import Envelope
from metrics import Metrics
from notifications import Conversion, Exposure, Notification

logger = logging.getLogger(__name__)

FLAG_TYPES = ("flag",)
EXPERIMENT_TYPES = ("ab-test", "feature-test")
FEATURE_TYPES = ("all-feature-variables", "feature", "feature-variable")

_LOG_INTERVAL_SECONDS = 60.0
_LOGS_PER_INTERVAL = 5


class _Malformed(Exception):
    """A frame this processor cannot use; the message is the metric reason."""


class NotificationProcessor:
    """Classifies envelopes; thread-safe, shared by every worker."""

    def __init__(self, exposure_mode: str, metrics: Metrics) -> None:
        self._mode = exposure_mode
        self._metrics = metrics
        self._lock = threading.Lock()
        self._revision: str | None = None
        self._log_window_start = 0.0
        self._logged_in_window: dict[str, int] = {}
        self._received = {
            kind: metrics.received.labels(kind)
            for kind in (*FLAG_TYPES, *EXPERIMENT_TYPES, *FEATURE_TYPES, "track")
        }

    def process(self, envelope: Envelope) -> Notification | None:
        """The exposure or conversion in `envelope`, or None if there is none."""
        try:
            document = json.loads(envelope.data.decode())
            if not isinstance(document, dict):
                raise _Malformed("not_an_object")
            if "DecisionInfo" in document:
                return self._decision(document, envelope)
            if "EventKey" in document:
                return self._conversion(document, envelope)
            if "Revision" in document:
                self._config_update(document)
                return None
            raise _Malformed("unknown_shape")
        except _Malformed as problem:
            self._reject(str(problem), envelope)
        except (ValueError, RecursionError):
            # json raises ValueError (UnicodeDecodeError included) for bytes
            # that are not UTF-8 JSON, RecursionError for absurd nesting.
            self._reject("not_json", envelope)
        return None

    def _decision(
        self, document: dict[str, Any], envelope: Envelope
    ) -> Exposure | None:
        kind = document.get("Type")
        info = _object(document, "DecisionInfo")
        user_id, attributes = _user(document)

        if kind in FLAG_TYPES:
            flag_key = _text(info, "flagKey")
            rule_key = _text(info, "ruleKey", required=False)
            variation_key = _text(info, "variationKey", required=False)
            enabled = info.get("enabled") is True
            exposed = info.get("decisionEventDispatched") is True
        elif kind in EXPERIMENT_TYPES:
            flag_key = rule_key = _text(info, "experimentKey")
            variation_key = _text(info, "variationKey", required=False)
            enabled = bool(variation_key)
            exposed = bool(variation_key)
        elif kind in FEATURE_TYPES:
            feature = _object(info, "feature")
            flag_key = _text(feature, "featureKey")
            source_info = feature.get("sourceInfo")
            source_info = source_info if isinstance(source_info, dict) else {}
            rule_key = _text(source_info, "experimentKey", required=False)
            variation_key = _text(source_info, "variationKey", required=False)
            enabled = feature.get("featureEnabled") is True
            exposed = feature.get("source") == "feature-test" and bool(variation_key)
        else:
            raise _Malformed("unknown_decision_type")

        self._received[kind].inc()
        if self._mode == "none" or (self._mode == "dispatched" and not exposed):
            return None
        return Exposure(
            user_id=user_id,
            attributes=attributes,
            flag_key=flag_key,
            rule_key=rule_key,
            variation_key=variation_key,
            enabled=enabled,
            decision_type=kind,
            received_ns=envelope.received_ns,
            identity=_identity(envelope),
        )

    def _conversion(self, document: dict[str, Any], envelope: Envelope) -> Conversion:
        event_key = _text(document, "EventKey")
        user_id, attributes = _user(document)
        tags = document.get("EventTags")
        if tags is None:
            tags = {}
        elif not isinstance(tags, dict):
            raise _Malformed("bad_event_tags")
        conversion = document.get("ConversionEvent")
        conversion = conversion if isinstance(conversion, dict) else {}

        revenue = conversion.get("revenue", tags.get("revenue"))
        # Optimizely truncates revenue to an integer.
        revenue = int(revenue) if _is_finite_number(revenue) else None
        value = conversion.get("value", tags.get("value"))
        if not _is_finite_number(value):
            value = None

        self._received["track"].inc()
        return Conversion(
            user_id=user_id,
            attributes=attributes,
            event_key=event_key,
            tags=tags,
            revenue=revenue,
            value=float(value) if value is not None else None,
            received_ns=envelope.received_ns,
            identity=_identity(envelope),
        )

    def _config_update(self, document: dict[str, Any]) -> None:
        revision = document.get("Revision")
        if not isinstance(revision, str | int) or isinstance(revision, bool):
            raise _Malformed("bad_revision")
        self._metrics.received.labels("project_config_update").inc()
        with self._lock:
            changed = str(revision) != self._revision
            self._revision = str(revision)
        if changed:
            logger.info("project config updated to revision %s", revision)
        else:
            logger.debug("repeated config update for revision %s ignored", revision)

    def _reject(self, reason: str, envelope: Envelope) -> None:
        self._metrics.rejected.labels(reason).inc()
        now = time.monotonic()
        with self._lock:
            if now - self._log_window_start > _LOG_INTERVAL_SECONDS:
                self._log_window_start = now
                self._logged_in_window = {}
            logged = self._logged_in_window.get(reason, 0)
            self._logged_in_window[reason] = logged + 1
        if logged < _LOGS_PER_INTERVAL:
            logger.warning(
                "rejected notification %d: %s (%d bytes)",
                envelope.id,
                reason,
                len(envelope.data),
                extra={"reason": reason, "bytes": len(envelope.data)},
            )
        elif logged == _LOGS_PER_INTERVAL:
            logger.warning("more notifications rejected for %s; see metrics", reason)


def _is_finite_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _object(document: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = document.get(key)
    if not isinstance(value, dict):
        raise _Malformed(f"bad_{key.lower()}")
    return value


def _text(document: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = document.get(key)
    if isinstance(value, str) and (value or not required):
        return value
    if value is None and not required:
        return ""
    raise _Malformed(f"bad_{key.lower()}")


def _user(document: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    context = _object(document, "UserContext")
    user_id = context.get("ID")
    if not isinstance(user_id, str):
        raise _Malformed("bad_user_id")
    attributes = context.get("Attributes")
    if attributes is None:
        attributes = {}
    elif not isinstance(attributes, dict):
        raise _Malformed("bad_attributes")
    return user_id, attributes


def _identity(envelope: Envelope) -> str:
    """Same notification and receipt time, same identity; anything else differs.

    The receipt time is unique per notification within a process and moves
    forward across restarts, so two identical frames never share an
    identity, while a replay from the spool or a dead-letter file keeps it.
    """
    digest = hashlib.blake2b(envelope.data, digest_size=16)
    digest.update(envelope.received_ns.to_bytes(8, "big", signed=False))
    return digest.hexdigest()
