"""The Amplitude SDK reference: the official client sending the same events.

    python -I reference_amplitude_sdk.py SERVER_URL API_KEY COUNT USERS

Builds `COUNT` exposure events first, prints `ready`, waits for a line on
stdin, then `track()`s them all as fast as it can and `shutdown()`s, which
flushes. The benchmark times it until the stand-in holds every event.

Must run isolated (`-I`) with a working directory outside the repository:
the repository's own `amplitude.py` would otherwise shadow the SDK.
"""

from __future__ import annotations

import json
import sys
import time

from amplitude import Amplitude, BaseEvent, Config

EXPOSURE_EVENT_TYPE = "[Optimizely] Exposure"


def main(server_url: str, api_key: str, count: int, users: int) -> None:
    # Everything but the endpoint and the id length (which the daemon also
    # lowers to 1) stays at the SDK's defaults.
    client = Amplitude(
        api_key, configuration=Config(server_url=server_url, min_id_length=1)
    )
    events = [
        BaseEvent(
            event_type=EXPOSURE_EVENT_TYPE,
            user_id=f"user-{index % users}",
            event_properties={
                "flag_key": f"flag_{index // users}",
                "rule_key": "rule_ab",
                "variation_key": "on",
                "enabled": True,
            },
        )
        for index in range(count)
    ]
    print("ready", flush=True)
    sys.stdin.readline()

    cpu_before = time.process_time()
    started = time.monotonic()
    for event in events:
        client.track(event)
    tracked = time.monotonic()
    client.shutdown()
    done = time.monotonic()
    print(
        json.dumps(
            {
                "track_seconds": tracked - started,
                "shutdown_seconds": done - tracked,
                "cpu_seconds": time.process_time() - cpu_before,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
