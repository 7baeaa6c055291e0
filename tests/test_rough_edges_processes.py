"""
Rough edges a new user met, with real twistd and fitbroker processes: a
daemonized replica or adapter whose port is taken, one-line configuration
errors, the plugins README followed as written, and syslog on an
`init`-made cluster.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from benchmarks.cluster import free_ports, twistd, wait_for_port
from fit_broker.init import cluster_toml, init_cluster
from tests.processes import ROOT, ReplicaProcesses

pytestmark = pytest.mark.integration

FITBROKER = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"]


def env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(command, cwd, timeout=30):
    return subprocess.run(command, cwd=cwd, capture_output=True, timeout=timeout, env=env())


def one_line(result):
    """Return the one line a failed command printed, checking there was only one."""
    assert result.returncode != 0
    out = (result.stdout + result.stderr).decode()
    assert "Traceback" not in out and "Usage:" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return lines[0]


def consecutive_free_ports(count):
    for _ in range(50):
        base = free_ports(1)[0]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise AssertionError("no run of free ports found")


def kill_daemon(pidfile):
    """Stop a daemon this test started by mistake (its pid file says which)."""
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def daemonized(tmp_path, *plugin_args):
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    command = twistd() + ["--pidfile", str(pidfile), "--logfile", str(logfile), *plugin_args]
    started = time.monotonic()
    try:
        result = run(command, cwd=str(tmp_path), timeout=30)
    finally:
        kill_daemon(pidfile)
    return result, time.monotonic() - started


def test_daemonized_replica_with_its_port_taken_exits_with_one_line(tmp_path):
    """`twistd fitbroker` without -n whose port is taken exits non-zero within seconds, saying why in one line."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "cluster.toml"
    config.write_text(
        cluster_toml("demo", 0, [port], ["probe"], [], keys_dir=None, tls=False, admins=[], classes={})
    )
    try:
        result, elapsed = daemonized(tmp_path, "fitbroker", "--config", str(config), "--replica-id", "0")
    finally:
        taken.close()
    line = one_line(result)
    assert line == (
        f"fitbroker: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another instance running?)"
    )
    assert elapsed < 20


def test_daemonized_syslog_adapter_with_its_port_taken_exits_with_one_line(tmp_path):
    """`twistd fitbroker-syslog` without -n whose UDP port is taken exits non-zero, saying why in one line."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    path = init_cluster(
        str(tmp_path / "c"), first_port=consecutive_free_ports(4), syslog_client="syslog",
        syslog_port=port,
    )
    try:
        result, elapsed = daemonized(tmp_path, "fitbroker-syslog", "--config", path)
    finally:
        taken.close()
    line = one_line(result)
    assert line.startswith(f"fitbroker-syslog: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert elapsed < 20


def test_twistd_reports_a_bad_configuration_in_one_line(tmp_path):
    """`twistd fitbroker --config bad.toml` prints the file, key and expectation in one line, without usage."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nfaults = -1\n")
    result = run(twistd() + ["fitbroker", "--config", str(bad), "--replica-id", "0"], cwd=str(tmp_path))
    assert re.fullmatch(
        rf"fitbroker: {re.escape(str(bad))}: \[cluster\.faults\]: expected .*", one_line(result)
    )


def test_twistd_names_an_unknown_scheme_on_a_keyless_cluster(tmp_path):
    """A keyless cluster naming a scheme no plugin provides stops with that, not with a missing keys_dir."""
    config = tmp_path / "cluster.toml"
    config.write_text(
        cluster_toml(
            "demo", 0, [7450], ["probe"], [("demo", "demo", "default", "cft", "rot14", ["probe"], [])],
            keys_dir=None, tls=False, admins=[], classes={},
        )
    )
    result = run(twistd() + ["-n", "fitbroker", "--config", str(config), "--replica-id", "0"], cwd=str(tmp_path))
    line = one_line(result)
    assert "'rot14', which no plugin provides; available:" in line
    assert "keys_dir" not in line


