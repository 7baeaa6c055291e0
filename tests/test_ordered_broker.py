"""
Ordered channels in the broker state machine: admission before the log,
the same application of decided entries at every replica, tombstones for
gaps, and replies that wait for the log.
"""

import tomllib

import attrs
import pytest

from fit_broker.broker.machine import BrokerStateMachine
from fit_broker.broker.ordered import (
    EXPIRED,
    OVERFLOW,
    OrderedQueue,
    ReplicatedState,
    batch_ref,
    check_value,
)
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.units import Request, batch_digest, pack_contents
from fit_broker.config import parse_config
from fit_broker.init import cluster_toml

NOW = 1_800_000_000.0


@attrs.frozen
class Decided:
    instance: int
    timestamp: float
    values: tuple
    transferred: bool = False


def machine(index=0, **qos):
    """A replica's state machine for channel 'events' (ordered) and 'plain' (not)."""
    clients = ("probe", "console")
    text = cluster_toml(
        "sim", 1, [7600 + i for i in range(4)], clients,
        [("events", "events", "ordered", "cft", "si", clients, clients),
         ("plain", "plain", "plain", "cft", "si", clients, clients)],
        keys_dir="keys", tls=False, admins=[],
        classes={
            "ordered": dict({"capacity": 1000, "ttl": 60, "ordering": "channel"}, **qos),
            "plain": {"capacity": 1000, "ttl": 60},
        },
    )
    c = parse_config("<sim>", tomllib.loads(text))
    return BrokerStateMachine(c, scheme_lookup(c), replica_index=index)


def event(first_id, publisher="probe", timestamp=NOW, ttl=30.0, contents=(b"x",)):
    return (publisher, first_id, timestamp, ttl, 0, pack_contents(list(contents)), b"")


def publish(m, batches, client="probe", channel="events", seq=1, token="t"):
    return m.handle(client, Request(seq, "publish", channel, 0, tuple(batches)), NOW, token)


class Log:
    """Decides values in the order they are given, for several machines alike."""

    def __init__(self, *machines):
        self.machines = machines
        self.instance = 0

    def decide(self, values, timestamp=NOW):
        self.instance += 1
        entry = Decided(self.instance, timestamp, tuple(values))
        for m in self.machines:
            m.apply_decided([entry], NOW)


def subscribe(m, log, client="console", channel="events"):
    reply = m.handle(client, Request(2, "subscribe", channel, options={"stream": True}), NOW, "s")
    assert reply is None
    log.decide(m.take_proposals())
    answers = dict(m.take_answers())
    assert answers["s"].ok, answers
    return answers["s"]


def two_replicas():
    """Replicas 0 and 1 applying one log, with 'console' subscribed to 'events' at both."""
    a, b = machine(0), machine(1)
    log = Log(a, b)
    subscribe(a, log)
    b.handle("console", Request(2, "subscribe", "events", options={"stream": True}), NOW, "s")
    return a, b, log


def test_publish_waits_for_the_log_and_answers_with_the_position():
    """An ordered publish is answered only once its references are decided, with their position."""
    m = machine()
    log = Log(m)
    subscribe(m, log)
    assert publish(m, [event(1), event(2)]) is None
    proposals = m.take_proposals()
    assert [p[0] for p in proposals] == ["batch", "batch"] and all(check_value(p) is None for p in proposals)
    assert m.take_answers() == []
    log.decide(proposals)
    (token, reply), = m.take_answers()
    assert token == "t" and reply.ok and reply.info["position"] == 3 and reply.info["appended"] == 2


def test_replicas_applying_one_log_agree_on_sequence_numbers_and_state():
    """Two replicas that admitted different things but apply the same log queue the same entries and hold equal state."""
    a, b, log = two_replicas()
    publish(a, [event(1)])
    publish(b, [event(2)])
    refs = a.take_proposals() + b.take_proposals()
    log.decide(refs)
    log.decide(refs)  # a Byzantine leader repeats them: deduplicated alike
    assert a.state_snapshot() == b.state_snapshot()
    entries = []
    for m in (a, b):
        stream = m.open_stream("events", "console", 100, 1 << 20)
        entries.append([(e[0], e[1], e[3]) for e in stream.take(NOW)])
    assert entries[0] == entries[1] == [(2, 1, ""), (3, 2, "")]
    assert a.channels["events"].counters["decided-duplicate"] == 2


