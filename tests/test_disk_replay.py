"""
Replay of a disk channel from a time, sans-IO: the broker state machine on
FakeStorage replays exactly the batches stamped at or after the time, in log
order, within the subscriber's credit and queue bounds; other channels and
bad times are refused in one line; the subscriber votes on a replay afresh;
`tail --from TIME` parses dates and ages.
"""

import argparse
import json
import math
import random
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from twisted.internet.task import Clock

from fit_broker.broker.disk_channel import DiskStream
from fit_broker.cli import CommandError, _check_from, _join_from, _parser, parse_from
from fit_broker.client.subscriber import Subscriber
from fit_broker.errors import RequestFailed
from fit_broker.schemes.si import si
from fit_broker.units import Delivery, Request
from tests.simnet import cluster_config
from tests.test_disk_channel import NOW, Disk, config, event, publish, queued_ids, start, subscribe, sync
from tests.test_ordered_subscriber import FakeProxy


def replay(broker, since, client="console", now=NOW, tag="events", **options):
    """Subscribe C{client} again asking for a replay from C{since}; return the reply."""
    request = Request(5, "subscribe", tag, options={"resume": True, "from_time": since, **options})
    return broker.handle(client, request, now)


def published(broker, stamps, now=NOW, ttl=60.0):
    """Publish one batch per timestamp (ids 1, 2, ...) and sync; return the ids."""
    for i, stamp in enumerate(stamps, 1):
        publish(broker, [event(i, timestamp=stamp, ttl=ttl)], now=now)
    sync(broker, now)
    return list(range(1, len(stamps) + 1))


def test_replay_gives_exactly_the_batches_at_or_after_the_time_in_log_order():
    """After everything was taken (and so acknowledged), a replay from T queues again exactly the batches stamped at or after T, in log order, whatever order the stamps came in."""
    broker = start(config(), Disk())
    subscribe(broker)
    stamps = [NOW - 50, NOW - 10, NOW - 40, NOW - 20, NOW - 30, NOW]
    published(broker, stamps)
    assert queued_ids(broker) == [1, 2, 3, 4, 5, 6]
    assert queued_ids(broker) == []
    reply = replay(broker, NOW - 30)
    assert reply.ok, reply
    assert reply.info["replay"] == {"from": NOW - 30, "records": 6}
    assert queued_ids(broker) == [2, 4, 5, 6]
    channel = broker.channels["events"]
    assert channel.counters["replays"] == 1 and channel.counters["replayed"] == 4
    assert channel.replays == {}
    assert queued_ids(broker) == []  # replayed once


def test_replay_skips_what_still_waits_and_keeps_new_publishes():
    """A batch still waiting for the subscriber is not queued twice by a replay, and batches published during a replay reach the queue as usual."""
    broker = start(config(), Disk())
    subscribe(broker)
    published(broker, [NOW - 3, NOW - 2, NOW - 1])
    replay(broker, NOW - 100)
    publish(broker, [event(4)])
    assert sorted(queued_ids(broker)) == [1, 2, 3, 4]


def test_expired_batches_are_not_replayed_and_are_counted():
    """A batch whose TTL passed since it was logged is not replayed, and counts as replay-expired."""
    broker = start(config(ttl=60), Disk())
    subscribe(broker)
    publish(broker, [event(1, timestamp=NOW - 5, ttl=10.0)])
    publish(broker, [event(2, timestamp=NOW - 4, ttl=60.0)])
    sync(broker)
    later = NOW + 20
    assert queued_ids(broker) == [1, 2]
    assert replay(broker, NOW - 60, now=later).ok
    assert queued_ids(broker, now=later) == [2]
    assert broker.channels["events"].counters["replay-expired"] == 1


