"""The SDK-backed Agent stand-in answers and streams like Agent v4.4."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from standins.agent_sdk import STREAM_PATH, AgentSdkStandIn, _HandOff, go_json

SDK_KEY = "demo_sdk_key"
HEADERS = {"X-Optimizely-SDK-Key": SDK_KEY}
SAMPLE_FRAMES = Path(__file__).with_name("fixtures") / "agent-sse-sample.txt"
QUIET_SECONDS = 0.3


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentSdkStandIn]:
    with AgentSdkStandIn(SDK_KEY) as standin:
        yield standin


def _decide(
    agent: AgentSdkStandIn,
    keys: list[str],
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    return requests.post(
        f"{agent.url}/v1/decide",
        params=[("keys", key) for key in keys],
        json={"userId": "user-401"} if body is None else body,
        headers=HEADERS if headers is None else headers,
        timeout=5,
    )


def _track(
    agent: AgentSdkStandIn, event_key: str, body: dict[str, Any]
) -> requests.Response:
    return requests.post(
        f"{agent.url}/v1/track",
        params={"eventKey": event_key},
        json=body,
        headers=HEADERS,
        timeout=5,
    )


def _sample_frames() -> list[dict[str, Any]]:
    raw = SAMPLE_FRAMES.read_bytes()
    return [json.loads(frame[len(b"data: ") :]) for frame in raw.split(b"\n\n")[:-1]]


def _key_order(value: Any) -> Any:
    """The struct layout of a notification: field names in order, recursively.

    Maps (attributes, variables, tags) hold data-dependent keys, so only
    their being objects is compared.
    """
    maps = {"Attributes", "variables", "EventTags", "tags", "attributes"}
    if isinstance(value, dict):
        return [
            (key, "map" if key in maps else _key_order(item))
            for key, item in value.items()
        ]
    if isinstance(value, list):
        return [_key_order(item) for item in value[:1]]
    return type(value).__name__


class _RawStream:
    """A notification-stream client on a bare socket, to see bytes and chunks."""

    def __init__(self, agent: AgentSdkStandIn, query: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
        self.sock.sendall(
            f"GET {STREAM_PATH}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Optimizely-SDK-Key: {SDK_KEY}\r\n\r\n".encode()
        )
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def quiet_for(self, seconds: float) -> bool:
        """True when nothing at all arrives within `seconds`."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buffer += data
        return False

    def head(self) -> str:
        head = self._read_until(b"\r\n\r\n")
        return head.decode("latin-1")

    def chunks(self, count: int) -> list[bytes]:
        found = []
        for _ in range(count):
            size = int(self._read_until(b"\r\n"), 16)
            while len(self.buffer) < size + 2:
                self._receive()
            found.append(self.buffer[:size])
            assert self.buffer[size : size + 2] == b"\r\n"
            self.buffer = self.buffer[size + 2 :]
        return found

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._receive()
        part, self.buffer = self.buffer.split(marker, 1)
        return part

    def _receive(self) -> None:
        self.sock.settimeout(5)
        data = self.sock.recv(65536)
        assert data, "stream closed"
        self.buffer += data


@pytest.fixture
def stream(agent: AgentSdkStandIn) -> Iterator[Any]:
    opened: list[_RawStream] = []

    def open_stream(query: str = "") -> _RawStream:
        already = agent.report()["streams_open"]
        raw = _RawStream(agent, query)
        opened.append(raw)
        assert agent.wait_for_streams(already + 1, 5)
        return raw

    yield open_stream
    for raw in opened:
        raw.close()
    deadline = time.monotonic() + 5
    while agent.report()["streams_open"] and time.monotonic() < deadline:
        time.sleep(0.02)


# --- Decide ---------------------------------------------------------------------


def test_one_key_answers_the_agents_object_byte_for_byte(agent):
    body = {"userId": "user-401", "userAttributes": {"country": "us"}}

    answer = _decide(agent, ["checkout_redesign"], body)

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.content == (
        b'{"variationKey":"treatment","enabled":true,'
        b'"ruleKey":"checkout_redesign_ab","flagKey":"checkout_redesign",'
        b'"userContext":{"userId":"user-401","attributes":{"country":"us"}},'
        b'"reasons":[],"variables":{"button_color":"green","discount":0.1},'
        b'"isEveryoneElseVariation":false}\n'
    )


