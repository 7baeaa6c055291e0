"""
FIT Broker client processes for the throughput benchmark.

    python -m benchmarks.driver publish --config F --channels ch0,ch1 --seconds 10
    python -m benchmarks.driver subscribe --config F --channels ch0,ch1 --ledger L

Unlike L{benchmarks.loadgen}, the publisher runs for a duration rather than a
number of events, and both sides keep their ids as ranges (see
L{benchmarks.ledger}) so the harness can count what was lost.  The same
processes drive the null relay, which speaks the same protocol.

The subscriber says C{ready} on stderr once subscribed and stops once it
has delivered as many events as the number the harness writes to its stdin
(the publisher's acknowledged count), or once nothing arrived for --idle
seconds after that number came.  Each prints one JSON line on stdout.
"""

import argparse
import struct
import sys
import time
from array import array
from zlib import crc32

from benchmarks.cluster import PUBLISHER, SUBSCRIBER
from benchmarks.ledger import (
    Delivered,
    Expectation,
    Ranges,
    emit,
    payload_filler,
    percentile,
    say_ready,
    write_ledger,
)


def _load_keys(config, client):
    """
    Return the client's key ring when the cluster file names key material.
    """
    if not config.keys_dir:
        return None
    from fit_broker import keys

    return keys.load_keyring(keys.resolve_party_directory(config.keys_dir, client), client)


async def publish(reactor, args, session):
    """
    Publish batches round-robin over the channels for --seconds (or until
    --events were sent), keeping --window calls outstanding, then wait for
    every acknowledgement.  Says C{publishing} on stderr as it starts, so
    that a sampling profiler can be attached then.
    """
    from twisted.internet.defer import Deferred

    publisher = session.publisher
    tags = args.channels.split(",")
    content = payload_filler(args.size)
    batch = args.batch
    ledgers = {tag: Ranges() for tag in tags}
    state = {"acked": 0, "failed": 0, "outstanding": 0, "sent": 0, "error": None, "last": None}
    wake = [None]

    def settled():
        state["outstanding"] -= 1
        if wake[0] is not None:
            waiter, wake[0] = wake[0], None
            waiter.callback(None)

    waits = array("d")

    def acked(ids, tag, sent_at):
        now = state["last"] = time.monotonic()
        waits.append(now - sent_at)
        state["acked"] += len(ids)
        ledgers[tag].add_run(ids[0], ids[-1])
        settled()

    def failed(failure, count):
        state["failed"] += count
        state["error"] = state["error"] or f"{failure.type.__name__}: {failure.getErrorMessage()}"
        settled()

    print("publishing", file=sys.stderr, flush=True)
    cpu = time.process_time()
    started = time.monotonic()
    deadline = started + args.seconds
    turn = 0
    while state["error"] is None:
        now = time.monotonic()
        if now >= deadline or (args.events and state["sent"] >= args.events):
            break
        if state["outstanding"] >= args.window:
            wake[0] = Deferred()
            await wake[0]
            continue
        if args.rate:
            ahead = state["sent"] / args.rate - (now - started)
            if ahead > 0.001:
                pause = Deferred()
                reactor.callLater(ahead, pause.callback, None)
                await pause
        tag = tags[turn % len(tags)]
        turn += 1
        state["sent"] += batch
        state["outstanding"] += 1
        d = publisher.publish_many(tag, [content] * batch)
        d.addCallbacks(acked, failed, callbackArgs=(tag, time.monotonic()), errbackArgs=(batch,))
        if turn % 8 == 0:
            # Let replies in: publish_many only queues while the reactor is ours.
            pause = Deferred()
            reactor.callLater(0, pause.callback, None)
            await pause
    while state["outstanding"]:
        wake[0] = Deferred()
        await wake[0]
    elapsed = (state["last"] or time.monotonic()) - started
    cpu = time.process_time() - cpu
    if args.ledger:
        write_ledger(args.ledger, {tag: r.normalised() for tag, r in ledgers.items()})
    summary = {
        "role": "publisher",
        "sent": state["sent"],
        "acked": state["acked"],
        "failed": state["failed"],
        "seconds": round(elapsed, 3),
        "published_per_s": round(state["acked"] / elapsed, 1) if elapsed > 0 else None,
        "cpu_s": round(cpu, 3),
    }
    # How long a publish call waited for its acknowledgement: on an ordered
    # channel, the agreement's latency plus the queue in front of it.
    waits = sorted(waits)
    for key, fraction in (("ack_p50_ms", 0.5), ("ack_p99_ms", 0.99)):
        value = percentile(waits, fraction)
        summary[key] = round(value * 1000, 2) if value is not None else None
    if state["error"]:
        summary["error"] = state["error"]
    return summary


