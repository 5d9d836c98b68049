"""Fixtures shared by the tests that run the daemon against the stand-ins."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from standins.agent_stream import AgentStreamStandIn
from standins.amplitude import AmplitudeStandIn
from standins.ga4 import Ga4StandIn
from tests.harness import AMPLITUDE_KEY, GA_ID, GA_SECRET, SDK_KEY


@pytest.fixture
def agent() -> Iterator[AgentStreamStandIn]:
    """A scripted Agent notification stream for the test SDK key."""
    with AgentStreamStandIn(sdk_key=SDK_KEY) as stand_in:
        yield stand_in


@pytest.fixture
def ga() -> Iterator[Ga4StandIn]:
    with Ga4StandIn(measurement_id=GA_ID, api_secret=GA_SECRET) as stand_in:
        yield stand_in


@pytest.fixture
def amplitude() -> Iterator[AmplitudeStandIn]:
    with AmplitudeStandIn(api_key=AMPLITUDE_KEY) as stand_in:
        yield stand_in
