"""
A subscriber's stream of one channel: what a replica may push, and when.
"""

from fit_broker.units import MAX_CREDIT_BYTES, MAX_CREDIT_EVENTS, batch_bytes, credit_cost

# Events and bytes one delivery frame carries at most.
DELIVERY_EVENTS = 400
DELIVERY_BYTES = 512 * 1024


class Stream:
    """
    Credit-based push of one channel's queue to one subscriber connection.

    The subscriber grants credits in events and in bytes as its application
    takes what it was sent; the replica pushes a batch only while both are
    positive, so a slow console slows only its own stream, and what it was
    sent but has not acknowledged stays bounded.  The subscriber mirrors this
    count exactly (L{fit_broker.client.subscriber}), so a replica that pushes
    beyond its credit is caught.  Credits are capped at
    L{MAX_CREDIT_EVENTS} and L{MAX_CREDIT_BYTES} on both sides: a subscriber
    cannot make a replica hold more than that sent and unacknowledged.
    """

    __slots__ = ("tag", "queue", "events", "bytes", "max_events", "max_bytes")

    ordered = False

    def __init__(self, tag, queue, events, nbytes):
        self.tag = tag
        self.queue = queue
        self.max_events = MAX_CREDIT_EVENTS
        self.max_bytes = MAX_CREDIT_BYTES
        self.events = self.bytes = 0
        self.grant(events, nbytes)

    def grant(self, events, nbytes):
        """
        Add credits; values that are not positive integers add nothing.
        """
        if type(events) is int and events > 0:
            self.events = min(self.events + events, self.max_events)
        if type(nbytes) is int and nbytes > 0:
            self.bytes = min(self.bytes + nbytes, self.max_bytes)

    @property
    def open(self):
        return self.events > 0 and self.bytes > 0

    @property
    def ready(self):
        """
        True when there is credit and something waits to be pushed.
        """
        return self.events > 0 and self.bytes > 0 and self.queue.size > 0

    def take(self, now):
        """
        Return the batches of the next delivery frame within the credits, and
        charge them.
        """
        if not (self.events > 0 and self.bytes > 0):
            return []
        batches = self.queue.take(
            min(self.events, DELIVERY_EVENTS), now, min(self.bytes, DELIVERY_BYTES)
        )
        for batch in batches:
            self.events -= credit_cost(batch)
            self.bytes -= batch_bytes(batch)
        return batches
