"""Tests for settings.py: defaults, parsing, `.env` loading and error reports."""

from __future__ import annotations

import dataclasses
import os

import pytest

from settings import (
    DEFAULT_AGENT_BASE_URL,
    ConfigError,
    Settings,
    load_settings,
)

MINIMAL = {"OPTIMIZELY_SDK_KEY": "sdk_key_1", "DRY_RUN": "true"}

# A value for every variable, each different from its default.
EVERY_VARIABLE = {
    "OPTIMIZELY_SDK_KEY": "sdk_key_1",
    "OPTIMIZELY_AGENT_BASE_URL": "http://127.0.0.1:9999/",
    "NOTIFICATION_FILTER": "decision, track",
    "STREAM_CONNECT_TIMEOUT_SECONDS": "2.5",
    "RECONNECT_MAX_SECONDS": "7",
    "GA_MEASUREMENT_ID": "G-TEST123",
    "GA_API_SECRET": "ga_secret_value",
    "GA_DEBUG_MODE": "yes",
    "GA_COLLECT_URL": "http://127.0.0.1:9998/mp/collect",
    "GA_CLIENT_ID_ATTRIBUTE": "cid",
    "GA_SEND_USER_ID": "off",
    "GA_CURRENCY": "eur",
    "GA_CONCURRENCY": "8",
    "GA_GROUPING_WINDOW_MS": "250",
    "AMPLITUDE_API_KEY": "amp_key_value",
    "AMPLITUDE_TRACKING_URL": "http://127.0.0.1:9997/2/httpapi",
    "AMPLITUDE_EXPOSURE_EVENT_TYPE": "$exposure",
    "AMPLITUDE_BATCH_SIZE": "2000",
    "AMPLITUDE_FLUSH_INTERVAL_SECONDS": "0.5",
    "AMPLITUDE_CONCURRENCY": "2",
    "AMPLITUDE_THROTTLE_SECONDS": "45",
    "EXPOSURE_MODE": "all",
    "BUFFER_CAPACITY": "500",
    "BUFFER_OVERFLOW_POLICY": "drop_newest",
    "WORKER_THREADS": "3",
    "DESTINATION_QUEUE_CAPACITY": "700",
    "RETRY_HORIZON_SECONDS": "30",
    "RETRY_INITIAL_SECONDS": "0.25",
    "RETRY_MAX_SECONDS": "4",
    "HTTP_CONNECT_TIMEOUT_SECONDS": "1.5",
    "HTTP_READ_TIMEOUT_SECONDS": "12",
    "DEAD_LETTER_PATH": "/tmp/dl.jsonl",
    "SPOOL_PATH": "/tmp/spool",
    "SPOOL_MAX_BYTES": "2097152",
    "DRY_RUN": "1",
    "LOG_LEVEL": "warning",
    "LOG_FORMAT": "json",
    "SHUTDOWN_TIMEOUT_SECONDS": "9",
    "HEALTH_HOST": "0.0.0.0",
    "HEALTH_PORT": "0",
    "WEDGED_AFTER_SECONDS": "120",
    "SUMMARY_INTERVAL_SECONDS": "0",
}

EXPECTED_FROM_EVERY_VARIABLE = Settings(
    sdk_key="sdk_key_1",
    agent_base_url="http://127.0.0.1:9999",
    notification_filter=("decision", "track"),
    stream_connect_timeout_seconds=2.5,
    reconnect_max_seconds=7.0,
    ga_measurement_id="G-TEST123",
    ga_api_secret="ga_secret_value",
    ga_debug_mode=True,
    ga_collect_url="http://127.0.0.1:9998/mp/collect",
    ga_client_id_attribute="cid",
    ga_send_user_id=False,
    ga_currency="EUR",
    ga_concurrency=8,
    ga_grouping_window_seconds=0.25,
    amplitude_api_key="amp_key_value",
    amplitude_tracking_url="http://127.0.0.1:9997/2/httpapi",
    amplitude_exposure_event_type="$exposure",
    amplitude_batch_size=2000,
    amplitude_flush_interval_seconds=0.5,
    amplitude_concurrency=2,
    amplitude_throttle_seconds=45.0,
    exposure_mode="all",
    buffer_capacity=500,
    buffer_overflow_policy="drop_newest",
    worker_threads=3,
    destination_queue_capacity=700,
    retry_horizon_seconds=30.0,
    retry_initial_seconds=0.25,
    retry_max_seconds=4.0,
    http_connect_timeout_seconds=1.5,
    http_read_timeout_seconds=12.0,
    dead_letter_path="/tmp/dl.jsonl",
    spool_path="/tmp/spool",
    spool_max_bytes=2097152,
    dry_run=True,
    log_level="WARNING",
    log_format="json",
    shutdown_timeout_seconds=9.0,
    health_host="0.0.0.0",
    health_port=0,
    wedged_after_seconds=120.0,
    summary_interval_seconds=0.0,
)


