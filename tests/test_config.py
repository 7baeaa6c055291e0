"""
Configuration files: valid ones load, every mistake names the file, key and expectation.
"""

import tomllib

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


def test_admins_and_max_bytes_defaults(tmp_path):
    """Without the keys nobody is an admin and every class queues at most 16 MiB per subscriber."""
    config = load_config(write(tmp_path, GOOD))
    assert config.admins == frozenset()
    assert not config.is_admin("probe")
    assert config.channels["events"].qos.max_bytes == 16 * 1024 * 1024
    assert config.classes["default"].max_bytes == 16 * 1024 * 1024


def test_admins_and_max_bytes_load(tmp_path):
    """Named admins are admins, other clients are not, and a class's max_bytes is kept."""
    text = GOOD.replace('default_client = "probe"', 'default_client = "probe"\nadmins = ["console"]')
    text = text.replace("ttl = 10", "ttl = 10\nmax_bytes = 4096")
    config = load_config(write(tmp_path, text))
    assert config.admins == frozenset({"console"})
    assert config.is_admin("console") and not config.is_admin("probe")
    assert config.channels["events"].qos.max_bytes == 4096


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('default_client = "probe"', 'admins = ["ghost"]', r"\[cluster.admins\]: expected clients of \[clients\], found 'ghost'"),
        ('default_client = "probe"', 'admins = ["*"]', r"\[cluster.admins\]: expected clients of \[clients\], found '\*'"),
        ('default_client = "probe"', 'admins = "probe"', r"\[cluster.admins\]: expected a list of client names"),
        ('default_client = "probe"', 'admins = [1]', r"\[cluster.admins\]: expected a list of client names"),
        ('ttl = 10', 'max_bytes = 0', r"\[classes.fast.max_bytes\]: expected a positive number of bytes, found 0"),
        ('ttl = 10', 'max_bytes = -5', r"\[classes.fast.max_bytes\]: expected a positive number of bytes, found -5"),
        ('ttl = 10', 'max_bytes = "16M"', r"\[classes.fast.max_bytes\]: expected a positive number of bytes, found '16M'"),
        ('ttl = 10', 'max_bytes = 1.5', r"\[classes.fast.max_bytes\]: expected a positive number of bytes, found 1.5"),
        ('ttl = 10', 'max_bytes = true', r"\[classes.fast.max_bytes\]: expected a positive number of bytes, found True"),
    ],
)
def test_admins_and_max_bytes_mistakes(tmp_path, old, new, message):
    """An unknown admin or a bad max_bytes raises ConfigError naming the file and the key."""
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(path)


def test_init_names_first_client_admin(tmp_path):
    """The cluster file init writes makes its first (default) client the only admin, unless told otherwise."""
    from fit_broker.config import parse_config
    from fit_broker.init import cluster_toml, sample_channels

    clients = ["local", "probe"]
    channels = sample_channels(clients)
    text = cluster_toml("t", 1, range(7400, 7404), clients, channels)
    config = parse_config("cluster.toml", tomllib.loads(text))
    assert config.default_client == "local"
    assert config.admins == frozenset({"local"})
    text = cluster_toml("t", 1, range(7400, 7404), clients, channels, admins=clients)
    assert parse_config("cluster.toml", tomllib.loads(text)).admins == frozenset(clients)


def test_readme_sample_keys_load(tmp_path):
    """The README's [cluster] and [classes.standard] sample with admins and max_bytes is accepted."""
    readme = open("README.md").read()
    sample = readme.split("### The configuration", 1)[1].split("```toml", 1)[1].split("[[channels]]", 1)[0]
    sample = sample.replace("[clients.probe]", "[clients.probe]\n[clients.local]\n[clients.console]")
    config = load_config(write(tmp_path, sample))
    assert config.is_admin("local")
    assert config.classes["standard"].max_bytes == 16777216


@pytest.mark.parametrize(
    "extra, message",
    [
        ("leader_timeout = 0", "[cluster.leader_timeout]: expected a positive number of seconds, found 0"),
        ("checkpoint_interval = -4", "[cluster.checkpoint_interval]: expected a positive number of decided instances"),
        ('orderer = "paxos-made-simple"', "[cluster.orderer]: expected one of"),
    ],
)
def test_ordering_settings_are_checked(extra, message):
    """The orderer's settings in [cluster] are checked, each refusal one line naming the key."""
    from fit_broker.config import parse_config
    from fit_broker.errors import FitBrokerError
    from fit_broker.init import cluster_toml, sample_channels

    clients = ["local", "probe"]
    text = cluster_toml("t", 1, range(7400, 7404), clients, sample_channels(clients))
    text = text.replace("[cluster]\n", f"[cluster]\n{extra}\n", 1)
    with pytest.raises(FitBrokerError) as raised:
        parse_config("cluster.toml", tomllib.loads(text))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_ordered_channels_refused_where_the_orderer_cannot_run():
    """An ordered channel in a cluster too small for its orderer stops the configuration with one line."""
    from fit_broker.config import parse_config
    from fit_broker.errors import ConfigError
    from fit_broker.init import cluster_toml, sample_channels

    clients = ["local", "probe"]
    text = cluster_toml("t", 1, range(7400, 7403), clients,
                        [row for row in sample_channels(clients) if row[3] == "cft" or row[2] == "ordered"])
    text = text.replace('class = "ordered"\nqop = "bft"', 'class = "ordered"\nqop = "cft"')
    config = parse_config("cluster.toml", tomllib.loads(text))
    assert config.orderer == "multi-paxos"
    small = cluster_toml("t", 1, range(7400, 7402), clients,
                         [row for row in sample_channels(clients) if row[2] == "ordered"])
    small = small.replace('qop = "bft"', 'qop = "cft"')
    with pytest.raises(ConfigError, match=r"\[cluster.orderer\]: expected an ordering protocol this cluster can run"):
        parse_config("cluster.toml", tomllib.loads(small))
