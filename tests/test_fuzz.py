"""Property tests: hostile frames through the listener, the processor and both maps.

Hypothesis feeds arbitrary bytes, invalid UTF-8, 100 kB strings, deep
nesting, NaN and 1e400, control characters and odd unicode in keys and
values, and mutations of the captured sample stream. The properties: the
listener hands over every frame byte for byte however the stream is cut
into chunks; nothing raises; every frame is processed or counted as
rejected; and every request either destination would send still fits that
destination's published limits.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from amplitude import AmplitudeDestination
from destination import Mapped, Rejected
from event_buffer import Envelope, MemoryBuffer
from google_analytics import Ga4Destination
from metrics import Metrics
from notification_listener import NotificationListener
from notification_processor import NotificationProcessor
from notifications import Conversion, Exposure
from settings import EXPOSURE_MODES, Settings
from standins import ga4 as ga4_standin
from standins.agent_stream import AgentStreamStandIn, load_sample_frames
from standins.amplitude import _event_problems

SAMPLE = Path(__file__).parent / "fixtures" / "agent-sse-sample.txt"
SAMPLE_FRAMES = load_sample_frames(SAMPLE)
SAMPLE_DOCUMENTS = [json.loads(frame) for frame in SAMPLE_FRAMES]

RECEIVED = "listener_notifications_received"
REJECTED = "listener_notifications_rejected"

GA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
GA_MAX_EVENTS = 25
GA_MAX_PARAMS = 25
GA_MAX_NAME = 40
GA_MAX_VALUE = 100
GA_MAX_BODY = 130_000
AMPLITUDE_MAX_STRING = 1024
AMPLITUDE_MAX_BODY = 1_000_000

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Placeholders swapped for JSON text that no Python value serialises to.
_HUGE_FLOAT = "\x00huge-float\x00"
_NEG_HUGE_FLOAT = "\x00neg-huge-float\x00"
_LITERALS = {_HUGE_FLOAT: "1e400", _NEG_HUGE_FLOAT: "-1e400"}
BIG = "x" * 100_000


# -- strategies ---------------------------------------------------------------------

odd_text = st.one_of(
    # Surrogates included: serialised as \ud800 escapes, or as invalid UTF-8.
    st.text(st.characters(exclude_categories=()), max_size=24),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\x1f\x7f",
            "\u202e\u200b",
            "\ud800",
            "\udfff x",
            "\U0001f600" * 30,
            "é" * 101,
            "a" * 1025,
            "$opt_bot_filtering",
            "[Amplitude] Revenue",
            "firebase_x",
            "_private",
            "null",
            "0",
            "GA1.1.123.456",
            "123.456",
        ]
    ),
)
numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            10**400,
            -(10**400),
            2**63,
            1e308,
            -1e308,
            5e-324,
            _HUGE_FLOAT,
            _NEG_HUGE_FLOAT,
        ]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(odd_text, children, max_size=4),
    ),
    max_leaves=20,
)


_ABSENT = object()


@st.composite
def _maybe(draw: st.DrawFn, strategy: st.SearchStrategy) -> Any:
    """Usually `strategy`; one time in ten anything at all, or absent."""
    # Hypothesis leans towards small numbers: make those the usual case.
    roll = draw(st.integers(0, 19))
    if roll == 19:
        return draw(json_values)
    if roll == 18:
        return _ABSENT
    return draw(strategy)


def _document(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not _ABSENT}


attributes = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(odd_text, st.just("ga_client_id")),
        st.one_of(json_values, st.just(BIG)),
        max_size=6,
    ),
)
user_context = st.builds(
    lambda user_id, attrs: _document(
        ID=user_id, Attributes=attrs, QualifiedSegments=None
    ),
    _maybe(st.one_of(odd_text, st.just(BIG))),
    _maybe(attributes),
)


@st.composite
def decisions(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(
            [
                "flag",
                "ab-test",
                "feature-test",
                "all-feature-variables",
                "feature",
                "feature-variable",
                "mystery",
            ]
        )
    )
    key = _maybe(st.one_of(odd_text, st.just(BIG)))
    if kind == "flag":
        info = _document(
            flagKey=draw(key),
            ruleKey=draw(key),
            variationKey=draw(key),
            enabled=draw(_maybe(st.booleans())),
            decisionEventDispatched=draw(_maybe(st.booleans())),
        )
    elif kind in ("ab-test", "feature-test"):
        info = _document(experimentKey=draw(key), variationKey=draw(key))
    else:
        feature = _document(
            featureKey=draw(key),
            featureEnabled=draw(_maybe(st.booleans())),
            source=draw(_maybe(st.sampled_from(["feature-test", "rollout"]))),
            sourceInfo=draw(
                _maybe(
                    st.builds(
                        lambda e, v: _document(experimentKey=e, variationKey=v),
                        key,
                        key,
                    )
                )
            ),
        )
        info = _document(feature=draw(_maybe(st.just(feature))))
    return _document(
        Type=draw(_maybe(st.just(kind))),
        UserContext=draw(_maybe(user_context)),
        DecisionInfo=draw(_maybe(st.just(info))),
    )


@st.composite
def conversions(draw: st.DrawFn) -> dict[str, Any]:
    tags = st.one_of(
        st.none(),
        st.dictionaries(
            st.one_of(odd_text, st.sampled_from(["revenue", "value", "currency"])),
            st.one_of(json_values, st.just(BIG)),
            max_size=30,
        ),
    )
    money = _maybe(numbers)
    return _document(
        EventKey=draw(_maybe(st.one_of(odd_text, st.just(BIG)))),
        UserContext=draw(_maybe(user_context)),
        EventTags=draw(_maybe(tags)),
        ConversionEvent=draw(
            _maybe(st.builds(lambda r, v: _document(revenue=r, value=v), money, money))
        ),
    )


config_updates = st.builds(
    lambda revision: _document(Type="project_config_update", Revision=revision),
    _maybe(st.one_of(odd_text, st.integers())),
)


@st.composite
def mutated_samples(draw: st.DrawFn) -> Any:
    """A sample notification with one value somewhere replaced or removed."""
    document = json.loads(json.dumps(draw(st.sampled_from(SAMPLE_DOCUMENTS))))
    node = document
    while True:
        children = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, list)
            else []
        )
        if not children:
            return document
        key, child = draw(st.sampled_from(children))
        if isinstance(child, dict | list) and child and draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(json_values)
        return document


def _serialise(document: Any, style: str) -> bytes:
    text = json.dumps(document, ensure_ascii=style == "ascii", allow_nan=True)
    for placeholder, literal in _LITERALS.items():
        text = text.replace(json.dumps(placeholder), literal)
    # Go's encoder writes UTF-8; a lone surrogate then has no valid form.
    return text.encode("utf-8", "surrogatepass")


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    """A sample frame with a few bytes inserted, deleted or overwritten."""
    data = bytearray(draw(st.sampled_from(SAMPLE_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        what = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=4))
        if what == "insert":
            data[at:at] = chunk
        elif what == "delete":
            del data[at : at + len(chunk)]
        else:
            data[at : at + len(chunk)] = chunk
    return bytes(data)


documents = st.one_of(
    decisions(), conversions(), config_updates, mutated_samples(), json_values
)
serialised = st.builds(_serialise, documents, st.sampled_from(["ascii", "utf-8"]))
frames = st.one_of(
    serialised,
    serialised,
    serialised,
    byte_mutations(),
    st.binary(max_size=64),
    st.sampled_from(SAMPLE_FRAMES),
)

# Pathological frames every run tries, whatever hypothesis draws.
DEEP_LIST = b"[" * 10_000
DEEP_CLOSED = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
DEEP_ATTRIBUTES = _serialise(
    {
        "EventKey": "purchase",
        "UserContext": {"ID": "user-1", "Attributes": {"deep": [[[[[[[[[[[]]]]]]]]]]]}},
        "EventTags": {"nested": json.loads("[" * 500 + "]" * 500)},
    },
    "ascii",
)
NON_FINITE = (
    b'{"EventKey":"buy","UserContext":{"ID":"u","Attributes":{"n":NaN,"i":Infinity}},'
    b'"EventTags":{"revenue":1e400,"value":-Infinity,"big":1e400,"x":NaN},'
    b'"ConversionEvent":{"revenue":NaN,"value":1e400}}'
)
HUGE_NUMBERS = (
    b'{"EventKey":"buy","UserContext":{"ID":"u","Attributes":null},'
    b'"EventTags":{"revenue":' + b"9" * 400 + b',"value":' + b"9" * 400 + b"}}"
)
BIG_FLAG = _serialise(
    {
        "Type": "flag",
        "UserContext": {"ID": BIG, "Attributes": {BIG: BIG}},
        "DecisionInfo": {
            "flagKey": BIG,
            "ruleKey": BIG,
            "variationKey": BIG,
            "enabled": True,
            "decisionEventDispatched": True,
        },
    },
    "utf-8",
)
INVALID_UTF8 = [b"\xff\xfe", b'{"EventKey":"\xed\xa0\x80"}', b'{"Type":"fl\xc3ag"}']


# -- the listener's parsing ----------------------------------------------------------


class _Response:
    """What NotificationListener._read needs of a streamed HTTP response."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def iter_content(self, chunk_size: int | None = None) -> Iterator[bytes]:
        return iter(self._chunks)