def test_a_batch_expired_at_the_decided_timestamp_leaves_a_tombstone():
    """A reference decided after its TTL becomes a tombstone with its sequence number, never a silent gap."""
    m = machine()
    log = Log(m)
    subscribe(m, log)
    publish(m, [event(1, ttl=5.0), event(2)])
    log.decide(m.take_proposals(), timestamp=NOW + 10)
    stream = m.open_stream("events", "console", 100, 1 << 20)
    taken = stream.take(NOW)
    assert [(e[1], e[3]) for e in taken] == [(1, EXPIRED), (2, "")]
    assert taken[0][2][5] == b"" and len(taken[0][2][6]) == 32


def test_a_replica_lacking_a_decided_batch_sends_its_digest_and_fetches_it_from_peers():
    """A decided reference whose body this replica never got goes out as its digest and is fetched and checked."""
    a, b, log = two_replicas()
    publish(a, [event(1)])
    log.decide(a.take_proposals())
    wanted = b.missing_to_fetch(NOW)
    assert len(wanted) == 1 and b.missing_to_fetch(NOW) == []
    found = a.serve_peer_fetch([(w[1], w[2], w[3]) for w in wanted])
    forged = [("events", event(1, contents=(b"forged",)))]
    assert b.peer_fetched(forged) == 0 and b.counters["peer-fetch-mismatch"] == 1
    assert b.peer_fetched(found) == 1 and not b.missing
    stream = b.open_stream("events", "console", 100, 1 << 20)
    assert stream.take(NOW)[0][2] == event(1)


def test_subscription_goes_through_the_log_and_unordered_channels_do_not():
    """A first subscription to an ordered channel waits for the log; an unordered channel answers at once."""
    m = machine()
    assert m.handle("console", Request(2, "subscribe", "events"), NOW, "s") is None
    assert m.take_proposals() == [("subscribe", "events", "console")]
    assert m.handle("console", Request(3, "subscribe", "plain"), NOW, "p").ok
    reply = m.handle("probe", Request(4, "publish", "plain", 0, (event(1),)), NOW, "q")
    assert reply.ok and m.take_proposals() == []


def test_a_retry_of_a_decided_batch_is_answered_at_once_with_its_position():
    """A publisher that retries a batch already decided gets its position without a new proposal."""
    m = machine()
    log = Log(m)
    publish(m, [event(1)])
    log.decide(m.take_proposals())
    m.take_answers()
    reply = publish(m, [event(1)], seq=5)
    assert reply.ok and reply.info["position"] == 1 and m.take_proposals() == []


def test_a_request_the_log_never_decides_is_answered_busy_after_the_timeout():
    """A publish that is never ordered is answered, not left hanging."""
    from fit_broker.broker.machine import ORDER_TIMEOUT

    m = machine()
    publish(m, [event(1)])
    m.expire_waiting(NOW + ORDER_TIMEOUT + 1)
    (token, reply), = m.take_answers()
    assert token == "t" and reply.status == "busy" and "not ordered" in reply.text


def test_state_transfer_restores_subscriptions_and_sequence_numbers():
    """A replica restored from another's snapshot continues the same sequence numbers."""
    a, b = machine(0), machine(1)
    log = Log(a)
    subscribe(a, log)
    publish(a, [event(1), event(2)])
    log.decide(a.take_proposals())
    b.restore_state(a.state_snapshot())
    assert b.state_snapshot() == a.state_snapshot()
    assert "console" in b.channels["events"].queues
    log = Log(a, b)
    publish(a, [event(3)])
    log.decide(a.take_proposals())
    stream = b.open_stream("events", "console", 100, 1 << 20)
    assert [(e[0], e[1]) for e in stream.take(NOW)] == [(4, 3)]


