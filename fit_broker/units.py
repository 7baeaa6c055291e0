"""
Data units: events, requests and replies.

On hot paths events stay the tuples the codec decoded (see L{EVENT_FIELDS});
L{Event} is the value the client API hands to applications.
"""

import attrs

EVENT_FIELDS = ("publisher", "event_id", "timestamp", "ttl", "urgency", "content", "protection")
PUBLISHER, EVENT_ID, TIMESTAMP, TTL, URGENCY, CONTENT, PROTECTION = range(7)

# Request methods.
HELLO = "hello"
REGISTER = "register"
UNREGISTER = "unregister"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
PUBLISH = "publish"
RECEIVE = "receive"
CREDIT = "credit"
STATUS = "status"
METHODS = frozenset(
    {HELLO, REGISTER, UNREGISTER, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, RECEIVE, CREDIT, STATUS}
)


@attrs.frozen
class Event:
    """
    One event as a publisher sent it.  Its identity is C{(publisher, event_id)}.

    @ivar timestamp: the publisher's clock, seconds since the epoch.
    @ivar ttl: seconds after C{timestamp} at which the event expires.
    @ivar urgency: 0 is the least urgent; higher levels leave queues first.
    @ivar protection: what the channel's protection scheme attached.
    """

    publisher: str
    event_id: int
    timestamp: float
    ttl: float
    urgency: int
    content: bytes
    protection: bytes = b""

    @property
    def deadline(self):
        return self.timestamp + self.ttl

    def to_wire(self):
        return (
            self.publisher,
            self.event_id,
            self.timestamp,
            self.ttl,
            self.urgency,
            self.content,
            self.protection,
        )

    @classmethod
    def from_wire(cls, t):
        return cls(*t)


@attrs.frozen
class Request:
    """
    What a client asks of every replica.

    @ivar count: how many events to fetch (C{receive}) or credit (C{credit}).
    @ivar events: wire tuples (C{publish}).
    @ivar options: method-specific values (client name, resume flag, proof).
    """

    seq: int
    method: str
    channel: str = ""
    count: int = 0
    events: tuple = ()
    options: dict = attrs.field(factory=dict)


@attrs.frozen
class Reply:
    """
    A replica's answer to the request with the same C{seq}.
    """

    seq: int
    status: str
    text: str = ""
    events: tuple = ()
    channel: str = ""
    info: dict = attrs.field(factory=dict)

    @property
    def ok(self):
        return self.status == "ok"


@attrs.frozen
class Delivery:
    """
    A batch of events a replica pushes on a subscriber's stream.
    """

    channel: str
    events: tuple
