"""
Peer brokers for the baseline: Mosquitto (MQTT), NATS and Redis pub/sub.

Each runs from Debian's package, on 127.0.0.1 with a configuration written
here, and is stopped by its process id.  Limits that would silently drop a
slow subscriber's messages are lifted (as FIT Broker's queues are made large
enough), so that what is measured is speed and what is lost is reported.

Client processes, one JSON line each, same contract as
L{benchmarks.driver}:

    python -m benchmarks.peers publish --system nats --port P --channels ch0,ch1 --seconds 10
    python -m benchmarks.peers subscribe --system nats --port P --channels ch0,ch1 --ledger L

Every event carries --size bytes: a 16-byte header (publisher clock, id)
and filler.  In the plain modes each event is one message of the peer; in
the C{-batch} modes a publisher packs --batch events into one message, as
an application after throughput would, and the subscriber splits them
(FIT Broker batches the same way under its API, but keeps each event's
identity, acknowledgement and TTL).  Clients are used as a user after
throughput would: MQTT with paho's loop calls on one thread and many
messages in flight; NATS with buffered publishes and a flush (PING/PONG) per
batch as the acknowledgement; Redis with pipelines of --batch PUBLISH
commands and hiredis to parse.
"""

import argparse
import os
import select
import shutil
import subprocess
import sys
import time

from benchmarks.cluster import Unavailable, free_ports, stop_processes, wait_for_port
from benchmarks.ledger import HEADER, Delivered, Expectation, Ranges, emit, payload_filler, say_ready, write_ledger

# system -> modes measured; "-batch" packs --batch events into one message.
# MQTT QoS 1 is the one whose publishes the broker acknowledges; a NATS
# flush and a Redis pipeline's replies say the server has taken them.
PEER_MODES = {
    "mosquitto": ("qos1", "qos0", "qos1-batch"),
    "nats": ("core", "core-batch"),
    "redis": ("pubsub", "pubsub-batch"),
}


def events_per_message(mode, batch):
    return batch if mode.endswith("-batch") else 1


def topic(system, tag):
    if system == "mosquitto":
        return f"bench/{tag}"
    if system == "nats":
        return f"bench.{tag}"
    return f"bench:{tag}"


