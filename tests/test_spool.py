"""Tests for spool.py: the SQLite spool behind the buffer interface.

Each test opens a `SpoolBuffer` on a fresh directory under pytest's
`tmp_path`; a "restart" is a second `SpoolBuffer` on the same directory.
Disk failures are real where the kernel can produce them as root (a path
under a regular file, a directory where the database should be) and a
connection wrapper that raises SQLite's own error where it cannot (a full
disk).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

import spool
from event_buffer import Envelope
from metrics import Metrics
from spool import SPOOL_FILE, SpoolBuffer

DROPPED = "listener_buffer_dropped"
SPOOL_ERRORS = "listener_spool_errors"
MEMORY_ID_BASE = 1 << 62


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("test")


def numbered(count: int, start: int = 0, size: int = 0) -> list[tuple[bytes, int]]:
    """Frames `start`..`start+count-1`, padded to `size` bytes, times rising."""
    return [
        (f"frame-{i}".encode().ljust(size, b"."), 1_700_000_000_000_000_000 + i)
        for i in range(start, start + count)
    ]


def open_spool(
    directory: Path,
    metrics: Metrics,
    *,
    max_bytes: int = 1 << 30,
    policy: str = "drop_oldest",
    memory_capacity: int = 100_000,
) -> SpoolBuffer:
    return SpoolBuffer(
        str(directory), max_bytes, policy, metrics, memory_capacity=memory_capacity
    )


def take_all(buffer: SpoolBuffer, batch: int = 1000) -> list[Envelope]:
    taken: list[Envelope] = []
    while chunk := buffer.take(batch, 0):
        taken.extend(chunk)
    return taken


def rows_on_disk(directory: Path) -> list[tuple[int, int, bytes]]:
    """What another process would find in the spool file."""
    with sqlite3.connect(directory / SPOOL_FILE) as db:
        return [
            (row_id, received_ns, bytes(data))
            for row_id, received_ns, data in db.execute(
                "SELECT id, received_ns, data FROM notifications ORDER BY id"
            )
        ]


def as_tuples(envelopes: list[Envelope]) -> list[tuple[int, int, bytes]]:
    return [(e.id, e.received_ns, e.data) for e in envelopes]


# -- the buffer interface -----------------------------------------------------


def test_put_take_ack_in_fifo_order(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    frames = numbered(5)

    buffer.put_many(frames[:2])
    buffer.put_many(frames[2:])
    first = buffer.take(3, 0)
    rest = buffer.take(10, 0)

    assert [(e.data, e.received_ns) for e in first + rest] == frames
    ids = [e.id for e in first + rest]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert buffer.depth() == 0
    assert buffer.take(10, 0) == []

    buffer.ack(ids)
    buffer.shutdown()
    assert rows_on_disk(tmp_path) == []


def test_take_waits_for_a_put_from_another_thread(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    producer = threading.Timer(0.05, buffer.put_many, [numbered(1)])
    producer.start()

    taken = buffer.take(10, 5.0)

    producer.join()
    assert [e.data for e in taken] == [b"frame-0"]


def test_close_ends_takes_once_empty(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(2))
    buffer.close()

    assert not buffer.closed_and_empty
    assert len(buffer.take(10, 5.0)) == 2
    assert buffer.closed_and_empty
    assert buffer.take(10, 5.0) == []  # at once, not after the timeout


def test_a_thousand_frames_in_one_put(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    frames = numbered(1000, size=64)

    buffer.put_many(frames)

    assert buffer.depth() == 1000
    assert [(e.data, e.received_ns) for e in take_all(buffer, 256)] == frames
    assert len(rows_on_disk(tmp_path)) == 1000


# -- restarts -------------------------------------------------------------------


def test_restart_returns_exactly_the_unacknowledged_oldest_first(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(10))
    taken = take_all(buffer)
    acked = [e for i, e in enumerate(taken) if i % 3 == 0]
    unacked = [e for i, e in enumerate(taken) if i % 3 != 0]
    buffer.ack([e.id for e in acked])
    buffer.shutdown()

    again = open_spool(tmp_path, Metrics("test"))

    assert again.recovered == len(unacked)
    assert again.depth() == len(unacked)
    assert as_tuples(take_all(again)) == as_tuples(unacked)


def test_restart_after_a_crash_resends_and_loses_nothing(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(20))
    taken = take_all(buffer)
    buffer.ack([e.id for e in taken[:5]])
    # No shutdown(): the process died with acknowledgements still batched.

    again = open_spool(tmp_path, Metrics("test"))
    replayed = take_all(again)

    # Everything unacknowledged comes back, in order; acknowledged rows may
    # come back too (the destinations deduplicate), never anything else.
    assert as_tuples(taken[5:]) == as_tuples(replayed)[-15:]
    assert set(as_tuples(replayed)) <= set(as_tuples(taken))
    assert as_tuples(replayed) == sorted(as_tuples(replayed))


def test_acknowledged_rows_are_deleted_from_the_file(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(6))
    taken = take_all(buffer)
    buffer.ack([taken[0].id, taken[2].id, taken[4].id])
    buffer.shutdown()

    assert rows_on_disk(tmp_path) == as_tuples([taken[1], taken[3], taken[5]])
    assert open_spool(tmp_path, metrics).recovered == 3


def test_acknowledgements_are_applied_without_a_shutdown(
    tmp_path, metrics, monkeypatch
):
    monkeypatch.setattr(spool, "_ACK_MAX_DELAY_SECONDS", 0.0)
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(3))
    taken = take_all(buffer)

    buffer.ack([e.id for e in taken])

    assert rows_on_disk(tmp_path) == []


def test_new_ids_continue_after_a_restart(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(3))
    old = take_all(buffer)
    buffer.ack([e.id for e in old])
    buffer.shutdown()

    again = open_spool(tmp_path, metrics)
    again.put_many(numbered(1, start=3))

    assert again.take(10, 0)[0].id > max(e.id for e in old)


def test_concurrent_producer_and_consumers_settle_every_frame(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics)
    seen: list[bytes] = []
    seen_lock = threading.Lock()

    def consume() -> None:
        while True:
            envelopes = buffer.take(50, 0.1)
            if not envelopes and buffer.closed_and_empty:
                return
            with seen_lock:
                seen.extend(e.data for e in envelopes)
            buffer.ack([e.id for e in envelopes])

    consumers = [
        threading.Thread(target=consume, name=f"consumer-{i}") for i in range(3)
    ]
    for thread in consumers:
        thread.start()
    for start in range(0, 3000, 30):
        buffer.put_many(numbered(30, start=start))
    buffer.close()
    for thread in consumers:
        thread.join(10)

    assert not any(thread.is_alive() for thread in consumers)
    assert sorted(seen) == sorted(data for data, _ in numbered(3000))
    buffer.shutdown()
    assert rows_on_disk(tmp_path) == []


# -- the size bound ---------------------------------------------------------------

MAX_BYTES = 64 * 1024
FRAME_BYTES = 200
# The size is measured every so many frames, so the file may exceed the
# bound by up to that many frames before it is noticed.
SLACK_FRAMES = spool._SIZE_CHECK_EVERY


def fill(buffer: SpoolBuffer, count: int, batch: int = 50) -> None:
    for start in range(0, count, batch):
        buffer.put_many(numbered(batch, start=start, size=FRAME_BYTES))


def test_drop_oldest_keeps_the_newest_within_the_bound(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics, max_bytes=MAX_BYTES)

    fill(buffer, 5000)

    dropped = metrics.total(DROPPED, reason="spool_full_drop_oldest")
    assert dropped > 0
    assert metrics.total(DROPPED) == dropped
    assert buffer.depth() + dropped == 5000
    kept = take_all(buffer)
    assert buffer.depth() == 0
    assert len(kept) * FRAME_BYTES <= MAX_BYTES + SLACK_FRAMES * FRAME_BYTES
    assert kept[-1].data.startswith(b"frame-4999.")
    assert [e.data for e in kept] == [
        data for data, _ in numbered(5000, size=FRAME_BYTES)[-len(kept) :]
    ]


def test_drop_newest_keeps_the_oldest_within_the_bound(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics, max_bytes=MAX_BYTES, policy="drop_newest")

    fill(buffer, 5000)

    dropped = metrics.total(DROPPED, reason="spool_full_drop_newest")
    assert dropped > 0
    assert metrics.total(DROPPED) == dropped
    kept = take_all(buffer)
    assert len(kept) + dropped == 5000
    assert len(kept) * FRAME_BYTES <= MAX_BYTES + SLACK_FRAMES * FRAME_BYTES
    assert [e.data for e in kept] == [
        data for data, _ in numbered(len(kept), size=FRAME_BYTES)
    ]


def test_drop_newest_accepts_again_once_acknowledgements_free_room(
    tmp_path, metrics, monkeypatch
):
    monkeypatch.setattr(spool, "_ACK_MAX_DELAY_SECONDS", 0.0)
    buffer = open_spool(tmp_path, metrics, max_bytes=MAX_BYTES, policy="drop_newest")
    fill(buffer, 3000)
    dropped = metrics.total(DROPPED)
    assert dropped > 0
    buffer.put_many(numbered(1, start=8000))
    assert metrics.total(DROPPED) == dropped + 1  # still full

    buffer.ack([e.id for e in take_all(buffer)])
    buffer.put_many(numbered(10, start=9000))

    assert metrics.total(DROPPED) == dropped + 1
    assert [e.data for e in take_all(buffer)] == [
        data for data, _ in numbered(10, start=9000)
    ]


def test_drop_oldest_never_drops_what_a_worker_holds(tmp_path, metrics):
    buffer = open_spool(tmp_path, metrics, max_bytes=MAX_BYTES)
    fill(buffer, 900)
    held = take_all(buffer)  # in flight to the destinations

    fill(buffer, 5000)
    dropped = metrics.total(DROPPED)
    waiting = take_all(buffer)

    # Every frame is accounted for exactly once: held, waiting or dropped.
    assert len(held) + len(waiting) + dropped == 900 + 5000
    # Acknowledging what was held still works and empties the file of it.
    buffer.ack([e.id for e in held + waiting])
    buffer.shutdown()
    assert rows_on_disk(tmp_path) == []


# -- a corrupt file -----------------------------------------------------------------


def test_a_garbage_file_is_moved_aside_and_a_fresh_spool_started(
    tmp_path, metrics, caplog
):
    (tmp_path / SPOOL_FILE).write_bytes(b"this is not SQLite\n" * 500)

    with caplog.at_level(logging.ERROR, logger="spool"):
        buffer = open_spool(tmp_path, metrics)

    asides = list(tmp_path.glob(f"{SPOOL_FILE}.corrupt-*"))
    assert len(asides) == 1
    assert asides[0].read_bytes().startswith(b"this is not SQLite")
    assert metrics.total(SPOOL_ERRORS, reason="corrupt") == 1
    assert "unreadable" in caplog.text and "moved it to" in caplog.text
    assert buffer.recovered == 0
    buffer.put_many(numbered(2))
    assert [e.data for e in take_all(buffer)] == [b"frame-0", b"frame-1"]
    assert len(rows_on_disk(tmp_path)) == 2  # on disk, not in memory


def test_a_damaged_database_is_moved_aside(tmp_path, metrics, caplog):
    buffer = open_spool(tmp_path, metrics)
    fill(buffer, 500)
    buffer.shutdown()
    path = tmp_path / SPOOL_FILE
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    # Keep the header, wreck the pages behind it.
    data[4096:] = b"\xa5" * (len(data) - 4096)
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.ERROR, logger="spool"):
        again = open_spool(tmp_path, Metrics("test"))

    assert list(tmp_path.glob(f"{SPOOL_FILE}.corrupt-*"))
    assert "unreadable" in caplog.text
    again.put_many(numbered(1))
    assert [e.data for e in take_all(again)] == [b"frame-0"]


# -- a disk that refuses ----------------------------------------------------------


def assert_memory_fallback(buffer: SpoolBuffer, metrics: Metrics) -> None:
    buffer.put_many(numbered(3))
    buffer.put_many(numbered(2, start=3))
    taken = take_all(buffer)
    assert [e.data for e in taken] == [data for data, _ in numbered(5)]
    assert all(e.id >= MEMORY_ID_BASE for e in taken)
    buffer.ack([e.id for e in taken])  # harmless for memory envelopes
    buffer.shutdown()


def test_a_directory_that_cannot_be_created_falls_back_to_memory(
    tmp_path, metrics, caplog
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file")

    with caplog.at_level(logging.ERROR, logger="spool"):
        buffer = open_spool(blocker / "spool", metrics)
        assert_memory_fallback(buffer, metrics)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "keeping notifications in memory" in errors[0].getMessage()
    assert metrics.total(SPOOL_ERRORS) == 1
    assert buffer.recovered == 0


def test_a_directory_in_place_of_the_file_is_not_moved_aside(tmp_path, metrics, caplog):
    (tmp_path / SPOOL_FILE).mkdir()

    with caplog.at_level(logging.ERROR, logger="spool"):
        buffer = open_spool(tmp_path, metrics)
        assert_memory_fallback(buffer, metrics)

    # SQLite cannot open it, but nothing says it is corrupt: leave it be.
    assert (tmp_path / SPOOL_FILE).is_dir()
    assert not list(tmp_path.glob(f"{SPOOL_FILE}.corrupt-*"))
    assert metrics.total(SPOOL_ERRORS, reason="corrupt") == 0
    assert metrics.total(SPOOL_ERRORS) == 1
    assert "keeping notifications in memory" in caplog.text


class _FullDisk:
    """Wraps the spool's connection; writes fail while `full` is set."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.full = True

    def execute(self, sql: str, *args):
        if self.full and sql.startswith(("BEGIN", "INSERT")):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args):
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.executemany(sql, *args)

    def close(self) -> None:
        self._db.close()


