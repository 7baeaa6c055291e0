"""
`fitbroker status`: the table people read, from replicas' status replies.
"""

import json

import pytest

from fit_broker.cli import replica_status, status_table
from tests.processes import ReplicaProcesses, write_cluster
from tests.test_cli import fitbroker

INFO = {
    "connections": {},
    "requests": {"requests": 9},
    "started": 1000.0,
    "now": 4723.5,
    "channels": {
        "events": {
            "counters": {"accepted": 12, "duplicate": 3, "expired-on-arrival": 1},
            "subscribers": {
                "console": {"enqueued": 12, "delivered": 7, "expired": 2, "overflowed": 1, "waiting": 2},
                "probe": {"enqueued": 12, "delivered": 12, "expired": 0, "overflowed": 0, "waiting": 0},
            },
        }
    },
}


def test_replica_status_sums_queues_and_measures_the_clock():
    """In, out, waiting and discards add up the channel's queues; offset is taken mid round trip."""
    row = replica_status(INFO, sent=4722.0, received=4724.0)
    assert row["up"] and row["uptime"] == 3723.5
    assert row["offset"] == pytest.approx(0.5) and row["round_trip"] == pytest.approx(2.0)
    assert row["channels"] == {"events": {"in": 12, "out": 19, "waiting": 2, "discards": 4}}


def test_replica_that_did_not_answer_is_down():
    """A replica with no status reply is shown down, without channel rows."""
    table = status_table(
        {"replica-0": replica_status(INFO, 4722.0, 4724.0), "replica-1": replica_status("unreachable")}
    )
    lines = table.splitlines()
    assert lines[0].split() == ["REPLICA", "STATE", "UPTIME", "CLOCK", "OFFSET", "ROUND", "TRIP"]
    assert lines[1].split() == ["replica-0", "up", "1h02m", "+0.500", "s", "2000", "ms"]
    assert lines[2].split() == ["replica-1", "down", "-", "-", "-"]
    assert lines[4].split() == ["CHANNEL", "REPLICA", "IN", "OUT", "WAITING", "DISCARDS"]
    assert lines[5].split() == ["events", "replica-0", "12", "19", "2", "4"]
    assert len(lines) == 6


def test_replica_without_clock_fields_shows_unknowns():
    """A reply without `started` and `now` (an older replica) shows ? for uptime and offset."""
    info = {k: v for k, v in INFO.items() if k not in ("started", "now")}
    line = status_table({"replica-0": replica_status(info, 1.0, 2.0)}).splitlines()[1]
    assert line.split() == ["replica-0", "up", "?", "?", "?"]


def test_refused_status_is_shown():
    """A replica that refuses the status request is up, and says why."""
    row = replica_status({"error": "unauthorized: not an admin"}, 1.0, 2.0)
    assert "refused: unauthorized: not an admin" in status_table({"replica-0": row})


@pytest.mark.integration
def test_status_table_and_json_against_processes(tmp_path):
    """Against three running replicas of four, the table shows the fourth down and counts events in."""
    path, ports = write_cluster(str(tmp_path), ["events"])
    replicas = ReplicaProcesses(str(tmp_path), path, ports)
    try:
        for index in range(3):
            replicas.start(index)
        from benchmarks.cluster import wait_for_port

        for port in ports[:3]:
            wait_for_port(port, 60)
        published = fitbroker("publish", "--config", path, "events", "a", "b")
        assert published.returncode == 0, published.stderr
        result = fitbroker("status", "--config", path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().splitlines()
        states = {line.split()[0]: line.split()[1] for line in lines[1:5]}
        assert states == {"replica-0": "up", "replica-1": "up", "replica-2": "up", "replica-3": "down"}
        events = [line.split() for line in lines if line.startswith("events ")]
        # A CFT publish returns once f+1 replicas have the events.
        assert len(events) == 3 and sum(int(row[2]) == 2 for row in events) >= 2, lines
        info = json.loads(fitbroker("status", "--json", "--config", path).stdout)
        assert info["replica-3"] == "unreachable"
        assert info["replica-0"]["now"] >= info["replica-0"]["started"]
    finally:
        replicas.stop_all()


def test_status_shows_each_replicas_agreement_and_table_version():
    """Administrators see each replica's leader, regency, decided instance, checkpoint, position and table version."""
    from fit_broker.cli import replica_status, status_table

    info = {
        "now": 10.0, "started": 5.0, "channels": {},
        "agreement": {"leader": 1, "regency": 1, "decided": 70, "stable_checkpoint": 64, "position": 90},
        "table": {"version": 3},
    }
    text = status_table({"replica-0": replica_status(info), "replica-1": replica_status(None)})
    line = [row for row in text.splitlines() if row.startswith("replica-0") and " 70 " in row]
    assert line and line[0].split() == ["replica-0", "1", "1", "70", "64", "90", "3"]
    assert "LEADER" in text