def test_retention_dropped_batches_are_not_replayed():
    """Segments retention dropped are gone from the log, so a replay from before them gives only what is left and unexpired, in order."""
    broker = start(config(ttl=60, max_bytes=1024), Disk())
    subscribe(broker)
    for i in range(1, 41):
        publish(broker, [event(i, timestamp=NOW - 80 + i, ttl=60.0, size=40)], now=NOW - 80 + i)
    sync(broker)
    queued_ids(broker)
    broker.expire(NOW)
    channel = broker.channels["events"]
    first = channel.log.first_index
    assert first > 0, channel.log
    assert replay(broker, 0).ok
    expected = [i for i in range(1, 41) if i - 1 >= first and NOW - 80 + i + 60 > NOW]
    got = []
    while True:  # a few at a time: the queue holds at most 1 KiB
        taken = queued_ids(broker)
        if not taken:
            break
        assert len(taken) < len(expected)
        got += taken
    assert expected and got == expected


def test_replay_flows_through_credit_and_never_holds_more_than_it():
    """A replay of a log larger than the subscriber's credit fills its queue only up to the credit at each frame, and the stream still delivers every batch once, in log order."""
    broker = start(config(capacity=10), Disk())
    subscribe(broker)
    ids = published(broker, [NOW - 30 + i / 10 for i in range(60)])
    assert len(queued_ids(broker)) == 10  # the queue's own bound: the rest overflowed
    channel = broker.channels["events"]
    assert replay(broker, 0).ok
    stream = broker.open_stream("events", "console", 4, 1 << 20)
    assert type(stream) is DiskStream
    got = []
    most = 0
    for _ in range(100):
        batches = stream.take(NOW)
        most = max(most, channel.queues["console"].size + channel.queues["console"].unacked_events)
        if not batches:
            break
        got += [b[1] for b in batches]
        broker.ack("events", "console", tuple((b[0], b[1]) for b in batches))
        stream.grant(len(batches), 1024)
    assert got == ids
    assert most <= 4
    assert channel.replays == {} and channel.counters["replayed"] == 60


def test_every_replica_replays_the_same_set_whatever_the_arrival_order():
    """Two replicas that received the same batches in different orders replay the same batches: the filter is the publisher's timestamp, not arrival."""
    stamps = {i: NOW - 10 * i for i in range(1, 9)}
    sets = []
    for seed in (1, 2):
        broker = start(config(), Disk())
        subscribe(broker)
        order = list(stamps)
        random.Random(seed).shuffle(order)
        for i in order:
            publish(broker, [event(i, timestamp=stamps[i])])
        sync(broker)
        queued_ids(broker)
        assert replay(broker, NOW - 45).ok
        sets.append(sorted(queued_ids(broker)))
    assert sets[0] == sets[1] == [1, 2, 3, 4]


def test_unsubscribing_or_starting_afresh_ends_a_replay():
    """A replay under way ends when the subscriber unsubscribes or subscribes afresh (skipping its backlog)."""
    broker = start(config(capacity=2), Disk())
    subscribe(broker)
    published(broker, [NOW - 5, NOW - 4, NOW - 3, NOW - 2])
    channel = broker.channels["events"]
    queued_ids(broker)
    replay(broker, 0)
    channel.feed("console", NOW, 1, 1 << 20)
    assert "console" in channel.replays
    subscribe(broker, resume=False)
    assert channel.replays == {}
    replay(broker, 0)
    broker.handle("console", Request(6, "unsubscribe", "events"), NOW)
    assert channel.replays == {}


@pytest.mark.parametrize("qos", [{}, {"ordering": "channel"}])
def test_replay_is_refused_on_channels_not_on_disk(qos):
    """A replay asked of a memory channel (unordered or ordered) is refused with a clear bad-request, never raised."""
    broker = start(cluster_config(("events",), clients=("probe", "console"), **qos), Disk())
    reply = replay(broker, NOW - 10)
    assert reply.status == "bad-request", reply
    assert "not kept on disk" in reply.text and 'persistence = "disk"' in reply.text


@pytest.mark.parametrize("since", ["yesterday", True, math.nan, math.inf, None, [1]])
def test_a_bad_replay_time_is_refused(since):
    """A from_time that is not a finite number is refused with a one-line bad-request naming what was expected."""
    broker = start(config(), Disk())
    subscribe(broker)
    reply = replay(broker, since)
    if since is None:
        assert reply.status == "bad-request" or (reply.ok and "replay" not in reply.info)
        return
    assert reply.status == "bad-request", reply
    assert "expected a time in seconds since the epoch" in reply.text and "\n" not in reply.text
    assert broker.channels["events"].replays == {}


