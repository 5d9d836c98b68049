"""`python main.py replay FILE`: send a dead-letter file's events again.

The events go through the same dispatchers, batching and retries as live
traffic. Whatever still fails is written to a new dead-letter file beside
the old one, so a replay can itself be replayed.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace

from daemon import (
    build_destinations,
    build_dispatchers,
    dry_run_poster,
    effective_settings,
)
from dead_letter import DeadLetterFile, read_dead_letters
from delivery import CompletionTracker, Outbound, http_poster
from destination import Mapped
from logger_config import SecretMasker
from metrics import Metrics
from settings import VERSION, Settings

logger = logging.getLogger(__name__)


def replay(settings: Settings, path: str, mask: SecretMasker) -> int:
    """Re-send every replayable letter in `path`; 0 if all were delivered."""
    failed_path = f"{path}.replay-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    settings = replace(effective_settings(settings), dead_letter_path=failed_path)
    metrics = Metrics(VERSION)
    failures = DeadLetterFile(failed_path, metrics, mask)
    tracker = CompletionTracker(lambda ids: None)
    if settings.dry_run:
        poster = dry_run_poster(sys.stdout, mask)
    else:
        poster = http_poster(settings)
    destinations = build_destinations(settings)
    dispatchers = {
        d.name: d
        for d in build_dispatchers(
            settings, destinations, metrics, failures, tracker, poster
        )
    }

    by_destination: dict[str, list[Outbound]] = {}
    unusable = []
    for number, letter in enumerate(read_dead_letters(path), 1):
        if letter.destination not in dispatchers or not letter.key:
            unusable.append(letter)
            continue
        mapped = Mapped.of(letter.key, letter.event)
        by_destination.setdefault(letter.destination, []).append(
            Outbound(mapped, number, letter.received_ns)
        )
    if unusable:
        failures.write(unusable)
        logger.warning(
            "%d letters cannot be replayed (destination not configured, or the "
            "event was never made); copied to %s",
            len(unusable),
            failed_path,
        )

    for dispatcher in dispatchers.values():
        dispatcher.start()
        dispatcher.flush()
    for name, outbounds in by_destination.items():
        dispatchers[name].submit(outbounds)
    for dispatcher in dispatchers.values():
        dispatcher.wait_idle(settings.retry_horizon_seconds + 30)
        dispatcher.abort()

    sent = int(metrics.total("listener_events_delivered"))
    failed = failures.written
    logger.info("replayed %s: %d delivered, %d still failing", path, sent, failed)
    if failed:
        logger.warning("undelivered events written to %s", failed_path)
    return 1 if failed else 0
