"""
Publisher and subscriber processes that drive a cluster and record what happened.

    python -m benchmarks.loadgen publish --config F --as probe --channels a,b \
        --events 20000 [--size 256] [--rate 5000] [--acked FILE]
    python -m benchmarks.loadgen subscribe --config F --as console --channels a,b \
        --expect 20000 [--idle 30] [--delivered FILE]

Each prints one JSON summary line on stdout when done.  The publisher records
every acknowledged event as a line ``channel event_id crc32`` in --acked; the
subscriber records each delivery the same way in --delivered, so a checker can
compare the two histories.  The subscriber says ``ready`` on stderr once
subscribed.
"""

import argparse
import json
import os
import sys
import time
from zlib import crc32


def _percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def _publish(reactor, args, session):
    from twisted.internet.defer import Deferred

    publisher = session.publisher
    channels = args.channels.split(",")
    filler = os.urandom(max(0, args.size - 24)).hex()[: max(0, args.size - 24)].encode()
    acked_file = open(args.acked, "w") if args.acked else None
    state = {"acked": 0, "failed": 0, "outstanding": 0, "sent": 0}
    done = Deferred()
    window = args.window
    batch = args.batch
    started = time.monotonic()
    wake = [None]

    def record(ids, tag, contents):
        state["acked"] += len(ids)
        if acked_file:
            acked_file.write(
                "".join(f"{tag} {i} {crc32(c):08x}\n" for i, c in zip(ids, contents))
            )
        finished_one()

    def failed(failure, count):
        state["failed"] += count
        finished_one()

    def finished_one():
        state["outstanding"] -= 1
        if state["sent"] >= args.events and state["outstanding"] == 0 and not done.called:
            done.callback(None)
        elif wake[0] is not None:
            waiter, wake[0] = wake[0], None
            waiter.callback(None)

    turn = 0
    while state["sent"] < args.events:
        if state["outstanding"] >= window:
            wake[0] = Deferred()
            await wake[0]
            continue
        if args.rate:
            ahead = state["sent"] / args.rate - (time.monotonic() - started)
            if ahead > 0.001:
                pause = Deferred()
                reactor.callLater(ahead, pause.callback, None)
                await pause
        count = min(batch, args.events - state["sent"])
        tag = channels[turn % len(channels)]
        turn += 1
        stamp = b"%.6f " % time.time()
        contents = [stamp + filler] * count
        state["sent"] += count
        state["outstanding"] += 1
        d = publisher.publish_many(tag, contents, args.urgency)
        d.addCallbacks(record, failed, callbackArgs=(tag, contents), errbackArgs=(count,))
    if state["outstanding"]:
        await done
    elapsed = time.monotonic() - started
    if acked_file:
        acked_file.close()
    return {
        "role": "publisher",
        "sent": state["sent"],
        "acked": state["acked"],
        "failed": state["failed"],
        "seconds": round(elapsed, 3),
        "published_per_s": round(state["acked"] / elapsed, 1) if elapsed else None,
    }


async def _subscribe(reactor, args, session):
    from twisted.internet.defer import Deferred

    channels = args.channels.split(",")
    delivered_file = open(args.delivered, "w") if args.delivered else None
    seen = set()
    state = {"delivered": 0, "duplicates": 0, "first": None, "last": time.monotonic()}
    latencies = []
    done = Deferred()
    sample_every = max(1, args.expect // 20000) if args.expect else 1

    def on_events(tag):
        def take(events):
            now = time.monotonic()
            if state["first"] is None:
                state["first"] = now
            state["last"] = now
            wall = time.time()
            lines = []
            for event in events:
                key = (tag, event.publisher, event.event_id)
                if key in seen:
                    state["duplicates"] += 1
                seen.add(key)
                state["delivered"] += 1
                if state["delivered"] % sample_every == 0:
                    stamp = event.content[:17].split(b" ", 1)[0]
                    try:
                        latencies.append(wall - float(stamp))
                    except ValueError:
                        pass
                if delivered_file:
                    lines.append(f"{tag} {event.event_id} {crc32(event.content):08x}\n")
            if delivered_file:
                delivered_file.write("".join(lines))
                delivered_file.flush()  # written before the hand-over is recorded, for crash tests
            if args.expect and state["delivered"] >= args.expect and not done.called:
                done.callback(None)

        return take

    for tag in channels:
        await session.subscriber.subscribe(tag, on_events(tag))
    print("ready", file=sys.stderr, flush=True)

    def idle_check():
        if done.called:
            return
        if time.monotonic() - state["last"] > args.idle:
            done.callback(None)
        else:
            reactor.callLater(0.5, idle_check)

    state["last"] = time.monotonic()
    reactor.callLater(0.5, idle_check)
    await done
    if delivered_file:
        delivered_file.close()
    span = (state["last"] - state["first"]) if state["first"] else 0.0
    latencies.sort()
    return {
        "role": "subscriber",
        "delivered": state["delivered"],
        "duplicates": state["duplicates"],
        "seconds": round(span, 3),
        "delivered_per_s": round(state["delivered"] / span, 1) if span else None,
        "p50_ms": round(_percentile(latencies, 0.5) * 1000, 2) if latencies else None,
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "voter": {
            tag: dict(session.subscriber.voters[tag].counters) for tag in channels
        },
        "subscriber": dict(session.subscriber.counters),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("role", choices=["publish", "subscribe"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--as", dest="client", required=True)
    parser.add_argument("--channels", required=True)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s, 0 = as fast as acknowledged")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--window", type=int, default=64, help="publish_many calls outstanding")
    parser.add_argument("--urgency", type=int, default=0)
    parser.add_argument("--acked")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--delivered")
    parser.add_argument("--credit", type=int, default=2000)
    parser.add_argument("--state-dir", default=None, help="record deliveries there (exactly once across restarts)")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from fit_broker.client.session import open_session
    from fit_broker.config import load_config

    config = load_config(args.config)
    options = {"timeout": 10.0}
    if args.role == "subscribe":
        options["credit"] = args.credit
        options["state_dir"] = args.state_dir
    result = {}

    async def run():
        session = open_session(config, args.client, reactor, **options)
        try:
            channels = args.channels.split(",")
            await session.proxy.wait_for_links(max(config.acks_needed(t) for t in channels), 30)
            role = _publish if args.role == "publish" else _subscribe
            result.update(await role(reactor, args, session))
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            session.stop()
            reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.run()
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
