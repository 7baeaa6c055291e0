"""
Ordering protocols.  C{none}: each replica appends batches as they arrive.

Protocols hold state per channel, so what plugins find
(L{fit_broker.plugins.builtin_orderings}) is a factory of each.
"""

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.interfaces import IOrderingFactory, IOrderingProtocol


@implementer(IPlugin, IOrderingFactory)
@attrs.frozen
class OrderingFactory:
    """
    A named maker of ordering protocols: C{protocol} is called with no
    arguments, once per channel of a replica.
    """

    name: str
    protocol: type

    def __call__(self):
        return self.protocol()


@implementer(IOrderingProtocol)
class NoOrdering:
    """
    No agreement between replicas: a batch is appended as soon as it arrives,
    so each subscriber sees each publisher's batches of one urgency level in
    publication order, and no order across publishers.
    """

    name = "none"

    def submit(self, channel, entries, now):
        return [(channel, entries)]


no_ordering = OrderingFactory("none", NoOrdering)