def test_pulls_are_refused_on_ordered_channels():
    """An ordered channel streams; a pull gets a clear refusal."""
    m = machine()
    Log(m)
    reply = m.handle("console", Request(3, "receive", "events", 10), NOW)
    assert reply.status == "bad-request" and "ordered" in reply.text


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-newest"])
def test_overflow_leaves_merged_tombstones_and_keeps_sequence(policy):
    """A full ordered queue turns batches into tombstones (merged when adjacent), never into a gap."""
    q = OrderedQueue(capacity=3, overflow=policy)
    for seq in range(1, 8):
        ref = batch_ref("events", event(seq), batch_digest(event(seq)))
        q.append(seq, seq, ref)
    taken = q.take(100, 1 << 20, NOW, lambda ref: event(ref[3]))
    seqs = []
    for position, seq, batch, note, span in taken:
        seqs.extend(range(seq, seq + span))
        if note:
            assert note == OVERFLOW and span >= 1
    assert seqs == list(range(1, 8))
    assert sum(1 for e in taken if not e[3]) == 3
    assert len([e for e in taken if e[3]]) == 1


def test_acknowledged_entries_are_forgotten_and_unacknowledged_ones_resent_in_order():
    """Acks free entries; a reconnect resends the rest in sequence order."""
    q = OrderedQueue(capacity=100)
    refs = [batch_ref("events", event(i), batch_digest(event(i))) for i in range(1, 5)]
    for i, ref in enumerate(refs, 1):
        q.append(i, i, ref)
    form = lambda ref: event(ref[3])
    assert [e[1] for e in q.take(100, 1 << 20, NOW, form)] == [1, 2, 3, 4]
    assert q.ack([("probe", 2)]) == 1
    q.requeue_unacked()
    assert [e[1] for e in q.take(100, 1 << 20, NOW, form)] == [1, 3, 4]
    assert q.watermark(9) == 9


def test_snapshot_round_trip_and_garbage():
    """The replicated state survives a snapshot round trip, and garbage is refused with ValueError."""
    s = ReplicatedState(["events"])
    s.dedup(batch_ref("events", event(1), batch_digest(event(1))))
    assert ReplicatedState.restore(s.snapshot()).snapshot() == s.snapshot()
    with pytest.raises(ValueError):
        ReplicatedState.restore(b"\x93garbage")


def _admin_machines(count=2):
    from fit_broker.keys import generate_keyrings

    clients = ("ops", "probe", "console")
    text = cluster_toml(
        "sim", 1, [7600 + i for i in range(4)], clients,
        [("events", "events", "ordered", "cft", "si", ["probe"], ["console"])],
        keys_dir="keys", tls=False, admins=["ops"],
        classes={"ordered": {"ordering": "channel"}},
    )
    c = parse_config("<sim>", tomllib.loads(text))
    rings = generate_keyrings(4, list(clients), {"events": ["probe", "console"]})
    machines = []
    for i in range(count):
        m = BrokerStateMachine(c, scheme_lookup(c), keys=rings[f"replica-{i}"], replica_index=i)
        m.table_problem = None
        machines.append(m)
    return machines, rings


def _admin_request(rings, change, seq=7, admin="ops"):
    from fit_broker.client.admin import sign_change

    data, signature = sign_change(rings[admin], "sim", admin, change)
    return Request(seq, "admin", options={"change": data, "signature": signature})


def test_a_signed_table_change_is_ordered_and_applied_alike_everywhere():
    """An administrator's signed change goes through the log; every replica applies it at the same position, and the new channel works."""
    (a, b), rings = _admin_machines()
    log = Log(a, b)
    change = {"op": "create-channel", "tag": "audit", "class": "ordered",
              "publishers": ["probe"], "subscribers": ["console"]}
    assert a.handle("ops", _admin_request(rings, change), NOW, "adm") is None
    log.decide(a.take_proposals())
    (token, reply), = a.take_answers()
    assert reply.ok and reply.info["version"] == 1
    assert a.table.version == b.table.version == 1
    assert "audit" in a.channels and "audit" in b.channels and a.channels["audit"].ordered
    assert a.state_snapshot() == b.state_snapshot()
    table = a.handle("console", Request(8, "table"), NOW)
    assert table.info["version"] == 1 and "audit" in table.info["table"]["channels"]
    assert a.handle("probe", Request(9, "publish", "audit", 0, (event(1),)), NOW, "p") is None


