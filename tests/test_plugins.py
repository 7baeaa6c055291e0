"""
Named components as plugins: QoP modes, voters, ordering protocols and
protection schemes found by name, built-in or dropped into a folder, and
plugins/README.md's worked example of every kind followed as written.
"""

import json
import os
import pickle
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
from twisted.plugin import CachedDropin
from zope.interface.verify import verifyObject

from benchmarks.cluster import free_ports, twistd, wait_for_port
from fit_broker import plugins, registry
from fit_broker.config import load_config
from fit_broker.errors import ConfigError, UnknownComponent
from fit_broker.interfaces import (
    IOrderingFactory,
    IOrderingProtocol,
    IProtectionScheme,
    IQoPMode,
    IVoter,
    IVoterFactory,
)
from tests.processes import ROOT
from tests.simnet import SimNet

PLUGINS_DIR = os.path.join(ROOT, "plugins")
EXAMPLES = {
    "example_scheme.py": (IProtectionScheme, "rot13-demo"),
    "example_qop.py": (IQoPMode, "cft-all"),
    "example_voter.py": (IVoterFactory, "first-copy-tally"),
    "example_ordering.py": (IOrderingFactory, "sequencer"),
}
FITBROKER = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"]


@pytest.fixture
def builtins_only(monkeypatch):
    """Search the built-in plugin modules only, and forget drop-in modules afterwards."""
    monkeypatch.setattr(plugins, "__path__", [os.path.dirname(plugins.__file__)])
    yield
    for name in [m for m in sys.modules if m.startswith("fit_broker.plugins.example_")]:
        del sys.modules[name]


def _readme():
    with open(os.path.join(PLUGINS_DIR, "README.md")) as f:
        return f.read()


def _blocks(language, after):
    text = _readme()
    return re.findall(rf"```{language}\n(.*?)```", text[text.index(after):], re.S)


def _drop_in(folder):
    """Copy the four example modules into C{folder}/plugins, as the README asks."""
    (folder / "plugins").mkdir()
    for name in EXAMPLES:
        shutil.copy(os.path.join(PLUGINS_DIR, name), folder / "plugins" / name)


