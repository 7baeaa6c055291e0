"""
The throughput benchmark's harness, run for a few seconds so that it keeps
working: real replicas, null relays, publisher and subscriber processes.
Never asserts a speed; the machine running the tests is not a benchmark rig.
"""

import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["system", "mode", "channels", "published_per_s", "delivered_per_s", "lost", "p50_ms", "p99_ms"]


def test_short_run_delivers_everything_and_writes_results(tmp_path):
    """Two channel counts of CFT and the null relay, two seconds each: events flow, none of those acknowledged is lost, an unrunnable mode becomes a row saying why, and the CSV and Markdown table are written with the documented columns."""
    out = tmp_path / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.throughput",
            "--channels", "2,4", "--seconds", "2", "--peers", "none",
            "--modes", "cft,no-such-mode", "--out", str(out), "--no-plot",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(COLUMNS)] == COLUMNS
        rows = list(reader)
    measured = {(r["system"], r["mode"], int(r["channels"])): r for r in rows}
    for key in [("fitbroker", "cft", 2), ("fitbroker", "cft", 4), ("null-relay", "relay", 2), ("null-relay", "relay", 4)]:
        row = measured[key]
        assert float(row["published_per_s"]) > 0, row
        assert float(row["delivered_per_s"]) > 0, row
        assert row["lost"] == "0", row
        assert not row["note"], row
    unrunnable = measured[("fitbroker", "no-such-mode", 2)]
    assert unrunnable["note"].startswith("unavailable:"), unrunnable
    assert unrunnable["delivered_per_s"] == ""
    assert "| fitbroker | cft | 4 |" in (out / "results.md").read_text()
