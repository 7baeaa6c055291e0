"""
Every implementation provides the interface it declares.
"""

import pytest
from zope.interface.verify import verifyObject

from fit_broker.components import ORDERINGS, QOP_MODES, VOTERS
from fit_broker.interfaces import IOrderingProtocol, IProtectionScheme, IQoPMode, IQoSClass, IVoter
from fit_broker.qos import QoSClass
from fit_broker.schemes.registry import available_schemes


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
    """Every voter provides IVoter."""
    assert verifyObject(IVoter, VOTERS[name](faults=1, scheme=_Verifiable(), channel="c"))


@pytest.mark.parametrize("name", sorted(ORDERINGS))
def test_orderings(name):
    """Every ordering protocol provides IOrderingProtocol."""
    assert verifyObject(IOrderingProtocol, ORDERINGS[name]())


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