def _listener(buffer: MemoryBuffer, metrics: Metrics) -> NotificationListener:
    return NotificationListener(Settings(sdk_key="fuzz_key"), buffer, metrics)


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


# The Agent's frames are JSON: never empty, never a raw line break inside.
payloads = st.one_of(frames, st.binary(min_size=1, max_size=200)).map(
    lambda data: data.replace(b"\r", b"\\r").replace(b"\n", b"\\n") or b"{}"
)


@FUZZ
@given(
    st.lists(payloads, min_size=1, max_size=12),
    st.lists(st.integers(min_value=0), max_size=20),
)
@example([b"\xff\xfe\x00", b"data: x", b": comment", DEEP_LIST], [1, 7, 9])
@example(SAMPLE_FRAMES, [])
@example([BIG.encode()] * 3, [5, 50_000, 150_000])
def test_the_listener_hands_over_every_frame_byte_for_byte(payload_list, cuts):
    metrics = Metrics("fuzz")
    buffer = MemoryBuffer(10_000, "drop_oldest", metrics)
    listener = _listener(buffer, metrics)
    stream = b"".join(b"data: " + payload + b"\n\n" for payload in payload_list)

    listener._read(_Response(_cut(stream, cuts)))

    handed_over = buffer.take(10_000, 0)
    assert [e.data for e in handed_over] == payload_list
    times = [e.received_ns for e in handed_over]
    assert times == sorted(set(times))
    assert listener.received == len(payload_list)