# The subscriber.


class _Setup:
    def __init__(self, state_dir=None, **qos):
        self.config = cluster_config(("events",), clients=("probe", "console"), **qos)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.proxy = FakeProxy(self.config)
        self.proxy.client = "console"
        self.subscriber = Subscriber(self.proxy, self.clock, lambda name: si, state_dir=state_dir)
        self.got = []

    def subscribe(self, **options):
        return self.subscriber.subscribe("events", self.got.extend, batches=True, **options)

    def push(self, index, *ids):
        self.proxy.on_delivery(index, Delivery("events", tuple(event(i) for i in ids)))


def test_a_replay_hands_over_again_what_the_delivery_record_holds(tmp_path):
    """A subscriber that delivered batches before hands them over again when it subscribes from a time: its voter starts afresh, and the option goes in the first subscribe only."""
    first = _Setup(state_dir=str(tmp_path), persistence="disk")
    first.subscribe()
    first.push(0, 1, 2)
    assert [b.first_id for b in first.got] == [1, 2]
    first.subscriber.stop()

    again = _Setup(state_dir=str(tmp_path), persistence="disk")
    again.subscribe()
    again.push(0, 1, 2)
    assert again.got == []  # the delivery record remembers them
    again.subscriber.stop()

    replayed = _Setup(state_dir=str(tmp_path), persistence="disk")
    replayed.subscribe(from_time=NOW - 60)
    (request, _, _), = replayed.proxy.invoked
    assert request.options["from_time"] == NOW - 60
    replayed.push(0, 1, 2)
    replayed.push(1, 1, 2)
    assert [b.first_id for b in replayed.got] == [1, 2]
    for hook in replayed.proxy.on_link_up:
        hook(2)
    resubscribed = [r for _, r in replayed.proxy.sent if r.method == "subscribe"]
    assert resubscribed and all("from_time" not in r.options for r in resubscribed)
    replayed.subscriber.stop()


@pytest.mark.parametrize("qos, options", [
    ({}, {"from_time": NOW}),
    ({"persistence": "disk"}, {"from_time": "noon"}),
    ({"persistence": "disk"}, {"from_time": NOW, "from_position": 3}),
])
def test_the_subscriber_refuses_a_replay_it_cannot_ask_for(qos, options):
    """subscribe(from_time=...) fails with bad-request on a memory channel, with a time that is not a number, or with a start position too."""
    setup = _Setup(**qos)
    failure = []
    setup.subscribe(**options).addErrback(failure.append)
    assert failure and failure[0].check(RequestFailed)
    assert failure[0].value.status == "bad-request"
    assert setup.proxy.invoked == []


# The command line.


def test_tail_from_parses_positions_dates_and_ages():
    """--from takes a whole number as a position, an ISO-8601 date-time with Z or an offset, or an age before now."""
    assert parse_from("42", NOW) == ("position", 42)
    assert parse_from("-10m", NOW) == ("time", NOW - 600)
    assert parse_from("-2h", NOW) == ("time", NOW - 7200)
    assert parse_from("-30s", NOW) == ("time", NOW - 30)
    assert parse_from("-1.5d", NOW) == ("time", NOW - 1.5 * 86400)
    assert parse_from("2026-12-02T06:00:00Z", NOW) == ("time", 1796191200.0)
    assert parse_from("2026-12-02T07:00:00+01:00", NOW) == ("time", 1796191200.0)
    args = _parser().parse_args(_join_from(["tail", "--from", "-10m", "events"]))
    assert args.from_position is None and args.from_time is not None
    args = _parser().parse_args(["tail", "--from", "7", "events"])
    assert args.from_position == 7 and args.from_time is None