def _blocks(text, language, after):
    section = text[text.index(after):]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_plugins_readme_example_runs_as_written(tmp_path):
    """The plugins README's demo cluster and commands, followed step by step, carry an event through rot13-demo."""
    with open(os.path.join(ROOT, "plugins", "README.md")) as f:
        readme = f.read()
    toml = _blocks(readme, "toml", "## Using it")[0]
    steps = [line for line in _blocks(readme, "sh", "## Using it")[0].splitlines() if line.strip()]
    port = free_ports(1)[0]
    assert "7450" in toml
    (tmp_path / "demo.toml").write_text(toml.replace("7450", str(port)))
    (tmp_path / "plugins").mkdir()
    shutil.copy(os.path.join(ROOT, "plugins", "example_scheme.py"), tmp_path / "plugins")

    def command(line):
        words = shlex.split(line, comments=True)
        program = {"twistd": twistd(), "fitbroker": FITBROKER}[words[0]]
        return program + words[1:]

    replica_cmd, tail_cmd, publish_cmd = (command(line) for line in steps)
    replica = subprocess.Popen(replica_cmd, cwd=str(tmp_path), env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tail = None
    try:
        wait_for_port(port, 30, replica)
        tail = subprocess.Popen(tail_cmd + ["--count", "1"], cwd=str(tmp_path), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert b"subscribed" in tail.stderr.readline()
        published = run(publish_cmd, cwd=str(tmp_path))
        assert published.returncode == 0, published.stderr
        out, _ = tail.communicate(timeout=30)
        event = json.loads(out)
        assert event["channel"] == "demo"
        assert event["content"] == "hello through rot13-demo"
    finally:
        for process in (tail, replica):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)


def test_syslog_adapter_runs_on_an_init_made_cluster(tmp_path):
    """`fitbroker init` then `twistd -n fitbroker-syslog --config DIR/cluster.toml` publishes syslog into channel syslog."""
    first = consecutive_free_ports(4)
    syslog_port = free_ports(1)[0]
    folder = tmp_path / "c"
    written = run(
        FITBROKER + ["init", str(folder), "--first-port", str(first), "--syslog-port", str(syslog_port)],
        cwd=str(tmp_path),
    )
    assert written.returncode == 0, written.stderr
    assert b"twistd -n fitbroker-syslog" in written.stdout
    config = str(folder / "cluster.toml")
    replicas = ReplicaProcesses(str(tmp_path), config, list(range(first, first + 4)))
    adapter = tail = None
    try:
        replicas.start_all()
        adapter = subprocess.Popen(
            twistd() + ["-n", "fitbroker-syslog", "--config", config], cwd=str(tmp_path), env=env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(syslog_port, 30, adapter)
        tail = subprocess.Popen(
            FITBROKER + ["tail", "--config", config, "--count", "1", "syslog"],
            cwd=str(tmp_path), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert b"subscribed" in tail.stderr.readline()
        with socket.create_connection(("127.0.0.1", syslog_port)) as sender:
            sender.sendall(b"<13>Jan  1 00:00:00 host app: hello from an init-made cluster\n")
            out, _ = tail.communicate(timeout=30)
        event = json.loads(out)
        assert event["channel"] == "syslog" and event["publisher"] == "syslog"
        assert "hello from an init-made cluster" in event["content"]
    finally:
        for process in (tail, adapter):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        replicas.stop_all()


def test_init_again_names_force(tmp_path):
    """Re-running init on a cluster's folder says to pass --force, and --force replaces it."""
    folder = str(tmp_path / "c")
    assert run(FITBROKER + ["init", folder], cwd=str(tmp_path)).returncode == 0
    line = one_line(run(FITBROKER + ["init", folder], cwd=str(tmp_path)))
    assert "pass --force" in line and "overwrite" not in line
    assert run(FITBROKER + ["init", folder, "--force"], cwd=str(tmp_path)).returncode == 0
