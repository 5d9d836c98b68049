"""The shared destination pieces: measuring events and splicing bodies."""

from __future__ import annotations

import json

import pytest

from amplitude import AmplitudeDestination
from destination import EVENTS, Mapped, with_events
from google_analytics import Ga4Destination
from notifications import Conversion, Exposure
from settings import Settings

SETTINGS = Settings(
    sdk_key="k",
    ga_measurement_id="G-TEST123",
    ga_api_secret="s3cret",
    amplitude_api_key="key\"with'quotes",
)


def _compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def test_spliced_body_is_exactly_the_encoded_body():
    events = [Mapped.of("u", {"n": i, "text": "é\u2028<&>"}) for i in range(3)]
    events.append(Mapped("u", {"made": "by hand"}, 16))  # no encoding kept
    envelope = {"a": 1, "events": EVENTS, "z": {"q": "\x00events"}}
    spliced = with_events(envelope, events)
    expected = {**envelope, "events": [m.event for m in events]}
    assert spliced == _compact(expected)


def test_a_lone_surrogate_is_replaced_so_the_body_can_be_sent():
    made = Mapped.of("u", {"bad": "\ud800x"})
    assert made.event == {"bad": "?x"}
    assert made.size == len(made.encoded) == len(_compact(made.event))


@pytest.mark.parametrize("destination_type", [Ga4Destination, AmplitudeDestination])
def test_each_destination_sends_the_body_it_describes(destination_type):
    destination = destination_type(SETTINGS)
    notes = [
        Exposure(
            "user-1", {"plan": "gold"}, "f", "r", "v", True, "flag", 10**18, "a" * 32
        ),
        Conversion(
            "user-1", {}, "buy now", {"tag": "x"}, 1999, None, 10**18 + 1, "b" * 32
        ),
    ]
    events = [m for note in notes for m in destination.map(note)]
    request = destination.build_request(events)
    assert request.encoded() == _compact(request.body)
