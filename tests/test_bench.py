"""The benchmark's smoke run: it completes and prints its table.

Only the shape of the output is checked, never a figure: timings on a
shared machine prove nothing about the code.
"""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT

QUICK_RUN_LIMIT_SECONDS = 60


def test_quick_run_exits_cleanly_and_prints_its_table(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_LIMIT_SECONDS,
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr
    out = completed.stdout
    assert "| scenario | figure | value | target | verdict |" in out
    for figure in ("daemon / ceiling", "daemon / SDK", "daemon / plain loop"):
        assert figure in out
    assert "latency p99" in out
    report = (tmp_path / "benchmarks.md").read_text()
    assert "| scenario | figure | value | target | verdict |" in report
    assert (tmp_path / "bench-steady.png").stat().st_size > 0
