"""
Configuration files: valid ones load, every mistake names the file, key and expectation.
"""

import pytest

from fit_broker.config import load_config
from fit_broker.errors import ConfigError

GOOD = """
[cluster]
name = "t"
faults = 1
default_client = "probe"

[[replicas]]
listen = "tcp:7400"
connect = "tcp:127.0.0.1:7400"
[[replicas]]
listen = "tcp:7401"
connect = "tcp:127.0.0.1:7401"

[clients.probe]
[clients.console]

[classes.fast]
capacity = 5
ttl = 10

[[channels]]
tag = "events"
class = "fast"
publishers = ["probe"]
subscribers = ["console"]
"""


def write(tmp_path, text):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return str(path)


def test_sample_configuration_loads():
    """The shipped sample cluster file is valid."""
    config = load_config("etc/local-cluster.toml")
    assert len(config.replicas) == 4 and config.faults == 1
    assert config.acks_needed("events") == 2
    assert config.channels["events"].may_publish("probe")


def test_good_file(tmp_path):
    """A minimal file loads with its class and ACL."""
    config = load_config(write(tmp_path, GOOD))
    spec = config.channels["events"]
    assert spec.qos.capacity == 5 and spec.qos.ttl == 10.0
    assert spec.may_publish("probe") and not spec.may_publish("console")
    assert spec.may_subscribe("console") and not spec.may_subscribe("probe")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('faults = 1', 'faults = "one"', r"\[cluster.faults\]: expected the number of faulty"),
        ('capacity = 5', 'capacity = 0', r"\[classes.fast.capacity\]: expected a positive integer, found 0"),
        ('class = "fast"', 'class = "slow"', r"\[channels\[0\].class\]: expected one of the classes"),
        ('publishers = ["probe"]', 'publishers = ["mallory"]', r"found 'mallory'"),
        ('tag = "events"', 'tag = "events"\nqop = "paxos"', r"\[channels\[0\].qop\]: expected one of bft, cft"),
        ('ttl = 10', 'ttl = 10\ncolour = "red"', r"\[classes.fast.colour\]: expected one of the keys"),
        ('default_client = "probe"', 'default_client = "ghost"', r"default_client\]: expected a client"),
    ],
)
def test_mistakes_are_named(tmp_path, old, new, message):
    """Each mistake raises ConfigError naming the file, the key and what was expected."""
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(path)


def test_missing_file_and_bad_toml(tmp_path):
    """A missing file or invalid TOML is one clear error."""
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[cluster\n"))


def test_no_replicas(tmp_path):
    """A cluster without replicas is refused."""
    text = GOOD.split("[[replicas]]")[0] + "[clients.probe]\n"
    with pytest.raises(ConfigError, match=r"\[replicas\]: expected at least one"):
        load_config(write(tmp_path, text.replace('default_client = "probe"', "")))


def test_unknown_scheme_lists_available(tmp_path):
    """A channel naming a scheme no plugin provides stops start-up listing those that exist."""
    from fit_broker.errors import UnknownComponent
    from fit_broker.schemes.registry import scheme_lookup

    config = load_config(write(tmp_path, GOOD.replace('class = "fast"', 'class = "fast"\nscheme = "rot26"')))
    with pytest.raises(UnknownComponent, match=r"'rot26'.*available: .*si"):
        scheme_lookup(config)


def test_bft_needs_three_f_plus_one(tmp_path):
    """A BFT channel on a cluster of fewer than 3f+1 replicas is refused with the numbers."""
    text = GOOD.replace('class = "fast"', 'class = "fast"\nqop = "bft"')
    with pytest.raises(ConfigError, match=r"\[channels\[0\].qop\]: .*n >= 3f\+1 = 4 replicas to tolerate 1.*has 2"):
        load_config(write(tmp_path, text))