def problems_for(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_defaults_agree_with_the_settings_class():
    assert load_settings(MINIMAL) == Settings(sdk_key="sdk_key_1", dry_run=True)


def test_documented_defaults():
    settings = load_settings(MINIMAL)

    assert settings.agent_base_url == DEFAULT_AGENT_BASE_URL == "http://localhost:8080"
    assert settings.notification_filter == ()
    assert settings.exposure_mode == "dispatched"
    assert settings.buffer_capacity == 100_000
    assert settings.buffer_overflow_policy == "drop_oldest"
    assert settings.ga_grouping_window_seconds == pytest.approx(0.05)
    assert settings.ga_currency == "USD"
    assert settings.ga_send_user_id is True
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"
    assert settings.health_host == "127.0.0.1"


def test_every_variable_is_parsed():
    assert load_settings(EVERY_VARIABLE) == EXPECTED_FROM_EVERY_VARIABLE


def test_every_field_is_covered_by_the_full_environment():
    # A new setting must get a variable in EVERY_VARIABLE, or this fails.
    defaults = Settings(sdk_key="")
    unchanged = [
        field.name
        for field in dataclasses.fields(Settings)
        if getattr(EXPECTED_FROM_EVERY_VARIABLE, field.name)
        == getattr(defaults, field.name)
    ]
    assert unchanged == []


def test_values_are_stripped_and_blank_means_default():
    settings = load_settings(
        {**MINIMAL, "OPTIMIZELY_SDK_KEY": "  sdk_key_1 \n", "BUFFER_CAPACITY": "  "}
    )

    assert settings.sdk_key == "sdk_key_1"
    assert settings.buffer_capacity == 100_000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), ("on", True), ("No", False), ("0", False)],
)
def test_booleans(raw, expected):
    assert load_settings({**MINIMAL, "GA_DEBUG_MODE": raw}).ga_debug_mode is expected


def test_log_level_is_case_insensitive():
    assert load_settings({**MINIMAL, "LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_dotenv_is_loaded_and_the_real_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "OPTIMIZELY_SDK_KEY=from_file\nDRY_RUN=true\nLOG_LEVEL=DEBUG\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", {"LOG_LEVEL": "ERROR"})

    settings = load_settings()

    assert settings.sdk_key == "from_file"
    assert settings.dry_run is True
    assert settings.log_level == "ERROR"


def test_missing_dotenv_is_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", dict(MINIMAL))

    assert load_settings().sdk_key == "sdk_key_1"


def test_an_explicit_environment_ignores_dotenv(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("LOG_LEVEL=DEBUG\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", {})

    assert load_settings(dict(MINIMAL)).log_level == "INFO"
    assert "LOG_LEVEL" not in os.environ


def test_every_problem_is_reported_at_once():
    problems = problems_for(
        {
            **MINIMAL,
            "BUFFER_CAPACITY": "0",
            "EXPOSURE_MODE": "sometimes",
            "LOG_FORMAT": "xml",
            "GA_DEBUG_MODE": "maybe",
            "HEALTH_PORT": "70000",
            "AMPLITUDE_BATCH_SIZE": "2001",
            "OPTIMIZELY_AGENT_BASE_URL": "ftp://agent",
            "GA_CURRENCY": "dollars",
            "WORKER_THREADS": "two",
            "RECONNECT_MAX_SECONDS": "nan",
        }
    )

    assert len(problems) == 10
    expected = {
        "BUFFER_CAPACITY": "at least 1",
        "EXPOSURE_MODE": "dispatched, all, none",
        "LOG_FORMAT": "text, json",
        "GA_DEBUG_MODE": "true or false",
        "HEALTH_PORT": "at most 65535",
        "AMPLITUDE_BATCH_SIZE": "at most 2000",
        "OPTIMIZELY_AGENT_BASE_URL": "http(s) URL",
        "GA_CURRENCY": "ISO 4217",
        "WORKER_THREADS": "whole number",
        "RECONNECT_MAX_SECONDS": "a number",
    }
    for variable, allowed in expected.items():
        matching = [p for p in problems if p.startswith(variable)]
        assert len(matching) == 1, (variable, problems)
        assert allowed in matching[0], matching[0]


def test_the_message_lists_every_problem():
    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, "LOG_LEVEL": "loud", "WORKER_THREADS": "0"})

    message = str(caught.value)
    assert "2 problems" in message
    assert "LOG_LEVEL='LOUD'" in message
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in message
    assert "WORKER_THREADS" in message


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "Infinity"])
def test_non_finite_numbers_are_rejected(raw):
    assert problems_for({**MINIMAL, "SHUTDOWN_TIMEOUT_SECONDS": raw}) == [
        f"SHUTDOWN_TIMEOUT_SECONDS={raw!r} is not a number"
    ]


def test_a_fraction_is_not_a_whole_number():
    assert problems_for({**MINIMAL, "BUFFER_CAPACITY": "1.5"}) == [
        "BUFFER_CAPACITY='1.5' is not a whole number"
    ]


