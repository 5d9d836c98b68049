"""Tests for notification_processor.py: Agent JSON to exposures and conversions."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from event_buffer import Envelope
from metrics import Metrics
from notification_processor import NotificationProcessor
from notifications import Conversion, Exposure

SAMPLE = Path(__file__).parent / "fixtures" / "agent-sse-sample.txt"
REJECTED = "listener_notifications_rejected"
RECEIVED = "listener_notifications_received"
MARKER = "PAYLOAD-MARKER-7f3a"

GOLD = {"age": 34, "beta": True, "plan": "gold"}


def sample_payloads() -> list[bytes]:
    frames = SAMPLE.read_bytes().split(b"\n\n")
    payloads = [frame.removeprefix(b"data: ") for frame in frames if frame]
    assert len(payloads) == 9
    return payloads


def exposure(**fields) -> dict:
    return {"user_id": "user-123", "attributes": GOLD, **fields}


# What each of the nine sample frames becomes, by exposure mode; fields of the
# record without `identity`, `received_ns` (checked separately); None: nothing.
FLAG_BUCKETED = exposure(
    flag_key="checkout_flow",
    rule_key="checkout_ab",
    variation_key="treatment",
    enabled=True,
    decision_type="flag",
)
FLAG_ROLLOUT = exposure(
    user_id="user-456",
    attributes={},
    flag_key="checkout_flow",
    rule_key="default-rollout-7001-20001",
    variation_key="off",
    enabled=False,
    decision_type="flag",
)
AB_TEST = exposure(
    flag_key="homepage_banner",
    rule_key="homepage_banner",
    variation_key="variation_b",
    enabled=True,
    decision_type="ab-test",
)
FEATURE_TEST_UNBUCKETED = exposure(
    user_id="user-789",
    attributes={},
    flag_key="checkout_ab",
    rule_key="checkout_ab",
    variation_key="",
    enabled=False,
    decision_type="feature-test",
)
ALL_FEATURE_VARIABLES = exposure(
    flag_key="checkout_flow",
    rule_key="checkout_ab",
    variation_key="treatment",
    enabled=True,
    decision_type="all-feature-variables",
)
PURCHASE = {
    "user_id": "user-123",
    "attributes": GOLD,
    "event_key": "purchase",
    "tags": {"category": "shoes", "revenue": 4200, "value": 42},
    "revenue": 4200,
    "value": 42.0,
}
SIGNUP = {
    "user_id": "user-789",
    "attributes": {},
    "event_key": "signup",
    "tags": {},
    "revenue": None,
    "value": None,
}
FLAG_NO_RULE = exposure(
    user_id="user-000",
    attributes={"country": "DE", "referrer": "https://shop.example/?a=1&b=<2>"},
    flag_key="new_search",
    rule_key="",
    variation_key="",
    enabled=False,
    decision_type="flag",
)

EXPECTED = {
    "dispatched": [
        FLAG_BUCKETED,
        None,
        AB_TEST,
        None,
        ALL_FEATURE_VARIABLES,
        PURCHASE,
        SIGNUP,
        None,
        None,
    ],
    "all": [
        FLAG_BUCKETED,
        FLAG_ROLLOUT,
        AB_TEST,
        FEATURE_TEST_UNBUCKETED,
        ALL_FEATURE_VARIABLES,
        PURCHASE,
        SIGNUP,
        None,
        FLAG_NO_RULE,
    ],
    "none": [None, None, None, None, None, PURCHASE, SIGNUP, None, None],
}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("test")


def envelope(data: bytes, received_ns: int = 1_700_000_000_000_000_000) -> Envelope:
    return Envelope(id=7, received_ns=received_ns, data=data)


def fields_of(result: Exposure | Conversion | None) -> dict | None:
    if result is None:
        return None
    shown = dataclasses.asdict(result)
    del shown["identity"], shown["received_ns"]
    return shown


def process_all(mode: str, metrics: Metrics, payloads: list[bytes]) -> list:
    processor = NotificationProcessor(mode, metrics)
    return [
        processor.process(envelope(payload, 1000 + i))
        for i, payload in enumerate(payloads)
    ]


@pytest.mark.parametrize("mode", ["dispatched", "all", "none"])
def test_sample_frames(mode, metrics):
    results = process_all(mode, metrics, sample_payloads())

    assert [fields_of(r) for r in results] == EXPECTED[mode]
    for i, (result, expected) in enumerate(zip(results, EXPECTED[mode], strict=True)):
        if expected is None:
            continue
        kind = Conversion if "event_key" in expected else Exposure
        assert type(result) is kind
        assert result.received_ns == 1000 + i
        assert len(result.identity) == 32
        int(result.identity, 16)
    assert metrics.total(REJECTED) == 0


@pytest.mark.parametrize("mode", ["dispatched", "all", "none"])
def test_received_counts_do_not_depend_on_the_mode(mode, metrics):
    process_all(mode, metrics, sample_payloads())

    assert metrics.by_label(RECEIVED, "type") == {
        "flag": 3,
        "ab-test": 1,
        "feature-test": 1,
        "all-feature-variables": 1,
        "track": 2,
        "project_config_update": 1,
    }


@pytest.mark.parametrize("mode", ["dispatched", "all", "none"])
def test_redis_key_order_gives_identical_results(mode, metrics):
    # The Agent's Redis-synced mode re-sorts every key of every object.
    resorted = [
        json.dumps(json.loads(p), sort_keys=True, separators=(",", ":")).encode()
        for p in sample_payloads()
    ]
    assert resorted != sample_payloads()

    results = process_all(mode, Metrics("test"), sample_payloads())
    from_redis = process_all(mode, metrics, resorted)

    assert [fields_of(r) for r in from_redis] == [fields_of(r) for r in results]
    assert metrics.total(REJECTED) == 0


def test_config_update_and_no_exposure_return_none(metrics):
    processor = NotificationProcessor("dispatched", metrics)

    payload = b'{"Type":"project_config_update","Revision":"43"}'
    assert processor.process(envelope(payload)) is None
    assert metrics.total(RECEIVED, type="project_config_update") == 1
    assert metrics.total(REJECTED) == 0


def test_repeated_config_updates_are_logged_once(metrics, caplog):
    caplog.set_level(logging.INFO, logger="notification_processor")
    processor = NotificationProcessor("dispatched", metrics)

    for revision in ('"43"', '"43"', '"43"', '"44"', "44", '"44"'):
        data = b'{"Type":"project_config_update","Revision":%s}' % revision.encode()
        processor.process(envelope(data))

    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [
        "project config updated to revision 43",
        "project config updated to revision 44",
    ]
    assert metrics.total(RECEIVED, type="project_config_update") == 6


def user(**overrides) -> dict:
    return {"ID": "u1", "Attributes": None, "QualifiedSegments": None, **overrides}


def flag(**overrides) -> dict:
    return {
        "Type": "flag",
        "UserContext": user(),
        "DecisionInfo": {
            "decisionEventDispatched": True,
            "enabled": True,
            "flagKey": MARKER,
            "ruleKey": "r",
            "variationKey": "v",
        },
        **overrides,
    }


def track(**overrides) -> dict:
    return {
        "EventKey": MARKER,
        "UserContext": user(),
        "EventTags": None,
        "ConversionEvent": {},
        **overrides,
    }


def dumps(document: object) -> bytes:
    return json.dumps(document).encode()


MALFORMED = {
    "not_json": (b"not json " + MARKER.encode(), "not_json"),
    "invalid_utf8": (b'{"EventKey":"\xff\xfe' + MARKER.encode() + b'"}', "not_json"),
    "truncated": (dumps(flag())[:-3], "not_json"),
    "array": (dumps([MARKER, 1]), "not_an_object"),
    "string": (dumps(MARKER), "not_an_object"),
    "null_user_context": (dumps(flag(UserContext=None)), "bad_usercontext"),
    "missing_user_context": (
        dumps({k: v for k, v in flag().items() if k != "UserContext"}),
        "bad_usercontext",
    ),
    "null_decision_info": (
        dumps({**flag(), "DecisionInfo": None, "x": MARKER}),
        "bad_decisioninfo",
    ),
    "numeric_user_id": (dumps(flag(UserContext=user(ID=12345))), "bad_user_id"),
    "list_attributes": (
        dumps(flag(UserContext=user(Attributes=[MARKER]))),
        "bad_attributes",
    ),
    "unknown_decision_type": (dumps(flag(Type="weird")), "unknown_decision_type"),
    "numeric_flag_key": (
        dumps(flag(DecisionInfo={"flagKey": 1, "note": MARKER})),
        "bad_flagkey",
    ),
    "empty_flag_key": (
        dumps(flag(DecisionInfo={"flagKey": "", "note": MARKER})),
        "bad_flagkey",
    ),
    "feature_without_feature": (
        dumps(flag(Type="all-feature-variables", DecisionInfo={"x": MARKER})),
        "bad_feature",
    ),
    "experiment_without_key": (
        dumps(flag(Type="ab-test", DecisionInfo={"variationKey": MARKER})),
        "bad_experimentkey",
    ),
    "unknown_shape": (dumps({"Something": MARKER}), "unknown_shape"),
    "numeric_event_key": (
        dumps(track(EventKey=5, ConversionEvent={"key": MARKER})),
        "bad_eventkey",
    ),
    "list_event_tags": (dumps(track(EventTags=[MARKER])), "bad_event_tags"),
    "null_revision": (
        dumps({"Type": "project_config_update", "Revision": None, "x": MARKER}),
        "bad_revision",
    ),
    "deep_nesting": (
        # Valid JSON but for its depth: only the RecursionError path rejects it.
        b'{"x":"'
        + MARKER.encode()
        + b'","y":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        "not_json",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_are_counted_and_logged_without_payload(name, metrics, caplog):
    caplog.set_level(logging.DEBUG)
    data, reason = MALFORMED[name]
    assert MARKER.encode() in data
    processor = NotificationProcessor("all", metrics)

    assert processor.process(envelope(data)) is None

    assert metrics.total(REJECTED, reason=reason) == 1
    assert metrics.total(REJECTED) == 1
    assert metrics.total(RECEIVED) == 0
    assert MARKER not in caplog.text
    [record] = [r for r in caplog.records if r.name == "notification_processor"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"rejected notification 7: {reason} ({len(data)} bytes)"
    )
    assert (record.reason, record.bytes) == (reason, len(data))


def test_the_stream_goes_on_after_a_malformed_frame(metrics):
    processor = NotificationProcessor("dispatched", metrics)

    assert processor.process(envelope(b"{")) is None
    result = processor.process(envelope(sample_payloads()[0]))

    assert fields_of(result) == FLAG_BUCKETED


def test_reject_logging_is_rate_limited(metrics, caplog):
    caplog.set_level(logging.WARNING, logger="notification_processor")
    processor = NotificationProcessor("dispatched", metrics)

    for _ in range(50):
        processor.process(envelope(b"garbage"))
    processor.process(envelope(b"[]"))

    assert metrics.total(REJECTED, reason="not_json") == 50
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 7
    assert messages[5] == "more notifications rejected for not_json; see metrics"
    assert "not_an_object" in messages[6]


@pytest.mark.parametrize(
    ("tags", "conversion", "revenue", "value"),
    [
        ({"revenue": 4200.9, "value": 1.5}, {}, 4200, 1.5),
        ({"revenue": 100}, {"revenue": 250}, 250, None),
        ({"revenue": True, "value": False}, {}, None, None),
        ({"revenue": "12", "value": "3.5"}, {}, None, None),
        ({"revenue": 10**400, "value": 10**400}, {}, None, None),
        ({}, {"revenue": 1e400, "value": -1e400}, None, None),
    ],
)
def test_revenue_and_value(tags, conversion, revenue, value, metrics):
    processor = NotificationProcessor("dispatched", metrics)
    data = json.dumps(track(EventTags=tags, ConversionEvent=conversion)).encode()

    result = processor.process(envelope(data))

    assert isinstance(result, Conversion)
    assert (result.revenue, result.value) == (revenue, value)
    assert result.tags == tags


def test_nan_value_is_dropped(metrics):
    processor = NotificationProcessor("dispatched", metrics)
    data = dumps(track()).replace(b'"EventTags": null', b'"EventTags": {"value": NaN}')

    result = processor.process(envelope(data))

    assert isinstance(result, Conversion)
    assert result.value is None


def test_feature_rollout_is_not_dispatched(metrics):
    document = flag(
        Type="all-feature-variables",
        DecisionInfo={
            "feature": {
                "featureEnabled": True,
                "featureKey": "f",
                "source": "rollout",
                "sourceInfo": {},
            }
        },
    )
    data = dumps(document)

    assert NotificationProcessor("dispatched", metrics).process(envelope(data)) is None
    result = NotificationProcessor("all", metrics).process(envelope(data))
    assert fields_of(result) == {
        "user_id": "u1",
        "attributes": {},
        "flag_key": "f",
        "rule_key": "",
        "variation_key": "",
        "enabled": True,
        "decision_type": "all-feature-variables",
    }


def test_identity_is_stable_for_the_same_frame_and_time(metrics):
    processor = NotificationProcessor("all", metrics)
    data = sample_payloads()[0]

    first = processor.process(envelope(data, 1000))
    again = processor.process(envelope(data, 1000))
    other_process = NotificationProcessor("all", Metrics("test")).process(
        envelope(data, 1000)
    )

    assert first.identity == again.identity == other_process.identity


def test_identity_differs_for_identical_frames_at_different_times(metrics):
    processor = NotificationProcessor("all", metrics)
    data = sample_payloads()[5]

    first = processor.process(envelope(data, 1000))
    second = processor.process(envelope(data, 1001))

    assert first == dataclasses.replace(
        second, received_ns=1000, identity=first.identity
    )
    assert first.identity != second.identity


def test_identity_differs_for_different_frames_at_the_same_time(metrics):
    processor = NotificationProcessor("all", metrics)
    payloads = sample_payloads()

    identities = {
        processor.process(envelope(payloads[i], 1000)).identity for i in (0, 2, 5, 6)
    }

    assert len(identities) == 4