def test_a_full_disk_sends_puts_to_memory_and_logs_once(
    tmp_path, metrics, caplog, monkeypatch
):
    buffer = open_spool(tmp_path, metrics)
    buffer.put_many(numbered(2))  # on disk before the disk fills
    disk = _FullDisk(buffer._db)
    monkeypatch.setattr(buffer, "_db", disk)

    with caplog.at_level(logging.ERROR, logger="spool"):
        for start in range(2, 10, 2):
            buffer.put_many(numbered(2, start=start))

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "database or disk is full" in errors[0].getMessage()
    assert metrics.total(SPOOL_ERRORS, reason="disk_full") == 1
    taken = take_all(buffer)
    # The frames already on disk come first, then the ones kept in memory.
    assert [e.data for e in taken] == [data for data, _ in numbered(10)]
    assert [e.id >= MEMORY_ID_BASE for e in taken] == [False] * 2 + [True] * 8
    buffer.ack([e.id for e in taken])


def test_the_disk_is_tried_again_after_a_while(tmp_path, metrics, caplog, monkeypatch):
    buffer = open_spool(tmp_path, metrics)
    disk = _FullDisk(buffer._db)
    monkeypatch.setattr(buffer, "_db", disk)
    buffer.put_many(numbered(1))
    assert metrics.total(SPOOL_ERRORS) == 1

    disk.full = False
    monkeypatch.setattr(spool, "_RETRY_DISK_AFTER_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="spool"):
        buffer.put_many(numbered(1, start=1))

    assert "trying the spool on disk again" in caplog.text
    # What memory held moved to disk ahead of the new frame: order kept.
    assert [data for _, _, data in rows_on_disk(tmp_path)] == [b"frame-0", b"frame-1"]
    taken = take_all(buffer)
    assert [e.data for e in taken] == [b"frame-0", b"frame-1"]
    assert all(e.id < MEMORY_ID_BASE for e in taken)


def test_memory_fallback_is_bounded_and_counts_drops(tmp_path, metrics):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    buffer = open_spool(blocker / "spool", metrics, memory_capacity=5)

    buffer.put_many(numbered(8))

    assert buffer.depth() == 5
    assert metrics.total(DROPPED, reason="overflow_drop_oldest") == 3
    assert [e.data for e in take_all(buffer)] == [data for data, _ in numbered(8)[3:]]