def test_a_table_change_not_signed_by_an_administrator_is_refused_at_once_and_when_decided():
    """A client that is not an administrator, or a replica replaying a change, cannot change the table."""
    (a, b), rings = _admin_machines()
    change = {"op": "grant", "tag": "events", "client": "probe", "role": "subscribe"}
    reply = a.handle("probe", _admin_request(rings, change, admin="probe"), NOW, "x")
    assert reply.status == "refused" and "not-admin" in reply.text
    # a Byzantine leader slips the forged change into the log: every correct replica refuses it alike
    from fit_broker.client.admin import sign_change
    from fit_broker.control import table_value

    data, signature = sign_change(rings["probe"], "sim", "probe", change)
    Log(a, b).decide([table_value("ops", data, signature)])
    assert a.table.version == b.table.version == 0
    assert a.state_snapshot() == b.state_snapshot()


def test_a_replica_restored_by_state_transfer_gets_the_changed_table():
    """State transfer carries the control table: the restored replica has the run-time channel."""
    (a, b), rings = _admin_machines()
    a.handle("ops", _admin_request(rings, {"op": "create-channel", "tag": "audit", "class": "ordered",
                                           "publishers": ["probe"], "subscribers": ["console"]}), NOW, "adm")
    Log(a).decide(a.take_proposals())
    b.restore_state(a.state_snapshot())
    assert b.table.version == 1 and "audit" in b.channels
    assert b.state_snapshot() == a.state_snapshot()


def test_table_changes_are_refused_with_one_line_when_no_log_runs():
    """Without an ordering protocol, an admin request is refused with the reason."""
    (a,), rings = _admin_machines(1)
    a.table_problem = "the replicas run no ordering protocol"
    reply = a.handle("ops", _admin_request(rings, {"op": "remove-channel", "tag": "events"}), NOW, "x")
    assert reply.status == "refused" and "no ordering protocol" in reply.text and "\n" not in reply.text


def test_clients_learn_run_time_channels_from_the_table_replicas_describe():
    """A channel created at run time becomes a ChannelSpec a client can use, with its file's classes."""
    from fit_broker.client.admin import table_channels

    (a, b), rings = _admin_machines()
    a.handle("ops", _admin_request(rings, {"op": "create-channel", "tag": "audit", "class": "ordered",
                                           "publishers": ["probe"], "subscribers": ["console"]}), NOW, "adm")
    Log(a).decide(a.take_proposals())
    info = a.handle("console", Request(8, "table"), NOW).info
    learned = table_channels(a.config, info)
    spec = learned["audit"]
    assert spec.may_publish("probe") and spec.may_subscribe("console") and not spec.may_publish("console")
    assert spec.qos.ordering == "channel" and spec == a.channels["audit"].spec
    assert table_channels(a.config, {"table": {"channels": {"x": {"class": "missing"}}}}) == {}


def test_every_request_waiting_on_one_table_change_gets_its_result():
    """A change that reached a replica twice (a client's resend) is answered ok on both, not 'not applied' on the second."""
    (a,), rings = _admin_machines(1)
    request = _admin_request(rings, {"op": "grant", "tag": "events", "client": "ops", "role": "subscribe"})
    assert a.handle("ops", request, NOW, "first") is None
    assert a.handle("ops", request, NOW, "second") is None
    Log(a).decide(a.take_proposals()[:1])
    answers = dict(a.take_answers())
    assert answers["first"].ok and answers["second"].ok, answers
    assert not a._table_results


