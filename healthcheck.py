"""Container health check: exit 0 when the daemon's /healthz answers 200.

The Dockerfile's HEALTHCHECK runs this, because the slim image has no curl.
It uses only the standard library and can be run by hand the same way:

    HEALTH_PORT=8090 python healthcheck.py

It asks 127.0.0.1 on HEALTH_PORT, so the operator endpoint must listen
there (HEALTH_HOST 0.0.0.0 or 127.0.0.1). Exit status 0 means the daemon
says it is alive; 1 means it said otherwise, did not answer within
TIMEOUT_SECONDS, or the endpoint is turned off (HEALTH_PORT=0).
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import fields

from settings import Settings

TIMEOUT_SECONDS = 3.0

# The default lives in settings.py; read it from there instead of restating it.
_DEFAULT_PORT = next(f.default for f in fields(Settings) if f.name == "health_port")


def check(port: int, timeout_seconds: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """Ask /healthz once; return whether it answered 200, and what happened."""
    url = f"http://127.0.0.1:{port}/healthz"

    # An HTTP_PROXY set for the daemon's outbound traffic must not reroute
    # a loopback request, so this opener ignores proxy variables.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_seconds) as response:
            body = response.read(512).decode("utf-8", "replace").strip()
            return response.status == 200, f"{url} answered {response.status} {body}"
    except urllib.error.HTTPError as error:
        body = error.read(512).decode("utf-8", "replace").strip()
        return False, f"{url} answered {error.code} {body}"
    except (OSError, http.client.HTTPException) as error:
        return False, f"{url} did not answer: {error}"


def main() -> int:
    raw = os.environ.get("HEALTH_PORT", "").strip() or str(_DEFAULT_PORT)
    try:
        port = int(raw)
    except ValueError:
        print(f"HEALTH_PORT={raw!r} is not a port number", file=sys.stderr)
        return 1
    if not 0 < port < 65536:
        print(
            f"HEALTH_PORT={raw}: the operator endpoint is off, nothing to check",
            file=sys.stderr,
        )
        return 1

    healthy, detail = check(port)
    print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
