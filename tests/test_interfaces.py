"""
Every implementation provides the interface it declares.
"""

import pytest
from zope.interface.verify import verifyObject

from fit_broker import registry
from fit_broker.interfaces import (
    IOrderingFactory,
    IOrderingProtocol,
    IProtectionScheme,
    IQoPMode,
    IQoSClass,
    IVoter,
    IVoterFactory,
)
from fit_broker.qos import QoSClass
from fit_broker.schemes.registry import available_schemes

QOP_MODES = registry.available(IQoPMode)
VOTERS = registry.available(IVoterFactory)
ORDERINGS = registry.available(IOrderingFactory)


def test_builtins_are_plugins():
    """Every built-in QoP mode, voter and ordering protocol is found as a plugin by its name."""
    assert {"cft", "bft"} <= set(QOP_MODES)
    assert {"first-copy", "f-plus-one", "signature"} <= set(VOTERS)
    assert {"mod-smart", "multi-paxos"} <= set(ORDERINGS)
    for found in (QOP_MODES, VOTERS, ORDERINGS):
        assert all(plugin.name == name for name, plugin in found.items())


def test_qos_class():
    """QoSClass provides IQoSClass and caps TTLs at the class's."""
    qos = QoSClass("c", ttl=60.0)
    assert verifyObject(IQoSClass, qos)
    assert qos.effective_ttl(0) == 60.0 and qos.effective_ttl(10) == 10 and qos.effective_ttl(600) == 60.0


@pytest.mark.parametrize("name", sorted(QOP_MODES))
def test_qop_modes(name):
    """Every QoP mode provides IQoPMode and names a voter that exists."""
    mode = QOP_MODES[name]
    assert verifyObject(IQoPMode, mode)
    assert mode.default_voter() in VOTERS


class _Verifiable:
    name = "verifiable"
    subscriber_verifiable = True

    def check_delivered(self, keys, channel, batch):
        return None


@pytest.mark.parametrize("name", sorted(VOTERS))
def test_voters(name):
    """Every voter plugin provides IVoterFactory and makes a fresh IVoter, ignoring context it does not use."""
    factory = VOTERS[name]
    assert verifyObject(IVoterFactory, factory)
    voter = factory(faults=1, scheme=_Verifiable(), channel="c", replicas=4, window=(10, 1000), future=1)
    assert verifyObject(IVoter, voter)
    assert voter.name == name
    assert factory(faults=1, scheme=_Verifiable(), channel="c") is not voter


@pytest.mark.parametrize("name", sorted(ORDERINGS))
def test_orderings(name):
    """Every ordering plugin provides IOrderingFactory, checks the cluster's size and makes a fresh IOrderingProtocol per replica."""
    from fit_broker.errors import ConfigError

    factory = ORDERINGS[name]
    assert verifyObject(IOrderingFactory, factory)
    factory.check_cluster(4, 1)
    with pytest.raises(ConfigError):
        factory.check_cluster(2, 1)
    crypto = _Crypto()
    protocol = factory(0, 4, 1, crypto)
    assert verifyObject(IOrderingProtocol, protocol)
    assert protocol.name == name and factory(1, 4, 1, crypto) is not protocol


class _Crypto:
    def sign(self, data):
        return b"s" + data[:8]

    def verify(self, replica, data, signature):
        return signature == b"s" + data[:8]


@pytest.mark.parametrize("name", sorted(available_schemes()))
def test_schemes(name):
    """Every protection scheme found as a plugin provides IProtectionScheme."""
    assert verifyObject(IProtectionScheme, available_schemes()[name])


def test_bft_quorum():
    """BFT acknowledges after 2f+1 replicas and needs n >= 3f+1."""
    from fit_broker.errors import ConfigError

    bft = QOP_MODES["bft"]
    assert bft.acks_needed(4, 1) == 3 and bft.default_voter() == "f-plus-one"
    bft.check_cluster(4, 1)
    with pytest.raises(ConfigError, match="n >= 3f\\+1 = 4 replicas to tolerate 1"):
        bft.check_cluster(3, 1)


def test_cft_quorum():
    """CFT acknowledges after f+1 replicas and needs at least f+1 of them."""
    from fit_broker.errors import ConfigError

    cft = QOP_MODES["cft"]
    assert cft.acks_needed(4, 1) == 2
    with pytest.raises(ConfigError, match="at least f\\+1 = 3"):
        cft.check_cluster(2, 2)
