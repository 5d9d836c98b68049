"""Tests for event_buffer.py: the bounded MemoryBuffer and its drop accounting."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from event_buffer import MemoryBuffer
from metrics import Metrics

DROPPED = "listener_buffer_dropped"


def frames(*payloads: bytes, start_ns: int = 1000) -> list[tuple[bytes, int]]:
    return [(payload, start_ns + i) for i, payload in enumerate(payloads)]


def numbered(count: int, prefix: str = "") -> list[tuple[bytes, int]]:
    return [(f"{prefix}{i}".encode(), i + 1) for i in range(count)]


def wait_until(condition, timeout_seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return condition()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("test")


def test_fifo_with_ids_and_receipt_times(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)

    buffer.put_many(frames(b"a", b"b"))
    buffer.put_many(frames(b"c", start_ns=5000))
    taken = buffer.take(10, 0)

    assert [(e.id, e.received_ns, e.data) for e in taken] == [
        (1, 1000, b"a"),
        (2, 1001, b"b"),
        (3, 5000, b"c"),
    ]


def test_take_respects_max_items(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)
    buffer.put_many(numbered(5))

    assert [e.data for e in buffer.take(2, 0)] == [b"0", b"1"]
    assert buffer.depth() == 3
    assert [e.data for e in buffer.take(10, 0)] == [b"2", b"3", b"4"]
    assert buffer.depth() == 0


def test_payload_bytes_are_kept_exactly(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)
    payload = b'{"a":"\xff\xfe\\u0026"}'

    buffer.put_many([(payload, 1)])

    assert buffer.take(1, 0)[0].data == payload


def test_drop_oldest_keeps_the_newest(metrics):
    buffer = MemoryBuffer(3, "drop_oldest", metrics)

    buffer.put_many(numbered(5))
    buffer.put_many([(b"late", 99)])

    assert [e.data for e in buffer.take(10, 0)] == [b"3", b"4", b"late"]
    assert metrics.total(DROPPED, reason="overflow_drop_oldest") == 3
    assert metrics.total(DROPPED, reason="overflow_drop_newest") == 0


def test_drop_newest_keeps_the_oldest(metrics):
    buffer = MemoryBuffer(3, "drop_newest", metrics)

    buffer.put_many(numbered(5))
    buffer.put_many([(b"late", 99)])

    assert [e.data for e in buffer.take(10, 0)] == [b"0", b"1", b"2"]
    assert metrics.total(DROPPED, reason="overflow_drop_newest") == 3
    assert metrics.total(DROPPED, reason="overflow_drop_oldest") == 0


def test_capacity_frees_up_after_take(metrics):
    buffer = MemoryBuffer(2, "drop_newest", metrics)
    buffer.put_many(numbered(2))
    buffer.take(1, 0)

    buffer.put_many([(b"x", 9)])

    assert buffer.depth() == 2
    assert metrics.total(DROPPED) == 0


def test_ids_keep_counting_past_drops(metrics):
    buffer = MemoryBuffer(1, "drop_oldest", metrics)

    buffer.put_many(numbered(3))

    assert [e.id for e in buffer.take(5, 0)] == [3]


def test_many_drops_give_few_log_lines(metrics, caplog):
    caplog.set_level(logging.WARNING, logger="event_buffer")
    buffer = MemoryBuffer(2, "drop_oldest", metrics)

    for i in range(1000):
        buffer.put_many([(b"x", i)])

    assert metrics.total(DROPPED, reason="overflow_drop_oldest") == 998
    records = [r for r in caplog.records if r.name == "event_buffer"]
    # The first drop is reported at once; the rest wait for the interval.
    assert len(records) == 1
    assert records[0].reason == "overflow_drop_oldest"
    assert records[0].count == 1
    assert "dropped 1 notifications" in records[0].getMessage()


def test_drop_log_reports_each_reason(metrics, caplog):
    caplog.set_level(logging.WARNING, logger="event_buffer")
    newest = MemoryBuffer(1, "drop_newest", metrics)

    newest.put_many(numbered(4))

    [record] = [r for r in caplog.records if r.name == "event_buffer"]
    assert (record.reason, record.count) == ("overflow_drop_newest", 3)


def test_take_times_out_empty(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)

    started = time.monotonic()
    assert buffer.take(10, 0.05) == []
    assert time.monotonic() - started >= 0.04


def test_take_wakes_up_on_put(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)
    got: list = []
    consumer = threading.Thread(
        target=lambda: got.extend(buffer.take(10, 30)), name="test-consumer"
    )
    consumer.start()

    buffer.put_many(frames(b"wake"))
    consumer.join(5)

    assert not consumer.is_alive()
    assert [e.data for e in got] == [b"wake"]


def test_close_wakes_a_waiting_take(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)
    got: list = [None]
    consumer = threading.Thread(
        target=lambda: got.__setitem__(0, buffer.take(10, 30)), name="test-consumer"
    )
    consumer.start()

    buffer.close()
    consumer.join(5)

    assert not consumer.is_alive()
    assert got == [[]]


def test_after_close_take_drains_then_returns_at_once(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)
    buffer.put_many(numbered(3))

    buffer.close()

    assert not buffer.closed_and_empty
    assert [e.data for e in buffer.take(2, 30)] == [b"0", b"1"]
    assert not buffer.closed_and_empty
    assert [e.data for e in buffer.take(2, 30)] == [b"2"]
    assert buffer.closed_and_empty
    started = time.monotonic()
    assert buffer.take(2, 30) == []
    assert time.monotonic() - started < 1


def test_open_and_empty_is_not_closed_and_empty(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)

    assert not buffer.closed_and_empty
    buffer.close()
    assert buffer.closed_and_empty


def test_ack_is_harmless(metrics):
    buffer = MemoryBuffer(10, "drop_oldest", metrics)
    buffer.put_many(numbered(1))

    buffer.ack([e.id for e in buffer.take(1, 0)])

    assert buffer.depth() == 0


def test_put_never_blocks_on_a_full_buffer(metrics):
    buffer = MemoryBuffer(10, "drop_newest", metrics)
    buffer.put_many(numbered(10))
    producer = threading.Thread(
        target=lambda: [buffer.put_many(numbered(100)) for _ in range(100)],
        name="test-producer",
    )

    producer.start()
    producer.join(5)

    assert not producer.is_alive()
    assert metrics.total(DROPPED, reason="overflow_drop_newest") == 10_000


def test_many_producers_and_consumers_lose_nothing(metrics):
    producers, per_producer, consumers = 4, 2500, 4
    buffer = MemoryBuffer(producers * per_producer, "drop_oldest", metrics)
    taken: list[list] = [[] for _ in range(consumers)]
    slowest_put = [0.0]

    def produce(p: int) -> None:
        items = numbered(per_producer, prefix=f"{p}:")
        for start in range(0, per_producer, 7):
            began = time.monotonic()
            buffer.put_many(items[start : start + 7])
            slowest_put[0] = max(slowest_put[0], time.monotonic() - began)

    def consume(c: int) -> None:
        while not buffer.closed_and_empty:
            taken[c].extend(buffer.take(13, 0.01))

    threads = [
        threading.Thread(target=consume, args=(c,), name=f"test-consumer-{c}")
        for c in range(consumers)
    ]
    producing = [
        threading.Thread(target=produce, args=(p,), name=f"test-producer-{p}")
        for p in range(producers)
    ]
    for thread in threads + producing:
        thread.start()
    for thread in producing:
        thread.join(10)
    buffer.close()
    for thread in threads:
        thread.join(10)

    assert not any(t.is_alive() for t in threads + producing)
    everything = [e for batch in taken for e in batch]
    assert len(everything) == producers * per_producer
    assert sorted(e.id for e in everything) == list(range(1, len(everything) + 1))
    expected = {
        f"{p}:{i}".encode() for p in range(producers) for i in range(per_producer)
    }
    assert {e.data for e in everything} == expected
    # Each consumer sees envelopes in buffer order, so ids rise within it.
    for batch in taken:
        ids = [e.id for e in batch]
        assert ids == sorted(ids)
    assert metrics.total(DROPPED) == 0
    assert slowest_put[0] < 1.0  # generous: a put never waits for a consumer
