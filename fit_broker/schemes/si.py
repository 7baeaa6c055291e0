"""
SI, simple identification: events carry their publisher's name and nothing
else.  Replicas trust the identity the connection established (the client's
hello, or its TLS certificate); subscribers trust the voter.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.interfaces import IProtectionScheme
from fit_broker.units import PAYLOAD, unpack_contents


@implementer(IPlugin, IProtectionScheme)
class SimpleIdentification:
    name = "si"
    subscriber_verifiable = False

    def protect(self, keys, channel, batch):
        return batch

    def check_batch(self, keys, channel, publisher, batch):
        return None

    def check_delivered(self, keys, channel, batch):
        return None

    def open(self, keys, channel, batch):
        return unpack_contents(batch[PAYLOAD])


si = SimpleIdentification()