class OrderCheck:
    """
    What the subscriber can check cheaply of the order it was handed
    batches in, one comparison or two per batch.

    Every channel here has one publisher, so publication order is id order:
    a batch whose first id is not above the last id handed over on its
    channel breaks it (C{backwards}).  On an ordered channel sequence
    numbers rise by one from batch to batch (a rise by more skips numbers,
    C{skipped}: tombstones; one that does not rise is C{seq_backwards}),
    log positions rise within a channel, and with C{ordering = "global"}
    across all of them (C{position_backwards}).  C{fingerprint} hashes each
    channel's C{(seq, position, first id, count)} in hand-over order, so
    that subscribers that delivered everything agree on it exactly when
    they were handed the same order.
    """

    PACK = struct.Struct("<qqqq").pack

    def __init__(self, global_order=False):
        self.global_order = global_order
        self.channels = {}
        self.last_global = 0
        self.backwards = 0
        self.seq_backwards = 0
        self.position_backwards = 0
        self.skipped = 0
        self.ordered_batches = 0

    def channel(self, tag):
        # [last id, last seq, last position, running crc]
        return self.channels.setdefault(tag, [-1, None, 0, 0])

    def batch(self, state, batch, count):
        if batch.first_id <= state[0]:
            self.backwards += 1
        else:
            state[0] = batch.first_id + count - 1
        seq = batch.seq
        if seq is None:
            return
        self.ordered_batches += 1
        position = batch.position
        last_seq = state[1]
        if last_seq is not None:
            if seq <= last_seq:
                self.seq_backwards += 1
            elif seq != last_seq + 1:
                self.skipped += seq - last_seq - 1
        state[1] = seq
        if position <= state[2] or (self.global_order and position <= self.last_global):
            self.position_backwards += 1
        state[2] = position
        if position > self.last_global:
            self.last_global = position
        state[3] = crc32(self.PACK(seq, position, batch.first_id, count), state[3])

    def summary(self):
        out = {"backwards": self.backwards}
        if self.ordered_batches:
            out.update(
                ordered_batches=self.ordered_batches,
                seq_backwards=self.seq_backwards,
                position_backwards=self.position_backwards,
                skipped=self.skipped,
                fingerprint={tag: f"{state[3]:08x}" for tag, state in sorted(self.channels.items())},
            )
        return out


async def subscribe(reactor, args, session):
    """
    Stream every channel, record ids, latencies and order, stop as the
    harness says.
    """
    from twisted.internet.defer import Deferred

    tags = args.channels.split(",")
    record = Delivered()
    done = Deferred()
    expectation = Expectation()
    channels = session.proxy.config.channels
    order = OrderCheck(
        global_order=any(channels[tag].qos.ordering == "global" for tag in tags if tag in channels)
    )

    def on_events(tag):
        ids = record.channel(tag)
        latencies = record.latencies
        state = order.channel(tag)
        check = order.batch

        def take(batches):
            wall = time.time()
            for batch in batches:
                count = len(batch.contents)
                record.arrived(count)
                check(state, batch, count)
                ids.extend(range(batch.first_id, batch.first_id + count))
                latencies.extend([wall - batch.timestamp] * count)

        return take

    for tag in tags:
        await session.subscriber.subscribe(tag, on_events(tag), batches=True)
    say_ready()
    cpu = time.process_time()

    quiet_since = [time.monotonic()]

    def check():
        if done.called:
            return
        expected = expectation.value
        now = time.monotonic()
        if record.last is not None and record.last > quiet_since[0]:
            quiet_since[0] = record.last
        if expected is not None:
            if record.count >= expected or now - quiet_since[0] > args.idle:
                done.callback(None)
                return
        elif now - quiet_since[0] > args.max_wait:
            done.callback(None)
            return
        reactor.callLater(0.1, check)

    reactor.callLater(0.1, check)
    await done
    cpu = time.process_time() - cpu
    summary = record.summary(args.ledger)
    summary["cpu_s"] = round(cpu, 3)
    summary["order"] = order.summary()
    voter = {}
    for v in session.subscriber.voters.values():
        for key, value in v.counters.items():
            voter[key] = voter.get(key, 0) + value
    summary["voter"] = voter
    summary["subscriber"] = dict(session.subscriber.counters)
    return summary


async def fill(reactor, args, session):
    """
    Subscribe without streaming, so that the replicas' queues only fill.
    """
    for tag in args.channels.split(","):
        await session.subscriber.subscribe(tag)
    return {"role": "fill", "subscribed": len(args.channels.split(","))}


async def status(reactor, args, session):
    """
    Return every replica's counters (the C{status} request).
    """
    from fit_broker import units
    from fit_broker.units import Request

    proxy = session.proxy
    replies = {}
    await proxy.wait_for_links(len(proxy.config.replicas), 10)
    request = Request(proxy.next_seq(), units.STATUS)
    await proxy.invoke(
        request,
        len(proxy.config.replicas),
        retry=False,
        observe=lambda index, reply: replies.__setitem__(str(index), reply.info),
    )
    return {"role": "status", "replicas": replies}


ROLES = {"publish": publish, "subscribe": subscribe, "fill": fill, "status": status}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--config", required=True)
    parser.add_argument("--as", dest="client")
    parser.add_argument("--channels", default="")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=0, help="stop after this many events (0: by time)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="events/s this publisher offers, 0 = as fast as acknowledged"
    )
    parser.add_argument("--batch", type=int, default=100, help="events per publish_many call")
    parser.add_argument("--window", type=int, default=64, help="publish_many calls outstanding")
    parser.add_argument("--credit", type=int, default=2000)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--ledger")
    args = parser.parse_args(argv)
    if args.client is None:
        args.client = SUBSCRIBER if args.role in ("subscribe", "fill") else PUBLISHER

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from fit_broker.client.session import open_session
    from fit_broker.config import load_config

    result = {}

    async def run():
        session = None
        try:
            config = load_config(args.config)
            options = {"timeout": 30.0}
            if args.role == "subscribe":
                options["credit"] = args.credit
            session = open_session(
                config, args.client, reactor, keys=_load_keys(config, args.client), **options
            )
            await session.proxy.wait_for_links(len(config.replicas), 30)
            result.update(await ROLES[args.role](reactor, args, session))
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if session is not None:
                session.stop()
            reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.run()
    emit(result)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
