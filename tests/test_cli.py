"""
The fitbroker command line against real replica processes, and its errors.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.processes import ROOT, ReplicaProcesses, write_cluster

pytestmark = pytest.mark.integration


def fitbroker(*args, cwd=ROOT, stdin=None, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=env,
    )


def one_line_error(result, *fragments):
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli"))
    path, ports = write_cluster(folder, ["events", "alerts"])
    replicas = ReplicaProcesses(folder, path, ports)
    replicas.start_all()
    yield replicas
    replicas.stop_all()


def test_publish_then_tail(cluster):
    """Published messages and stdin lines come out of tail as JSON objects with the documented keys."""
    config = cluster.config_path
    tail = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
         "tail", "--config", config, "--as", "console", "--count", "4", "events"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert b"subscribed" in tail.stderr.readline()
    assert fitbroker("publish", "--config", config, "events", "one", "two").returncode == 0
    result = fitbroker("publish", "--config", config, "--urgency", "2", "events", stdin=b"three\n\xff\xfe\n")
    assert result.returncode == 0, result.stderr
    out, _ = tail.communicate(timeout=30)
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["content"] for r in records[:3]] == ["one", "two", "three"]
    assert records[3]["content"] is None and records[3]["content_b64"] == "//4="
    for record in records:
        assert set(record) >= {"channel", "publisher", "event_id", "timestamp", "urgency", "content"}
        assert record["channel"] == "events" and record["publisher"] == "probe"
    assert records[2]["urgency"] == 2


def test_status(cluster):
    """status --json prints every reachable replica's counters."""
    result = fitbroker("status", "--json", "--config", cluster.config_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert sorted(info) == [f"replica-{i}" for i in range(4)]
    for replica in info.values():
        assert "events" in replica["channels"]


def test_unknown_channel(cluster):
    """An unknown channel is one line naming the file and the channels that exist."""
    one_line_error(fitbroker("publish", "--config", cluster.config_path, "nope", "x"), "no channel 'nope'", "events")


def test_unauthorised_client(cluster):
    """A client the control table does not authorise is told so in one line."""
    one_line_error(
        fitbroker("publish", "--config", cluster.config_path, "--as", "console", "events", "x"),
        "does not let this client publish to 'events'",
    )
    one_line_error(
        fitbroker("tail", "--config", cluster.config_path, "--as", "mallory", "events"),
        "no client 'mallory'",
    )


def test_missing_and_invalid_config(tmp_path):
    """A missing default configuration and an invalid file are each one clear line."""
    one_line_error(fitbroker("tail", "events", cwd=str(tmp_path)), "twistd -n fitbroker")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nfaults = -1\n")
    one_line_error(fitbroker("tail", "--config", str(bad), "events"), str(bad), "cluster.faults")


def test_no_replica_reachable(tmp_path):
    """With no replica running, the command says what it tried and exits non-zero."""
    path, _ = write_cluster(str(tmp_path), ["events"])
    env_timeout = fitbroker("publish", "--config", path, "events", "x", timeout=60)
    one_line_error(env_timeout, "cannot reach the cluster", "0 of 4 replicas reachable", "is the cluster running?")


def test_publish_streams_stdin_lines_as_they_come(cluster):
    """A line written to publish's standard input is delivered before the input ends (as from `journalctl -f`)."""
    config = cluster.config_path
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"]
    tail = subprocess.Popen(
        command + ["tail", "--config", config, "--as", "console", "--count", "1", "alerts"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert b"subscribed" in tail.stderr.readline()
    publish = subprocess.Popen(
        command + ["publish", "--config", config, "alerts"],
        cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        publish.stdin.write(b"first line, input still open\n")
        publish.stdin.flush()
        out, _ = tail.communicate(timeout=30)
        assert json.loads(out)["content"] == "first line, input still open"
        assert publish.poll() is None
    finally:
        publish.stdin.close()
    assert publish.wait(30) == 0
    assert b"published 1 event(s)" in publish.stderr.read()


def test_blank_stdin_lines_are_skipped_and_counted(cluster):
    """Blank lines of standard input become no event; the final message counts them."""
    result = fitbroker("publish", "--config", cluster.config_path, "events", stdin=b"one\n\n   \r\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert b"published 2 event(s) to events (skipped 2 blank line(s))" in result.stderr


@pytest.mark.parametrize("ttl", ["-5", "nan"])
def test_negative_ttl_is_refused_in_one_line(ttl):
    """A negative or non-number --ttl is one line naming the option, before any connection."""
    one_line_error(fitbroker("publish", "--ttl", ttl, "events", "x"), "--ttl", "channel's TTL")


def test_publish_help_and_version():
    """--help says what --ttl 0 and blank lines mean; --version prints the package's version."""
    from importlib.metadata import version

    help_text = " ".join(fitbroker("publish", "--help").stdout.decode().split())
    assert "0 (the default) means the channel's TTL" in help_text
    assert "Blank lines of standard input" in help_text
    result = fitbroker("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"fitbroker {version('fit-broker')}"


def test_publish_from_a_clock_far_behind_fails(cluster):
    """A publisher whose clock is 10 minutes behind is warned at start, told its events expired at a quorum, and exits non-zero."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    behind = (
        "import sys, time; real = time.time; time.time = lambda: real() - 600; "
        "from fit_broker.cli import main; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", behind, "publish", "--config", cluster.config_path, "events", "late"],
        cwd=ROOT, capture_output=True, timeout=60, env=env,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 2 and "Traceback" not in result.stderr.decode(), lines
    assert "warning: this host's clock is 600 s behind the replicas'" in lines[0]
    for fragment in ("1 event(s) were already past their TTL at a quorum of replicas", "clock", "(expired)"):
        assert fragment in lines[1], lines[1]


def test_tail_count_cut_in_a_batch_prints_the_rest_next_time(cluster, tmp_path):
    """`tail --count` that stops inside a batch prints the rest of it next time, and nothing twice."""
    config = cluster.config_path
    state = str(tmp_path / "state")
    command = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"]
    tail = subprocess.Popen(
        command + ["tail", "--config", config, "--as", "console", "--state-dir", state, "--count", "3", "alerts"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert b"subscribed" in tail.stderr.readline()
    assert fitbroker("publish", "--config", config, "alerts", "a1", "a2", "a3", "a4", "a5").returncode == 0
    out, _ = tail.communicate(timeout=30)
    first = [json.loads(line)["content"] for line in out.decode().splitlines()]
    assert first == ["a1", "a2", "a3"]
    again = fitbroker("tail", "--config", config, "--as", "console", "--state-dir", state, "--count", "2", "alerts")
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["content"] for line in again.stdout.decode().splitlines()] == ["a4", "a5"]
