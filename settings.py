"""The daemon's configuration: read once from the environment, validated whole.

Every setting is an environment variable; a `.env` file in the working
directory is loaded first when present, and the real environment wins over
it. `load_settings` returns one frozen `Settings` object or raises
`ConfigError` listing every problem at once, so an operator fixes a broken
deployment in one pass instead of one restart per mistake.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

VERSION = "0.1.0"

DEFAULT_AGENT_BASE_URL = "http://localhost:8080"
DEFAULT_GA_COLLECT_URL = "https://www.google-analytics.com/mp/collect"
DEFAULT_AMPLITUDE_TRACKING_URL = "https://api2.amplitude.com/2/httpapi"
DEFAULT_EXPOSURE_EVENT_TYPE = "[Optimizely] Exposure"

NOTIFICATION_TYPES = ("decision", "track", "project_config_update")
EXPOSURE_MODES = ("dispatched", "all", "none")
OVERFLOW_POLICIES = ("drop_oldest", "drop_newest")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Amplitude's HTTP V2 API refuses more than 2000 events in one request.
AMPLITUDE_MAX_BATCH_SIZE = 2000

# The Agent's default client.sdkKeyRegex.
_SDK_KEY_FORM = re.compile(r"[a-zA-Z0-9+/=_]+(:[a-zA-Z0-9+/=_]+)?")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """The environment does not describe a runnable daemon.

    `problems` holds one line per bad or missing variable. No line ever
    contains the value of a secret.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(
            f"invalid configuration ({len(problems)} problems):\n{listing}"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon needs to know about its deployment."""

    # The Agent and its stream.
    sdk_key: str
    agent_base_url: str = DEFAULT_AGENT_BASE_URL
    notification_filter: tuple[str, ...] = ()
    stream_connect_timeout_seconds: float = 10.0
    reconnect_max_seconds: float = 30.0

    # Google Analytics 4.
    ga_measurement_id: str = ""
    ga_api_secret: str = ""
    ga_debug_mode: bool = False
    ga_collect_url: str = DEFAULT_GA_COLLECT_URL
    ga_client_id_attribute: str = "ga_client_id"
    ga_send_user_id: bool = True
    ga_currency: str = "USD"
    ga_concurrency: int = 64
    ga_grouping_window_seconds: float = 0.05

    # Amplitude.
    amplitude_api_key: str = ""
    amplitude_tracking_url: str = DEFAULT_AMPLITUDE_TRACKING_URL
    amplitude_exposure_event_type: str = DEFAULT_EXPOSURE_EVENT_TYPE
    amplitude_batch_size: int = 100
    amplitude_flush_interval_seconds: float = 1.0
    amplitude_concurrency: int = 4
    amplitude_throttle_seconds: float = 30.0

    # Which decisions are exposures.
    exposure_mode: str = "dispatched"

    # Buffering, workers and delivery.
    buffer_capacity: int = 100_000
    buffer_overflow_policy: str = "drop_oldest"
    worker_threads: int = 2
    destination_queue_capacity: int = 100_000
    retry_horizon_seconds: float = 600.0
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 60.0
    http_connect_timeout_seconds: float = 5.0
    http_read_timeout_seconds: float = 30.0
    dead_letter_path: str = "dead-letter.jsonl"
    spool_path: str = ""
    spool_max_bytes: int = 1 << 30

    # Process and operations.
    dry_run: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    shutdown_timeout_seconds: float = 20.0
    health_host: str = "127.0.0.1"
    health_port: int = 8090
    wedged_after_seconds: float = 300.0
    summary_interval_seconds: float = 60.0

    @property
    def ga_enabled(self) -> bool:
        return bool(self.ga_measurement_id and self.ga_api_secret)

    @property
    def amplitude_enabled(self) -> bool:
        return bool(self.amplitude_api_key)

    @property
    def destinations(self) -> tuple[str, ...]:
        """The destinations events go to; in a dry run both are shown."""
        if self.dry_run:
            return ("ga4", "amplitude")
        enabled = []
        if self.ga_enabled:
            enabled.append("ga4")
        if self.amplitude_enabled:
            enabled.append("amplitude")
        return tuple(enabled)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log, a metric or a file."""
        return tuple(
            value
            for value in (self.sdk_key, self.ga_api_secret, self.amplitude_api_key)
            if value
        )

    def __repr__(self) -> str:
        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _SECRET_FIELDS and value:
                value = "***"
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"


_SECRET_FIELDS = {"sdk_key", "ga_api_secret", "amplitude_api_key"}


class _Reader:
    """Reads typed values from an environment mapping, collecting problems."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def text(self, name: str, default: str = "") -> str:
        return self.environ.get(name, default).strip()

    def choice(
        self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False
    ) -> str:
        value = self.text(name, default) or default
        if upper:
            value = value.upper()
        if value not in allowed:
            self.problems.append(
                f"{name}={value!r} is not allowed; use one of: {', '.join(allowed)}"
            )
            return default
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.environ.get(name)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        self.problems.append(f"{name}={raw!r} is not a boolean; use true or false")
        return default

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float,
        maximum: float | None = None,
        integer: bool = False,
    ) -> Any:
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        parse: Callable[[str], float] = int if integer else float
        try:
            value = parse(raw)
            # float() accepts "nan" and "inf", which no setting can use.
            if not integer and not math.isfinite(value):
                raise ValueError(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            self.problems.append(f"{name}={raw!r} is not {kind}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum:g}" if maximum is not None else ""
            self.problems.append(f"{name}={raw} must be at least {minimum:g}{upper}")
            return default
        return value

    def url(self, name: str, default: str) -> str:
        value = self.text(name, default) or default
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problems.append(f"{name} must be an http(s) URL with a host")
        return value.rstrip("/")


def load_settings(
    environ: Mapping[str, str] | None = None, *, env_file: str | None = ".env"
) -> Settings:
    """Read and validate the configuration; raise ConfigError on any problem.

    With `environ` omitted, the process environment is used after loading
    `env_file` into it (existing variables are never overridden).
    """
    if environ is None:
        if env_file and Path(env_file).is_file():
            from dotenv import load_dotenv

            load_dotenv(env_file, override=False)
        environ = os.environ

    read = _Reader(environ)
    problems = read.problems

    sdk_key = read.text("OPTIMIZELY_SDK_KEY")
    if not sdk_key:
        problems.append(
            "OPTIMIZELY_SDK_KEY is required: the SDK key of the Agent's project"
        )
    elif not _SDK_KEY_FORM.fullmatch(sdk_key):
        problems.append(
            "OPTIMIZELY_SDK_KEY may hold only letters, digits, +, /, = and _ "
            "(optionally ':' and a datafile token); the Agent rejects other keys, "
            "hyphens included ('sdkKey failed validation')"
        )

    notification_filter: tuple[str, ...] = ()
    raw_filter = read.text("NOTIFICATION_FILTER")
    if raw_filter:
        wanted = [part.strip() for part in raw_filter.split(",") if part.strip()]
        unknown = [part for part in wanted if part not in NOTIFICATION_TYPES]
        if unknown or not wanted:
            named = ", ".join(map(repr, unknown))
            problems.append(
                f"NOTIFICATION_FILTER has {named or 'no value'}; "
                f"use a comma-separated list of: {', '.join(NOTIFICATION_TYPES)} "
                "(the Agent streams nothing when no value is valid)"
            )
        notification_filter = tuple(
            dict.fromkeys(p for p in wanted if p in NOTIFICATION_TYPES)
        )

    ga_measurement_id = read.text("GA_MEASUREMENT_ID")
    ga_api_secret = read.text("GA_API_SECRET")
    if bool(ga_measurement_id) != bool(ga_api_secret):
        missing = "GA_API_SECRET" if ga_measurement_id else "GA_MEASUREMENT_ID"
        problems.append(
            f"{missing} is missing: GA4 needs both GA_MEASUREMENT_ID and GA_API_SECRET"
        )
    amplitude_api_key = read.text("AMPLITUDE_API_KEY")

    dry_run = read.flag("DRY_RUN", False)
    if not dry_run and not (ga_measurement_id or ga_api_secret or amplitude_api_key):
        problems.append(
            "no destination is configured: set GA_MEASUREMENT_ID and GA_API_SECRET "
            "for GA4 and/or AMPLITUDE_API_KEY for Amplitude, or set DRY_RUN=true "
            "to print the payloads instead of sending them"
        )

    ga_currency = read.text("GA_CURRENCY", "USD") or "USD"
    if len(ga_currency) != 3 or not ga_currency.isalpha():
        problems.append(
            f"GA_CURRENCY={ga_currency!r} must be a three-letter ISO 4217 code"
        )

    exposure_event_type = (
        read.text("AMPLITUDE_EXPOSURE_EVENT_TYPE", DEFAULT_EXPOSURE_EVENT_TYPE)
        or DEFAULT_EXPOSURE_EVENT_TYPE
    )
    if len(exposure_event_type) > 1024:
        problems.append("AMPLITUDE_EXPOSURE_EVENT_TYPE must be at most 1024 characters")

    settings = Settings(
        sdk_key=sdk_key,
        agent_base_url=read.url("OPTIMIZELY_AGENT_BASE_URL", DEFAULT_AGENT_BASE_URL),
        notification_filter=notification_filter,
        stream_connect_timeout_seconds=read.number(
            "STREAM_CONNECT_TIMEOUT_SECONDS", 10.0, minimum=0.1
        ),
        reconnect_max_seconds=read.number("RECONNECT_MAX_SECONDS", 30.0, minimum=0.1),
        ga_measurement_id=ga_measurement_id,
        ga_api_secret=ga_api_secret,
        ga_debug_mode=read.flag("GA_DEBUG_MODE", False),
        ga_collect_url=read.url("GA_COLLECT_URL", DEFAULT_GA_COLLECT_URL),
        ga_client_id_attribute=read.text("GA_CLIENT_ID_ATTRIBUTE", "ga_client_id"),
        ga_send_user_id=read.flag("GA_SEND_USER_ID", True),
        ga_currency=ga_currency.upper(),
        ga_concurrency=read.number(
            "GA_CONCURRENCY", 64, minimum=1, maximum=512, integer=True
        ),
        ga_grouping_window_seconds=read.number(
            "GA_GROUPING_WINDOW_MS", 50, minimum=0, maximum=10_000, integer=True
        )
        / 1000,
        amplitude_api_key=amplitude_api_key,
        amplitude_tracking_url=read.url(
            "AMPLITUDE_TRACKING_URL", DEFAULT_AMPLITUDE_TRACKING_URL
        ),
        amplitude_exposure_event_type=exposure_event_type,
        amplitude_batch_size=read.number(
            "AMPLITUDE_BATCH_SIZE",
            100,
            minimum=1,
            maximum=AMPLITUDE_MAX_BATCH_SIZE,
            integer=True,
        ),
        amplitude_flush_interval_seconds=read.number(
            "AMPLITUDE_FLUSH_INTERVAL_SECONDS", 1.0, minimum=0.0, maximum=60.0
        ),
        amplitude_concurrency=read.number(
            "AMPLITUDE_CONCURRENCY", 4, minimum=1, maximum=64, integer=True
        ),
        amplitude_throttle_seconds=read.number(
            "AMPLITUDE_THROTTLE_SECONDS", 30.0, minimum=0.0, maximum=3600.0
        ),
        exposure_mode=read.choice("EXPOSURE_MODE", "dispatched", EXPOSURE_MODES),
        buffer_capacity=read.number(
            "BUFFER_CAPACITY", 100_000, minimum=1, integer=True
        ),
        buffer_overflow_policy=read.choice(
            "BUFFER_OVERFLOW_POLICY", "drop_oldest", OVERFLOW_POLICIES
        ),
        worker_threads=read.number(
            "WORKER_THREADS", 2, minimum=1, maximum=64, integer=True
        ),
        destination_queue_capacity=read.number(
            "DESTINATION_QUEUE_CAPACITY", 100_000, minimum=1, integer=True
        ),
        retry_horizon_seconds=read.number("RETRY_HORIZON_SECONDS", 600.0, minimum=0.0),
        retry_initial_seconds=read.number("RETRY_INITIAL_SECONDS", 0.5, minimum=0.001),
        retry_max_seconds=read.number("RETRY_MAX_SECONDS", 60.0, minimum=0.001),
        http_connect_timeout_seconds=read.number(
            "HTTP_CONNECT_TIMEOUT_SECONDS", 5.0, minimum=0.1
        ),
        http_read_timeout_seconds=read.number(
            "HTTP_READ_TIMEOUT_SECONDS", 30.0, minimum=0.1
        ),
        dead_letter_path=read.text("DEAD_LETTER_PATH", "dead-letter.jsonl")
        or "dead-letter.jsonl",
        spool_path=read.text("SPOOL_PATH"),
        spool_max_bytes=read.number(
            "SPOOL_MAX_BYTES", 1 << 30, minimum=1 << 20, integer=True
        ),
        dry_run=dry_run,
        log_level=read.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=read.choice("LOG_FORMAT", "text", LOG_FORMATS),
        shutdown_timeout_seconds=read.number(
            "SHUTDOWN_TIMEOUT_SECONDS", 20.0, minimum=0.0
        ),
        health_host=read.text("HEALTH_HOST", "127.0.0.1") or "127.0.0.1",
        health_port=read.number(
            "HEALTH_PORT", 8090, minimum=0, maximum=65535, integer=True
        ),
        wedged_after_seconds=read.number("WEDGED_AFTER_SECONDS", 300.0, minimum=1.0),
        summary_interval_seconds=read.number(
            "SUMMARY_INTERVAL_SECONDS", 60.0, minimum=0.0
        ),
    )
    if settings.retry_max_seconds < settings.retry_initial_seconds:
        problems.append("RETRY_MAX_SECONDS must not be below RETRY_INITIAL_SECONDS")
    if problems:
        raise ConfigError(problems)
    return settings
