"""A disk-backed buffer: notifications survive crashes, restarts and outages.

It has the same interface as the in-memory buffer. A frame is written to
an SQLite database (WAL mode) before the listener reads more from the
Agent, and is deleted only when every destination has acknowledged or
dead-lettered it, so a restart resends exactly the unacknowledged work,
oldest first. Writes and deletes are batched: a burst of frames is one
transaction, and acknowledgements are gathered and applied together.

The spool never takes the daemon down. A database that cannot be opened
or read is moved aside and a fresh one started; when the disk is full or
the directory unwritable, frames go to memory instead, with an error log
and a counter, until the disk accepts writes again.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path

from event_buffer import DropReporter, Envelope
from metrics import Metrics

logger = logging.getLogger(__name__)

SPOOL_FILE = "spool.sqlite3"
_ACK_BATCH = 512
_DELETE_CHUNK = 500  # ids per DELETE, within SQLite's bound on parameters
_ACK_MAX_DELAY_SECONDS = 0.2
_SIZE_CHECK_EVERY = 1000
# Envelopes kept in memory while the disk refuses writes get ids far above
# any SQLite rowid, so an acknowledgement can tell the two apart.
_MEMORY_ID_BASE = 1 << 62
_RETRY_DISK_AFTER_SECONDS = 30.0


class SpoolBuffer:
    """The EventBuffer interface over an SQLite file in `directory`."""

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        overflow_policy: str,
        metrics: Metrics,
        *,
        memory_capacity: int = 100_000,
    ) -> None:
        self.capacity = memory_capacity
        self._directory = Path(directory)
        self._max_bytes = max_bytes
        self._drop_oldest = overflow_policy == "drop_oldest"
        self._metrics = metrics
        self._drops = DropReporter(metrics, "spool")
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self._cursor = 0  # highest rowid handed to a worker
        self._waiting = 0  # rows not yet handed out
        self._acks: list[int] = []
        self._last_ack_flush = time.monotonic()
        self._puts_since_size_check = 0
        self._over_limit = False
        self._memory: deque[Envelope] = deque()
        self._next_memory_id = _MEMORY_ID_BASE
        self._disk_failed_at: float | None = None
        self._db: sqlite3.Connection | None = None
        # Workers read through their own connection, so a SELECT never holds
        # the lock the listener needs to write (WAL lets both run at once).
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self.recovered = 0
        self._open()

    # -- opening and recovery ---------------------------------------------------

    def _open(self) -> None:
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
        except (sqlite3.DatabaseError, OSError) as error:
            if _is_corrupt(error) and self._path.exists():
                self._move_aside(error)
                try:
                    self._db = self._connect()
                except (sqlite3.DatabaseError, OSError) as again:
                    self._disk_failure("open", again)
            else:
                self._disk_failure("open", error)
        if self._db is not None:
            try:
                self._reader = sqlite3.connect(
                    self._path, check_same_thread=False, isolation_level=None
                )
                self._reader.execute("PRAGMA query_only=1")
            except sqlite3.DatabaseError as error:
                self._disk_failure("open", error)
                self._db.close()
                self._db = self._reader = None
                return
            self.recovered = self._waiting
            if self.recovered:
                logger.info(
                    "spool holds %d unacknowledged notifications; sending them first",
                    self.recovered,
                    extra={"count": self.recovered},
                )

    @property
    def _path(self) -> Path:
        return self._directory / SPOOL_FILE

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL survives a crash of this process (kill -9,
            # out-of-memory); only a power loss can take the last commits.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS notifications ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " received_ns INTEGER NOT NULL,"
                " data BLOB NOT NULL)"
            )
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            self._waiting = db.execute("SELECT COUNT(*) FROM notifications").fetchone()[
                0
            ]
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _move_aside(self, error: Exception) -> None:
        aside = self._path.with_name(f"{SPOOL_FILE}.corrupt-{time.time_ns()}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self._path) + suffix)
            if source.exists():
                source.rename(str(aside) + suffix)
        self._metrics.spool_errors.labels("corrupt").inc()
        logger.error(
            "spool %s is unreadable (%s); moved it to %s and started a fresh one",
            self._path,
            error,
            aside,
        )

    # -- the EventBuffer interface ---------------------------------------------

    def put_many(self, frames: list[tuple[bytes, int]]) -> None:
        if not frames:
            return
        with self._ready:
            if self._use_disk():
                # What memory kept while the disk failed is older: it goes
                # first, so the order holds, and it becomes durable too.
                backlog = [(e.data, e.received_ns) for e in self._memory]
                try:
                    self._insert(backlog + frames)
                    self._memory.clear()
                    self._ready.notify(len(frames))
                    return
                except (sqlite3.DatabaseError, OSError) as error:
                    self._disk_failure("write", error)
            self._put_memory(frames)
            self._ready.notify(len(frames))

    def take(self, max_items: int, timeout_seconds: float) -> list[Envelope]:
        # One taker at a time, so rows are handed out in order exactly once.
        with self._read_lock:
            with self._ready:
                self._flush_acks(force=False)
                if not self._waiting and not self._memory and not self._closed:
                    self._ready.wait(timeout_seconds)
                cursor = self._cursor
                from_disk = bool(self._waiting) and self._reader is not None
            rows = []
            if from_disk:
                assert self._reader is not None
                try:
                    rows = self._reader.execute(
                        "SELECT id, received_ns, data FROM notifications"
                        " WHERE id > ? ORDER BY id LIMIT ?",
                        (cursor, max_items),
                    ).fetchall()
                except sqlite3.DatabaseError as error:
                    with self._ready:
                        self._disk_failure("read", error)
            with self._ready:
                taken = [Envelope(i, ns, bytes(data)) for i, ns, data in rows]
                if rows:
                    self._cursor = rows[-1][0]
                    self._waiting = max(0, self._waiting - len(rows))
                elif from_disk:
                    self._waiting = 0
                while self._memory and len(taken) < max_items:
                    taken.append(self._memory.popleft())
                return taken

    def ack(self, envelope_ids: list[int]) -> None:
        with self._lock:
            self._acks.extend(i for i in envelope_ids if i < _MEMORY_ID_BASE)
            self._flush_acks(force=False)

    def report_drops(self) -> None:
        self._drops.report_now()

    def depth(self) -> int:
        return self._waiting + len(self._memory)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def shutdown(self) -> None:
        """Apply pending acknowledgements and close the database."""
        with self._read_lock, self._lock:
            self._flush_acks(force=True)
            for connection in (self._reader, self._db):
                if connection is not None:
                    connection.close()
            self._db = self._reader = None

    @property
    def closed_and_empty(self) -> bool:
        return self._closed and not self._waiting and not self._memory

    # -- internals (called with the lock held) ---------------------------------

    def _insert(self, frames: list[tuple[bytes, int]]) -> None:
        assert self._db is not None
        self._puts_since_size_check += len(frames)
        # Measuring costs three queries, so it is done every so many frames;
        # once over the bound, on every put until acknowledgements free room.
        if self._over_limit or self._puts_since_size_check >= _SIZE_CHECK_EVERY:
            self._puts_since_size_check = 0
            self._enforce_size()
            self._over_limit = self._over_size()
            if self._over_limit and not self._drop_oldest:
                self._drops.dropped("spool_full_drop_newest", len(frames))
                return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT INTO notifications (received_ns, data) VALUES (?, ?)",
                [(received_ns, data) for data, received_ns in frames],
            )
            self._db.execute("COMMIT")
        except BaseException:
            # A failed ROLLBACK must not hide the error that says why.
            with contextlib.suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")
            raise
        self._waiting += len(frames)

    def _over_size(self) -> bool:
        assert self._db is not None
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * page_size > self._max_bytes

    def _enforce_size(self) -> None:
        if not self._drop_oldest:
            return
        assert self._db is not None
        dropped = 0
        while self._over_size():
            # Rows already handed out are on their way to the destinations:
            # deleting them would count as dropped what is then delivered.
            cursor = self._db.execute(
                "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications"
                " WHERE id > ? ORDER BY id LIMIT 1000)",
                (self._cursor,),
            )
            if not cursor.rowcount:
                break
            dropped += cursor.rowcount
        if dropped:
            self._waiting = self._db.execute(
                "SELECT COUNT(*) FROM notifications WHERE id > ?", (self._cursor,)
            ).fetchone()[0]
            self._drops.dropped("spool_full_drop_oldest", dropped)

    def _flush_acks(self, *, force: bool) -> None:
        if not self._acks or self._db is None:
            return
        due = time.monotonic() - self._last_ack_flush >= _ACK_MAX_DELAY_SECONDS
        if not force and not due and len(self._acks) < _ACK_BATCH:
            return
        acks, self._acks = self._acks, []
        self._last_ack_flush = time.monotonic()
        try:
            self._db.execute("BEGIN")
            for start in range(0, len(acks), _DELETE_CHUNK):
                chunk = acks[start : start + _DELETE_CHUNK]
                self._db.execute(
                    "DELETE FROM notifications WHERE id IN"
                    f" ({','.join('?' * len(chunk))})",
                    chunk,
                )
            self._db.execute("COMMIT")
        except (sqlite3.DatabaseError, OSError) as error:
            with contextlib.suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")
            # Unacknowledged rows are only resent after a restart: harmless.
            self._disk_failure("ack", error)

    def _put_memory(self, frames: list[tuple[bytes, int]]) -> None:
        for data, received_ns in frames:
            if len(self._memory) >= self.capacity:
                if not self._drop_oldest:
                    self._drops.dropped("overflow_drop_newest")
                    continue
                self._memory.popleft()
                self._drops.dropped("overflow_drop_oldest")
            self._memory.append(Envelope(self._next_memory_id, received_ns, data))
            self._next_memory_id += 1

    def _use_disk(self) -> bool:
        if self._db is None:
            return False
        if self._disk_failed_at is None:
            return True
        if time.monotonic() - self._disk_failed_at < _RETRY_DISK_AFTER_SECONDS:
            return False
        self._disk_failed_at = None
        logger.info("trying the spool on disk again")
        return True

    def _disk_failure(self, action: str, error: BaseException) -> None:
        reason = _reason(error)
        self._metrics.spool_errors.labels(reason).inc()
        if self._disk_failed_at is None:
            logger.error(
                "spool %s failed in %s (%s); keeping notifications in memory until "
                "the disk accepts writes again",
                action,
                self._directory,
                error,
                extra={"reason": reason},
            )
        self._disk_failed_at = time.monotonic()


def _is_corrupt(error: BaseException) -> bool:
    # OperationalError is the disk or the environment (locked, full, cannot
    # open, read-only): the file may be fine, so it must not be moved aside.
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(
        error, sqlite3.OperationalError
    )


def _reason(error: BaseException) -> str:
    text = str(error).lower()
    if "full" in text or getattr(error, "errno", None) == 28:
        return "disk_full"
    if "readonly" in text or "permission" in text or isinstance(error, PermissionError):
        return "unwritable"
    if isinstance(error, sqlite3.DatabaseError) and "malformed" in text:
        return "corrupt"
    return "io_error"