def test_a_sent_entry_that_expires_unacknowledged_is_resent_as_a_tombstone():
    """An entry sent but not acknowledged when its TTL passes becomes a tombstone, which a reconnect sends again."""
    q = OrderedQueue(capacity=100)
    ref = batch_ref("events", event(1, ttl=5.0), batch_digest(event(1, ttl=5.0)))
    q.append(1, 1, ref)
    assert [e[3] for e in q.take(100, 1 << 20, NOW, lambda r: event(1, ttl=5.0))] == [""]
    assert q.expire(NOW + 10) == 1 and q.unacked_events == 0 and q.counters["expired"] == 1
    q.requeue_unacked()
    taken = q.take(100, 1 << 20, NOW + 10, lambda r: event(1))
    assert [(e[1], e[3]) for e in taken] == [(1, EXPIRED)]


def test_replicas_load_their_keys_when_only_agreement_needs_them(tmp_path):
    """Without TLS and with only unkeyed (si) ordered channels, replicas still load the keys their links and signatures need."""
    from fit_broker.config import load_config
    from fit_broker.credentials import replica_credentials
    from fit_broker.pki import write_cluster_material

    clients = ["probe", "console"]
    write_cluster_material(str(tmp_path / "keys"), "t", 4, clients, {"events": clients})
    text = cluster_toml(
        "t", 1, [7600 + i for i in range(4)], clients,
        [("events", "events", "ordered", "bft", "si", clients, clients)],
        keys_dir="keys", tls=False, admins=[], classes={"ordered": {"ordering": "channel"}},
    )
    (tmp_path / "cluster.toml").write_text(text)
    keys, tls, _ = replica_credentials(load_config(str(tmp_path / "cluster.toml")), 0)
    assert tls is None and keys is not None and keys.replica_signing_key is not None


def test_a_publish_ordered_after_its_publisher_was_revoked_is_refused_not_acknowledged():
    """A batch admitted before a revocation but ordered after it is never delivered, so its publisher is told so instead of ok."""
    (a, b), rings = _admin_machines()
    log = Log(a, b)
    a.handle("console", Request(2, "subscribe", "events", options={"stream": True}), NOW, "s")
    log.decide(a.take_proposals())
    a.take_answers()
    assert a.handle("probe", Request(3, "publish", "events", 0, (event(1),)), NOW, "pub") is None
    batch = a.take_proposals()
    a.handle("ops", _admin_request(rings, {"op": "revoke", "tag": "events", "client": "probe", "role": "publish"}), NOW, "adm")
    log.decide(a.take_proposals())
    log.decide(batch)
    answers = dict(a.take_answers())
    assert answers["adm"].ok
    assert answers["pub"].status == "unauthorized" and "may no longer publish" in answers["pub"].text
    stream = a.open_stream("events", "console", 100, 1 << 20)
    assert stream.take(NOW) == []


def test_a_missing_batch_is_not_asked_for_after_its_ttl_nor_kept_for_a_removed_channel():
    """Peers are not asked forever for a decided batch that expired, and a copy for a channel removed since is dropped without error."""
    a, b = machine(0), machine(1)
    log = Log(a, b)
    publish(a, [event(1, ttl=5.0)])
    log.decide(a.take_proposals())
    assert len(b.missing_to_fetch(NOW)) == 1
    assert b.missing_to_fetch(NOW + 10) == [] and not b.missing
    publish(a, [event(2)])
    log.decide(a.take_proposals())
    found = a.serve_peer_fetch([(w[1], w[2], w[3]) for w in b.missing_to_fetch(NOW)])
    del b.channels["events"]
    assert b.peer_fetched(found) == 0 and not b.missing