def test_a_real_listener_takes_hostile_frames_from_the_agent():
    hostile = [
        b"\xff\xfe\xfd",
        DEEP_LIST,
        DEEP_OBJECT,
        NON_FINITE,
        HUGE_NUMBERS,
        BIG_FLAG,
        *INVALID_UTF8,
        '{"k":"\u2028\u2029\x01"}'.encode(),
        *SAMPLE_FRAMES,
    ]
    metrics = Metrics("fuzz")
    buffer = MemoryBuffer(1000, "drop_oldest", metrics)
    with AgentStreamStandIn(sdk_key="fuzz_key") as agent:
        settings_ = Settings(
            sdk_key="fuzz_key", agent_base_url=agent.url, reconnect_max_seconds=0.1
        )
        listener = NotificationListener(settings_, buffer, metrics)
        listener.start()
        try:
            assert agent.wait_for_connected(1, 10)
            for frame in hostile:
                assert agent.publish(frame) == 1
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(got) < len(hostile) and time.monotonic() < deadline:
                got.extend(e.data for e in buffer.take(100, 0.1))
        finally:
            listener.stop()
    assert got == hostile
    assert listener.is_alive() is False


# -- the processor ----------------------------------------------------------------


def _process_all(
    frame_list: list[bytes], mode: str
) -> tuple[list[Exposure | Conversion | None], Metrics]:
    metrics = Metrics("fuzz")
    processor = NotificationProcessor(mode, metrics)
    now = time.time_ns()
    results = [
        processor.process(Envelope(index + 1, now + index, frame))
        for index, frame in enumerate(frame_list)
    ]
    return results, metrics


