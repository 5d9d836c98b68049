"""The ceiling for reading the Agent's stream: requests, sseclient-py, json.

    python -I reference_stream.py STREAM_URL SDK_KEY COUNT

Opens the stream, parses `COUNT` frames and does nothing else with them,
then prints one JSON line with the monotonic time of the last frame and
the CPU time spent. No
Python reader of this stream can go faster with the same libraries, so
the benchmark measures the daemon against it. Run isolated (`-I`) from
outside the repository, like the other references.
"""

from __future__ import annotations

import json
import sys
import time

import requests
import sseclient


def main(url: str, sdk_key: str, count: int) -> None:
    headers = {"X-Optimizely-SDK-Key": sdk_key, "Accept": "text/event-stream"}
    parsed = 0
    cpu_before = time.process_time()
    with requests.Session() as session:
        session.trust_env = False
        # The Agent answers with its first notification: no read timeout.
        response = session.get(url, headers=headers, stream=True, timeout=(5, None))
        client = sseclient.SSEClient(response.iter_content(chunk_size=None))
        for event in client.events():
            json.loads(event.data)
            parsed += 1
            if parsed >= count:
                break
        done = time.monotonic()
        cpu_seconds = time.process_time() - cpu_before
        response.close()
    result = {"frames": parsed, "done_monotonic": done, "cpu_seconds": cpu_seconds}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
