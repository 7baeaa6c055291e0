"""
SI, simple identification: events carry their publisher's name and nothing
else.  Replicas trust the identity the connection established (the client's
hello, or its TLS certificate); subscribers trust the voter.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.interfaces import IProtectionScheme
from fit_broker.units import CONTENT


@implementer(IPlugin, IProtectionScheme)
class SimpleIdentification:
    name = "si"
    subscriber_verifiable = False

    def protect(self, keys, channel, events):
        return events, b""

    def check_batch(self, keys, channel, publisher, events, batch_proof):
        return None

    def check_event(self, keys, channel, event):
        return None

    def open(self, keys, channel, event):
        return event[CONTENT]


si = SimpleIdentification()
