"""
EXAMPLE: the 'arrival-counted' ordering protocol.

It shows the shape of a drop-in ordering protocol: a module-level factory
providing C{IPlugin} and C{IOrderingFactory}, which makes one protocol per
channel of each replica, since a protocol may hold state.  Like 'none', it
appends batches as they arrive and agrees with no other replica; it also
counts the batches it let through in C{appended}.
"""

from zope.interface import implementer

from fit_broker.interfaces import IOrderingProtocol
from fit_broker.ordering import OrderingFactory


@implementer(IOrderingProtocol)
class ArrivalCounted:
    name = "arrival-counted"

    def __init__(self):
        self.appended = 0

    def submit(self, channel, entries, now):
        self.appended += len(entries)
        return [(channel, entries)]


arrival_counted = OrderingFactory(ArrivalCounted.name, ArrivalCounted)
