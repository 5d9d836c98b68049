"""Entry point: forward Optimizely Agent notifications to GA4 and Amplitude.

    python main.py                 run the daemon until SIGTERM or SIGINT
    python main.py replay FILE     send a dead-letter file's events again

Exit status: 0 after a clean stop, 2 for a bad configuration or usage, 1
when the operator endpoint cannot listen, a replay left events undelivered
or a second signal cut the drain short.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from daemon import Daemon, secrets_of
from health import HealthServer
from logger_config import configure_logging
from replay import replay
from settings import ConfigError, load_settings

logger = logging.getLogger("main")


def main(argv: list[str]) -> int:
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"optimizely-agent-listener: {error}", file=sys.stderr)
        return 2

    if argv and (argv[0] != "replay" or len(argv) != 2):
        print("usage: python main.py [replay FILE]", file=sys.stderr)
        return 2

    mask = configure_logging(
        settings.log_level, settings.log_format, secrets_of(settings)
    )
    if argv:
        return replay(settings, argv[1], mask)

    daemon = Daemon(settings, mask)
    try:
        health = HealthServer(daemon) if settings.health_port else None
    except OSError as error:
        logger.error(
            "cannot serve the operator endpoint on %s:%d: %s (set HEALTH_PORT, "
            "or 0 to turn it off)",
            settings.health_host,
            settings.health_port,
            error.strerror or error,
        )
        return 1
    stop = threading.Event()
    _handle_signals(stop)

    daemon.start()
    if health:
        health.start()
    stop.wait()

    daemon.drain(settings.shutdown_timeout_seconds)
    logger.info("stopped: %s", daemon.summary())
    if health:
        health.stop()
    logging.shutdown()
    return 0


def _handle_signals(stop: threading.Event) -> None:
    """The first SIGTERM or SIGINT drains; a second one exits at once."""

    def on_signal(number: int, frame: object) -> None:
        if stop.is_set():
            logger.warning("second signal: exiting without finishing the drain")
            logging.shutdown()
            os._exit(1)
        logger.info("received %s", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