@FUZZ
@given(st.lists(frames, min_size=1, max_size=10), st.sampled_from(EXPOSURE_MODES))
@example([DEEP_LIST, DEEP_CLOSED, DEEP_OBJECT, DEEP_ATTRIBUTES], "all")
@example([NON_FINITE, HUGE_NUMBERS, BIG_FLAG, *INVALID_UTF8], "all")
@example(SAMPLE_FRAMES, "dispatched")
def test_every_frame_is_processed_or_counted_as_rejected(frame_list, mode):
    results, metrics = _process_all(frame_list, mode)

    assert all(r is None or isinstance(r, Exposure | Conversion) for r in results)
    received = metrics.total(RECEIVED)
    rejected = metrics.total(REJECTED)
    assert received + rejected == len(frame_list)
    # Whatever became a record was received, never rejected as well.
    assert sum(r is not None for r in results) <= received


def test_the_pathological_frames_are_rejected_for_the_right_reason():
    results, metrics = _process_all(
        [DEEP_LIST, DEEP_CLOSED, DEEP_OBJECT, INVALID_UTF8[0]], "all"
    )
    assert results == [None] * 4
    assert metrics.total(REJECTED, reason="not_json") == 4

    # UTF-8-encoded surrogates are not UTF-8: strict decoding refuses them
    # before json could turn them into lone surrogates no body can carry.
    results, metrics = _process_all([INVALID_UTF8[1]], "all")
    assert results == [None]
    assert metrics.total(REJECTED, reason="not_json") == 1

    results, metrics = _process_all([NON_FINITE, HUGE_NUMBERS, BIG_FLAG], "all")
    assert [type(r) for r in results] == [Conversion, Conversion, Exposure]
    assert results[0].revenue is None and results[0].value is None
    assert results[1].revenue is None and results[1].value is None


# -- what the destinations would send ------------------------------------------------


def _destinations(send_user_id: bool) -> tuple[Ga4Destination, AmplitudeDestination]:
    settings_ = Settings(
        sdk_key="fuzz_key",
        ga_measurement_id="G-FUZZ",
        ga_api_secret="fuzz_secret",
        ga_send_user_id=send_user_id,
        amplitude_api_key="fuzz_amplitude_key",
    )
    return Ga4Destination(settings_), AmplitudeDestination(settings_)


