"""The loopback stand-ins answer exactly as the services they replace.

The Agent stand-in is read with a bare socket, so every byte it sends (and
every byte it withholds) is visible. The destinations are driven with plain
`requests`.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from standins.agent_stream import (
    SAMPLE_FRAMES_PATH,
    STREAM_PATH,
    AgentStreamStandIn,
    go_json,
    load_sample_frames,
)
from standins.amplitude import AmplitudeStandIn
from standins.ga4 import Ga4StandIn

SDK_KEY = "test_sdk_key"
FRAMES = load_sample_frames()
DECISION, TRACK, CONFIG = FRAMES[0], FRAMES[5], FRAMES[7]
MARKER = b'{"marker":true}'

# How long a client waits to be sure the stand-in sends nothing.
SILENCE_SECONDS = 0.2


class RawStream:
    """A bare-socket stream client that keeps every byte it receives."""

    def __init__(self, port: int, query: str = "", **headers: str) -> None:
        headers.setdefault("X-Optimizely-SDK-Key", SDK_KEY)
        lines = [f"GET {STREAM_PATH}{query} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [
            f"{name.replace('_', '-')}: {value}" for name, value in headers.items()
        ]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.received = b""

    def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.received:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        return self.received

    def read_to_eof(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        while chunk := self.sock.recv(65536):
            self.received += chunk
        return self.received

    def stays_silent(self) -> bool:
        self.sock.settimeout(SILENCE_SECONDS)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.received += chunk
        return False

    def head_and_frames(self) -> tuple[bytes, list[bytes]]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        frames = []
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            frames.append(body[:size])
            body = body[size + 2 :]
        return head, frames

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def agent() -> Iterator[AgentStreamStandIn]:
    with AgentStreamStandIn(sdk_key=SDK_KEY) as standin:
        yield standin


@pytest.fixture
def ga4() -> Iterator[Ga4StandIn]:
    with Ga4StandIn() as standin:
        yield standin


@pytest.fixture
def amplitude() -> Iterator[AmplitudeStandIn]:
    with AmplitudeStandIn() as standin:
        yield standin


def open_stream(agent: AgentStreamStandIn, query: str = "") -> RawStream:
    stream = RawStream(agent.port, query)
    assert agent.wait_for_connected(1, timeout=5)
    return stream


# The Agent stream.


def test_sample_frames_load_from_the_repository() -> None:
    assert SAMPLE_FRAMES_PATH.parent.name == "fixtures"
    assert len(FRAMES) == 9
    assert CONFIG == b'{"Type":"project_config_update","Revision":"43"}'


@pytest.mark.parametrize("frame", FRAMES)
def test_dicts_are_serialized_byte_for_byte_as_go_does(frame: bytes) -> None:
    assert go_json(json.loads(frame)) == frame


def test_nothing_arrives_before_the_first_frame_that_passes_the_filter(
    agent: AgentStreamStandIn,
) -> None:
    stream = open_stream(agent, "?filter=track")
    assert stream.stays_silent()

    assert agent.publish(DECISION) == 1
    assert stream.stays_silent()

    assert agent.publish(TRACK) == 1
    stream.read_until(b"\n\n")
    head, frames = stream.head_and_frames()
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert {
        "Content-Type: text/event-stream",
        "Cache-Control: no-cache",
        "Connection: keep-alive",
        "Transfer-Encoding: chunked",
        "Vary: Origin",
    } <= set(lines)
    assert any(line.startswith("X-Request-Id: ") for line in lines)
    assert frames == [b"data: " + TRACK + b"\n\n"]


def test_each_notification_is_one_chunk_in_publish_order(
    agent: AgentStreamStandIn,
) -> None:
    stream = open_stream(agent)
    assert agent.publish_many(FRAMES) == len(FRAMES)

    stream.read_until(FRAMES[-1] + b"\n\n")
    _, frames = stream.head_and_frames()
    assert frames == [b"data: " + frame + b"\n\n" for frame in FRAMES]


def test_a_client_request_id_is_echoed(agent: AgentStreamStandIn) -> None:
    stream = RawStream(agent.port, X_Request_Id="req-42")
    assert agent.wait_for_connected(1, timeout=5)
    agent.publish(CONFIG)
    stream.read_until(b"\n\n")
    head, _ = stream.head_and_frames()
    assert b"X-Request-Id: req-42" in head.split(b"\r\n")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", [DECISION, TRACK, CONFIG]),
        ("?filter=decision", [DECISION]),
        ("?filter=track&filter=project_config_update", [TRACK, CONFIG]),
        ("?filter=decision,track", [DECISION, TRACK]),
        ("?filter=decision,bogus", [DECISION]),
        ("?filter=project_config_update,%20track", [CONFIG]),
    ],
)
def test_filter_keeps_only_the_listed_categories(
    agent: AgentStreamStandIn, query: str, expected: list[bytes]
) -> None:
    stream = open_stream(agent, query)
    agent.publish_many([DECISION, TRACK, CONFIG])

    # The marker shares a category with the first expected frame, so once
    # it arrives everything published before it has been written or dropped.
    first = {DECISION: "decision", TRACK: "track", CONFIG: "project_config_update"}
    agent.publish(MARKER, category=first[expected[0]])
    stream.read_until(MARKER)
    _, frames = stream.head_and_frames()
    assert frames == [b"data: " + frame + b"\n\n" for frame in [*expected, MARKER]]


@pytest.mark.parametrize(
    "query", ["?filter=", "?filter=Decision", "?filter=log_event_notification"]
)
def test_filter_with_nothing_valid_streams_nothing(
    agent: AgentStreamStandIn, query: str
) -> None:
    stream = open_stream(agent, query)
    assert agent.publish_many([DECISION, TRACK, CONFIG]) == 3
    assert stream.stays_silent()
    assert stream.received == b""


def test_raw_mode_writes_one_json_line_per_frame(agent: AgentStreamStandIn) -> None:
    stream = open_stream(agent, "?raw=false")
    agent.publish_many([DECISION, CONFIG])

    stream.read_until(CONFIG + b"\n")
    head, frames = stream.head_and_frames()
    assert b"Content-Type: text/event-stream" in head
    assert frames == [DECISION + b"\n", CONFIG + b"\n"]


def test_redis_mode_sorts_keys_at_every_level() -> None:
    with AgentStreamStandIn(redis_mode=True) as agent:
        stream = open_stream(agent)
        agent.publish(json.loads(TRACK))
        stream.read_until(b"\n\n")

    _, frames = stream.head_and_frames()
    payload = frames[0].removeprefix(b"data: ").removesuffix(b"\n\n")
    assert (
        payload
        == json.dumps(json.loads(TRACK), sort_keys=True, separators=(",", ":")).encode()
    )
    assert payload.startswith(b'{"ConversionEvent":{"Attributes":[{"entity_id"')


def test_go_escaping_survives_redis_mode() -> None:
    with AgentStreamStandIn(redis_mode=True) as agent:
        stream = open_stream(agent)
        agent.publish(json.loads(FRAMES[8]))
        stream.read_until(b"\n\n")
    assert b"a=1\\u0026b=\\u003c2\\u003e" in stream.received


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        ({}, 400, b'{"error":"missing required X-Optimizely-SDK-Key header"}\n'),
        (
            {"X-Optimizely-SDK-Key": "has-hyphen"},
            400,
            b'{"error":"sdkKey failed validation"}\n',
        ),
        (
            {"X-Optimizely-SDK-Key": "other_key"},
            500,
            b'{"error":"failed to instantiate Optimizely for SDK Key: other_key"}\n',
        ),
    ],
)
def test_bad_sdk_keys_get_the_agents_answers(
    agent: AgentStreamStandIn, headers: dict[str, str], status: int, body: bytes
) -> None:
    response = requests.get(agent.stream_url, headers=headers, timeout=5)
    assert response.status_code == status
    assert response.content == body
    assert response.headers["Content-Type"] == "application/json"
    assert agent.connections_total == 0


def test_a_disabled_stream_answers_403_after_the_key_check() -> None:
    with AgentStreamStandIn(notifications_enabled=False) as agent:
        headers = {"X-Optimizely-SDK-Key": SDK_KEY}
        response = requests.get(agent.stream_url, headers=headers, timeout=5)
        assert response.status_code == 403
        assert response.text == "Notification stream not enabled\n"
        assert response.headers["Content-Type"].startswith("text/plain")

        headers = {"X-Optimizely-SDK-Key": "other_key"}
        response = requests.get(agent.stream_url, headers=headers, timeout=5)
        assert response.status_code == 500


def test_a_key_with_a_datafile_token_is_accepted(agent: AgentStreamStandIn) -> None:
    RawStream(agent.port, X_Optimizely_SDK_Key=f"{SDK_KEY}:token_123=")
    assert agent.wait_for_connected(1, timeout=5)


def test_other_routes(agent: AgentStreamStandIn) -> None:
    assert requests.get(agent.url + "/health", timeout=5).json() == {"status": "ok"}
    assert requests.post(agent.stream_url, timeout=5).status_code == 405
    assert requests.get(agent.url + "/v1/nope", timeout=5).status_code == 404


def test_publish_reaches_every_open_stream(agent: AgentStreamStandIn) -> None:
    assert agent.publish(CONFIG) == 0

    first, second = RawStream(agent.port), RawStream(agent.port)
    assert agent.wait_for_connected(2, timeout=5)
    assert agent.publish(CONFIG) == 2
    for stream in (first, second):
        assert stream.read_until(CONFIG).endswith(b"data: " + CONFIG + b"\n\n\r\n")


def test_a_stalled_reader_stalls_publish(agent: AgentStreamStandIn) -> None:
    stream = open_stream(agent)
    big = b'{"padding":"' + b"x" * 1_000_000 + b'"}'

    # The writer blocks once the socket buffers are full; the publish after
    # that waits for it until its own timeout, then gives up on the stream.
    results = []
    while 0 not in results and len(results) < 200:
        results.append(agent.publish(big, timeout_seconds=0.1))
    assert results[-1] == 0
    assert results.count(0) == 1
    stream.close()


def test_cut_streams_closes_without_a_terminating_chunk(
    agent: AgentStreamStandIn,
) -> None:
    stream = open_stream(agent)
    agent.publish(CONFIG)
    stream.read_until(CONFIG)

    assert agent.cut_streams() == 1
    assert agent.connected == 0
    received = stream.read_to_eof()
    assert received.endswith(b"data: " + CONFIG + b"\n\n\r\n")
    assert not received.endswith(b"0\r\n\r\n")


def test_a_closed_client_is_noticed(agent: AgentStreamStandIn) -> None:
    stream = open_stream(agent)
    stream.close()
    assert agent.wait_for_connected(0, timeout=5)


def test_a_frame_after_the_write_timeout_is_lost_with_the_connection() -> None:
    # A zero timeout puts every frame past the deadline, with no waiting.
    with AgentStreamStandIn(write_timeout_seconds=0.0) as agent:
        stream = open_stream(agent)
        assert agent.publish(CONFIG) == 1
        assert stream.read_to_eof() == b""
        assert agent.wait_for_connected(0, timeout=5)
        assert agent.report()["lost"] == 1


def test_restart_comes_back_on_the_same_port(agent: AgentStreamStandIn) -> None:
    port = agent.port
    for attempt in range(1, 4):
        stream = open_stream(agent)
        agent.restart()
        assert agent.port == port
        assert stream.read_to_eof() == b""
        assert agent.connected == 0
        RawStream(port)
        assert agent.wait_for_connected(1, timeout=5)
        assert agent.connections_total == 2 * attempt
        agent.cut_streams()

    agent.stop()
    agent.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(agent.url + "/health", timeout=5)


# GA4.


def ga4_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client_id": "1234567890.1735689600",
        "user_id": "user-123",
        "timestamp_micros": time.time_ns() // 1000 - 5_000_000,
        "events": [
            {
                "name": "experience_impression",
                "params": {
                    "exp_variant_string": "OPTLY-checkout_flow-treatment",
                    "session_id": 1735689600,
                    "engagement_time_msec": 1,
                },
            }
        ],
    }
    body.update(overrides)
    return body


def ga4_post(
    standin: Ga4StandIn, body: Any, debug: bool = False, **query: str
) -> requests.Response:
    params = {"measurement_id": "G-TEST123", "api_secret": "test_ga_secret", **query}
    url = standin.debug_url if debug else standin.collect_url
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, params=params, data=data, timeout=5)


def one_event(name: str = "exposure", **params: Any) -> list[dict[str, Any]]:
    return [{"name": name, "params": params}]


def test_ga4_validates_a_good_request_clean(ga4: Ga4StandIn) -> None:
    response = ga4_post(ga4, ga4_body(), debug=True)
    assert response.status_code == 200
    assert response.json() == {"validationMessages": []}
    assert ga4.events() == []


@pytest.mark.parametrize(
    ("body", "field_path", "code"),
    [
        (ga4_body(client_id=None), "client_id", "VALUE_REQUIRED"),
        (ga4_body(client_id="abc"), "client_id", "VALUE_INVALID"),
        (ga4_body(client_id="0.1735689600"), "client_id", "VALUE_INVALID"),
        (ga4_body(events=[]), "events", "VALUE_REQUIRED"),
        (ga4_body(events=one_event() * 26), "events", "EXCEEDED_MAX_ENTITIES"),
        (ga4_body(events=one_event("_x")), "events[0].name", "NAME_RESERVED"),
        (ga4_body(events=one_event("ga_x")), "events[0].name", "NAME_RESERVED"),
        (ga4_body(events=one_event("1abc")), "events[0].name", "NAME_INVALID"),
        (ga4_body(events=one_event("bad-name")), "events[0].name", "NAME_INVALID"),
        (ga4_body(events=one_event("a" * 41)), "events[0].name", "VALUE_OUT_OF_BOUNDS"),
        (
            ga4_body(events=one_event("session_start")),
            "events[0].name",
            "NAME_RESERVED",
        ),
        (
            ga4_body(events=one_event(**{f"p{i}": i for i in range(26)})),
            "events[0].params",
            "EXCEEDED_MAX_ENTITIES",
        ),
        (
            ga4_body(events=one_event(firebase_conversion=1)),
            "events[0].params.firebase_conversion",
            "NAME_RESERVED",
        ),
        (
            ga4_body(events=one_event(google_x=1)),
            "events[0].params.google_x",
            "NAME_RESERVED",
        ),
        (
            ga4_body(events=one_event(**{"a" * 41: 1})),
            f"events[0].params.{'a' * 41}",
            "VALUE_OUT_OF_BOUNDS",
        ),
        (
            ga4_body(events=one_event(note="x" * 101)),
            "events[0].params.note",
            "VALUE_OUT_OF_BOUNDS",
        ),
        (
            ga4_body(events=one_event(note={"nested": 1})),
            "events[0].params.note",
            "VALUE_INVALID",
        ),
        (
            ga4_body(user_properties={"p" * 25: {"value": "x"}}),
            f"user_properties.{'p' * 25}",
            "VALUE_OUT_OF_BOUNDS",
        ),
        (
            ga4_body(user_properties={"plan": {"value": "x" * 37}}),
            "user_properties.plan.value",
            "VALUE_OUT_OF_BOUNDS",
        ),
        (
            ga4_body(user_properties={"first_open_time": {"value": 1}}),
            "user_properties.first_open_time",
            "NAME_RESERVED",
        ),
        (
            ga4_body(timestamp_micros=time.time_ns() // 1000 - 73 * 3600 * 10**6),
            "timestamp_micros",
            "VALUE_OUT_OF_BOUNDS",
        ),
        (
            ga4_body(timestamp_micros=time.time_ns() // 1000 + 300 * 10**6),
            "timestamp_micros",
            "VALUE_OUT_OF_BOUNDS",
        ),
        (
            ga4_body(consent={"ad_user_data": "YES"}),
            "consent.ad_user_data",
            "VALUE_INVALID",
        ),
        (b"{not json", "", "VALUE_INVALID"),
        (ga4_body(padding="x" * 130_000), "", "VALUE_OUT_OF_BOUNDS"),
    ],
)
def test_ga4_reports_each_broken_limit(
    ga4: Ga4StandIn, body: Any, field_path: str, code: str
) -> None:
    messages = ga4_post(ga4, body, debug=True).json()["validationMessages"]
    assert (field_path, code) in {
        (m["fieldPath"], m["validationCode"]) for m in messages
    }
    assert all(m["description"] for m in messages)


def test_ga4_debug_ignores_credential_values(ga4: Ga4StandIn) -> None:
    response = ga4_post(ga4, ga4_body(), debug=True, api_secret="wrong")
    assert response.json() == {"validationMessages": []}

    response = requests.post(ga4.debug_url, json=ga4_body(), timeout=5)
    paths = {m["fieldPath"] for m in response.json()["validationMessages"]}
    assert paths == {"measurement_id", "api_secret"}


def test_ga4_collect_answers_204_and_records_violations(ga4: Ga4StandIn) -> None:
    stamp = time.time_ns() // 1000 - 10_000_000
    good = ga4_body(timestamp_micros=stamp)
    good["events"].append({"name": "second", "timestamp_micros": stamp + 1})
    response = ga4_post(ga4, good)
    assert response.status_code == 204
    assert response.content == b""

    response = ga4_post(ga4, ga4_body(events=one_event("_bad")), api_secret="wrong")
    assert response.status_code == 204

    assert ga4.wait_for_events(3, timeout=5)
    events = ga4.events()
    assert [(e.client_id, e.user_id, e.event["name"]) for e in events] == [
        ("1234567890.1735689600", "user-123", "experience_impression"),
        ("1234567890.1735689600", "user-123", "second"),
        ("1234567890.1735689600", "user-123", "_bad"),
    ]
    assert [e.timestamp_micros for e in events[:2]] == [stamp, stamp + 1]
    assert {(v.field_path, v.validation_code) for v in ga4.violations} == {
        ("events[0].name", "NAME_RESERVED"),
        ("api_secret", "VALUE_INVALID"),
    }
    assert ga4.requests_by_status == {204: 2}


def test_ga4_faults_are_recorded_apart_from_deliveries(ga4: Ga4StandIn) -> None:
    ga4.fail_next(1, 503, retry_after=7)
    ga4.drop_next(1)

    response = ga4_post(ga4, ga4_body())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    with pytest.raises(requests.ConnectionError):
        ga4_post(ga4, ga4_body())
    assert ga4_post(ga4, ga4_body()).status_code == 204

    assert len(ga4.events()) == 1
    assert [r.status for r in ga4.faulted] == [503, 0]
    assert ga4.report() == {
        "requests": 1,
        "requests_by_status": {204: 1, 503: 1},
        "faulted": 2,
        "dropped": 1,
        "events": 1,
        "violations": 0,
    }


def test_ga4_outage_lasts_until_recover(ga4: Ga4StandIn) -> None:
    ga4.outage(500)
    assert [ga4_post(ga4, ga4_body()).status_code for _ in range(3)] == [500] * 3
    ga4.recover()
    assert ga4_post(ga4, ga4_body()).status_code == 204


def test_ga4_timed_outage_ends_by_itself(ga4: Ga4StandIn) -> None:
    ga4.set_status_for(0.0, 502)
    assert ga4_post(ga4, ga4_body()).status_code == 204

    ga4.set_status_for(60.0, 502)
    assert ga4_post(ga4, ga4_body()).status_code == 502


def test_ga4_delay_slows_every_answer(ga4: Ga4StandIn) -> None:
    ga4.set_delay(0.2)
    started = time.monotonic()
    assert ga4_post(ga4, ga4_body()).status_code == 204
    assert time.monotonic() - started >= 0.2
    with pytest.raises(requests.Timeout):
        requests.post(ga4.collect_url, json=ga4_body(), timeout=0.05)


# Amplitude.


def amp_event(user_id: str = "user-123", **fields: Any) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "event_type": "$exposure",
        "time": 1735689600000,
        "insert_id": f"optly-{user_id}",
        **fields,
    }


def amp_post(
    standin: AmplitudeStandIn, events: list[Any], **body: Any
) -> requests.Response:
    payload = {"api_key": "test_amplitude_key", "events": events, **body}
    return requests.post(standin.tracking_url, json=payload, timeout=5)


def test_amplitude_ingests_and_deduplicates_by_insert_id(
    amplitude: AmplitudeStandIn,
) -> None:
    response = amp_post(amplitude, [amp_event("user-1"), amp_event("user-2")])
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 200
    assert answer["events_ingested"] == 2
    assert answer["payload_size_bytes"] == len(response.request.body)
    assert answer["server_upload_time"] > 1_700_000_000_000

    # A resend after an ambiguous failure: same insert_id, same user.
    amp_post(amplitude, [amp_event("user-1"), amp_event("user-3")])
    # The same insert_id on another device is a different event.
    amp_post(amplitude, [amp_event("user-1", device_id="device-9")])

    assert amplitude.wait_for_unique(4, timeout=5)
    assert len(amplitude.events()) == 5
    assert [e["user_id"] for e in amplitude.unique_events()] == [
        "user-1",
        "user-2",
        "user-3",
        "user-1",
    ]
    assert amplitude.duplicates == 1


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (
            {"events": [amp_event()]},
            {
                "code": 400,
                "error": "Request missing required field",
                "missing_field": "api_key",
            },
        ),
        (
            {"api_key": "wrong", "events": [amp_event()]},
            {"code": 400, "error": "Invalid API key: wrong"},
        ),
        (
            {"api_key": "test_amplitude_key"},
            {
                "code": 400,
                "error": "Request missing required field",
                "missing_field": "events",
            },
        ),
        (
            {"api_key": "test_amplitude_key", "events": [amp_event()] * 2001},
            {"code": 413, "error": "Payload too large"},
        ),
        (
            {
                "api_key": "test_amplitude_key",
                "events": [amp_event(note="x" * 1000) for _ in range(1000)],
            },
            {"code": 413, "error": "Payload too large"},
        ),
    ],
)
def test_amplitude_refuses_bad_requests(
    amplitude: AmplitudeStandIn, payload: dict[str, Any], answer: dict[str, Any]
) -> None:
    response = requests.post(amplitude.tracking_url, json=payload, timeout=5)
    assert response.status_code == answer["code"]
    assert response.json() == answer
    assert amplitude.events() == []


def test_amplitude_refuses_bad_json(amplitude: AmplitudeStandIn) -> None:
    response = requests.post(amplitude.tracking_url, data=b"{nope", timeout=5)
    assert response.json() == {"code": 400, "error": "Invalid JSON request body"}


def test_amplitude_rejects_a_request_with_invalid_events_whole(
    amplitude: AmplitudeStandIn,
) -> None:
    events = [
        amp_event("user-1"),
        amp_event("null"),
        amp_event("user-3", time="2025-01-01"),
        {"user_id": "user-4"},
        amp_event("user-5", event_type="[Amplitude] Revenue"),
        amp_event("abc"),
        amp_event("user-7", event_properties={"long": "x" * 1025}),
        {"event_type": "no id"},
    ]
    response = amp_post(amplitude, events)
    assert response.status_code == 400
    assert response.json() == {
        "code": 400,
        "error": "Invalid field values on some events",
        "events_with_invalid_fields": {
            "user_id": [1],
            "time": [2],
            "event_type": [4],
            "event_properties": [6],
        },
        "events_with_missing_fields": {"event_type": [3], "user_id": [7]},
        "events_with_invalid_id_lengths": {"user_id": [5]},
    }
    assert amplitude.events() == []


def test_amplitude_min_id_length_option(amplitude: AmplitudeStandIn) -> None:
    response = amp_post(amplitude, [amp_event("ab")])
    assert response.json()["error"] == "Invalid id length for user_id or device_id"

    response = amp_post(amplitude, [amp_event("ab")], options={"min_id_length": 1})
    assert response.status_code == 200


def test_amplitude_canned_answers_ingest_nothing(amplitude: AmplitudeStandIn) -> None:
    events = [amp_event("user-1"), amp_event("user-2"), amp_event("user-3")]

    amplitude.reject_fields_next([1], missing_indexes=[2])
    response = amp_post(amplitude, events)
    assert response.status_code == 400
    assert response.json()["events_with_invalid_fields"] == {"time": [1]}
    assert response.json()["events_with_missing_fields"] == {"event_type": [2]}

    amplitude.throttle_next({"user-2": 31}, daily_quota_users={"user-3": 500_001})
    response = amp_post(amplitude, events)
    assert response.status_code == 429
    answer = response.json()
    assert answer["throttled_events"] == [1, 2]
    assert answer["throttled_users"] == {"user-2": 31}
    assert answer["exceeded_daily_quota_users"] == {"user-3": 500_001}

    amplitude.silence_next([0])
    response = amp_post(amplitude, events)
    assert response.status_code == 400
    assert response.json()["error"] == "Events silenced for device_id"
    assert response.json()["silenced_events"] == [0]

    assert amplitude.events() == []
    assert amp_post(amplitude, events).status_code == 200
    assert len(amplitude.events()) == 3
    assert len(amplitude.rejections) == 3


def test_amplitude_too_large_over(amplitude: AmplitudeStandIn) -> None:
    amplitude.too_large_over(2)
    assert amp_post(amplitude, [amp_event("user-1")] * 3).status_code == 413
    assert amp_post(amplitude, [amp_event("user-1")] * 2).status_code == 200
    amplitude.too_large_over(None)
    assert amp_post(amplitude, [amp_event("user-1")] * 3).status_code == 200


def test_amplitude_drop_and_fail_then_recover(amplitude: AmplitudeStandIn) -> None:
    amplitude.drop_next(1)
    amplitude.fail_next(1, 500)
    with pytest.raises(requests.ConnectionError):
        amp_post(amplitude, [amp_event()])
    response = amp_post(amplitude, [amp_event()])
    assert response.status_code == 500
    assert response.json()["code"] == 500

    amplitude.outage(503)
    assert amp_post(amplitude, [amp_event()]).status_code == 503
    amplitude.recover()
    assert amp_post(amplitude, [amp_event()]).status_code == 200

    assert amplitude.wait_for_events(1, timeout=5)
    assert [r.status for r in amplitude.faulted] == [0, 500, 503]
    assert amplitude.report() == {
        "requests": 1,
        "requests_by_status": {200: 1, 500: 1, 503: 1},
        "faulted": 3,
        "dropped": 1,
        "events_ingested": 1,
        "unique": 1,
        "duplicates": 0,
        "rejections": 0,
    }


def test_answers_keep_the_connection_alive(amplitude: AmplitudeStandIn) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", amplitude.port, timeout=5)
    body = json.dumps({"api_key": "test_amplitude_key", "events": [amp_event()]})
    connection.request("POST", "/2/httpapi", body)
    first_socket = connection.sock
    for _ in range(20):
        assert connection.getresponse().read()
        connection.request("POST", "/2/httpapi", body)
    assert connection.getresponse().status == 200
    assert connection.sock is first_socket
    connection.close()