def test_retry_max_below_initial_is_an_error():
    problems = problems_for(
        {**MINIMAL, "RETRY_INITIAL_SECONDS": "5", "RETRY_MAX_SECONDS": "1"}
    )

    assert problems == ["RETRY_MAX_SECONDS must not be below RETRY_INITIAL_SECONDS"]


def test_sdk_key_is_required():
    problems = problems_for({"DRY_RUN": "true"})

    assert len(problems) == 1
    assert problems[0].startswith("OPTIMIZELY_SDK_KEY is required")


@pytest.mark.parametrize("key", ["dot.ted_key", "bang!key", "two:colons:key"])
def test_keys_the_agent_would_refuse_are_rejected(key):
    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, "OPTIMIZELY_SDK_KEY": key})
    assert "OPTIMIZELY_SDK_KEY may hold only" in str(caught.value)


def test_a_key_with_a_datafile_token_is_accepted():
    settings = load_settings({**MINIMAL, "OPTIMIZELY_SDK_KEY": "abc123:tok/en+="})
    assert settings.sdk_key == "abc123:tok/en+="


def test_hyphenated_sdk_key_is_rejected_without_echoing_it():
    key = "secret-sdk-key-4711"

    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, "OPTIMIZELY_SDK_KEY": key})

    assert "OPTIMIZELY_SDK_KEY may hold only" in str(caught.value)
    assert "hyphens included" in str(caught.value)
    assert "4711" not in str(caught.value)


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ({"GA_MEASUREMENT_ID": "G-ONLY"}, "GA_API_SECRET"),
        ({"GA_API_SECRET": "lonely_ga_secret_99"}, "GA_MEASUREMENT_ID"),
    ],
)
def test_half_a_ga_pair_is_an_error(present, missing):
    with pytest.raises(ConfigError) as caught:
        load_settings({"OPTIMIZELY_SDK_KEY": "sdk_key_1", **present})

    assert caught.value.problems == [
        f"{missing} is missing: GA4 needs both GA_MEASUREMENT_ID and GA_API_SECRET"
    ]
    assert "lonely_ga_secret_99" not in str(caught.value)


def test_no_destination_without_dry_run_is_an_error_with_the_hint():
    problems = problems_for({"OPTIMIZELY_SDK_KEY": "sdk_key_1"})

    assert len(problems) == 1
    assert "no destination is configured" in problems[0]
    assert "DRY_RUN=true" in problems[0]
    assert "AMPLITUDE_API_KEY" in problems[0]


def test_one_destination_is_enough():
    settings = load_settings(
        {"OPTIMIZELY_SDK_KEY": "sdk_key_1", "AMPLITUDE_API_KEY": "amp_key"}
    )

    assert settings.destinations == ("amplitude",)
    assert not settings.ga_enabled


def test_dry_run_shows_both_destinations():
    assert load_settings(MINIMAL).destinations == ("ga4", "amplitude")


def test_secrets_never_appear_in_problems():
    secrets = {
        "OPTIMIZELY_SDK_KEY": "sdk-SECRET-AAA",
        "GA_API_SECRET": "SECRET_BBB",
        "AMPLITUDE_API_KEY": "SECRET_CCC",
    }

    with pytest.raises(ConfigError) as caught:
        load_settings({**secrets, "LOG_LEVEL": "loud", "BUFFER_CAPACITY": "x"})

    for secret in secrets.values():
        assert secret not in str(caught.value)
        assert all(secret not in problem for problem in caught.value.problems)


def test_repr_masks_secrets():
    settings = load_settings(EVERY_VARIABLE)

    for shown in (repr(settings), str(settings), f"{settings}"):
        assert "sdk_key_1" not in shown
        assert "ga_secret_value" not in shown
        assert "amp_key_value" not in shown
        assert "sdk_key='***'" in shown
        assert "ga_measurement_id='G-TEST123'" in shown
    assert settings.secrets == ("sdk_key_1", "ga_secret_value", "amp_key_value")


def test_repr_shows_unset_secrets_as_empty():
    assert "amplitude_api_key=''" in repr(Settings(sdk_key="k"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        ("decision", ("decision",)),
        ("track,decision,track", ("track", "decision")),
        (" project_config_update , decision ", ("project_config_update", "decision")),
    ],
)
def test_notification_filter(raw, expected):
    settings = load_settings({**MINIMAL, "NOTIFICATION_FILTER": raw})

    assert settings.notification_filter == expected


def test_unknown_notification_filter_value_is_named():
    problems = problems_for({**MINIMAL, "NOTIFICATION_FILTER": "decision,Track"})

    assert len(problems) == 1
    assert "'Track'" in problems[0]
    assert "decision, track, project_config_update" in problems[0]


def test_notification_filter_with_no_valid_value_is_an_error():
    # The Agent streams nothing at all for a filter with nothing valid in it.
    problems = problems_for({**MINIMAL, "NOTIFICATION_FILTER": " , ,"})

    assert len(problems) == 1
    assert problems[0].startswith("NOTIFICATION_FILTER has no value")
    assert "streams nothing" in problems[0]


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_settings(MINIMAL).sdk_key = "other"  # type: ignore[misc]
