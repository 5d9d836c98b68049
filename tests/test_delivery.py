"""The dispatcher's batching, ordering, retry and shutdown rules.

A scripted destination and poster stand in for HTTP here, and the
dispatcher's sleep is captured, so retry timing is checked without waiting.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from dead_letter import DeadLetterFile
from delivery import CompletionTracker, Dispatcher, Outbound, TransientError
from destination import Mapped, Request, SendResult
from metrics import Metrics
from settings import Settings
from tests.harness import wait_until


class ScriptedDestination:
    """Answers decided by a function of the HTTP status; events are dicts."""

    name = "amplitude"
    max_batch_bytes = 1_000_000

    def __init__(self, max_batch_events: int = 10, one_key: bool = False) -> None:
        self.max_batch_events = max_batch_events
        self.one_key_per_batch = one_key

    def map(self, notification):  # pragma: no cover - not used here
        return []

    def build_request(self, events: list[Mapped]) -> Request:
        return Request(
            "http://127.0.0.1:9/x",
            "http://127.0.0.1:9/x",
            {"e": [m.event for m in events]},
        )

    def read_response(self, status, body, headers, count, *, events=None) -> SendResult:
        if status == 200:
            return SendResult()
        if status == 413:
            return SendResult(split=True)
        if status == 429:
            return SendResult(
                retry=True, retry_after_seconds=float(headers["Retry-After"])
            )
        if status == 400:
            return SendResult(
                rejected={0: "invalid_fields"}, resend=list(range(1, count))
            )
        return SendResult(retry=True)


class Recorder:
    """A poster that answers from a script and records every batch it saw."""

    def __init__(self, answer: Callable[[list[dict]], tuple[int, dict]]) -> None:
        self.answer = answer
        self.batches: list[list[dict]] = []
        self.in_flight: set[str] = set()
        self.overlaps = 0
        self.lock = threading.Lock()

    def __call__(self, session, url, safe_url, body):
        events = json.loads(body)["e"]
        keys = {e["key"] for e in events}
        with self.lock:
            if keys & self.in_flight:
                self.overlaps += 1
            self.in_flight |= keys
            self.batches.append(events)
        try:
            status, headers = self.answer(events)
        finally:
            with self.lock:
                self.in_flight -= keys
        if status == 0:
            raise TransientError("connection reset")
        return status, b"{}", headers

    def delivered(self) -> list[dict]:
        return [e for batch in self.batches for e in batch]


def _dispatcher(tmp_path, poster, *, destination=None, sleeps=None, **settings_kw):
    chosen = {"retry_initial_seconds": 0.5, "retry_max_seconds": 4.0, **settings_kw}
    settings = Settings(
        sdk_key="k",
        dry_run=True,
        dead_letter_path=str(tmp_path / "dead.jsonl"),
        **chosen,
    )
    metrics = Metrics("test")
    acked: list[int] = []
    tracker = CompletionTracker(acked.extend)
    letters = DeadLetterFile(settings.dead_letter_path, metrics, lambda text: text)
    dispatcher = Dispatcher(
        destination or ScriptedDestination(),
        settings,
        metrics,
        letters,
        tracker,
        poster=poster,
        concurrency=4,
        wait_seconds=0.01,
        sleep=sleeps.append if sleeps is not None else None,
    )
    dispatcher.acked = acked
    dispatcher.metrics = metrics
    dispatcher.letters_path = tmp_path / "dead.jsonl"
    return dispatcher


def _outbounds(keys_and_seq: list[tuple[str, int]]) -> list[Outbound]:
    made = []
    for number, (key, seq) in enumerate(keys_and_seq, 1):
        event = {"key": key, "seq": seq}
        made.append(Outbound(Mapped.of(key, event), number, time.time_ns()))
    return made


def _letters(dispatcher) -> list[dict]:
    path = dispatcher.letters_path
    return (
        [json.loads(line) for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )


def test_each_key_keeps_its_order_and_is_never_in_two_requests(tmp_path):
    recorder = Recorder(lambda events: (200, {}))
    dispatcher = _dispatcher(tmp_path, recorder)
    dispatcher.start()
    items = [(f"user-{i % 7}", i) for i in range(300)]
    for start in range(0, 300, 30):
        dispatcher.submit(_outbounds(items[start : start + 30]))
    assert wait_until(lambda: len(recorder.delivered()) == 300, 10)
    dispatcher.flush()
    assert dispatcher.wait_idle(5)
    dispatcher.abort()

    assert recorder.overlaps == 0
    seen: dict[str, list[int]] = {}
    for event in recorder.delivered():
        seen.setdefault(event["key"], []).append(event["seq"])
    assert all(seqs == sorted(seqs) for seqs in seen.values())
    assert all(len(batch) <= 10 for batch in recorder.batches)


def test_retry_after_is_honoured_and_backoff_is_capped(tmp_path):
    answers = iter([(429, {"Retry-After": "7"})] + [(503, {})] * 12 + [(200, {})])
    recorder = Recorder(lambda events: next(answers))
    sleeps: list[float] = []
    dispatcher = _dispatcher(tmp_path, recorder, sleeps=sleeps)
    dispatcher.start()
    dispatcher.submit(_outbounds([("u1", 1)]))
    assert wait_until(lambda: len(recorder.batches) == 14, 10)
    dispatcher.flush()
    assert dispatcher.wait_idle(5)
    dispatcher.abort()

    assert sleeps[0] == 7.0
    assert len(sleeps) == 13
    assert all(0 <= s <= 4.0 for s in sleeps[1:])
    assert dispatcher.metrics.total("listener_events_retried", reason="503") == 12
    assert dispatcher.metrics.total("listener_events_delivered") == 1
    assert _letters(dispatcher) == []


def test_shutdown_cuts_a_backoff_wait_short(tmp_path):
    recorder = Recorder(lambda events: (503, {}))
    dispatcher = _dispatcher(
        tmp_path, recorder, retry_max_seconds=60.0, retry_initial_seconds=30.0
    )
    dispatcher.start()
    dispatcher.submit(_outbounds([("u1", 1), ("u2", 2)]))
    assert wait_until(lambda: recorder.batches, 10)
    started = time.monotonic()
    dispatcher.abort(join_seconds=5)
    assert time.monotonic() - started < 2
    assert sorted(x["reason"] for x in _letters(dispatcher)) == ["shutdown", "shutdown"]
    assert sorted(dispatcher.acked) == [1, 2]


def test_rejected_events_are_dead_lettered_and_the_rest_resent(tmp_path):
    answers = iter([(400, {})])
    recorder = Recorder(lambda events: next(answers, (200, {})))
    dispatcher = _dispatcher(tmp_path, recorder)
    dispatcher.start()
    dispatcher.submit(_outbounds([("a", 1), ("b", 2), ("c", 3)]))
    dispatcher.flush()
    assert wait_until(lambda: len(recorder.batches) == 2, 10)
    assert dispatcher.wait_idle(5)
    dispatcher.abort()
    assert [e["seq"] for e in recorder.batches[1]] == [2, 3]
    letters = _letters(dispatcher)
    assert [(x["reason"], x["status"], x["event"]["seq"]) for x in letters] == [
        ("invalid_fields", 400, 1)
    ]
    assert sorted(dispatcher.acked) == [1, 2, 3]


def test_too_large_batches_are_halved_and_a_lone_event_dead_lettered(tmp_path):
    def answer(events):
        too_large = len(events) > 2 or any(e["seq"] == 99 for e in events)
        return (413, {}) if too_large else (200, {})

    recorder = Recorder(answer)
    dispatcher = _dispatcher(tmp_path, recorder)
    dispatcher.start()
    dispatcher.submit(_outbounds([(f"u{i}", i) for i in range(8)] + [("big", 99)]))
    dispatcher.flush()
    assert wait_until(
        lambda: dispatcher.metrics.total("listener_events_delivered") == 8, 10
    )
    assert dispatcher.wait_idle(5)
    dispatcher.abort()
    assert [x["reason"] for x in _letters(dispatcher)] == ["too_large"]


def test_a_full_queue_dead_letters_its_oldest_events(tmp_path, caplog):
    release = threading.Event()
    recorder = Recorder(lambda events: (release.wait(10), (200, {}))[1])
    dispatcher = _dispatcher(tmp_path, recorder, destination_queue_capacity=5)
    dispatcher.start()
    dispatcher.submit(_outbounds([(f"u{i}", i) for i in range(4)]))
    dispatcher.flush()
    assert wait_until(lambda: recorder.batches, 5)  # the first batch is in flight
    dispatcher.submit(_outbounds([(f"w{i}", 100 + i) for i in range(8)]))
    release.set()
    assert dispatcher.wait_idle(5)
    dispatcher.abort()
    letters = _letters(dispatcher)
    assert [x["reason"] for x in letters] == ["queue_overflow"] * 3
    assert "amplitude queue full: dead-lettered its 3 oldest events" in caplog.text
    assert [x["event"]["seq"] for x in letters] == [100, 101, 102]
    assert dispatcher.metrics.total("listener_events_delivered") == 4 + 5


@pytest.mark.parametrize("one_key", [True, False])
def test_lone_events_wait_at_most_the_window(tmp_path, one_key):
    recorder = Recorder(lambda events: (200, {}))
    dispatcher = _dispatcher(
        tmp_path, recorder, destination=ScriptedDestination(one_key=one_key)
    )
    dispatcher.start()
    dispatcher.submit(_outbounds([("u1", 1)]))
    assert wait_until(lambda: recorder.batches, 2)
    dispatcher.abort()


def test_abort_settles_a_batch_whose_request_is_still_running(tmp_path):
    release = threading.Event()
    recorder = Recorder(lambda events: (release.wait(10), (200, {}))[1])
    dispatcher = _dispatcher(tmp_path, recorder)
    dispatcher.start()
    dispatcher.submit(_outbounds([("u1", 1), ("u2", 2)]))
    dispatcher.flush()
    assert wait_until(lambda: recorder.batches, 5)

    started = time.monotonic()
    assert dispatcher.abort(join_seconds=0.2) == 2
    assert time.monotonic() - started < 2
    assert [x["reason"] for x in _letters(dispatcher)] == ["shutdown", "shutdown"]

    # The answer arriving afterwards must not settle the batch a second time.
    release.set()
    assert wait_until(lambda: not any(t.is_alive() for t in dispatcher._threads), 5)
    assert dispatcher.metrics.total("listener_events_delivered") == 0
    assert sorted(dispatcher.acked) == [1, 2]


def test_events_submitted_after_abort_are_dead_lettered_not_lost(tmp_path):
    dispatcher = _dispatcher(tmp_path, Recorder(lambda events: (200, {})))
    dispatcher.start()
    dispatcher.abort(join_seconds=1)
    dispatcher.submit(_outbounds([("late", 1), ("later", 2)]))
    assert [x["reason"] for x in _letters(dispatcher)] == ["shutdown", "shutdown"]
    assert sorted(dispatcher.acked) == [1, 2]
