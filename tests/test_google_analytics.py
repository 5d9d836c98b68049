"""Tests for the GA4 mapping, request building and answer reading."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from destination import Mapped, Rejected
from google_analytics import Ga4Destination
from notifications import Conversion, Exposure
from settings import Settings

RECEIVED_NS = 1_735_689_600_123_456_789
MICROS = RECEIVED_NS // 1000
ATTRIBUTES = {"age": 34, "beta": True, "plan": "gold"}
SECRET = "s3cr&t=/x"
CLIENT_ID_FORM = re.compile(r"[1-9][0-9]{9}\.[1-9][0-9]{9}")
# Pinned: changing the derivation would split every GA user in two.
USER_123_CLIENT_ID = "2115854436.5460200919"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sdk_key": "sdk",
        "ga_measurement_id": "G-TEST123",
        "ga_api_secret": SECRET,
    }
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
        "identity": "a" * 32,
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
        "identity": "b" * 32,
    }
    values.update(overrides)
    return Conversion(**values)


def impression(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "experience_impression",
        "params": params,
        "timestamp_micros": MICROS,
    }


def mapped(ga: Ga4Destination, notification: Exposure | Conversion) -> Mapped:
    [result] = ga.map(notification)
    assert isinstance(result, Mapped)
    return result


def params_of(ga: Ga4Destination, notification: Exposure | Conversion) -> dict:
    return mapped(ga, notification).event["params"]


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.fixture
def ga() -> Ga4Destination:
    return Ga4Destination(make_settings())


# The records the processor makes of the sample stream's frames
# (reference/agent-sse-sample.txt); frame 8 is a config update, which no
# destination ever sees.
SAMPLE_FRAMES = [
    pytest.param(
        exposure(),
        impression(
            {
                "exp_variant_string": "OPTLY-checkout_flow-treatment",
                "optimizely_flag": "checkout_flow",
                "optimizely_rule": "checkout_ab",
                "optimizely_variation": "treatment",
                "engagement_time_msec": 1,
            }
        ),
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
        impression(
            {
                "exp_variant_string": "OPTLY-checkout_flow-off",
                "optimizely_flag": "checkout_flow",
                "optimizely_rule": "default-rollout-7001-20001",
                "optimizely_variation": "off",
                "engagement_time_msec": 1,
            }
        ),
        id="2-flag-rollout",
    ),
    pytest.param(
        exposure(
            flag_key="homepage_banner",
            rule_key="homepage_banner",
            variation_key="variation_b",
            decision_type="ab-test",
        ),
        impression(
            {
                "exp_variant_string": "OPTLY-homepage_banner-variation_b",
                "optimizely_flag": "homepage_banner",
                "optimizely_rule": "homepage_banner",
                "optimizely_variation": "variation_b",
                "engagement_time_msec": 1,
            }
        ),
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
        impression(
            {
                "exp_variant_string": "OPTLY-checkout_ab-",
                "optimizely_flag": "checkout_ab",
                "optimizely_rule": "checkout_ab",
                "engagement_time_msec": 1,
            }
        ),
        id="4-feature-test-unbucketed",
    ),
    pytest.param(
        exposure(decision_type="all-feature-variables"),
        impression(
            {
                "exp_variant_string": "OPTLY-checkout_flow-treatment",
                "optimizely_flag": "checkout_flow",
                "optimizely_rule": "checkout_ab",
                "optimizely_variation": "treatment",
                "engagement_time_msec": 1,
            }
        ),
        id="5-all-feature-variables",
    ),
    pytest.param(
        conversion(
            tags={"category": "shoes", "revenue": 4200, "value": 42},
            revenue=4200,
            value=42.0,
        ),
        {
            "name": "purchase",
            "params": {
                "category": "shoes",
                "value": 42.0,
                "currency": "USD",
                "engagement_time_msec": 1,
            },
            "timestamp_micros": MICROS,
        },
        id="6-track-purchase",
    ),
    pytest.param(
        conversion(user_id="user-789", attributes={}, event_key="signup"),
        {
            "name": "signup",
            "params": {"engagement_time_msec": 1},
            "timestamp_micros": MICROS,
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
        impression(
            {
                "exp_variant_string": "OPTLY-new_search-",
                "optimizely_flag": "new_search",
                "engagement_time_msec": 1,
            }
        ),
        id="9-flag-no-variation",
    ),
]


@pytest.mark.parametrize(("notification", "expected"), SAMPLE_FRAMES)
def test_sample_frames_map_to_exact_events(
    ga: Ga4Destination, notification: Exposure | Conversion, expected: dict
) -> None:
    result = mapped(ga, notification)

    client_id, _, user_id = result.key.partition(" ")
    assert result.event == expected
    assert CLIENT_ID_FORM.fullmatch(client_id)
    assert user_id == notification.user_id
    assert result.size == len(compact(result.event))
    assert not ga.adjustments


def test_sample_request_body_is_exact(ga: Ga4Destination) -> None:
    events = [
        mapped(ga, exposure(received_ns=RECEIVED_NS + 5_000)),
        mapped(
            ga,
            conversion(
                tags={"category": "shoes", "revenue": 4200, "value": 42},
                revenue=4200,
                value=42.0,
            ),
        ),
    ]

    request = ga.build_request(events)

    assert request.url == (
        "https://www.google-analytics.com/mp/collect"
        "?measurement_id=G-TEST123&api_secret=s3cr%26t%3D%2Fx"
    )
    assert list(request.body) == ["client_id", "user_id", "timestamp_micros", "events"]
    assert request.body == {
        "client_id": USER_123_CLIENT_ID,
        "user_id": "user-123",
        "timestamp_micros": MICROS,
        "events": [events[0].event, events[1].event],
    }


def test_destination_shape() -> None:
    ga = Ga4Destination(make_settings())

    assert ga.name == "ga4"
    assert ga.max_batch_events == 25
    assert ga.one_key_per_batch is True
    assert ga.max_batch_bytes + 2_000 < 130_000


# Client id and user id.


def test_derived_client_id_is_stable_and_gtag_shaped() -> None:
    first = mapped(Ga4Destination(make_settings()), exposure()).key
    again = mapped(Ga4Destination(make_settings()), conversion()).key
    other = mapped(Ga4Destination(make_settings()), exposure(user_id="user-124")).key

    assert first == again == f"{USER_123_CLIENT_ID} user-123"
    assert other.split(" ")[0] != USER_123_CLIENT_ID
    assert CLIENT_ID_FORM.fullmatch(other.split(" ")[0])


@pytest.mark.parametrize("user_id", ["ü" * 300, "a b c", "\ud800", "0", "x"])
def test_derived_client_id_has_gtag_form_for_any_user(user_id: str) -> None:
    ga = Ga4Destination(make_settings())

    key = mapped(ga, exposure(user_id=user_id, attributes={})).key

    assert CLIENT_ID_FORM.fullmatch(key.partition(" ")[0])


@pytest.mark.parametrize(
    ("attribute", "client_id"),
    [
        ("1234567890.1700000000", "1234567890.1700000000"),
        ("GA1.1.1234567890.1700000000", "1234567890.1700000000"),
        ("7.8", "7.8"),
    ],
)
def test_client_id_comes_from_the_attribute(
    ga: Ga4Destination, attribute: str, client_id: str
) -> None:
    notification = exposure(attributes={**ATTRIBUTES, "ga_client_id": attribute})

    assert mapped(ga, notification).key == f"{client_id} user-123"
    assert ga.build_request([mapped(ga, notification)]).body["client_id"] == client_id


def test_client_id_attribute_name_is_configurable() -> None:
    ga = Ga4Destination(make_settings(ga_client_id_attribute="cid"))
    notification = exposure(attributes={"cid": "11.22", "ga_client_id": "33.44"})

    assert mapped(ga, notification).key == "11.22 user-123"


@pytest.mark.parametrize(
    "attribute",
    ["abc", "1234", "0.5", "1.2.3", " 1.2", 1234.5678, None, "1." + "9" * 30],
)
def test_invalid_client_id_attribute_falls_back_to_derived(
    ga: Ga4Destination, attribute: Any
) -> None:
    notification = exposure(attributes={"ga_client_id": attribute})

    assert mapped(ga, notification).key == f"{USER_123_CLIENT_ID} user-123"
    if attribute is not None:
        assert ga.adjustments["client_id_attribute_invalid"] == 1


def test_empty_user_id_without_client_id_is_rejected(ga: Ga4Destination) -> None:
    [result] = ga.map(exposure(user_id="", attributes={}))

    assert isinstance(result, Rejected)
    assert result.reason == "no_client_id"


def test_empty_user_id_with_client_id_sends_no_user_id(ga: Ga4Destination) -> None:
    notification = conversion(user_id="", attributes={"ga_client_id": "5.6"})
    result = mapped(ga, notification)

    assert result.key == "5.6"
    assert "user_id" not in ga.build_request([result]).body


def test_user_id_is_not_sent_when_disabled() -> None:
    ga = Ga4Destination(make_settings(ga_send_user_id=False))
    result = mapped(ga, exposure())

    assert result.key == USER_123_CLIENT_ID
    assert ga.build_request([result]).body == {
        "client_id": USER_123_CLIENT_ID,
        "timestamp_micros": MICROS,
        "events": [result.event],
    }


@pytest.mark.parametrize("user_id", ["x" * 257, "bad\udc80id"])
def test_unsendable_user_id_is_left_out(ga: Ga4Destination, user_id: str) -> None:
    result = mapped(ga, exposure(user_id=user_id))

    assert " " not in result.key
    assert "user_id" not in ga.build_request([result]).body
    assert ga.adjustments["user_id_omitted"] == 1


def test_user_id_of_256_characters_is_sent(ga: Ga4Destination) -> None:
    user_id = "ü" * 256

    result = mapped(ga, exposure(user_id=user_id))

    assert ga.build_request([result]).body["user_id"] == user_id


def test_user_id_with_spaces_survives_the_key(ga: Ga4Destination) -> None:
    result = mapped(ga, exposure(user_id=" user  with spaces "))

    assert ga.build_request([result]).body["user_id"] == " user  with spaces "


def test_request_timestamp_is_the_earliest_event(ga: Ga4Destination) -> None:
    events = [
        mapped(ga, exposure(received_ns=RECEIVED_NS + 9_000_000)),
        mapped(ga, exposure(received_ns=RECEIVED_NS)),
        mapped(ga, conversion(received_ns=RECEIVED_NS + 1_000)),
    ]

    body = ga.build_request(events).body

    assert body["timestamp_micros"] == MICROS
    assert [e["timestamp_micros"] for e in body["events"]] == [
        MICROS + 9_000,
        MICROS,
        MICROS + 1,
    ]


def test_old_notifications_keep_their_timestamp(ga: Ga4Destination) -> None:
    week_ago = RECEIVED_NS - 7 * 86_400 * 10**9

    result = mapped(ga, exposure(received_ns=week_ago))

    assert result.event["timestamp_micros"] == week_ago // 1000


# Exposure limits.


def test_long_exposure_values_are_truncated(ga: Ga4Destination) -> None:
    notification = exposure(
        flag_key="f" * 150, rule_key="r" * 101, variation_key="v" * 100
    )

    params = params_of(ga, notification)

    assert params == {
        "exp_variant_string": "OPTLY-" + "f" * 94,
        "optimizely_flag": "f" * 100,
        "optimizely_rule": "r" * 100,
        "optimizely_variation": "v" * 100,
        "engagement_time_msec": 1,
    }
    assert ga.adjustments == {"param_value_truncated": 3}


# Conversion names.


@pytest.mark.parametrize(
    ("event_key", "name"),
    [
        ("add_to_cart", "add_to_cart"),
        ("123 buy now!", "optly_123_buy_now_"),
        ("error", "optly_error"),
        ("Session_Start", "optly_Session_Start"),
        ("screen_view", "optly_screen_view"),
        ("_x", "optly__x"),
        ("firebase_x", "optly_firebase_x"),
        ("ga_x", "optly_ga_x"),
        ("Google_x", "optly_Google_x"),
        ("gtag.config", "gtag_config"),
        ("café crème", "caf__cr_me"),
        ("購入", "optly___"),
        ("check-out.step 2", "check_out_step_2"),
        ("a" * 60, "a" * 40),
        ("9" * 60, "optly_" + "9" * 34),
        ("", "optly_"),
    ],
)
def test_event_keys_become_valid_event_names(
    ga: Ga4Destination, event_key: str, name: str
) -> None:
    event = mapped(ga, conversion(event_key=event_key)).event

    assert event["name"] == name
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,39}", name)
    assert ga.adjustments["event_name_sanitised"] == (name != event_key)


def test_sanitised_names_are_counted_per_event(ga: Ga4Destination) -> None:
    for _ in range(3):
        ga.map(conversion(event_key="error", tags={"a b": 1}))

    assert ga.adjustments == {"event_name_sanitised": 3, "param_name_sanitised": 3}


# Conversion params.


@pytest.mark.parametrize(
    ("tag", "name"),
    [
        ("plain", "plain"),
        ("with space", "with_space"),
        ("firebase_conversion", "optly_firebase_conversion"),
        ("_private", "optly__private"),
        ("ga_session", "optly_ga_session"),
        ("google_thing", "optly_google_thing"),
        ("9lives", "optly_9lives"),
        ("k" * 50, "k" * 40),
        ("error", "error"),
    ],
)
def test_tag_names_become_valid_param_names(
    ga: Ga4Destination, tag: str, name: str
) -> None:
    params = params_of(ga, conversion(tags={tag: "x"}))

    assert params == {name: "x", "engagement_time_msec": 1}


def test_tag_values_follow_ga_types(ga: Ga4Destination) -> None:
    tags = {
        "text": "t" * 150,
        "empty": "",
        "count": 3,
        "big": 2**53,
        "ratio": 0.25,
        "yes": True,
        "no": False,
        "missing": None,
        "nan": float("nan"),
        "inf": float("inf"),
        "minus_inf": float("-inf"),
        "nested": {"a": 1},
        "listed": [1, 2],
    }

    params = params_of(ga, conversion(tags=tags))

    assert params == {
        "text": "t" * 100,
        "empty": "",
        "count": 3,
        "big": 2**53,
        "ratio": 0.25,
        "yes": 1,
        "no": 0,
        "engagement_time_msec": 1,
    }
    assert ga.adjustments == {
        "param_value_truncated": 1,
        "param_dropped_null": 1,
        "param_dropped_non_finite": 3,
        "param_dropped_nested": 2,
    }


def test_at_most_25_params_with_value(ga: Ga4Destination) -> None:
    tags = {f"tag_{i:02}": i for i in range(45)}
    tags["revenue"] = 1999

    params = params_of(ga, conversion(tags=tags, revenue=1999))

    assert len(params) == 25
    assert list(params)[:22] == [f"tag_{i:02}" for i in range(22)]
    assert params["value"] == 19.99
    assert params["currency"] == "USD"
    assert params["engagement_time_msec"] == 1
    assert ga.adjustments == {"param_dropped_limit": 23}


def test_at_most_25_params_without_value(ga: Ga4Destination) -> None:
    tags = {f"tag_{i:02}": "v" for i in range(40)}

    params = params_of(ga, conversion(tags=tags))

    assert len(params) == 25
    assert "tag_23" in params and "tag_24" not in params
    assert ga.adjustments == {"param_dropped_limit": 16}


def test_dropped_tags_take_no_param_slot(ga: Ga4Destination) -> None:
    tags = {f"n{i:02}": None for i in range(30)}
    tags.update({f"t{i:02}": "v" for i in range(24)})

    params = params_of(ga, conversion(tags=tags))

    assert len(params) == 25
    assert ga.adjustments == {"param_dropped_null": 30}


def test_colliding_param_names_keep_the_first(ga: Ga4Destination) -> None:
    tags = {"a b": 1, "a-b": 2, "engagement_time_msec": 500}

    params = params_of(ga, conversion(tags=tags))

    assert params == {"a_b": 1, "engagement_time_msec": 1}
    assert ga.adjustments["param_dropped_duplicate"] == 2


def test_revenue_in_cents_becomes_value_with_currency() -> None:
    ga = Ga4Destination(make_settings(ga_currency="EUR"))
    tags = {"revenue": 4250, "value": 3, "sku": "A1"}

    params = params_of(ga, conversion(tags=tags, revenue=4250, value=3.0))

    assert params == {
        "sku": "A1",
        "value": 42.5,
        "currency": "EUR",
        "engagement_time_msec": 1,
    }


def test_zero_and_negative_revenue_are_values(ga: Ga4Destination) -> None:
    assert params_of(ga, conversion(revenue=0))["value"] == 0.0
    assert params_of(ga, conversion(revenue=-1050))["value"] == -10.5


def test_value_tag_is_used_without_revenue(ga: Ga4Destination) -> None:
    params = params_of(ga, conversion(tags={"value": 7.5}, value=7.5))

    assert params == {"value": 7.5, "currency": "USD", "engagement_time_msec": 1}


def test_non_finite_value_is_dropped(ga: Ga4Destination) -> None:
    params = params_of(ga, conversion(value=float("nan")))

    assert params == {"engagement_time_msec": 1}
    assert ga.adjustments == {"param_dropped_non_finite": 1}


@pytest.mark.parametrize(
    ("tag", "currency"), [("gbp", "GBP"), ("EURO", "USD"), (12, "USD")]
)
def test_currency_tag_goes_with_the_value(
    ga: Ga4Destination, tag: Any, currency: str
) -> None:
    params = params_of(ga, conversion(tags={"currency": tag}, revenue=100))

    assert params == {"value": 1.0, "currency": currency, "engagement_time_msec": 1}


def test_currency_tag_without_value_is_a_plain_param(ga: Ga4Destination) -> None:
    params = params_of(ga, conversion(tags={"currency": "GBP"}))

    assert params == {"currency": "GBP", "engagement_time_msec": 1}


def test_map_leaves_the_record_alone(ga: Ga4Destination) -> None:
    tags = {"nested": {"a": [1]}, "text": "t" * 200, "revenue": 5}
    notification = conversion(tags=tags, revenue=5)

    ga.map(notification)

    assert tags == {"nested": {"a": [1]}, "text": "t" * 200, "revenue": 5}


# Requests.


def test_debug_mode_uses_the_validation_endpoint() -> None:
    ga = Ga4Destination(make_settings(ga_debug_mode=True))

    request = ga.build_request([mapped(ga, exposure())])

    assert request.url == (
        "https://www.google-analytics.com/debug/mp/collect"
        "?measurement_id=G-TEST123&api_secret=s3cr%26t%3D%2Fx"
    )
    assert request.safe_url == (
        "https://www.google-analytics.com/debug/mp/collect"
        "?measurement_id=G-TEST123&api_secret=***"
    )


@pytest.mark.parametrize(
    ("collect_url", "debug", "expected"),
    [
        (
            "https://region1.google-analytics.com/mp/collect",
            True,
            "https://region1.google-analytics.com/debug/mp/collect",
        ),
        (
            "http://127.0.0.1:9000/mp/collect",
            True,
            "http://127.0.0.1:9000/debug/mp/collect",
        ),
        (
            "http://127.0.0.1:9000/debug/mp/collect",
            True,
            "http://127.0.0.1:9000/debug/mp/collect",
        ),
        ("http://127.0.0.1:9000/relay", True, "http://127.0.0.1:9000/relay"),
        (
            "https://region1.google-analytics.com/mp/collect",
            False,
            "https://region1.google-analytics.com/mp/collect",
        ),
    ],
)
def test_collect_url_keeps_its_host(
    collect_url: str, debug: bool, expected: str
) -> None:
    ga = Ga4Destination(make_settings(ga_collect_url=collect_url, ga_debug_mode=debug))

    request = ga.build_request([mapped(ga, exposure())])

    assert request.url.split("?")[0] == expected


def test_collect_url_with_a_query_gets_ours_appended() -> None:
    ga = Ga4Destination(make_settings(ga_collect_url="http://127.0.0.1:9/c?x=1"))

    request = ga.build_request([mapped(ga, exposure())])

    assert request.safe_url == (
        "http://127.0.0.1:9/c?x=1&measurement_id=G-TEST123&api_secret=***"
    )


def test_safe_url_never_holds_the_secret(ga: Ga4Destination) -> None:
    request = ga.build_request([mapped(ga, exposure())])

    assert "api_secret=***" in request.safe_url
    assert "s3cr" not in request.safe_url
    assert request.safe_url.replace("***", "s3cr%26t%3D%2Fx") == request.url


# Answers.


def test_2xx_is_delivered(ga: Ga4Destination) -> None:
    for status in (200, 204):
        result = ga.read_response(status, b"", {}, 3)

        assert not (result.retry or result.rejected or result.split)
        assert not (result.resend or result.held or result.warnings)


def test_debug_answer_becomes_warnings() -> None:
    ga = Ga4Destination(make_settings(ga_debug_mode=True))
    body = json.dumps(
        {
            "validationMessages": [
                {
                    "fieldPath": "events",
                    "description": "Event at index: [0] has invalid name [_bad].",
                    "validationCode": "NAME_INVALID",
                },
                {"fieldPath": "client_id", "validationCode": "VALUE_REQUIRED"},
            ]
        }
    ).encode()

    result = ga.read_response(200, body, {}, 2)

    assert result.warnings == [
        "NAME_INVALID at events: Event at index: [0] has invalid name [_bad].",
        "VALUE_REQUIRED at client_id: ",
    ]
    assert not result.rejected and not result.retry


@pytest.mark.parametrize(
    ("body", "warnings"),
    [
        (b'{"validationMessages": []}', []),
        (b"<html>oops</html>", ["GA4 validation answer is not JSON"]),
        (b"[1]", ["GA4 validation answer has no validationMessages"]),
        (b"\xff\xfe", ["GA4 validation answer is not JSON"]),
    ],
)
def test_debug_answers_of_any_shape(body: bytes, warnings: list[str]) -> None:
    ga = Ga4Destination(make_settings(ga_debug_mode=True))

    assert ga.read_response(200, body, {}, 1).warnings == warnings


def test_warnings_only_in_debug_mode(ga: Ga4Destination) -> None:
    body = b'{"validationMessages": [{"fieldPath": "x"}]}'

    assert ga.read_response(200, body, {}, 1).warnings == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_failures_are_retried(ga: Ga4Destination, status: int) -> None:
    result = ga.read_response(status, b"<html>busy</html>", {}, 4)

    assert result.retry is True
    assert result.retry_after_seconds is None
    assert not result.rejected


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0),
        ("Wed, 31 Dec 2025 23:00:00 GMT", 0.0),
        ("soon", None),
    ],
)
def test_retry_after_in_seconds_or_as_a_date(
    header: str, seconds: float | None
) -> None:
    now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    ga = Ga4Destination(make_settings(), clock=lambda: now)

    result = ga.read_response(429, b"", {"retry-after": header}, 1)

    assert result.retry is True
    assert result.retry_after_seconds == seconds


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        (400, "check GA_COLLECT_URL and GA_MEASUREMENT_ID"),
        (401, "check GA_API_SECRET and GA_MEASUREMENT_ID"),
        (403, "check GA_API_SECRET and GA_MEASUREMENT_ID"),
        (404, "check GA_COLLECT_URL"),
        (405, "check GA_COLLECT_URL"),
        (418, "check GA_COLLECT_URL and GA_MEASUREMENT_ID"),
        (302, "check GA_COLLECT_URL and GA_MEASUREMENT_ID"),
    ],
)
def test_other_answers_reject_everything(
    ga: Ga4Destination, status: int, advice: str
) -> None:
    result = ga.read_response(status, SECRET.encode(), {}, 3)

    assert result.rejected == dict.fromkeys(range(3), f"http_{status}")
    assert not result.retry
    assert result.config_error.endswith(advice)
    assert "\n" not in result.config_error
    assert "s3cr" not in result.config_error
    assert "api_secret=***" in result.config_error


def test_too_large_is_split_then_rejected(ga: Ga4Destination) -> None:
    assert ga.read_response(413, b"", {}, 2).split is True

    single = ga.read_response(413, b"", {}, 1)
    assert not single.split
    assert single.rejected == {0: "http_413"}


def test_read_response_takes_the_batch_too(ga: Ga4Destination) -> None:
    events = [mapped(ga, exposure())]

    assert ga.read_response(204, b"", {}, 1, events=events).rejected == {}


# Sizes.


def _largest_conversion(user_id: str, received_ns: int) -> Conversion:
    # Control characters take 6 bytes each once JSON-escaped.
    tags = {f"{chr(0x10000 + i)}{i:02}" * 20: "\x01" * 200 for i in range(30)}
    return conversion(
        user_id=user_id,
        event_key="\x02" * 80,
        tags=tags,
        revenue=123_456,
        received_ns=received_ns,
    )


def _batches(ga: Ga4Destination, events: list[Mapped]) -> list[list[Mapped]]:
    """Batches the way the dispatcher makes them: by count and summed size."""
    batches: list[list[Mapped]] = []
    current: list[Mapped] = []
    total = 0
    for event in events:
        if current and (
            len(current) == ga.max_batch_events
            or total + event.size > ga.max_batch_bytes
        ):
            batches.append(current)
            current, total = [], 0
        current.append(event)
        total += event.size
    batches.append(current)
    return batches


@pytest.mark.parametrize("kind", ["largest", "small"])
def test_every_request_fits_gas_limits(kind: str) -> None:
    ga = Ga4Destination(make_settings())
    user_id = "\x03" * 256
    attributes = {"ga_client_id": f"{'9' * 20}.{'9' * 20}"}
    if kind == "largest":
        notifications = [
            _largest_conversion(user_id, RECEIVED_NS + i) for i in range(200)
        ]
        notifications = [replace(n, attributes=attributes) for n in notifications]
    else:
        notifications = [
            exposure(user_id=user_id, attributes=attributes, flag_key=f"f{i}")
            for i in range(200)
        ]
    events = [mapped(ga, notification) for notification in notifications]

    batches = _batches(ga, events)
    sizes = [len(compact(ga.build_request(batch).body)) for batch in batches]

    assert max(sizes) < 130_000
    assert max(len(batch) for batch in batches) <= 25
    if kind == "largest":
        # The byte limit, not the count, made these batches, and filled them.
        assert len(batches) > 200 // 25
        assert max(sizes) > 110_000


def test_sizes_are_exact_for_any_text(ga: Ga4Destination) -> None:
    notification = conversion(
        event_key="ünïcödé",
        tags={"emoji": "😀" * 30, "cjk": "購入", "ctl": '\x00\t"\\'},
    )

    result = mapped(ga, notification)

    assert result.size == len(compact(result.event))


def test_lone_surrogates_are_replaced(ga: Ga4Destination) -> None:
    result = mapped(ga, conversion(tags={"bad": "x\ud800y"}))

    assert result.event["params"]["bad"] == "x?y"
    assert result.size == len(compact(result.event))


def test_integers_beyond_json_precision_are_sent_as_floats(ga: Ga4Destination) -> None:
    event = mapped(ga, conversion(tags={"big": 10**30, "fine": 2**53}))
    params = event.event["params"]
    assert params["big"] == 1e30 and isinstance(params["big"], float)
    assert params["fine"] == 2**53
    assert ga.adjustments["param_huge_integer"] == 1
    # Too large even for a float: dropped, not sent as a 400-digit number.
    assert "huge" not in mapped(ga, conversion(tags={"huge": 10**400})).event["params"]