@pytest.mark.parametrize("text, fragment", [
    ("soon", "expected a log position (a whole number), an ISO-8601 date-time"),
    ("-10", "an age needs a unit"),
    ("-10y", "expected a log position"),
    ("2026-12-02", "not only a date"),
    ("2026-12-02T06:00:00", "needs Z or an offset"),
    ("2026-13-02T06:00:00Z", "expected a log position"),
])
def test_a_bad_time_is_one_line_naming_what_was_expected(text, fragment, capsys):
    """A --from that is neither a position nor a time exits with one line saying what was expected."""
    with pytest.raises(ValueError) as error:
        parse_from(text, NOW)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SystemExit):
        _parser().parse_args(_join_from(["tail", "--from", text, "events"]))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err


def test_tail_from_time_is_refused_in_one_line_on_other_channels():
    """--from TIME on a channel not kept on disk, or with --skip-backlog, is one CommandError; on disk channels it passes."""
    cfg = cluster_config(("events",), clients=("probe", "console"))
    args = argparse.Namespace(from_position=None, from_time=NOW, skip_backlog=False, channels=["events"])
    with pytest.raises(CommandError) as error:
        _check_from(cfg, args)
    assert "not a disk channel: events" in str(error.value) and "\n" not in str(error.value)
    _check_from(config(), args)
    args.skip_backlog = True
    with pytest.raises(CommandError, match="contradict"):
        _check_from(config(), args)


# Real replica processes.

CLI = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"]


@pytest.mark.integration
def test_tail_from_a_time_prints_exactly_the_events_since_once(tmp_path, monkeypatch):
    """Against four replica processes: after a tail printed (and acknowledged) every event, `tail --from TIME` prints exactly those published from TIME on, once each, and nothing older."""
    from tests.processes import ROOT
    from tests.test_disk_processes import start_cluster

    cluster = start_cluster(tmp_path, monkeypatch)
    try:
        config = cluster.config_path
        state = str(tmp_path / "tail-state")

        def fitbroker(*args):
            result = subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, timeout=60, env=cluster.env())
            assert result.returncode == 0, result.stderr.decode()[-2000:]
            return result

        first = subprocess.Popen(
            CLI + ["tail", "--config", config, "--as", "console", "--state-dir", state, "--count", "7", "d0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env(),
        )
        assert b"subscribed" in first.stderr.readline()
        fitbroker("publish", "--config", config, "--as", "probe", "d0", "old-1", "old-2", "old-3")
        time.sleep(1.0)
        since = time.time()
        time.sleep(0.2)
        fitbroker("publish", "--config", config, "--as", "probe", "d0", "new-1", "new-2")
        fitbroker("publish", "--config", config, "--as", "probe", "d0", "new-3", "new-4")
        out, _ = first.communicate(timeout=30)
        assert [json.loads(line)["content"] for line in out.decode().splitlines()] == [
            "old-1", "old-2", "old-3", "new-1", "new-2", "new-3", "new-4"
        ]

        when = datetime.fromtimestamp(since, timezone.utc).isoformat()
        replay = subprocess.Popen(
            CLI + ["tail", "--config", config, "--as", "console", "--state-dir", state, "--from", when, "d0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env(),
        )
        line = replay.stderr.readline()
        assert b"subscribed" in line and b"replaying from" in line, line
        time.sleep(4.0)  # long enough for any second copy to show
        replay.terminate()
        out, err = replay.communicate(timeout=30)
        printed = [json.loads(line) for line in out.decode().splitlines()]
        assert [e["content"] for e in printed] == ["new-1", "new-2", "new-3", "new-4"], err.decode()[-2000:]
        assert all(e["timestamp"] >= since for e in printed)

        refused = subprocess.run(
            CLI + ["tail", "--config", config, "--as", "console", "--from", "2026-12-02T06:00:00", "d0"],
            cwd=ROOT, capture_output=True, timeout=60, env=cluster.env(),
        )
        lines = refused.stderr.decode().strip().splitlines()
        assert refused.returncode != 0 and len(lines) == 1 and "needs Z or an offset" in lines[0]
        for index in range(4):
            assert "Traceback" not in cluster.output(index)
    finally:
        cluster.stop_all()
