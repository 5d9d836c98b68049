"""The dead-letter file: what a line holds, masking, and failing disks."""

from __future__ import annotations

import json
import logging

from dead_letter import DeadLetter, DeadLetterFile, read_dead_letters
from logger_config import SecretMasker
from metrics import Metrics

SECRET = "amp_key_Xy42"


def _letter(**overrides) -> DeadLetter:
    values = {
        "destination": "amplitude",
        "key": "user-1",
        "event": {"user_id": "user-1", "event_type": "purchase", "note": "é"},
        "reason": "invalid_fields",
        "status": 400,
        "received_ns": 1_796_000_000_000_000_000,
    }
    values.update(overrides)
    return DeadLetter(**values)


def test_each_letter_is_one_json_line_that_reads_back(tmp_path):
    metrics = Metrics("test")
    path = tmp_path / "dead.jsonl"
    letters = DeadLetterFile(str(path), metrics, SecretMasker([SECRET]))
    letters.write([_letter(), _letter(key="user-2", reason="shutdown", status=None)])

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {
        "time",
        "destination",
        "reason",
        "status",
        "key",
        "received_ns",
        "event",
    }
    assert first["event"]["note"] == "é"
    assert [letter.key for letter in read_dead_letters(str(path))] == [
        "user-1",
        "user-2",
    ]
    assert metrics.total("listener_events_dead_lettered", reason="shutdown") == 1
    assert letters.written == 2


def test_a_secret_inside_an_event_never_reaches_the_file(tmp_path):
    path = tmp_path / "dead.jsonl"
    letters = DeadLetterFile(str(path), Metrics("test"), SecretMasker([SECRET]))
    letters.write([_letter(event={"user_id": "u", "leak": f"key={SECRET}"})])
    assert SECRET not in path.read_text()
    assert "***" in path.read_text()


def test_a_failing_write_is_logged_and_counted_and_does_not_raise(tmp_path, caplog):
    metrics = Metrics("test")
    unwritable = tmp_path / "a-directory"
    unwritable.mkdir()
    letters = DeadLetterFile(str(unwritable), metrics, SecretMasker())
    with caplog.at_level(logging.ERROR):
        letters.write([_letter(), _letter()])
    assert metrics.total("listener_dead_letter_write_errors") == 1
    assert "cannot write 2 dead letters" in caplog.text
    assert letters.written == 0
    # The letters are still counted as given up on: nothing vanishes unseen.
    assert metrics.total("listener_events_dead_lettered") == 2


def test_unreadable_lines_are_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "dead.jsonl"
    good = json.dumps({"destination": "ga4", "key": "1.2 u", "event": {"name": "x"}})
    path.write_text(f'{good}\nnot json\n{{"destination": "ga4"}}\n\n{good}\n')
    with caplog.at_level(logging.WARNING):
        letters = list(read_dead_letters(str(path)))
    assert [letter.destination for letter in letters] == ["ga4", "ga4"]
    assert "line 2" in caplog.text and "line 3" in caplog.text