def test_several_keys_or_none_answer_arrays(agent):
    several = _decide(agent, ["checkout_redesign", "dark_mode"]).json()
    every = _decide(agent, []).json()

    assert [item["flagKey"] for item in several] == ["checkout_redesign", "dark_mode"]
    assert sorted(item["flagKey"] for item in every) == sorted(agent.flag_keys)
    for item in every:
        expected = [
            "variationKey",
            "enabled",
            "ruleKey",
            "flagKey",
            "userContext",
            "reasons",
            *(["variables"] if "variables" in item else []),
            "isEveryoneElseVariation",
        ]
        assert list(item) == expected
    # dark_mode has no variables, so the Agent omits the field.
    assert "variables" not in several[1]


def test_decisions_are_real_and_stable(agent):
    def variation(user: str, flag: str, attributes: dict[str, Any]) -> str:
        body = {"userId": user, "userAttributes": attributes}
        return _decide(agent, [flag], body).json()["variationKey"]

    handed_out = {variation(f"user-{n}", "checkout_redesign", {}) for n in range(40)}
    assert handed_out == {"control", "treatment", "off"}
    assert variation("user-7", "checkout_redesign", {}) == variation(
        "user-7", "checkout_redesign", {}
    )
    # pricing_page's A/B rule is for US visitors only.
    assert variation("user-7", "pricing_page", {}) == "off"
    assert variation("user-7", "pricing_page", {"country": "us"}) in {
        "control",
        "annual_first",
        "discount_banner",
    }
    assert variation("user-7", "new_search", {"beta": True}) == "on"


def test_everyone_else_rule_is_flagged(agent):
    answer = _decide(agent, ["new_search"], {"userId": "user-7"}).json()

    assert answer["variationKey"] == "off"
    assert answer["ruleKey"] == "default-rollout-70002-10002"
    assert answer["isEveryoneElseVariation"] is True


