"""Tests for the Amplitude mapping, request building and answer reading."""

from __future__ import annotations

import json
from typing import Any

import pytest

from amplitude import AmplitudeDestination
from destination import Mapped, Rejected
from notifications import Conversion, Exposure
from settings import Settings

RECEIVED_NS = 1_735_689_600_123_456_789
MILLIS = RECEIVED_NS // 1_000_000
ATTRIBUTES = {"age": 34, "beta": True, "plan": "gold"}
API_KEY = "amp-key-0123456789abcdef"
URL = "https://api2.amplitude.com/2/httpapi"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"sdk_key": "sdk", "amplitude_api_key": API_KEY}
    values.update(overrides)
    return Settings(**values)


def exposure(**overrides: Any) -> Exposure:
    values: dict[str, Any] = {
        "user_id": "user-123",
        "attributes": ATTRIBUTES,
        "flag_key": "checkout_flow",
        "rule_key": "checkout_ab",
        "variation_key": "treatment",
        "enabled": True,
        "decision_type": "flag",
        "received_ns": RECEIVED_NS,
        "identity": "0123456789abcdef" * 2,
    }
    values.update(overrides)
    return Exposure(**values)


def conversion(**overrides: Any) -> Conversion:
    values: dict[str, Any] = {
        "user_id": "user-123",
        "attributes": ATTRIBUTES,
        "event_key": "purchase",
        "tags": {},
        "revenue": None,
        "value": None,
        "received_ns": RECEIVED_NS,
        "identity": "fedcba9876543210" * 2,
    }
    values.update(overrides)
    return Conversion(**values)