def _batches(destination: Any, mapped: list[Mapped]) -> Iterator[list[Mapped]]:
    """Batches as the dispatcher forms them: by count, by size, by key for GA4."""
    groups: dict[str, list[Mapped]] = {}
    for item in mapped:
        key = item.key if destination.one_key_per_batch else ""
        groups.setdefault(key, []).append(item)
    for group in groups.values():
        batch: list[Mapped] = []
        size = 0
        for item in group:
            full = len(batch) >= destination.max_batch_events
            if batch and (full or size + item.size > destination.max_batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += item.size
        if batch:
            yield batch


def _wire(body: dict[str, Any]) -> bytes:
    """The body exactly as the dispatcher sends it; strict UTF-8, no NaN."""
    json.dumps(body, allow_nan=False)
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_ga4(body: dict[str, Any]) -> None:
    raw = _wire(body)
    assert len(raw) < GA_MAX_BODY
    events = body["events"]
    assert 1 <= len(events) <= GA_MAX_EVENTS
    for event in events:
        name = event["name"]
        assert GA_NAME.fullmatch(name) and len(name) <= GA_MAX_NAME, name
        params = event["params"]
        assert len(params) <= GA_MAX_PARAMS
        for param, value in params.items():
            assert GA_NAME.fullmatch(param) and len(param) <= GA_MAX_NAME, param
            assert type(value) in (str, int, float), type(value)
            if isinstance(value, str):
                assert len(value) <= GA_MAX_VALUE
            if isinstance(value, float):
                assert math.isfinite(value)
    # And the stand-in's reading of GA's documented rules agrees.
    checks = ga4_standin._Checks(time.time_ns() // 1000)
    checks.request(raw, json.loads(raw), {"measurement_id": "G", "api_secret": "s"})
    assert checks.messages == []


def _check_amplitude(body: dict[str, Any]) -> None:
    raw = _wire(body)
    assert len(raw) < AMPLITUDE_MAX_BODY
    events = body["events"]
    assert 1 <= len(events) <= 2000
    for event in events:
        longest = max((len(s) for s in _strings(event)), default=0)
        assert longest <= AMPLITUDE_MAX_STRING
    assert _event_problems(json.loads(raw)["events"], 1) is None


def _deliverable(
    results: list[Exposure | Conversion | None], send_user_id: bool
) -> None:
    ga, amplitude = _destinations(send_user_id)
    for destination, check in ((ga, _check_ga4), (amplitude, _check_amplitude)):
        mapped: list[Mapped] = []
        for record in results:
            if record is None:
                continue
            made = destination.map(record)
            assert len(made) == 1
            assert isinstance(made[0], Mapped | Rejected)
            if isinstance(made[0], Mapped):
                assert made[0].size == len(_wire(made[0].event))
                mapped.append(made[0])
        for batch in _batches(destination, mapped):
            check(destination.build_request(batch).body)


@FUZZ
@given(
    st.lists(frames, min_size=1, max_size=10),
    st.sampled_from(EXPOSURE_MODES),
    st.booleans(),
)
@example([DEEP_ATTRIBUTES, NON_FINITE, HUGE_NUMBERS, BIG_FLAG], "all", True)
@example(SAMPLE_FRAMES, "all", True)
def test_every_request_fits_the_destinations_limits(frame_list, mode, send_user_id):
    results, _ = _process_all(frame_list, mode)
    _deliverable(results, send_user_id)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(min_value=1, max_value=1023),
    st.integers(min_value=1, max_value=120),
    st.sampled_from(["a", "é", "\U0001f600", "\\", '"', "\x01"]),
)
def test_batches_of_large_events_stay_under_the_body_limits(keys, per_value, character):
    # Many users' conversions with large tags and attributes: the batch
    # byte accounting must keep every request under the limit.
    value = character * min(per_value * 10, 1024)
    document = {
        "EventKey": "purchase",
        "UserContext": {"ID": "user", "Attributes": {}},
        "EventTags": {f"tag_{i}": value for i in range(keys)},
    }
    frame_list = []
    for user in range(40):
        document["UserContext"]["ID"] = f"user-{user % 3}"
        document["UserContext"]["Attributes"] = {f"a{i}": value for i in range(keys)}
        frame_list.append(_serialise(document, "utf-8"))
    results, metrics = _process_all(frame_list, "all")
    assert metrics.total(REJECTED) == 0
    _deliverable(results, True)


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=range(len(SAMPLE_FRAMES)))
def test_sample_frames_make_valid_requests(frame):
    results, metrics = _process_all([frame], "all")
    assert metrics.total(REJECTED) == 0
    _deliverable(results, True)