def test_config_imports_no_implementation():
    """Reading a configuration imports names and interfaces only, no voter, mode, ordering or scheme module."""
    code = (
        "import sys, fit_broker.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('fit_broker')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=ROOT)
    loaded = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "fit_broker.registry" in loaded
    for module in ("fit_broker.voters", "fit_broker.qop", "fit_broker.ordering", "fit_broker.schemes"):
        assert f"'{module}" not in loaded


def test_components_module_is_gone():
    """Components are found as plugins only: the old table of implementations no longer exists."""
    with pytest.raises(ImportError):
        __import__("fit_broker.components")


@pytest.mark.parametrize("interface", sorted(registry.KINDS, key=lambda i: i.__name__))
def test_unknown_name_lists_what_exists(interface):
    """A name no plugin provides is one line naming the kind and every name that exists."""
    with pytest.raises(UnknownComponent) as raised:
        registry.find(interface, "nonesuch")
    message = str(raised.value)
    assert "\n" not in message
    assert f"no {registry.KINDS[interface]} called 'nonesuch'; available: " in message
    assert message.split("available: ")[1].split(", ") == registry.names(interface)


def test_examples_are_dropped_in_and_found(tmp_path, builtins_only):
    """Each example module, dropped into a folder, is found by getPlugins as a provider of its kind's interface."""
    for interface, name in EXAMPLES.values():
        assert name not in registry.available(interface)
    _drop_in(tmp_path)
    registry.add_plugin_folder(str(tmp_path / "plugins"))
    for interface, name in EXAMPLES.values():
        plugin = registry.find(interface, name)
        assert verifyObject(interface, plugin) and plugin.name == name
    voter = registry.find(IVoterFactory, "first-copy-tally")(faults=1, channel="demo", replicas=2)
    assert verifyObject(IVoter, voter)
    factory = registry.find(IOrderingFactory, "sequencer")
    leader, follower = factory(0, 2, 0, None), factory(1, 2, 0, None)
    assert verifyObject(IOrderingProtocol, leader)
    effects = leader.submit([("value", 1)], 0.0)
    assert [d.values for d in effects.decided] == [(("value", 1),)]
    (to, message), = effects.messages
    assert to is None
    assert [d.values for d in follower.receive(0, message, 0.0).decided] == [(("value", 1),)]
    assert registry.find(IQoPMode, "cft-all").acks_needed(3, 1) == 3


def test_a_stale_cache_of_the_old_scheme_package_is_forgotten(tmp_path, builtins_only):
    """A drop-in folder whose dropin.cache names modules of fit_broker.schemes still has its plugins found."""
    _drop_in(tmp_path)
    folder = tmp_path / "plugins"
    stale = {"example_scheme": CachedDropin("fit_broker.schemes.example_scheme", "")}
    (folder / "dropin.cache").write_bytes(pickle.dumps(stale))
    os.utime(folder / "dropin.cache", (2**33, 2**33))  # newer than every module, so Twisted trusts it
    registry.add_plugin_folder(str(folder))
    assert registry.find(IProtectionScheme, "rot13-demo").name == "rot13-demo"


def _every_kind(tmp_path, port=None):
    """Write the README's every-kind.toml beside a plugins folder of the examples, as it says."""
    toml = _blocks("toml", "## Trying every kind")[0]
    if port is not None:
        toml = toml.replace("7460", str(port)).replace("7461", str(port + 1))
    path = tmp_path / "every-kind.toml"
    path.write_text(toml)
    _drop_in(tmp_path)
    return path


@pytest.mark.parametrize(
    "old, key",
    [
        ('voter = "first-copy-tally"', "channels[0].voter"),
        ('qop = "cft-all"', "channels[0].qop"),
        ('orderer = "sequencer"', "cluster.orderer"),
    ],
)
def test_a_misspelt_name_stops_the_configuration(tmp_path, builtins_only, old, key):
    """A voter, mode or ordering no plugin provides stops config load with one line naming the key and the names."""
    path = _every_kind(tmp_path)
    path.write_text(path.read_text().replace(old, old[:-1] + 'x"'))
    with pytest.raises(UnknownComponent) as raised:
        load_config(str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}: [{key}]: expected one of ")
    assert message.endswith("x', which no plugin provides") and "\n" not in message


def test_readme_quotes_the_misspelt_voter_error(tmp_path, builtins_only):
    """The one line the README shows for a misspelt voter is the one config load gives."""
    path = _every_kind(tmp_path)
    path.write_text(path.read_text().replace('"first-copy-tally"', '"first-copy-tallly"'))
    with pytest.raises(UnknownComponent) as raised:
        load_config(str(path))
    quoted = re.search(r"one line: `(every-kind\.toml: .*?)`", _readme().replace("\n", " ")).group(1)
    assert str(raised.value) == quoted.replace("every-kind.toml", str(path), 1)


def test_a_missing_plugin_folder_is_named(tmp_path, builtins_only):
    """A plugin folder that does not exist stops config load naming the key and the folder."""
    path = _every_kind(tmp_path)
    shutil.rmtree(tmp_path / "plugins")
    with pytest.raises(ConfigError, match=r"\[cluster.plugin_folders\]: expected existing folders, found 'plugins'"):
        load_config(str(path))


def test_every_kind_carries_events_in_a_simulated_cluster(tmp_path, builtins_only):
    """The README's every-kind cluster, run in-process, uses all four examples: all replicas acknowledge, the tally counts, replica 0 orders for both."""
    config = load_config(str(_every_kind(tmp_path)))
    assert config.acks_needed("demo") == 2
    net = SimNet(config)
    publisher, subscriber = net.client("probe"), net.client("console")
    got = []
    d = subscriber.subscriber.subscribe("demo", got.extend)
    net.run()
    assert d.called and d.result.ok
    published = publisher.publisher.publish_many("demo", [b"hello %d" % i for i in range(5)])
    net.run()
    assert published.called and len(published.result) == 5
    assert sorted(event.content for event in got) == [b"hello %d" % i for i in range(5)]
    voter = subscriber.subscriber.voters["demo"]
    assert voter.name == "first-copy-tally"
    assert sum(n for reason, n in voter.counters.items() if reason.startswith("first:")) == voter.counters["delivered"]
    for replica in net.replicas:
        assert replica.broker.channels["demo"].scheme.name == "rot13-demo"
    ordered = publisher.publisher.publish_many("in-order", [b"first", b"second"])
    net.run(seconds=1)
    assert ordered.called and len(ordered.result) == 2
    for replica in net.replicas:
        orderer = replica.replicated_log.orderer
        assert orderer.name == "sequencer" and orderer.status()["decided"] >= 1
        assert replica.broker.state.next_seq["in-order"] == 2


@pytest.mark.integration
def test_every_kind_readme_steps_run_as_written(tmp_path):
    """The README's every-kind commands, run as written with real processes, carry an event through all four examples."""
    first = _two_free_ports()
    _every_kind(tmp_path, port=first)
    steps = [line for line in _blocks("sh", "## Trying every kind")[0].splitlines() if line.strip()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def command(line):
        words = shlex.split(line, comments=True)
        return {"twistd": twistd(), "fitbroker": FITBROKER}[words[0]] + words[1:]

    *replica_cmds, tail_cmd, publish_cmd = (command(line) for line in steps)
    processes = []
    try:
        for cmd in replica_cmds:
            processes.append(subprocess.Popen(cmd, cwd=str(tmp_path), env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for index, process in enumerate(processes):
            wait_for_port(first + index, 30, process)
        tail = subprocess.Popen(tail_cmd + ["--count", "1"], cwd=str(tmp_path), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        processes.append(tail)
        assert b"subscribed" in tail.stderr.readline()
        published = subprocess.run(publish_cmd, cwd=str(tmp_path), env=env, capture_output=True, timeout=30)
        assert published.returncode == 0, published.stderr
        out, _ = tail.communicate(timeout=30)
        event = json.loads(out)
        assert event["channel"] == "demo" and event["content"] == "hello through every kind"
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                process.wait(10)


def _two_free_ports():
    """Return a free port of 127.0.0.1 whose next port is free too."""
    for _ in range(50):
        first = free_ports(1)[0]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first
    raise AssertionError("no two consecutive free ports")
