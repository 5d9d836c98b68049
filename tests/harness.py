"""Runs the real daemon as a subprocess against loopback stand-ins.

`DaemonProcess` starts `python main.py` with a controlled environment,
captures stdout and stderr to files (so a chatty daemon never blocks on a
full pipe), and offers waits with deadlines on what it printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SDK_KEY = "test_sdk_key"
GA_SECRET = "ga_secret_Zq81"
GA_ID = "G-TEST123"
AMPLITUDE_KEY = "amp_key_Xy42"
SECRETS = (SDK_KEY, GA_SECRET, AMPLITUDE_KEY)


def wait_until(
    condition: Callable[[], Any], timeout: float, interval: float = 0.02
) -> Any:
    """Poll `condition` until it returns something truthy or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaemonProcess:
    """The daemon under test; use as a context manager."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str) -> None:
        self.tmp_path = tmp_path
        self.stdout_path = tmp_path / f"stdout-{time.monotonic_ns()}.txt"
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HEALTH_PORT": "0",
            "SUMMARY_INTERVAL_SECONDS": "0",
            "DEAD_LETTER_PATH": str(tmp_path / "dead-letter.jsonl"),
            "SHUTDOWN_TIMEOUT_SECONDS": "10",
            "RECONNECT_MAX_SECONDS": "0.5",
            "RETRY_INITIAL_SECONDS": "0.05",
            "RETRY_MAX_SECONDS": "0.3",
            "AMPLITUDE_FLUSH_INTERVAL_SECONDS": "0.1",
            "GA_GROUPING_WINDOW_MS": "20",
            "GA_CONCURRENCY": "4",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> DaemonProcess:
        self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), *self.args],
            cwd=self.tmp_path,
            env=self.env,
            stdout=self._stdout,
            stderr=self._stderr,
        )
        return self

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        for file in (self._stdout, self._stderr):
            if not file.closed:
                file.close()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.returncode = self.process.wait(timeout)
        self._close_files()
        return self.returncode

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.returncode = self.process.wait(timeout)
        self._close_files()
        return self.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self._close_files()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def wait_for_stderr(self, text: str, timeout: float = 10.0) -> bool:
        return bool(wait_until(lambda: text in self.stderr, timeout))

    def dead_letter_text(self) -> str:
        path = Path(self.env["DEAD_LETTER_PATH"])
        return path.read_text() if path.exists() else ""

    def dead_letters(self) -> list[dict[str, Any]]:
        path = Path(self.env["DEAD_LETTER_PATH"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def destination_env(ga, amplitude) -> dict[str, str]:
    """Environment pointing the daemon at the GA4 and Amplitude stand-ins."""
    env = {}
    if ga is not None:
        env.update(
            GA_MEASUREMENT_ID=GA_ID,
            GA_API_SECRET=GA_SECRET,
            GA_COLLECT_URL=ga.url + "/mp/collect",
        )
    if amplitude is not None:
        env.update(
            AMPLITUDE_API_KEY=AMPLITUDE_KEY,
            AMPLITUDE_TRACKING_URL=amplitude.url + "/2/httpapi",
        )
    return env


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret {secret[:3]}… leaked"


def flag_notification(
    user: str, flag: str, variation: str, rule: str = "rule_ab"
) -> dict:
    """A `flag` decision exactly as the Agent serializes it."""
    return {
        "Type": "flag",
        "UserContext": {"ID": user, "Attributes": {}, "QualifiedSegments": None},
        "DecisionInfo": {
            "decisionEventDispatched": True,
            "enabled": True,
            "experimentId": "1001",
            "flagKey": flag,
            "reasons": [],
            "ruleKey": rule,
            "variables": {},
            "variationId": "2001",
            "variationKey": variation,
        },
    }


def track_notification(user: str, event: str, revenue: int | None = None) -> dict:
    tags = {"revenue": revenue} if revenue is not None else None
    conversion: dict[str, Any] = {
        "entity_id": "3001",
        "key": event,
        "Attributes": [
            {
                "value": False,
                "key": "$opt_bot_filtering",
                "type": "custom",
                "entity_id": "$opt_bot_filtering",
            }
        ],
    }
    if tags:
        conversion.update(tags=tags, revenue=revenue)
    return {
        "EventKey": event,
        "UserContext": {"ID": user, "Attributes": None, "QualifiedSegments": None},
        "EventTags": tags,
        "ConversionEvent": conversion,
    }
