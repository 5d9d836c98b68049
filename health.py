"""The operator endpoint: liveness, readiness and Prometheus metrics.

    GET /healthz   200 while every thread is alive and none is stuck
    GET /readyz    200 while the stream request to the Agent is open
    GET /metrics   Prometheus text exposition

"Open" means the TCP connection to the Agent is up, the request was sent
and the Agent has not refused it. The Agent sends its status line only
with the first notification, so a quiet but healthy stream is ready
before any byte has arrived; a refusal or a dropped connection is not.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metrics import Metrics
from settings import Settings

logger = logging.getLogger(__name__)


class Observed(Protocol):
    settings: Settings
    metrics: Metrics

    def liveness(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, dict[str, str]]: ...


class HealthServer:
    """Serves the endpoint from its own thread; `port` is known after start."""

    def __init__(self, daemon: Observed) -> None:
        self._daemon = daemon
        handler = _handler_for(daemon)
        self._server = ThreadingHTTPServer(
            (daemon.settings.health_host, daemon.settings.health_port), handler
        )
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-server", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        logger.info(
            "operator endpoint on %s:%d (/healthz, /readyz, /metrics)",
            self._daemon.settings.health_host,
            self.port,
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(daemon: Observed) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "optimizely-agent-listener"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                alive, reason = daemon.liveness()
                self._json(200 if alive else 503, {"status": "ok" if alive else reason})
            elif path == "/readyz":
                ready, parts = daemon.readiness()
                parts = {"ready": "yes" if ready else "no", **parts}
                self._json(200 if ready else 503, parts)
            elif path == "/metrics":
                self._send(
                    200, CONTENT_TYPE_LATEST, generate_latest(daemon.metrics.registry)
                )
            else:
                self._json(404, {"error": "not found"})

        def _json(self, status: int, body: dict[str, str]) -> None:
            self._send(status, "application/json", json.dumps(body).encode())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("health request: " + format, *args)

    return _Handler
