"""
C{fitbroker}: the operator's command line.
"""

import argparse
import base64
import json
import os
import sys

from fit_broker.errors import FitBrokerError

DEFAULT_CONFIG = os.path.join("fitbroker-local", "cluster.toml")
CONNECT_TIMEOUT = 10.0
STDIN_CHUNK = 1 << 16
STDIN_WINDOW = 64


class CommandError(FitBrokerError):
    """
    A mistake on the command line, reported in one line.
    """


def _parser():
    parser = argparse.ArgumentParser(
        prog="fitbroker", description="Operate a FIT Broker cluster."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p):
        p.add_argument(
            "--config",
            default=None,
            help=f"the cluster's TOML file (default: {DEFAULT_CONFIG})",
        )
        p.add_argument("--as", dest="client", default=None, help="the client name to act as")

    publish = commands.add_parser("publish", help="publish events and wait for acknowledgements")
    common(publish)
    publish.add_argument("--urgency", type=int, default=0, help="urgency level (0 = least urgent)")
    publish.add_argument("--ttl", type=float, default=0.0, help="seconds to live (default: the channel's)")
    publish.add_argument("channel")
    publish.add_argument(
        "messages", nargs="*", metavar="MESSAGE", help="one event each (default: each line of stdin)"
    )
    publish.set_defaults(run=_publish)

    tail = commands.add_parser("tail", help="print delivered events as JSON lines")
    common(tail)
    tail.add_argument("--count", type=int, default=None, help="exit after N events")
    tail.add_argument(
        "--resume", action="store_true", help="also print what was queued while away"
    )
    tail.add_argument("channels", nargs="+", metavar="CHANNEL")
    tail.set_defaults(run=_tail)

    status = commands.add_parser("status", help="print each replica's counters as JSON")
    common(status)
    status.set_defaults(run=_status)

    init = commands.add_parser(
        "init", help="write a new cluster: its configuration, certificates and keys"
    )
    init.add_argument("directory")
    init.add_argument("--replicas", type=int, default=4, help="n (default 4)")
    init.add_argument("--faults", type=int, default=1, help="f, with n >= 3f+1 (default 1)")
    init.add_argument(
        "--clients", nargs="+", default=["local"], metavar="NAME",
        help="client names; the first is the default client (default: local)",
    )
    init.add_argument("--name", default="fitbroker", help="the cluster's name")
    init.add_argument("--first-port", type=int, default=7500, help="replica i listens on this + i")
    init.set_defaults(run=_init)

    return parser


def _load(args):
    from fit_broker.config import load_config

    path = args.config or DEFAULT_CONFIG
    if args.config is None and not os.path.exists(path):
        raise CommandError(
            f"no configuration: {path} does not exist; start the local cluster with "
            "`twistd -n fitbroker` in this folder, or pass --config FILE"
        )
    config = load_config(path)
    client = args.client or config.default_client
    if client is None:
        raise CommandError(f"{path} names no default_client; say which with --as CLIENT")
    if client not in config.clients:
        raise CommandError(
            f"{path}: no client {client!r} in [clients]; known: {', '.join(sorted(config.clients))}"
        )
    return config, client


def _check_channel(config, tag, may, what):
    spec = config.channel(tag)
    if spec is None:
        raise CommandError(
            f"{config.path}: no channel {tag!r}; channels: {', '.join(sorted(config.channels))}"
        )
    if not may(spec):
        raise CommandError(f"{config.path}: the control table does not let this client {what} {tag!r}")
    return spec


async def _connect(reactor, config, client):
    from fit_broker.client.session import open_session

    session = open_session(config, client, reactor)
    quorum = max(config.acks_needed(tag) for tag in config.channels) if config.channels else 1
    try:
        await session.proxy.wait_for_links(quorum, CONNECT_TIMEOUT)
    except FitBrokerError as e:
        session.stop()
        raise CommandError(f"cannot reach the cluster: {e}") from None
    return session


async def _publish(reactor, args):
    config, client = _load(args)
    _check_channel(config, args.channel, lambda s: s.may_publish(client), "publish to")
    session = await _connect(reactor, config, client)
    publisher = session.publisher
    total = 0
    try:
        if args.messages:
            contents = [m.encode("utf-8", "surrogateescape") for m in args.messages]
            await publisher.publish_many(args.channel, contents, args.urgency, args.ttl)
            total = len(contents)
        else:
            total = await _publish_stdin(reactor, publisher, args)
    except Exception as e:
        raise _unwrap(e) from None
    finally:
        session.stop()
    print(f"published {total} event(s) to {args.channel}", file=sys.stderr)