@pytest.mark.parametrize("persistence", ["memory", "disk"])
def test_hostile_resume_options_are_capped_and_never_crash(persistence):
    """A subscriber's resume claims (a position past the log, a huge or negative sequence number, wrong types, a replay from a bad time) are capped or refused in one line, never a traceback; an honest claim below the queue's start gets one lost tombstone."""
    m = machine(persistence=persistence)
    log = Log(m)
    subscribe(m, log)
    for i in range(1, 4):
        publish(m, [event(i)], seq=10 + i, token=f"p{i}")
        log.decide(m.take_proposals())
    queue = m.channels["events"].queues["console"]
    queue.floor = 3  # as after a restart that lost what it queued
    hostile = [
        {"from": 2**64 - 1, "from_seq": 2**63},
        {"from": -5, "from_seq": -1},
        {"from": "one", "from_seq": "two"},
        {"from": 1.5, "from_seq": None},
        {"from_time": "yesterday"},
        {"from_time": float("nan")},
    ]
    for number, options in enumerate(hostile):
        reply = m.handle(
            "console", Request(30 + number, "subscribe", "events", options={"stream": True, **options}),
            NOW, f"h{number}",
        )
        assert reply is not None
        if "from_time" in options:
            assert reply.status == "bad-request" and "\n" not in reply.text, reply
        else:
            assert reply.ok, reply
    assert not any(entry[3] == "lost" for entry in queue.entries)
    reply = m.handle(
        "console", Request(40, "subscribe", "events", options={"stream": True, "from": 1, "from_seq": 1}),
        NOW, "honest",
    )
    assert reply.ok
    queue = m.channels["events"].queues["console"]
    lost = [entry for entry in queue.entries if entry[3] == "lost"]
    assert len(lost) == 1 and lost[0][1] == 1 and lost[0][4] == 2


@pytest.mark.parametrize("persistence", ["memory", "disk"])
def test_batches_caught_up_on_by_state_transfer_are_queued_for_nobody(persistence):
    """A replica catching up by state transfer applies the batches like every replica (same sequence numbers and state), but queues them for no subscriber and fetches none: it cannot know what subscribers acknowledged meanwhile, and re-sending what they had would deliver it twice where the first copy wins. The next batch decided normally is queued."""
    a, b = machine(0, persistence=persistence), machine(1, persistence=persistence)
    log = Log(a, b)
    subscribe(a, log)
    b.handle("console", Request(2, "subscribe", "events", options={"stream": True}), NOW, "s")
    publish(a, [event(1)], seq=11, token="p1")
    publish(b, [event(1)], seq=11, token="p1")
    refs = a.take_proposals()
    b.take_proposals()
    log.instance += 1
    a.apply_decided([Decided(log.instance, NOW, tuple(refs))], NOW)
    b.apply_decided([Decided(log.instance, NOW, tuple(refs), transferred=True)], NOW)
    assert a.state_snapshot() == b.state_snapshot()
    assert len(a.channels["events"].queues["console"].entries) == 1
    assert len(b.channels["events"].queues["console"].entries) == 0
    assert not b.missing
    publish(a, [event(2)], seq=12, token="p2")
    publish(b, [event(2)], seq=12, token="p2")
    log.decide(a.take_proposals())
    b.take_proposals()
    assert [e[1] for e in b.channels["events"].queues["console"].entries] == [2]
    if persistence == "disk":
        channel = b.channels["events"]
        channel.rebuild()
        assert [e[1] for e in channel.queues["console"].entries] == [2]


@pytest.mark.parametrize("persistence", ["memory", "disk"])
def test_an_ack_that_comes_before_the_batch_keeps_it_out_of_the_queue(persistence):
    """A lagging replica told that the subscriber acknowledged a batch it has not applied yet does not queue it when it comes (counted acked-ahead), and on disk logs that, so a rebuild after a restart does not send it either."""
    m = machine(persistence=persistence)
    log = Log(m)
    subscribe(m, log)
    publish(m, [event(1)], seq=11, token="p1")
    refs = m.take_proposals()
    assert m.ack("events", "console", (("probe", 1),)) == 0
    log.decide(refs)
    channel = m.channels["events"]
    queue = channel.queues["console"]
    assert len(queue.entries) == 0 and queue.counters["acked-ahead"] == 1
    publish(m, [event(2)], seq=12, token="p2")
    log.decide(m.take_proposals())
    assert [e[1] for e in channel.queues["console"].entries] == [2]
    if persistence == "disk":
        channel.rebuild()
        assert [e[1] for e in channel.queues["console"].entries] == [2]