def test_unknown_flag_is_reported_in_reasons(agent):
    answer = _decide(agent, ["nope", "dark_mode"]).json()

    unknown = next(item for item in answer if item["flagKey"] == "nope")
    assert unknown["reasons"] == ['No flag was found for key "nope".']
    assert unknown["variationKey"] == "" and unknown["enabled"] is False


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        ({}, 400, b'{"error":"missing required X-Optimizely-SDK-Key header"}\n'),
        (
            {"X-Optimizely-SDK-Key": "demo-sdk-key"},
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
def test_sdk_key_is_checked_like_the_agent(agent, headers, status, body):
    answer = _decide(agent, ["dark_mode"], headers=headers)

    assert (answer.status_code, answer.content) == (status, body)


def test_sdk_key_may_carry_a_datafile_token(agent):
    headers = {"X-Optimizely-SDK-Key": f"{SDK_KEY}:token123"}

    assert _decide(agent, ["dark_mode"], headers=headers).status_code == 200


def test_request_errors(agent):
    missing_user = _decide(agent, ["dark_mode"], {"userAttributes": {}})
    bad_option = _decide(
        agent, ["dark_mode"], {"userId": "u", "decideOptions": ["NOPE"]}
    )
    not_json = requests.post(
        f"{agent.url}/v1/decide",
        data=b'{"userId": "u"}',
        headers={**HEADERS, "Content-Type": "text/plain"},
        timeout=5,
    )
    broken = requests.post(
        f"{agent.url}/v1/decide",
        data=b"{nope",
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=5,
    )

    assert missing_user.status_code == 400
    assert missing_user.content == (
        b'{"error":"missing \\"userId\\" in request payload"}\n'
    )
    assert bad_option.json() == {"error": "invalid option: NOPE"}
    assert (not_json.status_code, not_json.content) == (415, b"")
    assert broken.status_code == 400


def test_routing_host_and_health(agent):
    health = requests.get(f"{agent.url}/health", timeout=5)
    unknown = requests.get(f"{agent.url}/v1/nope", headers=HEADERS, timeout=5)
    wrong_method = requests.post(
        f"{agent.url}{STREAM_PATH}", json={}, headers=HEADERS, timeout=5
    )
    wrong_host = requests.get(
        f"{agent.url}/v1/config",
        headers={**HEADERS, "Host": "agent.example"},
        timeout=5,
    )

    assert health.content == b'{"status":"ok"}\n'
    assert (unknown.status_code, unknown.text) == (404, "404 page not found\n")
    assert wrong_method.status_code == 405
    assert wrong_host.status_code == 404
    assert wrong_host.json() == {"error": "invalid request host"}


# --- Track and config -----------------------------------------------------------


def test_track_answers(agent):
    known = _track(agent, "purchase", {"userId": "user-1"})
    unknown = _track(agent, "nope", {"userId": "user-1"})
    no_key = requests.post(
        f"{agent.url}/v1/track", json={"userId": "u"}, headers=HEADERS, timeout=5
    )

    assert known.content == b'{"userId":"user-1","eventKey":"purchase"}\n'
    assert unknown.status_code == 200
    assert unknown.json() == {
        "userId": "user-1",
        "eventKey": "nope",
        "error": 'event with key "nope" not found',
    }
    assert no_key.json() == {"error": "missing required path parameter: eventKey"}


def test_config_is_the_optimizely_config(agent):
    config = requests.get(f"{agent.url}/v1/config", headers=HEADERS, timeout=5)

    body = config.json()
    assert list(body) == [
        "environmentKey",
        "sdkKey",
        "revision",
        "experimentsMap",
        "featuresMap",
        "attributes",
        "audiences",
        "events",
    ]
    assert body["sdkKey"] == SDK_KEY
    assert list(body["featuresMap"]) == sorted(agent.flag_keys)
    assert list(body["featuresMap"]["checkout_redesign"]) == [
        "id",
        "key",
        "experimentRules",
        "deliveryRules",
        "variablesMap",
        "experimentsMap",
    ]
    assert [event["key"] for event in body["events"]] == agent.event_keys
    assert set(body["experimentsMap"]) == {"checkout_redesign_ab", "pricing_page_test"}
    # Go's encoder escapes HTML characters even inside the datafile's text.
    assert b"30% off \\u003c\\u0026 more\\u003e" in config.content


# --- The notification stream ------------------------------------------------------


def test_headers_arrive_only_with_the_first_frame(agent, stream):
    raw = stream()

    assert raw.quiet_for(QUIET_SECONDS)
    _decide(agent, ["checkout_redesign"], {"userId": "user-401"})

    head = raw.head()
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "Content-Type: text/event-stream" in head
    assert "Cache-Control: no-cache" in head
    assert "Transfer-Encoding: chunked" in head
    [chunk] = raw.chunks(1)
    assert chunk.startswith(b'data: {"Type":"flag",') and chunk.endswith(b"}\n\n")
    assert chunk.count(b"\n") == 2


def test_frames_have_the_reference_layout(agent, stream):
    raw = stream()
    body = {"userId": "user-401", "userAttributes": {"country": "us", "plan": "gold"}}
    tags = {"category": "shoes", "revenue": 4200, "value": 42.0}

    _decide(agent, ["checkout_redesign"], body)
    _track(agent, "purchase", {**body, "eventTags": tags})
    _track(agent, "signup", {"userId": "user-789"})

    raw.head()
    flag, purchase, signup = (
        json.loads(chunk[len(b"data: ") :]) for chunk in raw.chunks(3)
    )
    sample = _sample_frames()
    assert _key_order(flag) == _key_order(sample[0])
    assert _key_order(purchase) == _key_order(sample[5])
    assert _key_order(signup) == _key_order(sample[6])
    assert flag["DecisionInfo"] == {
        "decisionEventDispatched": True,
        "enabled": True,
        "experimentId": "50001",
        "flagKey": "checkout_redesign",
        "reasons": [],
        "ruleKey": "checkout_redesign_ab",
        "variables": {"button_color": "green", "discount": 0.1},
        "variationId": "90002",
        "variationKey": "treatment",
    }
    assert purchase["ConversionEvent"] == {
        "entity_id": "40001",
        "key": "purchase",
        "Attributes": [
            {"value": "us", "key": "country", "type": "custom", "entity_id": "20001"},
            {"value": "gold", "key": "plan", "type": "custom", "entity_id": "20002"},
            {
                "value": False,
                "key": "$opt_bot_filtering",
                "type": "custom",
                "entity_id": "$opt_bot_filtering",
            },
        ],
        "tags": tags,
        "revenue": 4200,
        "value": 42,
    }
    assert signup["EventTags"] is None
    assert signup["UserContext"] == {
        "ID": "user-789",
        "Attributes": None,
        "QualifiedSegments": None,
    }


def test_frames_are_go_encoded(agent, stream):
    raw = stream()
    attributes = {"referrer": "https://shop.example/?a=1&b=<2>", "country": "DE"}

    _decide(agent, ["dark_mode"], {"userId": "user-000", "userAttributes": attributes})
    _track(agent, "purchase", {"userId": "u", "eventTags": {"value": 42.0}})

    raw.head()
    flag, track = raw.chunks(2)
    assert (
        b'"Attributes":{"country":"DE",'
        b'"referrer":"https://shop.example/?a=1\\u0026b=\\u003c2\\u003e"}'
    ) in flag
    assert b'"variationKey":""' in flag and b'"ruleKey":""' in flag
    assert b'"EventTags":{"value":42}' in track


def test_filter_and_raw_mode(agent, stream):
    tracks_only = stream("?filter=track&raw")
    nothing = stream("?filter=")

    _decide(agent, ["dark_mode"])
    assert tracks_only.quiet_for(QUIET_SECONDS)
    _track(agent, "signup", {"userId": "user-5"})

    tracks_only.head()
    [line] = tracks_only.chunks(1)
    assert line.startswith(b'{"EventKey":"signup"') and line.endswith(b"}\n")
    assert nothing.quiet_for(QUIET_SECONDS)
    assert agent.report()["notifications_filtered"] >= 3


def test_every_stream_gets_every_notification(agent, stream):
    first, second = stream(), stream()
    before = agent.report()["notifications_streamed"].get("flag", 0)

    _decide(agent, ["checkout_redesign", "dark_mode"])

    for raw in (first, second):
        raw.head()
        assert len(raw.chunks(2)) == 2
    assert agent.report()["notifications_streamed"]["flag"] == before + 4


def test_a_stream_that_does_not_take_holds_up_decide_within_a_bound():
    with AgentSdkStandIn(SDK_KEY, hand_off_timeout_seconds=0.2) as standin:
        stuck = _HandOff()  # attached, but nobody ever takes from it
        with standin._streams_changed:
            standin._subscribers.append(stuck)

        started = time.monotonic()
        answer = _decide(standin, ["checkout_redesign", "dark_mode"])
        waited = time.monotonic() - started

    assert answer.status_code == 200
    assert 0.4 <= waited < 2
    assert standin.report()["notifications_dropped"] == 2


def test_disabled_notifications_answer_403_text():
    with AgentSdkStandIn(SDK_KEY, enable_notifications=False) as standin:
        answer = requests.get(f"{standin.url}{STREAM_PATH}", headers=HEADERS, timeout=5)

    assert answer.status_code == 403
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.text == "Notification stream not enabled\n"


def test_report_counts_what_it_served():
    with AgentSdkStandIn(SDK_KEY) as standin:
        _decide(standin, ["checkout_redesign", "dark_mode"])
        _track(standin, "purchase", {"userId": "u"})
        _track(standin, "nope", {"userId": "u"})
        _decide(standin, ["dark_mode"], headers={})
        report = standin.report()

    assert report["decide_requests"] == 1
    assert report["decisions"] == 2
    assert report["track_requests"] == 2
    assert report["tracks"] == 1
    assert report["unknown_events"] == 1
    assert report["rejected"] == {"400": 1}


def test_restart_keeps_the_url():
    standin = AgentSdkStandIn(SDK_KEY).start()
    try:
        url = standin.url
        standin.restart()
        assert standin.url == url
        assert _decide(standin, ["dark_mode"]).status_code == 200
    finally:
        standin.stop()
        standin.stop()


# --- The pieces -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0.0, "0"),
        (42.0, "42"),
        (0.15, "0.15"),
        (1.5e-5, "0.000015"),
        (1e-7, "1e-7"),
        (1e21, "1e+21"),
        (-3.25, "-3.25"),
        (4200, "4200"),
        ("a<b>&c\u2028", '"a\\u003cb\\u003e\\u0026c\\u2028"'),
        ("naïve\n", '"naïve\\n"'),
        ({"b": [True, None], "a": {}}, '{"b":[true,null],"a":{}}'),
    ],
)
def test_go_json(value, encoded):
    assert go_json(value) == encoded


def test_hand_off_returns_once_taken_and_gives_up_otherwise():
    hand_off = _HandOff()
    taken: list[Any] = []
    taker = threading.Thread(
        target=lambda: taken.append(hand_off.take(2)), name="test-taker"
    )
    taker.start()

    assert hand_off.offer("frame", 2) is True
    taker.join(2)
    assert taken == ["frame"]
    assert hand_off.offer("late", 0.05) is False
    assert hand_off.take(0) is None  # a withdrawn item is never delivered
    hand_off.close()
    assert hand_off.offer("closed", 1) is False


def test_command_line_serves_and_reports(capsys):
    from standins.agent_sdk import main

    assert main(["--max-seconds", "0.1"]) == 0

    out, err = capsys.readouterr()
    assert out.startswith("http://127.0.0.1:")
    assert json.loads(err)["decide_requests"] == 0