async def _publish_stdin(reactor, publisher, args):
    """
    Publish each line of standard input as it arrives: a reader thread hands
    over whatever lines are there (so a pipe from `journalctl -f` flows at
    once and a large file goes in large batches), and stops reading while
    too many chunks wait for acknowledgement.
    """
    import threading

    from twisted.internet.defer import Deferred, gatherResults

    window = threading.Semaphore(STDIN_WINDOW)
    outstanding = []
    finished = Deferred()
    count = [0]

    def publish(lines):
        contents = [line.rstrip(b"\r") for line in lines]
        count[0] += len(contents)
        d = publisher.publish_many(args.channel, contents, args.urgency, args.ttl)
        d.addBoth(lambda result: (window.release(), result)[1])
        outstanding.append(d)

    def read(fd):
        rest = b""
        while True:
            window.acquire()
            data = os.read(fd, STDIN_CHUNK)
            if not data:
                window.release()
                break
            *lines, rest = (rest + data).split(b"\n")
            if lines:
                reactor.callFromThread(publish, lines)
            else:
                window.release()
        if rest:
            window.acquire()
            reactor.callFromThread(publish, [rest])
        reactor.callFromThread(finished.callback, None)

    threading.Thread(target=read, args=(sys.stdin.fileno(),), daemon=True).start()
    await finished
    await gatherResults(outstanding, consumeErrors=True)
    return count[0]


def _unwrap(error):
    from twisted.internet.defer import FirstError

    while isinstance(error, FirstError):
        error = error.subFailure.value
    return error


def event_json(tag, event):
    """
    One delivered event as the JSON object `tail` prints.
    """
    record = {
        "channel": tag,
        "publisher": event.publisher,
        "event_id": event.event_id,
        "timestamp": event.timestamp,
        "urgency": event.urgency,
    }
    try:
        record["content"] = event.content.decode("utf-8")
    except UnicodeDecodeError:
        record["content"] = None
        record["content_b64"] = base64.b64encode(event.content).decode("ascii")
    return json.dumps(record, ensure_ascii=False)


async def _tail(reactor, args):
    from twisted.internet.defer import Deferred

    config, client = _load(args)
    for tag in args.channels:
        _check_channel(config, tag, lambda s: s.may_subscribe(client), "subscribe to")
    if args.count is not None and args.count < 1:
        raise CommandError("--count: expected a positive number")
    session = await _connect(reactor, config, client)
    finished = Deferred()
    printed = [0]
    out = sys.stdout

    def printer(tag):
        def show(events):
            for event in events:
                if finished.called:
                    return
                out.write(event_json(tag, event) + "\n")
                printed[0] += 1
                if args.count is not None and printed[0] >= args.count:
                    out.flush()
                    finished.callback(None)
                    return
            out.flush()

        return show

    try:
        for tag in args.channels:
            await session.subscriber.subscribe(tag, printer(tag), resume=args.resume)
        print(f"subscribed to {', '.join(args.channels)} as {client}", file=sys.stderr)
        await finished
    finally:
        session.stop()


async def _status(reactor, args):
    from fit_broker import units
    from fit_broker.units import Request

    config, client = _load(args)
    session = await _connect(reactor, config, client)
    proxy = session.proxy
    replies = {f"replica-{index}": "unreachable" for index in range(len(config.replicas))}
    try:
        try:
            await proxy.wait_for_links(len(config.replicas), 2.0)
        except FitBrokerError:
            pass
        request = Request(proxy.next_seq(), units.STATUS)
        await proxy.invoke(
            request,
            len(proxy.links),
            timeout=CONNECT_TIMEOUT,
            retry=False,
            observe=lambda index, reply: replies.__setitem__(f"replica-{index}", reply.info),
        )
    finally:
        session.stop()
    print(json.dumps(replies, indent=2, sort_keys=True))


async def _init(reactor, args):
    from fit_broker.init import init_cluster

    path = init_cluster(
        args.directory, args.replicas, args.faults, args.clients, args.first_port, args.name
    )
    print(f"wrote {path} and the keys beside it (private keys readable by their owner only)")
    print("start each replica, then publish and subscribe:")
    for index in range(args.replicas):
        print(f"  twistd -n fitbroker --config {path} --replica-id {index}")
    print(f"  fitbroker tail --config {path} events")
    print(f"  fitbroker publish --config {path} events hello")


def main(argv=None):
    args = _parser().parse_args(argv)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome = {"code": 0}

    async def run():
        try:
            await args.run(reactor, args)
        except FitBrokerError as e:
            print(f"fitbroker: {e}", file=sys.stderr)
            outcome["code"] = 1
        except KeyboardInterrupt:
            outcome["code"] = 130
        except Exception as e:
            if args.debug:
                raise
            print(f"fitbroker: internal error: {type(e).__name__}: {e} (--debug shows more)", file=sys.stderr)
            outcome["code"] = 2
        finally:
            if reactor.running:
                reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    try:
        reactor.run()
    except KeyboardInterrupt:
        outcome["code"] = 130
    sys.stdout.flush()
    return outcome["code"]
