"""The dead-letter file: events given up on, one JSON object per line.

Each line names the destination, the ordering key, the event exactly as it
would have been sent, the reason, the last HTTP status and the time, so
`python main.py replay FILE` can send it again later. A failure to write is
logged and counted but never stops delivery.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    destination: str
    key: str
    event: dict[str, Any]
    reason: str
    status: int | None
    received_ns: int


class DeadLetterFile:
    """Appends dead letters; safe to call from any thread."""

    def __init__(self, path: str, metrics: Metrics, mask: Callable[[str], str]) -> None:
        self.path = path
        self._metrics = metrics
        self._mask = mask
        self._lock = threading.Lock()
        self.written = 0

    def write(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        for letter in letters:
            self._metrics.dead_lettered.labels(letter.destination, letter.reason).inc()
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = "".join(
            self._mask(
                json.dumps(
                    {
                        "time": now,
                        "destination": letter.destination,
                        "reason": letter.reason,
                        "status": letter.status,
                        "key": letter.key,
                        "received_ns": letter.received_ns,
                        "event": letter.event,
                    },
                    ensure_ascii=False,
                    default=str,
                )
            )
            + "\n"
            for letter in letters
        )
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as file:
                file.write(lines)
                self.written += len(letters)
        except OSError as error:
            self._metrics.dead_letter_write_errors.inc()
            logger.error(
                "cannot write %d dead letters to %s: %s",
                len(letters),
                self.path,
                error.strerror or type(error).__name__,
                extra={"count": len(letters)},
            )


def read_dead_letters(path: str) -> Iterator[DeadLetter]:
    """Yield the letters of a dead-letter file, skipping unreadable lines."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                yield DeadLetter(
                    destination=entry["destination"],
                    key=str(entry["key"]),
                    event=entry["event"],
                    reason=entry.get("reason", ""),
                    status=entry.get("status"),
                    received_ns=int(entry.get("received_ns", 0)),
                )
            except (ValueError, KeyError, TypeError):
                logger.warning("skipping unreadable line %d of %s", number, path)
