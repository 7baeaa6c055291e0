"""
The systemd units in etc/systemd: valid for systemd, and running the right
twistd plugin for each replica and for the syslog adapter.
"""

import os
import shutil
import subprocess

import pytest

from tests.processes import ROOT

UNITS = os.path.join(ROOT, "etc", "systemd")
REPLICA = "fitbroker-replica@.service"
SYSLOG = "fitbroker-syslog.service"
TWISTD = "/opt/fitbroker/bin/twistd"


def unit_text(name):
    with open(os.path.join(UNITS, name)) as f:
        return f.read()


def exec_start(name):
    [line] = [line for line in unit_text(name).splitlines() if line.startswith("ExecStart=")]
    return line.split("=", 1)[1].split()


def test_replica_unit_runs_replica_of_its_instance():
    """fitbroker-replica@N runs `twistd fitbroker --replica-id N` in the foreground, logging to the journal."""
    command = exec_start(REPLICA)
    assert command[0] == TWISTD and "--nodaemon" in command and "--logfile=-" in command
    assert command[command.index("fitbroker") :] == [
        "fitbroker", "--config", "${FITBROKER_CONFIG}", "--replica-id", "%i"
    ]


def test_syslog_unit_runs_the_adapter_with_only_the_bind_capability():
    """fitbroker-syslog runs `twistd fitbroker-syslog` and may bind port 514 without being root."""
    command = exec_start(SYSLOG)
    assert command[command.index("fitbroker-syslog") :] == ["fitbroker-syslog", "--config", "${FITBROKER_CONFIG}"]
    text = unit_text(SYSLOG)
    assert "User=fitbroker" in text and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text


def test_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts both units, a replica instance included, without a warning."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's program exists: point it at one that does.
    twistd = shutil.which("twistd") or "/bin/true"
    for name in (REPLICA, SYSLOG):
        (tmp_path / name).write_text(unit_text(name).replace(TWISTD, twistd))
    result = subprocess.run(
        [tool, "verify", "--man=no", "./fitbroker-replica@0.service", f"./{SYSLOG}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    ours = [line for line in result.stderr.splitlines() if "fitbroker" in line]
    assert result.returncode == 0 and not ours, result.stderr