def mapped(amp: AmplitudeDestination, notification: Exposure | Conversion) -> Mapped:
    [result] = amp.map(notification)
    assert isinstance(result, Mapped)
    return result


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def depth(value: Any) -> int:
    """Nesting depth counting every dict and list, the outermost as 1."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@pytest.fixture
def amp() -> AmplitudeDestination:
    return AmplitudeDestination(make_settings())


EXPOSURE_INSERT_ID = "optly-0123456789abcdef0123456789abcdef"
CONVERSION_INSERT_ID = "optly-fedcba9876543210fedcba9876543210"

# The records the processor makes of the sample stream's frames
# (reference/agent-sse-sample.txt); frame 8 is a config update, which no
# destination ever sees.
SAMPLE_FRAMES = [
    pytest.param(
        exposure(),
        {
            "user_id": "user-123",
            "event_type": "[Optimizely] Exposure",
            "time": MILLIS,
            "insert_id": EXPOSURE_INSERT_ID,
            "event_properties": {
                "flag_key": "checkout_flow",
                "rule_key": "checkout_ab",
                "variation_key": "treatment",
                "enabled": True,
            },
            "user_properties": {
                "age": 34,
                "beta": True,
                "plan": "gold",
                "[Optimizely] checkout_flow": "treatment",
            },
        },
        id="1-flag",
    ),
    pytest.param(
        exposure(
            user_id="user-456",
            attributes={},
            rule_key="default-rollout-7001-20001",
            variation_key="off",
            enabled=False,
        ),
        {
            "user_id": "user-456",
            "event_type": "[Optimizely] Exposure",
            "time": MILLIS,
            "insert_id": EXPOSURE_INSERT_ID,
            "event_properties": {
                "flag_key": "checkout_flow",
                "rule_key": "default-rollout-7001-20001",
                "variation_key": "off",
                "enabled": False,
            },
            "user_properties": {"[Optimizely] checkout_flow": "off"},
        },
        id="2-flag-rollout",
    ),
    pytest.param(
        exposure(
            flag_key="homepage_banner",
            rule_key="homepage_banner",
            variation_key="variation_b",
            decision_type="ab-test",
        ),
        {
            "user_id": "user-123",
            "event_type": "[Optimizely] Exposure",
            "time": MILLIS,
            "insert_id": EXPOSURE_INSERT_ID,
            "event_properties": {
                "flag_key": "homepage_banner",
                "rule_key": "homepage_banner",
                "variation_key": "variation_b",
                "enabled": True,
            },
            "user_properties": {
                "age": 34,
                "beta": True,
                "plan": "gold",
                "[Optimizely] homepage_banner": "variation_b",
            },
        },
        id="3-ab-test",
    ),
    pytest.param(
        exposure(
            user_id="user-789",
            attributes={},
            flag_key="checkout_ab",
            rule_key="checkout_ab",
            variation_key="",
            enabled=False,
            decision_type="feature-test",
        ),
        {
            "user_id": "user-789",
            "event_type": "[Optimizely] Exposure",
            "time": MILLIS,
            "insert_id": EXPOSURE_INSERT_ID,
            "event_properties": {
                "flag_key": "checkout_ab",
                "rule_key": "checkout_ab",
                "variation_key": "",
                "enabled": False,
            },
        },
        id="4-feature-test-unbucketed",
    ),
    pytest.param(
        exposure(decision_type="all-feature-variables"),
        {
            "user_id": "user-123",
            "event_type": "[Optimizely] Exposure",
            "time": MILLIS,
            "insert_id": EXPOSURE_INSERT_ID,
            "event_properties": {
                "flag_key": "checkout_flow",
                "rule_key": "checkout_ab",
                "variation_key": "treatment",
                "enabled": True,
            },
            "user_properties": {
                "age": 34,
                "beta": True,
                "plan": "gold",
                "[Optimizely] checkout_flow": "treatment",
            },
        },
        id="5-all-feature-variables",
    ),
    pytest.param(
        conversion(
            tags={"category": "shoes", "revenue": 4200, "value": 42},
            revenue=4200,
            value=42.0,
        ),
        {
            "user_id": "user-123",
            "event_type": "purchase",
            "time": MILLIS,
            "insert_id": CONVERSION_INSERT_ID,
            "event_properties": {"category": "shoes", "revenue": 4200, "value": 42},
            "revenue": 42.0,
            "user_properties": {"age": 34, "beta": True, "plan": "gold"},
        },
        id="6-track-purchase",
    ),
    pytest.param(
        conversion(user_id="user-789", attributes={}, event_key="signup"),
        {
            "user_id": "user-789",
            "event_type": "signup",
            "time": MILLIS,
            "insert_id": CONVERSION_INSERT_ID,
        },
        id="7-track-signup",
    ),
    pytest.param(
        exposure(
            user_id="user-000",
            attributes={
                "country": "DE",
                "referrer": "https://shop.example/?a=1&b=<2>",
            },
            flag_key="new_search",
            rule_key="",
            variation_key="",
            enabled=False,
        ),
        {
            "user_id": "user-000",
            "event_type": "[Optimizely] Exposure",
            "time": MILLIS,
            "insert_id": EXPOSURE_INSERT_ID,
            "event_properties": {
                "flag_key": "new_search",
                "rule_key": "",
                "variation_key": "",
                "enabled": False,
            },
            "user_properties": {
                "country": "DE",
                "referrer": "https://shop.example/?a=1&b=<2>",
            },
        },
        id="9-flag-no-variation",
    ),
]


@pytest.mark.parametrize(("notification", "expected"), SAMPLE_FRAMES)
def test_sample_frames_map_to_exact_events(
    amp: AmplitudeDestination, notification: Exposure | Conversion, expected: dict
) -> None:
    result = mapped(amp, notification)

    assert result.event == expected
    assert result.key == notification.user_id
    assert result.size == len(compact(result.event))
    assert not amp.adjustments


def test_sample_request_body_is_exact(amp: AmplitudeDestination) -> None:
    events = [mapped(amp, exposure()), mapped(amp, conversion(user_id="user-789"))]

    request = amp.build_request(events)

    assert request.url == request.safe_url == URL
    assert list(request.body) == ["api_key", "events", "options"]
    assert request.body == {
        "api_key": API_KEY,
        "events": [events[0].event, events[1].event],
        "options": {"min_id_length": 1},
    }


def test_tracking_url_comes_from_settings() -> None:
    url = "http://127.0.0.1:9001/2/httpapi"
    amp = AmplitudeDestination(make_settings(amplitude_tracking_url=url))

    assert amp.build_request([mapped(amp, exposure())]).url == url


def test_destination_shape(amp: AmplitudeDestination) -> None:
    assert amp.name == "amplitude"
    assert amp.max_batch_events == 100
    assert amp.one_key_per_batch is False
    assert 990_000 < amp.max_batch_bytes < 1_000_000


@pytest.mark.parametrize("batch_size", [1, 500, 2000])
def test_batch_size_comes_from_settings(batch_size: int) -> None:
    amp = AmplitudeDestination(make_settings(amplitude_batch_size=batch_size))

    assert amp.max_batch_events == batch_size


def test_batch_size_never_exceeds_2000() -> None:
    amp = AmplitudeDestination(make_settings(amplitude_batch_size=5000))

    assert amp.max_batch_events == 2000


# Identity and names.


def test_insert_id_is_stable_and_short(amp: AmplitudeDestination) -> None:
    long_identity = "ab" * 64
    first = mapped(amp, exposure(identity=long_identity)).event["insert_id"]
    again = mapped(amp, exposure(identity=long_identity)).event["insert_id"]

    assert first == again == "optly-" + long_identity[:40]
    assert len(first) <= 64


def test_no_insert_id_without_identity(amp: AmplitudeDestination) -> None:
    assert "insert_id" not in mapped(amp, exposure(identity="")).event


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "   ",
        "anonymous",
        "Anonymous",
        "nil",
        "None",
        "NULL",
        "n/a",
        "N/A",
        "na",
        "undefined",
        "unknown",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "LMY47D",
        "0",
        "-1",
        " null ",
        "u" * 1025,
    ],
)
def test_user_ids_amplitude_refuses_are_rejected(
    amp: AmplitudeDestination, user_id: str
) -> None:
    for notification in (exposure(user_id=user_id), conversion(user_id=user_id)):
        [result] = amp.map(notification)

        assert isinstance(result, Rejected)
        assert result.reason == "invalid_user_id"


@pytest.mark.parametrize("user_id", ["1", "u", "00", "-2", "nulls", "u" * 1024])
def test_short_and_odd_user_ids_are_accepted(
    amp: AmplitudeDestination, user_id: str
) -> None:
    assert mapped(amp, exposure(user_id=user_id)).event["user_id"] == user_id


@pytest.mark.parametrize(
    ("event_key", "event_type"),
    [
        ("$identify", "[Optimizely] $identify"),
        ("$groupidentify", "[Optimizely] $groupidentify"),
        ("$IDENTIFY", "[Optimizely] $IDENTIFY"),
        ("[Amplitude] Revenue", "[Optimizely] [Amplitude] Revenue"),
        ("[Amplitude] Start Session", "[Optimizely] [Amplitude] Start Session"),
        ("[amplitude] anything", "[Optimizely] [amplitude] anything"),
        ("Amplitude Revenue", "Amplitude Revenue"),
        ("$exposure", "$exposure"),
        ("123 buy now!", "123 buy now!"),
    ],
)
def test_reserved_event_types_are_prefixed(
    amp: AmplitudeDestination, event_key: str, event_type: str
) -> None:
    event = mapped(amp, conversion(event_key=event_key)).event

    assert event["event_type"] == event_type
    assert amp.adjustments["event_type_renamed"] == (event_type != event_key)


def test_configured_exposure_type_is_used() -> None:
    settings = make_settings(amplitude_exposure_event_type="$exposure")
    amp = AmplitudeDestination(settings)

    assert mapped(amp, exposure()).event["event_type"] == "$exposure"


def test_reserved_exposure_type_is_renamed() -> None:
    settings = make_settings(amplitude_exposure_event_type="$identify")
    amp = AmplitudeDestination(settings)

    events = [mapped(amp, exposure()).event for _ in range(3)]

    assert {event["event_type"] for event in events} == {"[Optimizely] $identify"}
    assert amp.adjustments == {"event_type_renamed": 3}


def test_empty_event_key_is_rejected(amp: AmplitudeDestination) -> None:
    [result] = amp.map(conversion(event_key=""))

    assert isinstance(result, Rejected)
    assert result.reason == "invalid_event_type"


def test_long_event_key_is_truncated(amp: AmplitudeDestination) -> None:
    event = mapped(amp, conversion(event_key="e" * 2000)).event

    assert event["event_type"] == "e" * 1024
    assert amp.adjustments == {"string_truncated": 1}


# Properties.


def test_optimizely_attributes_are_not_user_properties(
    amp: AmplitudeDestination,
) -> None:
    attributes = {"plan": "gold", "$opt_bot_filtering": False, "$opt_x": 1}

    for notification in (
        exposure(attributes=attributes, variation_key=""),
        conversion(attributes=attributes),
    ):
        assert mapped(amp, notification).event["user_properties"] == {"plan": "gold"}


def test_revenue_is_in_currency_units(amp: AmplitudeDestination) -> None:
    assert mapped(amp, conversion(revenue=1999)).event["revenue"] == 19.99
    assert mapped(amp, conversion(revenue=0)).event["revenue"] == 0.0
    assert "revenue" not in mapped(amp, conversion(value=3.0)).event


def test_long_strings_are_truncated(amp: AmplitudeDestination) -> None:
    notification = conversion(
        tags={
            "k" * 1100: "v" * 1100,
            "list": ["w" * 2000],
            "nested": {"x": "y" * 1025},
        },
        attributes={"a": "b" * 5000},
    )

    event = mapped(amp, notification).event

    assert event["event_properties"] == {
        "k" * 1024: "v" * 1024,
        "list": ["w" * 1024],
        "nested": {"x": "y" * 1024},
    }
    assert event["user_properties"] == {"a": "b" * 1024}
    assert amp.adjustments == {"string_truncated": 5}


def test_long_exposure_keys_are_truncated(amp: AmplitudeDestination) -> None:
    notification = exposure(flag_key="f" * 1030, variation_key="v" * 1030)

    event = mapped(amp, notification).event

    assert event["event_properties"]["flag_key"] == "f" * 1024
    assert event["event_properties"]["variation_key"] == "v" * 1024
    assert event["user_properties"]["[Optimizely] " + "f" * 1011] == "v" * 1024


def test_non_finite_numbers_are_dropped(amp: AmplitudeDestination) -> None:
    nan, inf = float("nan"), float("inf")
    tags = {"a": nan, "b": inf, "c": -inf, "d": 1.5, "e": [1, nan, 2], "f": {"g": inf}}

    event = mapped(amp, conversion(tags=tags, attributes={"h": nan})).event

    assert event["event_properties"] == {"d": 1.5, "e": [1, 2], "f": {}}
    assert "user_properties" not in event
    assert amp.adjustments == {"property_dropped_non_finite": 6}
    assert b"NaN" not in compact(event) and b"Infinity" not in compact(event)


def test_json_values_pass_unchanged(amp: AmplitudeDestination) -> None:
    tags = {"s": "x", "i": -3, "f": 0.5, "t": True, "n": None, "l": [1, "a", None]}

    assert mapped(amp, conversion(tags=tags)).event["event_properties"] == tags


def test_at_most_1024_keys_per_object(amp: AmplitudeDestination) -> None:
    tags = {f"t{i}": i for i in range(1500)}
    attributes = {f"a{i}": i for i in range(1100)}

    event = mapped(amp, exposure(attributes=attributes)).event
    properties = mapped(amp, conversion(tags={"nested": tags})).event[
        "event_properties"
    ]

    assert len(event["user_properties"]) == 1024
    assert event["user_properties"]["[Optimizely] checkout_flow"] == "treatment"
    assert "a1022" in event["user_properties"]
    assert "a1023" not in event["user_properties"]
    assert len(properties["nested"]) == 1024
    assert amp.adjustments == {"property_dropped_keys": 77 + 476}


def test_deep_nesting_is_stringified(amp: AmplitudeDestination) -> None:
    nested: Any = "bottom"
    for _ in range(60):
        nested = {"d": nested}

    event = mapped(amp, conversion(tags={"deep": nested})).event

    properties = event["event_properties"]
    assert depth(properties) == 40
    innermost = properties
    for _ in range(39):
        innermost = innermost["d"] if "d" in innermost else innermost["deep"]
    [text] = innermost.values()
    expected: Any = "bottom"
    for _ in range(21):
        expected = {"d": expected}
    assert json.loads(text) == expected
    assert amp.adjustments == {"property_stringified_deep": 1}


def test_deep_lists_are_stringified(amp: AmplitudeDestination) -> None:
    nested: Any = [1]
    for _ in range(45):
        nested = [nested]

    event = mapped(amp, conversion(tags={"deep": nested})).event

    assert depth(event["event_properties"]) == 40
    assert amp.adjustments == {"property_stringified_deep": 1}


def test_map_leaves_the_record_alone(amp: AmplitudeDestination) -> None:
    tags = {"a": float("inf"), "b": ["x" * 2000], "$opt_c": 1}
    attributes = {"$opt_bot_filtering": False, "plan": "gold"}

    amp.map(conversion(tags=tags, attributes=attributes))

    assert tags["b"] == ["x" * 2000] and "a" in tags
    assert attributes == {"$opt_bot_filtering": False, "plan": "gold"}


def test_event_over_the_request_limit_is_rejected(amp: AmplitudeDestination) -> None:
    tags = {f"t{i}": {f"u{j}": "x" * 1024 for j in range(1024)} for i in range(2)}

    [result] = amp.map(conversion(tags=tags))

    assert isinstance(result, Rejected)
    assert result.reason == "too_large"


def test_lone_surrogates_are_replaced(amp: AmplitudeDestination) -> None:
    result = mapped(amp, conversion(tags={"bad": "x\ud800y"}))

    assert result.event["event_properties"]["bad"] == "x?y"
    assert result.size == len(compact(result.event))


# Answers.


def answer(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_200_is_delivered(amp: AmplitudeDestination) -> None:
    body = answer(code=200, events_ingested=3, payload_size_bytes=50)

    result = amp.read_response(200, body, {}, 3)

    assert not (result.retry or result.rejected or result.resend or result.held)
    assert not (result.split or result.config_error)


def test_400_missing_field_rejects_everything(amp: AmplitudeDestination) -> None:
    body = answer(
        code=400,
        error="Request missing required field",
        missing_field="api_key",
        events_with_invalid_fields={"time": [0]},
    )

    result = amp.read_response(400, body, {}, 3)

    assert result.rejected == dict.fromkeys(range(3), "missing_field")
    assert result.config_error == (
        "Amplitude says the request lacks the required field 'api_key'"
    )
    assert not result.resend


def test_400_invalid_api_key_never_echoes_the_key(amp: AmplitudeDestination) -> None:
    body = answer(code=400, error=f"Invalid API key: {API_KEY}")

    result = amp.read_response(400, body, {}, 2)

    assert result.rejected == {0: "invalid_api_key", 1: "invalid_api_key"}
    assert "AMPLITUDE_API_KEY" in result.config_error
    assert API_KEY not in result.config_error


@pytest.mark.parametrize("error", ["Invalid JSON request body", "Missing request body"])
def test_400_unreadable_body_rejects_everything(
    amp: AmplitudeDestination, error: str
) -> None:
    result = amp.read_response(400, answer(code=400, error=error), {}, 2)

    assert result.rejected == {0: "invalid_json", 1: "invalid_json"}
    assert result.config_error


def test_400_named_events_are_rejected_and_the_rest_resent(
    amp: AmplitudeDestination,
) -> None:
    body = answer(
        code=400,
        error="Invalid field values on some events",
        events_with_invalid_fields={"time": [0, 3], "event_type": [3]},
        events_with_missing_fields={"event_type": [5]},
        events_with_invalid_id_lengths={"user_id": [6, 99, -1, "7"]},
        silenced_events=[8, 0],
        silenced_devices=["d1"],
    )

    result = amp.read_response(400, body, {}, 10)

    assert result.rejected == {
        0: "invalid_fields",
        3: "invalid_fields",
        5: "missing_fields",
        6: "invalid_id_length",
        8: "silenced",
    }
    assert result.resend == [1, 2, 4, 7, 9]
    assert not result.retry and not result.config_error


def test_400_naming_nothing_rejects_everything(amp: AmplitudeDestination) -> None:
    body = answer(code=400, error="Invalid request path")

    result = amp.read_response(400, body, {}, 2)

    assert result.rejected == {0: "http_400", 1: "http_400"}
    assert result.config_error.endswith("(Invalid request path)")


def test_400_unknown_error_text_is_not_repeated(amp: AmplitudeDestination) -> None:
    body = answer(code=400, error=f"something new about {API_KEY}")

    result = amp.read_response(400, body, {}, 1)

    assert result.rejected == {0: "http_400"}
    assert API_KEY not in result.config_error


def test_403_rejects_everything(amp: AmplitudeDestination) -> None:
    result = amp.read_response(403, answer(code=403, error="Forbidden"), {}, 2)

    assert result.rejected == {0: "forbidden", 1: "forbidden"}
    assert result.config_error


def test_413_splits_or_rejects_a_single_event(amp: AmplitudeDestination) -> None:
    body = answer(code=413, error="Payload too large")

    assert amp.read_response(413, body, {}, 2).split is True
    single = amp.read_response(413, body, {}, 1)
    assert not single.split
    assert single.rejected == {0: "too_large"}


def _batch(amp: AmplitudeDestination, users: list[str]) -> list[Mapped]:
    return [mapped(amp, exposure(user_id=user)) for user in users]


def test_429_holds_throttled_drops_over_quota_resends_the_rest(
    amp: AmplitudeDestination,
) -> None:
    users = ["slow", "other", "quota", "slow", "listed", "other", "quota"]
    body = answer(
        code=429,
        error="Too many requests for some devices and users",
        eps_threshold=30,
        throttled_users={"slow": 32},
        throttled_events=[0, 4, 6],
        exceeded_daily_quota_users={"quota": 500200},
    )

    result = amp.read_response(
        429, body, {"Retry-After": "12"}, 7, events=_batch(amp, users)
    )

    assert result.held == {0: 12.0, 3: 12.0, 4: 12.0}
    assert result.rejected == {2: "daily_quota", 6: "daily_quota"}
    assert result.resend == [1, 5]
    assert not result.retry


def test_429_holds_for_30_seconds_by_default(amp: AmplitudeDestination) -> None:
    body = answer(code=429, throttled_events=[1], throttled_users={"b": 31})

    result = amp.read_response(429, body, {}, 3, events=_batch(amp, ["a", "b", "c"]))

    assert result.held == {1: 30.0}
    assert result.resend == [0, 2]


def test_429_hold_is_configurable() -> None:
    amp = AmplitudeDestination(make_settings(amplitude_throttle_seconds=3.0))
    body = answer(code=429, throttled_events=[0])

    result = amp.read_response(429, body, {}, 2, events=_batch(amp, ["a", "b"]))

    assert result.held == {0: 3.0}
    assert result.resend == [1]


def test_429_matches_devices_too(amp: AmplitudeDestination) -> None:
    events = [
        Mapped("a", {"user_id": "a", "device_id": "dev-1"}, 10),
        Mapped("b", {"user_id": "b", "device_id": "dev-2"}, 10),
        Mapped("c", {"user_id": "c"}, 10),
    ]
    body = answer(
        code=429,
        throttled_devices={"dev-1": 40},
        exceeded_daily_quota_devices={"dev-2": 500900},
    )

    result = amp.read_response(429, body, {}, 3, events=events)

    assert result.held == {0: 30.0}
    assert result.rejected == {1: "daily_quota"}
    assert result.resend == [2]


def test_429_without_the_batch_goes_by_index(amp: AmplitudeDestination) -> None:
    body = answer(
        code=429,
        throttled_events=[1],
        throttled_users={"a": 40},
        exceeded_daily_quota_users={"c": 500200},
    )

    result = amp.read_response(429, body, {}, 3)

    assert result.held == {1: 30.0}
    assert result.resend == [0, 2]
    assert not result.rejected


@pytest.mark.parametrize(
    ("body", "headers", "wait"),
    [
        (b"<html>slow down</html>", {}, 30.0),
        (answer(code=429, error="Too many requests"), {"retry-after": "7"}, 7.0),
        (b"", {"RETRY-AFTER": "Thu, 01 Jan 2026 00:01:00 GMT"}, 60.0),
    ],
)
def test_429_naming_nobody_retries_the_batch(
    body: bytes, headers: dict[str, str], wait: float
) -> None:
    now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    amp = AmplitudeDestination(make_settings(), clock=lambda: now)

    result = amp.read_response(429, body, headers, 2, events=None)

    assert result.retry is True
    assert result.retry_after_seconds == wait


def test_429_naming_only_users_elsewhere_retries_the_batch(
    amp: AmplitudeDestination,
) -> None:
    body = answer(code=429, throttled_users={"x": 40}, exceeded_daily_quota_users={})

    for events in (None, _batch(amp, ["a", "b"])):
        result = amp.read_response(429, body, {}, 2, events=events)

        assert result.retry is True
        assert result.retry_after_seconds == 30.0


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_transient_failures_are_retried(amp: AmplitudeDestination, status: int) -> None:
    plain = amp.read_response(status, b"<html>down</html>", {}, 3)
    told = amp.read_response(status, b"", {"Retry-After": "5"}, 3)

    assert plain.retry is True and plain.retry_after_seconds is None
    assert told.retry is True and told.retry_after_seconds == 5.0
    assert not plain.rejected


@pytest.mark.parametrize("status", [301, 401, 404, 405, 409, 422])
def test_other_answers_reject_everything(
    amp: AmplitudeDestination, status: int
) -> None:
    result = amp.read_response(status, b"nope", {}, 2)

    assert result.rejected == {0: f"http_{status}", 1: f"http_{status}"}
    assert "AMPLITUDE_TRACKING_URL" in result.config_error


@pytest.mark.parametrize("status", [200, 400, 403, 413, 429, 500, 404])
@pytest.mark.parametrize(
    "body",
    [b"", b"<html></html>", b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b"{" * 5000],
)
def test_any_body_is_read_without_crashing(
    amp: AmplitudeDestination, status: int, body: bytes
) -> None:
    amp.read_response(status, body, {}, 2, events=_batch(amp, ["a", "b"]))


def test_malformed_fields_are_ignored(amp: AmplitudeDestination) -> None:
    body = answer(
        code=400,
        events_with_invalid_fields=[1],
        events_with_missing_fields="time",
        silenced_events={"x": "y"},
        error=None,
    )

    result = amp.read_response(400, body, {}, 2)

    assert result.rejected == {1: "invalid_fields"}
    assert result.resend == [0]


# Sizes.


def _batches(amp: AmplitudeDestination, events: list[Mapped]) -> list[list[Mapped]]:
    """Batches the way the dispatcher makes them: by count and summed size."""
    batches: list[list[Mapped]] = []
    current: list[Mapped] = []
    total = 0
    for event in events:
        if current and (
            len(current) == amp.max_batch_events
            or total + event.size > amp.max_batch_bytes
        ):
            batches.append(current)
            current, total = [], 0
        current.append(event)
        total += event.size
    batches.append(current)
    return batches


@pytest.mark.parametrize(
    ("batch_size", "tags", "emoji"),
    [(2000, 0, 1), (2000, 0, 300), (2000, 1, 300), (100, 4, 300)],
)
def test_every_request_stays_under_1_mb(batch_size: int, tags: int, emoji: int) -> None:
    amp = AmplitudeDestination(
        make_settings(amplitude_batch_size=batch_size, amplitude_api_key="k" * 200)
    )
    # Control characters take 6 bytes each once JSON-escaped.
    properties = {f"t{i}": "\x01" * 1024 for i in range(tags)}
    events = [
        mapped(
            amp, conversion(user_id=f"u{i}", tags=properties, event_key="😀" * emoji)
        )
        for i in range(4100)
    ]

    batches = _batches(amp, events)
    sizes = [len(compact(amp.build_request(batch).body)) for batch in batches]

    assert max(sizes) < 1_000_000
    assert max(len(batch) for batch in batches) <= batch_size
    if emoji == 1:
        assert max(len(batch) for batch in batches) == 2000
    else:
        # The byte limit made these batches, and filled them.
        assert max(sizes) > 950_000


def test_integers_beyond_json_precision_keep_their_digits_as_text(
    amp: AmplitudeDestination,
) -> None:
    event = mapped(amp, conversion(tags={"big": 10**30, "fine": -(2**53)})).event
    assert event["event_properties"]["big"] == str(10**30)
    assert event["event_properties"]["fine"] == -(2**53)
    assert amp.adjustments["property_huge_integer"] == 1