class PeerServer:
    """
    One peer broker process on a free loopback port.
    """

    binary = None

    def __init__(self, folder):
        self.folder = folder
        self.port = free_ports(1)[0]
        self.process = None

    def command(self):
        raise NotImplementedError

    def start(self, timeout=15):
        path = shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin:/usr/bin")
        if path is None:
            raise Unavailable(f"{self.binary} is not installed (apt-get install {self.package})")
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, "server.log"), "ab") as log:
            self.process = subprocess.Popen(
                [path] + self.command(),
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for_port(self.port, timeout, self.process)
        except RuntimeError as e:
            self.stop()
            raise Unavailable(f"{self.binary} did not start: {e}") from None

    def stop(self):
        if self.process is not None:
            stop_processes([self.process])
            self.process = None


class MosquittoServer(PeerServer):
    binary = "mosquitto"
    package = "mosquitto"

    def command(self):
        path = os.path.join(self.folder, "mosquitto.conf")
        with open(path, "w") as f:
            f.write(
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                # no cap on QoS 1 messages in flight or queued per subscriber
                "max_inflight_messages 0\n"
                "max_queued_messages 0\n"
                "log_dest stderr\n"
                "log_type error\n"
                "log_type warning\n"
            )
        os.chmod(self.folder, 0o755)
        os.chmod(path, 0o644)
        return ["-c", path]


class NatsServer(PeerServer):
    binary = "nats-server"
    package = "nats-server"

    def command(self):
        path = os.path.join(self.folder, "nats.conf")
        with open(path, "w") as f:
            f.write(
                f"listen: 127.0.0.1:{self.port}\n"
                # a slow subscriber is buffered, not cut off as a slow consumer
                "max_pending: 1073741824\n"
                'write_deadline: "120s"\n'
            )
        return ["-c", path]


class RedisServer(PeerServer):
    binary = "redis-server"
    package = "redis-server"

    def command(self):
        return [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", self.folder,
            # a slow subscriber is buffered, not disconnected
            "--client-output-buffer-limit", "pubsub 0 0 0",
        ]


SERVERS = {"mosquitto": MosquittoServer, "nats": NatsServer, "redis": RedisServer}


def client_command(role, system, mode, port, channels, **options):
    command = [
        sys.executable, "-m", "benchmarks.peers", role,
        "--system", system, "--mode", mode, "--port", str(port), "--channels", ",".join(channels),
    ]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return command


class _Pacer:
    """
    Publishes round-robin over channels, one batch per channel at a time,
    and stops at the deadline.
    """

    def __init__(self, args):
        self.tags = args.channels.split(",")
        self.filler = payload_filler(max(0, args.size - HEADER.size))
        self.next_id = dict.fromkeys(self.tags, 0)
        self.turn = 0
        self.sent = 0
        self.rate = args.rate
        self.started = time.monotonic()
        self.deadline = self.started + args.seconds

    def running(self):
        return time.monotonic() < self.deadline

    def delay(self):
        if not self.rate:
            return 0.0
        return self.sent / self.rate - (time.monotonic() - self.started)

    def next_batch(self, size, per_message=1):
        """
        Return C{(tag, first id, payloads)} for the next C{size} events,
        C{per_message} events to a payload.
        """
        tag = self.tags[self.turn % len(self.tags)]
        self.turn += 1
        first = self.next_id[tag]
        self.next_id[tag] = first + size
        self.sent += size
        now = time.time()
        pack = HEADER.pack
        filler = self.filler
        events = [pack(now, first + i) + filler for i in range(size)]
        if per_message == 1:
            return tag, first, events
        return tag, first, [
            b"".join(events[i : i + per_message]) for i in range(0, size, per_message)
        ]


def _publisher_summary(args, acked, failed, sent, started, last, ledgers, error=None):
    elapsed = (last or time.monotonic()) - started
    if args.ledger:
        write_ledger(args.ledger, {tag: r.normalised() for tag, r in ledgers.items()})
    summary = {
        "role": "publisher",
        "sent": sent,
        "acked": acked,
        "failed": failed,
        "seconds": round(elapsed, 3),
        "published_per_s": round(acked / elapsed, 1) if elapsed > 0 else None,
    }
    if error:
        summary["error"] = error
    return summary


def _take(record, tag, payload, size):
    """
    Record the events of one message: one, or several packed back to back.
    """
    now = time.time()
    if len(payload) <= size:
        stamp, event_id = HEADER.unpack_from(payload)
        record.arrived(1)
        record.ids[tag].append(event_id)
        record.latencies.append(now - stamp)
        return
    unpack = HEADER.unpack_from
    ids = record.ids[tag]
    latencies = record.latencies
    n = 0
    for offset in range(0, len(payload), size):
        stamp, event_id = unpack(payload, offset)
        ids.append(event_id)
        latencies.append(now - stamp)
        n += 1
    record.arrived(n)


def _should_stop(record, expectation, quiet, args):
    """
    The common end: all expected events delivered, or quiet for too long.
    """
    now = time.monotonic()
    last = record.last if record.last is not None else quiet
    if expectation.value is not None:
        return record.count >= expectation.value or now - max(last, quiet) > args.idle
    return now - max(last, quiet) > args.max_wait


# MQTT (paho-mqtt), driven from one thread through its loop_* calls.


def _mqtt_client(name):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{os.getpid()}",
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    return client


def _mqtt_pump(client, timeout):
    """
    Wait up to C{timeout} for the socket, then read every packet there and
    write what is queued.  paho reads one packet per loop_read call.
    """
    sock = client.socket()
    if sock is None:
        raise ConnectionError("MQTT connection lost")
    wants = [sock] if client.want_write() else []
    readable, writable, _ = select.select([sock], wants, [], timeout)
    if readable:
        for _ in range(10_000):
            rc = client.loop_read()
            if rc:
                raise ConnectionError(f"MQTT read failed: {rc}")
            if client.socket() is None or not select.select([sock], [], [], 0)[0]:
                break
    if writable or client.want_write():
        rc = client.loop_write()
        if rc:
            raise ConnectionError(f"MQTT write failed: {rc}")
    client.loop_misc()


def _mqtt_connect(client, port):
    client.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise ConnectionError("no CONNACK from mosquitto")
        _mqtt_pump(client, 0.05)


def mqtt_publish(args):
    qos = 1 if args.mode == "qos1" else 0
    client = _mqtt_client("pub")
    window = args.window * args.batch
    client.max_queued_messages_set(0)
    pacer = _Pacer(args)
    ledgers = {tag: Ranges() for tag in pacer.tags}
    per_message = events_per_message(args.mode, args.batch)
    window = max(1, window // per_message)
    client.max_inflight_messages_set(window)
    # (tag, first id, last id) per message in publication order, which is
    # the order the broker acknowledges in.
    unacked = []
    state = {"acked": 0, "head": 0, "last": None}

    def on_publish(client, userdata, mid, reason_code, properties):
        tag, first, last = unacked[state["head"]]
        state["head"] += 1
        state["acked"] += last - first + 1
        state["last"] = time.monotonic()
        ledgers[tag].add_run(first, last)

    client.on_publish = on_publish
    _mqtt_connect(client, args.port)
    topics = {tag: topic("mosquitto", tag) for tag in pacer.tags}
    pacer.started = time.monotonic()
    pacer.deadline = pacer.started + args.seconds
    error = None
    try:
        while pacer.running():
            tag, first, payloads = pacer.next_batch(args.batch, per_message)
            name = topics[tag]
            for payload in payloads:
                unacked.append((tag, first, first + per_message - 1))
                first += per_message
                client.publish(name, payload, qos)
            _mqtt_pump(client, 0)
            while len(unacked) - state["head"] > window:
                _mqtt_pump(client, 0.05)
            pause = pacer.delay()
            if pause > 0.001:
                _mqtt_pump(client, pause)
            if state["head"] > 100_000:
                del unacked[: state["head"]]
                state["head"] = 0
        deadline = time.monotonic() + 60
        while len(unacked) > state["head"] and time.monotonic() < deadline:
            _mqtt_pump(client, 0.05)
    except ConnectionError as e:
        error = str(e)
    client.disconnect()
    failed = pacer.sent - state["acked"]
    return _publisher_summary(
        args, state["acked"], failed, pacer.sent, pacer.started, state["last"], ledgers, error
    )


def mqtt_subscribe(args):
    qos = 1 if args.mode == "qos1" else 0
    client = _mqtt_client("sub")
    tags = args.channels.split(",")
    record = Delivered()
    by_topic = {topic("mosquitto", tag): tag for tag in tags}
    for tag in tags:
        record.channel(tag)
    granted = []

    def on_message(client, userdata, message):
        _take(record, by_topic[message.topic], message.payload, args.size)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        granted.append(mid)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    _mqtt_connect(client, args.port)
    client.subscribe([(name, qos) for name in by_topic])
    deadline = time.monotonic() + 10
    while not granted and time.monotonic() < deadline:
        _mqtt_pump(client, 0.05)
    say_ready()
    expectation = Expectation()
    quiet = time.monotonic()
    error = None
    try:
        while not _should_stop(record, expectation, quiet, args):
            _mqtt_pump(client, 0.1)
    except ConnectionError as e:
        error = str(e)
    client.disconnect()
    summary = record.summary(args.ledger)
    if error:
        summary["error"] = error
    return summary


# NATS (nats-py), asyncio.


async def nats_publish(args):
    import asyncio

    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{args.port}", max_reconnect_attempts=0)
    pacer = _Pacer(args)
    ledgers = {tag: Ranges() for tag in pacer.tags}
    subjects = {tag: topic("nats", tag) for tag in pacer.tags}
    flushes = []  # (future of a PING/PONG, tag, first, last)
    per_message = events_per_message(args.mode, args.batch)
    state = {"acked": 0, "last": None}
    error = None

    def settle(entry):
        future, tag, first, last = entry
        future.result()
        state["acked"] += last - first + 1
        state["last"] = time.monotonic()
        ledgers[tag].add_run(first, last)

    pacer.started = time.monotonic()
    pacer.deadline = pacer.started + args.seconds
    try:
        while pacer.running():
            tag, first, payloads = pacer.next_batch(args.batch, per_message)
            subject = subjects[tag]
            publish = nc.publish
            for payload in payloads:
                await publish(subject, payload)
            future = asyncio.ensure_future(nc.flush(timeout=60))
            flushes.append((future, tag, first, first + args.batch - 1))
            while flushes and (flushes[0][0].done() or len(flushes) >= args.window):
                await flushes[0][0]
                settle(flushes.pop(0))
            pause = pacer.delay()
            if pause > 0.001:
                await asyncio.sleep(pause)
        while flushes:
            await flushes[0][0]
            settle(flushes.pop(0))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    await nc.close()
    return _publisher_summary(
        args, state["acked"], pacer.sent - state["acked"], pacer.sent, pacer.started,
        state["last"], ledgers, error,
    )


async def nats_subscribe(args):
    import asyncio

    import nats

    errors = []

    async def on_error(e):
        errors.append(f"{type(e).__name__}: {e}")

    nc = await nats.connect(
        f"nats://127.0.0.1:{args.port}", max_reconnect_attempts=0, error_cb=on_error
    )
    tags = args.channels.split(",")
    record = Delivered()

    def handler(tag):
        record.channel(tag)
        size = args.size

        async def on_message(message):
            _take(record, tag, message.data, size)

        return on_message

    for tag in tags:
        # 0 lifts nats-py's own slow-consumer limits.
        await nc.subscribe(
            topic("nats", tag), cb=handler(tag), pending_msgs_limit=0, pending_bytes_limit=0
        )
    await nc.flush()
    say_ready()
    expectation = Expectation()
    quiet = time.monotonic()
    while not _should_stop(record, expectation, quiet, args):
        await asyncio.sleep(0.1)
    await nc.close()
    summary = record.summary(args.ledger)
    if errors:
        summary["client_errors"] = len(errors)
        summary["first_client_error"] = errors[0]
    return summary


# Redis pub/sub (redis-py, with hiredis when installed).


def redis_publish(args):
    import redis

    r = redis.Redis(host="127.0.0.1", port=args.port, socket_timeout=60)
    pacer = _Pacer(args)
    ledgers = {tag: Ranges() for tag in pacer.tags}
    channels = {tag: topic("redis", tag) for tag in pacer.tags}
    acked = 0
    last = None
    error = None
    pipe = r.pipeline(transaction=False)
    per_message = events_per_message(args.mode, args.batch)
    pacer.started = time.monotonic()
    pacer.deadline = pacer.started + args.seconds
    try:
        while pacer.running():
            tag, first, payloads = pacer.next_batch(args.batch, per_message)
            name = channels[tag]
            for payload in payloads:
                pipe.publish(name, payload)
            pipe.execute()
            acked += args.batch
            last = time.monotonic()
            ledgers[tag].add_run(first, first + args.batch - 1)
            pause = pacer.delay()
            if pause > 0.001:
                time.sleep(pause)
    except redis.RedisError as e:
        error = f"{type(e).__name__}: {e}"
    r.close()
    return _publisher_summary(
        args, acked, pacer.sent - acked, pacer.sent, pacer.started, last, ledgers, error
    )


def redis_subscribe(args):
    import redis

    r = redis.Redis(host="127.0.0.1", port=args.port)
    tags = args.channels.split(",")
    record = Delivered()
    by_channel = {topic("redis", tag).encode(): tag for tag in tags}
    for tag in tags:
        record.channel(tag)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(*by_channel)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pubsub.get_message(timeout=0.05)
        counts = dict(r.pubsub_numsub(*by_channel))
        if all(counts.get(name, 0) >= 1 for name in by_channel):
            break
    say_ready()
    expectation = Expectation()
    quiet = time.monotonic()
    error = None
    get = pubsub.get_message
    try:
        while not _should_stop(record, expectation, quiet, args):
            for _ in range(10_000):
                message = get(timeout=0.1)
                if message is None:
                    break
                _take(record, by_channel[message["channel"]], message["data"], args.size)
    except redis.RedisError as e:
        error = f"{type(e).__name__}: {e}"
    pubsub.close()
    summary = record.summary(args.ledger)
    if error:
        summary["error"] = error
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    parser.add_argument("role", choices=["publish", "subscribe"])
    parser.add_argument("--system", choices=sorted(PEER_MODES), required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channels", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--ledger")
    args = parser.parse_args(argv)
    if args.mode not in PEER_MODES[args.system]:
        parser.error(f"--mode for {args.system}: one of {', '.join(PEER_MODES[args.system])}")
    try:
        if args.system == "mosquitto":
            run = mqtt_publish if args.role == "publish" else mqtt_subscribe
            summary = run(args)
        elif args.system == "nats":
            import asyncio

            run = nats_publish if args.role == "publish" else nats_subscribe
            summary = asyncio.run(run(args))
        else:
            run = redis_publish if args.role == "publish" else redis_subscribe
            summary = run(args)
    except Exception as e:
        summary = {"role": args.role, "error": f"{type(e).__name__}: {e}"}
    emit(summary)
    return 1 if "error" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
