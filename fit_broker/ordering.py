"""
Ordering protocols.  C{none}: each replica appends batches as they arrive.
"""

from zope.interface import implementer

from fit_broker.interfaces import IOrderingProtocol


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
