"""
The broker state machine (L3): access control, deduplication, TTL and queues, no I/O.
"""

import attrs
import pytest

from fit_broker.broker.machine import BrokerStateMachine
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.units import Request, pack_contents
from tests.simnet import cluster_config

NOW = 1_800_000_000.0


@pytest.fixture
def broker():
    config = cluster_config(("events", "alerts"), clients=("probe", "console", "intruder"))
    config.channels["alerts"] = attrs.evolve(
        config.channels["alerts"],
        publishers=frozenset({"probe"}),
        subscribers=frozenset({"console"}),
    )
    return BrokerStateMachine(config, scheme_lookup(config))


def event(first_id, publisher="probe", timestamp=NOW, ttl=30.0, urgency=0, contents=(b"x",)):
    """A wire batch of one event unless told otherwise."""
    return (publisher, first_id, timestamp, ttl, urgency, pack_contents(list(contents)), b"")


def publish(broker, batches, client="probe", channel="events", now=NOW):
    return broker.handle(client, Request(1, "publish", channel, 0, tuple(batches)), now)


def subscribe(broker, client="console", channel="events", resume=False):
    return broker.handle(client, Request(2, "subscribe", channel, options={"resume": resume}), NOW)


def receive(broker, count=100, client="console", channel="events", now=NOW):
    reply = broker.handle(client, Request(3, "receive", channel, count), now)
    assert reply.ok, reply
    return [b[1] for b in reply.batches]


def test_published_events_reach_each_subscriber_once(broker):
    """Every subscriber's queue gets each accepted event once."""
    subscribe(broker)
    subscribe(broker, client="probe")
    assert publish(broker, [event(1), event(2)]).ok
    assert receive(broker) == [1, 2]
    assert receive(broker, client="probe") == [1, 2]
    assert receive(broker) == []


def test_duplicates_are_dropped_and_counted(broker):
    """A retried batch with the same event ids is acknowledged but not queued again."""
    subscribe(broker)
    publish(broker, [event(1), event(2)])
    reply = publish(broker, [event(2), event(3)])
    assert reply.ok and reply.info["appended"] == 1
    assert receive(broker) == [1, 2, 3]
    assert broker.channels["events"].counters["duplicate"] == 1


def test_unauthorised_publisher_refused(broker):
    """A client the control table does not name as publisher gets 'unauthorized' and nothing is queued."""
    subscribe(broker, channel="alerts")
    reply = publish(broker, [event(1, publisher="intruder")], client="intruder", channel="alerts")
    assert reply.status == "unauthorized"
    assert "may not publish" in reply.text
    assert broker.channels["alerts"].counters["refused:unauthorized"] == 1
    assert receive(broker, channel="alerts") == []


def test_unauthorised_subscriber_refused(broker):
    """Subscribing or receiving without authorisation is refused."""
    assert subscribe(broker, client="intruder", channel="alerts").status == "unauthorized"
    reply = broker.handle("intruder", Request(3, "receive", "alerts", 5), NOW)
    assert reply.status == "not-subscribed"


def test_forged_publisher_name_refused(broker):
    """A client cannot publish batches in another publisher's name."""
    reply = publish(broker, [event(1, publisher="console")], client="probe")
    assert reply.status == "bad-request"
    assert "names publisher 'console'" in reply.text
    assert broker.channels["events"].counters["refused:publisher-mismatch"] == 1


@pytest.mark.parametrize(
    "bad, reason",
    [
        (event(1, urgency=9), "bad-urgency"),
        (event(1, ttl=0.0), "bad-ttl"),
        (event(1, ttl=61.0), "bad-ttl"),
        (event(1, timestamp=NOW + 3600), "timestamp-out-of-bounds"),
        (event(1, timestamp=float("nan")), "timestamp-out-of-bounds"),
        (event(1, ttl=float("inf")), "bad-ttl"),
        (event(1, contents=()), "bad-payload"),
        (("probe", 1, NOW, 30.0, 0, b"\xc4\x03abc", b""), "bad-payload"),
    ],
)
def test_malformed_batches_refuse_the_request(broker, bad, reason):
    """A request holding a malformed batch is refused whole, with the reason counted."""
    subscribe(broker)
    reply = publish(broker, [event(5), bad])
    assert reply.status == "bad-request"
    assert "batch 1" in reply.text
    assert broker.channels["events"].counters[f"refused:{reason}"] == 1
    assert receive(broker) == []


def test_expired_on_arrival_counted(broker):
    """An event already past its TTL when it arrives is acknowledged, counted, and never queued."""
    subscribe(broker)
    reply = publish(broker, [event(1, timestamp=NOW - 100, ttl=10.0), event(2)])
    assert reply.ok
    assert broker.channels["events"].counters["expired-on-arrival"] == 1
    assert receive(broker) == [2]


def test_ttl_expiry_in_queue(broker):
    """Events that expire while queued are not delivered and are counted."""
    subscribe(broker)
    publish(broker, [event(1, ttl=5.0), event(2, ttl=50.0)])
    broker.expire(NOW + 10)
    assert receive(broker, now=NOW + 10) == [2]
    assert broker.channels["events"].queues["console"].counters["expired"] == 1


def test_resubscribe_without_resume_starts_afresh(broker):
    """Subscribing again without resume discards what was queued, counted as skipped; with resume, keeps it."""
    subscribe(broker)
    publish(broker, [event(1)])
    subscribe(broker, resume=True)
    publish(broker, [event(2)])
    assert receive(broker, count=1) == [1]
    subscribe(broker, resume=False)
    assert receive(broker) == []
    assert broker.channels["events"].queues["console"].counters["skipped"] == 1


def test_unknown_channel_and_method(broker):
    """Unknown channels get a precise error instead of an exception."""
    reply = broker.handle("probe", Request(1, "publish", "nope", 0, ()), NOW)
    assert reply.status == "unknown-channel" and "'nope'" in reply.text


def test_channels_are_independent(broker):
    """Publishing on one channel never appears in another."""
    subscribe(broker)
    subscribe(broker, channel="alerts")
    publish(broker, [event(1)], channel="alerts")
    assert receive(broker) == []
    assert receive(broker, channel="alerts") == [1]


def test_status_snapshot(broker):
    """status reports per-channel and per-subscriber counters."""
    subscribe(broker)
    publish(broker, [event(1)])
    info = broker.handle("console", Request(9, "status"), NOW).info
    assert info["channels"]["events"]["counters"]["accepted"] == 1
    assert info["channels"]["events"]["subscribers"]["console"]["waiting"] == 1


def test_batches_are_forwarded_unchanged_and_counted_in_events(broker):
    """A replica queues the publisher's batch as sent and counts its events."""
    subscribe(broker)
    sent = event(10, contents=[b"a", b"b", b"c"])
    reply = publish(broker, [sent])
    assert reply.info["appended"] == 3
    got = broker.handle("console", Request(3, "receive", "events", 10), NOW).batches
    assert got == (sent,)
    assert broker.channels["events"].counters["accepted"] == 3
