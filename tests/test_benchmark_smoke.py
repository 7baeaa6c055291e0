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


def run_benchmark(out, *arguments, timeout=120):
    """
    Run C{python -m benchmarks.throughput} into C{out}; return its CSV rows
    by C{(system, mode, channels)}.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--peers", "none", "--out", str(out), "--no-plot",
         *arguments],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(COLUMNS)] == COLUMNS
        rows = list(reader)
    return {(r["system"], r["mode"], int(r["channels"])): r for r in rows}


def test_short_run_delivers_everything_and_writes_results(tmp_path):
    """Two channel counts of CFT and the null relay, two seconds each: events flow, none of those acknowledged is lost, an unrunnable mode becomes a row saying why, and the CSV and Markdown table are written with the documented columns."""
    out = tmp_path / "results"
    measured = run_benchmark(
        out, "--channels", "2,4", "--seconds", "2", "--modes", "cft,no-such-mode"
    )
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


def test_ordered_run_delivers_everything_in_one_order(tmp_path):
    """An ordered BFT mode at a fixed rate with two subscribers: every acknowledged event is delivered, nothing is duplicated, skipped or out of order, both subscribers were handed the same order, and latency and acknowledgement times are reported."""
    out = tmp_path / "results"
    measured = run_benchmark(
        out, "--channels", "3", "--seconds", "2", "--modes", "bft-ordered-global", "--no-relay",
        "--rate", "3000", "--subscribers", "2",
    )
    row = measured[("fitbroker", "bft-ordered-global", 3)]
    assert float(row["published_per_s"]) > 0, row
    assert float(row["delivered_per_s"]) > 0, row
    assert row["lost"] == "0", row
    assert row["out_of_order"] == "0", row
    assert not row["note"], row
    assert float(row["p50_ms"]) <= float(row["p99_ms"]), row
    assert float(row["ack_p50_ms"]) > 0, row
    assert float(row["rate"]) == 3000, row
    text = (out / "results.md").read_text()
    assert "| fitbroker | bft-ordered-global | 3 |" in text
    assert "each publisher offers 3,000 events/s" in text


def test_disk_mode_loses_nothing_and_reports_fsync(tmp_path):
    """A disk channel mode syncing on every publish delivers every acknowledged event, and the table names the data folder's filesystem and a measured fsync latency."""
    out = tmp_path / "results"
    measured = run_benchmark(
        out, "--channels", "2", "--seconds", "2", "--modes", "cft-disk-always", "--no-relay", timeout=90
    )
    row = measured[("fitbroker", "cft-disk-always", 2)]
    assert float(row["delivered_per_s"]) > 0, row
    assert row["lost"] == "0", row
    assert not row["note"], row
    text = (out / "results.md").read_text()
    assert "Disk channels: data folders on " in text
    assert "followed by fsync took " in text and " ms p99." in text


def test_disk_cluster_file_gives_each_replica_its_own_data_folder(tmp_path):
    """A disk mode's cluster file puts each replica's data in the point's folder and its class on disk with the mode's fsync policy."""
    from benchmarks.cluster import prepare_cluster
    from fit_broker.config import load_config

    path, ports = prepare_cluster(str(tmp_path), "cft-disk-interval", 2)
    config = load_config(path)
    folders = [config.replicas[i].data for i in range(len(ports))]
    assert folders == [str(tmp_path / "data" / f"replica-{i}") for i in range(len(ports))]
    bench = config.classes["bench"]
    assert (bench.persistence, bench.fsync, bench.fsync_interval) == ("disk", "interval", 50.0)


def test_order_check_counts_each_broken_promise():
    """The subscriber's order check counts a publisher's batch handed over before an earlier one, a sequence number or log position going back (across channels with global ordering), skipped numbers, and two subscribers handed different orders disagree on the fingerprint."""
    from benchmarks.driver import OrderCheck
    from benchmarks.throughput import join_subscribers
    from fit_broker.units import DeliveredBatch

    def batch(first_id, seq, position):
        return DeliveredBatch("probe", first_id, 0.0, 60.0, 0, [b"x"] * 10, position=position, seq=seq)

    def hand_over(check, handed):
        for tag, item in handed:
            check.batch(check.channel(tag), item, 10)
        return check.summary()

    kinds = ("backwards", "seq_backwards", "position_backwards", "skipped")
    good = [("a", batch(1, 1, 1)), ("b", batch(1, 1, 2)), ("a", batch(11, 2, 3))]
    clean = hand_over(OrderCheck(global_order=True), good)
    assert [clean[k] for k in kinds] == [0, 0, 0, 0]
    broken = hand_over(
        OrderCheck(global_order=True),
        [("a", batch(11, 1, 3)), ("b", batch(1, 1, 2)), ("a", batch(1, 3, 4)), ("a", batch(21, 3, 5))],
    )
    assert [broken[k] for k in kinds] == [1, 1, 1, 1]
    swapped = hand_over(OrderCheck(), [("a", batch(11, 1, 3)), ("a", batch(1, 2, 1)), ("b", batch(1, 1, 2))])
    joined = join_subscribers(
        [
            {"delivered_per_s": 10.0, "p50_ms": 1.0, "p99_ms": 2.0, "order": clean},
            {"delivered_per_s": 8.0, "p50_ms": 3.0, "p99_ms": 1.0, "order": swapped},
        ]
    )
    assert joined["order_mismatch"] == 1
    assert (joined["delivered_per_s"], joined["p50_ms"], joined["p99_ms"]) == (8.0, 3.0, 2.0)
