"""Tests for logger_config.py: text and JSON lines, secrets masked everywhere."""

from __future__ import annotations

import io
import json
import logging
import re
from urllib.parse import urlencode

import pytest

from logger_config import MASK, SecretMasker, configure_logging

SECRET = "s3cr+t/k=y &x"  # characters a URL encodes, and a space
SDK_KEY = "sdk_key_ABC123"


class CapturedLogging:
    """configure_logging's output for one test, captured in memory."""

    def __init__(self) -> None:
        self._stream = io.StringIO()

    def configure(self, **kwargs) -> None:
        configure_logging(**kwargs)
        logging.getLogger().handlers[0].setStream(self._stream)

    def __call__(self) -> list[str]:
        return self._stream.getvalue().splitlines()


@pytest.fixture
def output():
    """Captured logging; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    urllib3_level = logging.getLogger("urllib3").level
    yield CapturedLogging()

    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logging.getLogger("urllib3").setLevel(urllib3_level)


def test_text_line(output):
    output.configure(level="INFO", log_format="text")

    logging.getLogger("listener.test").info("read %d frames", 3)

    [line] = output()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d INFO    listener\.test: read 3 frames", line
    ), line


def test_level_filters_records(output):
    output.configure(level="WARNING")
    log = logging.getLogger("listener.test")

    log.info("quiet")
    log.warning("loud")

    assert len(output()) == 1
    assert output()[0].endswith("loud")


def test_urllib3_debug_is_silenced_even_at_debug(output):
    output.configure(level="DEBUG")

    logging.getLogger("urllib3.connectionpool").debug("GET /?api_secret=x")

    assert output() == []


def test_json_line_fields(output):
    output.configure(log_format="json")

    logging.getLogger("listener.test").warning(
        "dropped %d", 5, extra={"reason": "overflow", "count": 5, "obj": object()}
    )

    [line] = output()
    entry = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "listener.test"
    assert entry["message"] == "dropped 5"
    assert entry["reason"] == "overflow"
    assert entry["count"] == 5
    assert entry["obj"].startswith("<object object")
    # Only the extras: none of the LogRecord's own attributes.
    assert set(entry) == {
        "time",
        "level",
        "logger",
        "message",
        "reason",
        "count",
        "obj",
    }


def test_json_is_one_object_per_line(output):
    output.configure(log_format="json")
    log = logging.getLogger("listener.test")

    log.info("first\nwith a newline")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("second")
    log.info("third: %s", "ünïcode")

    entries = [json.loads(line) for line in output()]
    assert [e["message"] for e in entries] == [
        "first\nwith a newline",
        "second",
        "third: ünïcode",
    ]
    assert "ValueError: boom" in entries[1]["exception"]
    assert "Traceback" in entries[1]["exception"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_masked_in_message_args_and_traceback(output, log_format):
    output.configure(log_format=log_format, secrets=[SECRET, SDK_KEY])
    log = logging.getLogger("listener.test")

    log.info(f"key {SDK_KEY} in the message")
    log.info("key %s in the args", SDK_KEY)
    log.info("secret %r in a repr", SECRET)
    log.info("extra field", extra={"url": f"http://x/?key={SDK_KEY}"})
    try:
        raise RuntimeError(f"failed to instantiate Optimizely for SDK Key: {SDK_KEY}")
    except RuntimeError:
        log.exception("traceback")

    text = "\n".join(output())
    assert SDK_KEY not in text
    assert SECRET not in text
    assert "ABC123" not in text
    assert "k=y" not in text
    # Text lines leave out extra fields; JSON lines carry them.
    assert text.count(MASK) == (5 if log_format == "json" else 4)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_url_encoded_secret_is_masked(output, log_format):
    output.configure(log_format=log_format, secrets=[SECRET])
    log = logging.getLogger("listener.test")
    query = urlencode({"measurement_id": "G-1", "api_secret": SECRET})
    assert "s3cr%2Bt%2Fk%3Dy+%26x" in query  # what requests puts in a URL

    log.warning("POST http://127.0.0.1/mp/collect?%s failed", query)
    log.warning("quoted: %s", "s3cr%2Bt/k%3Dy%20%26x")
    log.warning("fully quoted: %s", "s3cr%2Bt%2Fk%3Dy%20%26x")

    text = "\n".join(output())
    assert "s3cr" not in text
    assert text.count(f"api_secret={MASK}") == 1
    assert "measurement_id=G-1" in text


def test_secret_with_json_escaped_characters_is_masked_in_json(output):
    secret = 'quote"back\\slash'
    output.configure(log_format="json", secrets=[secret])

    logging.getLogger("listener.test").error("secret is %s", secret)

    [line] = output()
    assert json.loads(line)["message"] == f"secret is {MASK}"


def test_masker_masks_a_longer_secret_whole():
    mask = SecretMasker(["abc", "abcdef"])

    assert mask("x abcdef y abc") == f"x {MASK} y {MASK}"


def test_masker_ignores_empty_secrets():
    assert SecretMasker(["", "k"])("keep") == f"{MASK}eep"
    assert SecretMasker([""])("unchanged") == "unchanged"


def test_configure_returns_the_masker(output):
    mask = configure_logging(secrets=[SDK_KEY])

    assert mask(f"dry run: {SDK_KEY}") == f"dry run: {MASK}"


def test_configure_replaces_previous_handlers(output):
    output.configure()
    output.configure()

    logging.getLogger("listener.test").warning("once")

    assert len(logging.getLogger().handlers) == 1
    assert len(output()) == 1
