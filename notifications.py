"""The records the processor makes of the Agent's notifications.

Each destination's mapping turns these into its own payloads; nothing
downstream of the processor ever looks at the Agent's JSON again. They are
not frozen only because a frozen dataclass costs several times as much to
build, and one is built for every notification; nothing changes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Exposure:
    """A user was shown a variation of a flag or experiment."""

    user_id: str
    attributes: Mapping[str, Any]  # {} when the Agent sent null
    flag_key: str  # the flag, or the experiment key for legacy decisions
    rule_key: str  # the rule or experiment; "" when the user matched none
    variation_key: str
    enabled: bool
    decision_type: str  # flag, ab-test, feature-test or all-feature-variables
    received_ns: int  # wall-clock nanoseconds when the listener read it
    identity: str  # hex digest, stable across resends and replays


@dataclass(slots=True)
class Conversion:
    """A user triggered a tracked event."""

    user_id: str
    attributes: Mapping[str, Any]
    event_key: str
    tags: Mapping[str, Any]  # {} when the Agent sent null
    revenue: int | None  # integer cents, as Optimizely records it
    value: float | None
    received_ns: int
    identity: str


Notification = Exposure | Conversion
