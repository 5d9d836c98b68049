"""The GA4 reference: a plain `requests.Session` loop per thread.

    python -I reference_ga4_loop.py COLLECT_URL CONCURRENCY BODIES_FILE

Reads one JSON request body per line, deals them round-robin to
`CONCURRENCY` threads that each own a Session, prints `ready`, waits for a
line on stdin, then posts them all and prints one JSON line: counts by
status, the seconds taken and the CPU time spent. Nothing batches, retries
or orders: this is the fastest a Python client with `requests` can push
these bodies at this concurrency.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import requests

TIMEOUT_SECONDS = (5.0, 30.0)


def main(url: str, concurrency: int, bodies_path: str) -> None:
    with open(bodies_path, "rb") as file:
        bodies = [line.rstrip(b"\n") for line in file if line.strip()]
    shares = [bodies[index::concurrency] for index in range(concurrency)]
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    go = threading.Event()

    def post_all(share: list[bytes]) -> None:
        seen: Counter[str] = Counter()
        headers = {"Content-Type": "application/json"}
        # A default Session, as a plain client would use: it honours the
        # environment (proxies, netrc) just as the daemon's senders do.
        with requests.Session() as session:
            go.wait()
            for body in share:
                try:
                    response = session.post(
                        url, data=body, headers=headers, timeout=TIMEOUT_SECONDS
                    )
                    seen[str(response.status_code)] += 1
                except requests.RequestException as error:
                    seen[type(error).__name__] += 1
        with lock:
            statuses.update(seen)

    threads = [
        threading.Thread(target=post_all, args=(share,), name=f"poster-{index}")
        for index, share in enumerate(shares)
    ]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    sys.stdin.readline()

    cpu_before = time.process_time()
    started = time.monotonic()
    go.set()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu_seconds = time.process_time() - cpu_before
    result = {"statuses": statuses, "seconds": elapsed, "cpu_seconds": cpu_seconds}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
