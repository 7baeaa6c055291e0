"""
C{fitbroker}: the operator's command line.
"""

import argparse
import base64
import json
import math
import os
import sys

from fit_broker.errors import FitBrokerError

DEFAULT_CONFIG = os.path.join("fitbroker-local", "cluster.toml")
CONNECT_TIMEOUT = 10.0
STDIN_CHUNK = 1 << 16
STDIN_WINDOW = 64
#: The client `init` writes for the syslog adapter, and its channel's tag.
SYSLOG_CLIENT = "syslog"


class CommandError(FitBrokerError):
    """
    A mistake on the command line, reported in one line.
    """


def _parser():
    parser = argparse.ArgumentParser(
        prog="fitbroker", description="Operate a FIT Broker cluster."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p):
        p.add_argument(
            "--config",
            default=None,
            help=f"the cluster's TOML file (default: {DEFAULT_CONFIG})",
        )
        p.add_argument("--as", dest="client", default=None, help="the client name to act as")

    publish = commands.add_parser(
        "publish",
        help="publish events and wait for acknowledgements",
        description="Publish each MESSAGE, or each line of standard input, as one event, and "
        "exit once the cluster acknowledged them all. Blank lines of standard input (empty or "
        "only spaces) are skipped, and counted in the final message.",
    )
    common(publish)
    publish.add_argument("--urgency", type=int, default=0, help="urgency level (0 = least urgent)")
    publish.add_argument(
        "--ttl", type=float, default=0.0,
        help="seconds each event lives, at most the channel's TTL; 0 (the default) means the "
        "channel's TTL",
    )
    publish.add_argument("channel")
    publish.add_argument(
        "messages", nargs="*", metavar="MESSAGE",
        help="one event each (default: each non-blank line of stdin)",
    )
    publish.set_defaults(run=_publish)

    tail = commands.add_parser("tail", help="print delivered events as JSON lines")
    common(tail)
    tail.add_argument(
        "--count", type=int, default=None,
        help="exit after N events (the rest of a batch cut short is printed next time)",
    )
    tail.add_argument(
        "--resume", action="store_true",
        help="print what was queued while away (the default; kept for old scripts)",
    )
    tail.add_argument(
        "--skip-backlog", action="store_true",
        help="skip what was queued for this client while away, and say how many events",
    )
    tail.add_argument(
        "--takeover", action="store_true",
        help="replace another connection subscribed as this client (e.g. a half-open one)",
    )
    tail.add_argument(
        "--state-dir", default=None, metavar="DIR",
        help="where to record what was printed, so a restart never prints it again "
        "(default: $XDG_STATE_HOME/fitbroker/CLUSTER/CLIENT)",
    )
    tail.add_argument(
        "--no-state", action="store_true", help="record nothing: a restart may print events again"
    )
    tail.add_argument(
        "--from", dest="from_position", action=_FromAction, default=None, metavar="POSITION|TIME",
        help="ordered channels: start at log POSITION (events before it are acknowledged "
        "and not printed) instead of where the delivery state left off; disk channels: print "
        "again every event the replicas still hold published at or after TIME, an ISO-8601 "
        "date-time with Z or an offset (2026-12-02T06:00:00Z) or an age (-30s, -10m, -2h, -1d)",
    )
    tail.add_argument("channels", nargs="+", metavar="CHANNEL")
    tail.set_defaults(run=_tail, from_time=None)

    status = commands.add_parser(
        "status",
        help="show each replica: up or down, uptime, clock offset, and per channel "
        "events in, out, waiting and discarded",
        description="Ask every replica for its status and print a table (columns in "
        "docs/status.md), or each replica's counters as JSON with --json.",
    )
    common(status)
    status.add_argument(
        "--json", action="store_true", help="print each replica's counters as JSON instead"
    )
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
    init.add_argument(
        "--hosts", default=None, metavar="H1,H2,...",
        help="the host of each replica (DNS name or IP address), comma-separated: replica i listens "
        "there on --first-port (on that address when it is one) and clients connect to it "
        "(default: every replica on 127.0.0.1)",
    )
    init.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="replicas serve Prometheus metrics at /metrics on 127.0.0.1:PORT (PORT + i for "
        "replicas sharing a host; default: no metrics)",
    )
    init.add_argument(
        "--syslog-port", type=int, default=5514,
        help="the port syslog.toml has the syslog adapter listen on (UDP and TCP; default 5514)",
    )
    init.add_argument(
        "--force", action="store_true",
        help="replace the cluster already in DIRECTORY: new keys, configuration and syslog.toml",
    )
    init.set_defaults(run=_init)

    sink = commands.add_parser(
        "sink", help="forward events to SIEMs (twistd fitbroker-sink in the foreground)"
    )
    sink.add_argument("--config", default=None, help=f"the cluster's TOML file (default: {DEFAULT_CONFIG})")
    sink.add_argument(
        "--sink-config", default=None, help="the sink settings (default: sink.toml beside the cluster file)"
    )
    sink.set_defaults(run=_sink)

    _admin_parser(commands, common)
    return parser


def _admin_parser(commands, common):
    """
    Add C{fitbroker admin ...}: show the control table, or change it with
    a change signed by the administrator's key.
    """
    admin = commands.add_parser(
        "admin",
        help="show or change the control table (administrators)",
        description="Show the control table the replicas agree on, or change it: each change is "
        "signed with the administrator's key (a client in [cluster] admins) and applied by every "
        "replica at the same position of the replicated log.",
    )
    actions = admin.add_subparsers(dest="admin_action", metavar="ACTION", required=True)

    def action(name, help):
        p = actions.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        common(p)
        p.set_defaults(run=_admin)
        return p

    def role(p):
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--publish", dest="role", action="store_const", const="publish")
        group.add_argument("--subscribe", dest="role", action="store_const", const="subscribe")

    table = action("table", "print the control table and its version")
    table.add_argument("--json", action="store_true", help="print the table as JSON")

    create = action("create-channel", "create a channel")
    create.add_argument("tag", metavar="TAG")
    create.add_argument("--class", dest="qos_class", required=True, metavar="CLASS",
                        help="a class of the cluster file")
    create.add_argument("--qop", default=None, help="QoP mode (default: cft)")
    create.add_argument("--scheme", default=None, help="protection scheme (default: si)")
    create.add_argument("--voter", default=None, help="voter (default: the QoP mode's)")
    create.add_argument("--topic", default=None, help="a description (default: the tag)")
    create.add_argument("--publishers", default="", metavar="A,B", help="clients that may publish")
    create.add_argument("--subscribers", default="", metavar="C,D",
                        help="clients that may subscribe")

    remove = action("remove-channel", "remove a channel")
    remove.add_argument("tag", metavar="TAG")

    set_class = action("set-class", "change a channel's class")
    set_class.add_argument("tag", metavar="TAG")
    set_class.add_argument("qos_class", metavar="CLASS")

    grant = action("grant", "let a client publish to or subscribe to a channel")
    grant.add_argument("tag", metavar="TAG")
    grant.add_argument("target", metavar="CLIENT")
    role(grant)

    revoke = action("revoke", "stop a client publishing to or subscribing to a channel")
    revoke.add_argument("tag", metavar="TAG")
    revoke.add_argument("target", metavar="CLIENT")
    role(revoke)


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
    """
    Return the spec of channel C{tag} if this client may use it; C{None}
    when the file does not name it but administrators may have created it
    since (L{_learn_channels} asks the cluster once connected).
    """
    spec = config.channel(tag)
    if spec is None:
        if config.admins:
            return None
        raise CommandError(
            f"{config.path}: no channel {tag!r}; channels: {', '.join(sorted(config.channels))}"
        )
    if not may(spec):
        raise CommandError(f"{config.path}: the control table does not let this client {what} {tag!r}")
    return spec


async def _learn_channels(session, config, tags, may, what):
    """
    Learn the channels in C{tags} that the file does not name from the
    control table f+1 replicas describe alike (created at run time).
    """
    from fit_broker.client.admin import Administrator, table_channels

    unknown = [tag for tag in tags if config.channel(tag) is None]
    if not unknown:
        return
    try:
        info = await Administrator(session.proxy, None).table()
    except FitBrokerError as e:
        session.stop()
        raise CommandError(
            f"{config.path}: no channel {unknown[0]!r}, and the cluster's control table could not be read: {e}"
        ) from None
    learned = table_channels(config, info)
    for tag in unknown:
        spec = learned.get(tag)
        if spec is None:
            session.stop()
            raise CommandError(
                f"no channel {tag!r} in {config.path} nor in the cluster's control table "
                f"(version {info.get('version')})"
            )
        if not may(spec):
            session.stop()
            raise CommandError(f"the cluster's control table does not let this client {what} {tag!r}")
        config.channels[tag] = spec


async def _connect(reactor, config, client, **options):
    from fit_broker.client.session import open_session

    session = open_session(config, client, reactor, **options)
    quorum = max(config.acks_needed(tag) for tag in config.channels) if config.channels else 1
    try:
        await session.proxy.wait_for_links(quorum, CONNECT_TIMEOUT)
    except FitBrokerError as e:
        session.stop()
        raise CommandError(f"cannot reach the cluster: {e}") from None
    warning = clock_warning(session.proxy.clock_offset())
    if warning:
        print(f"fitbroker: warning: {warning}", file=sys.stderr)
    return session


#: Seconds of clock difference with the replicas worth a warning.
CLOCK_WARNING = 10.0


def clock_warning(offset):
    """
    Return a warning when this host's clock is C{offset} seconds behind the
    replicas' (negative: ahead) by more than L{CLOCK_WARNING}, else C{None}.
    """
    if offset is None or abs(offset) <= CLOCK_WARNING:
        return None
    way = "behind" if offset > 0 else "ahead of"
    return (
        f"this host's clock is {abs(offset):.0f} s {way} the replicas'; events it publishes "
        "may be refused or expire early, and TTLs are judged against the wrong time"
    )


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fit-broker")
    except PackageNotFoundError:
        return "(not installed)"


async def _publish(reactor, args):
    if not (math.isfinite(args.ttl) and args.ttl >= 0):
        raise CommandError(
            f"--ttl: expected 0 (the channel's TTL) or a positive number of seconds, found {args.ttl:g}"
        )
    config, client = _load(args)
    may = lambda s: s.may_publish(client)  # noqa: E731
    _check_channel(config, args.channel, may, "publish to")
    session = await _connect(reactor, config, client)
    await _learn_channels(session, config, [args.channel], may, "publish to")
    publisher = session.publisher
    total = skipped = 0
    try:
        if args.messages:
            contents = [m.encode("utf-8", "surrogateescape") for m in args.messages]
            await publisher.publish_many(args.channel, contents, args.urgency, args.ttl)
            total = len(contents)
        else:
            total, skipped = await _publish_stdin(reactor, publisher, args)
    except Exception as e:
        raise _unwrap(e) from None
    finally:
        session.stop()
    blank = f" (skipped {skipped} blank line(s))" if skipped else ""
    position = publisher.positions.get(args.channel)
    at = f", ordered up to log position {position}" if position is not None else ""
    print(f"published {total} event(s) to {args.channel}{at}{blank}", file=sys.stderr)


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
    skipped = [0]

    def publish(lines):
        contents = [line.rstrip(b"\r") for line in lines]
        contents = [line for line in contents if line.strip()]
        skipped[0] += len(lines) - len(contents)
        if not contents:
            window.release()
            return
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
    return count[0], skipped[0]


def _unwrap(error):
    from twisted.internet.defer import FirstError

    while isinstance(error, FirstError):
        error = error.subFailure.value
    return error


def event_json(tag, event):
    """
    One delivered event as the JSON object `tail` prints; an event of an
    ordered channel also has its batch's log position and sequence number.
    """
    if event.seq is None:
        record = {
            "channel": tag,
            "publisher": event.publisher,
            "event_id": event.event_id,
            "timestamp": event.timestamp,
            "urgency": event.urgency,
        }
    else:
        record = {
            "channel": tag,
            "position": event.position,
            "seq": event.seq,
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


def _state_dir(args, config, client):
    if args.no_state:
        return None
    if args.state_dir is not None:
        return args.state_dir
    from fit_broker.client.delivered import DeliveryRecord

    return os.path.dirname(DeliveryRecord.default_path(config.name, client, "channel"))


class PartlyPrinted:
    """
    What `tail --count` printed of the group of batches it stopped in: that
    group is not acknowledged, so it comes again, and the events already
    printed from it are skipped then.  Kept beside the delivery state, or
    in memory only.
    """

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, "tail-partial.json") if state_dir else None
        self.printed_of = {}
        if self.path is not None:
            try:
                with open(self.path) as f:
                    saved = json.load(f)
                if isinstance(saved, dict):
                    self.printed_of = {
                        key: count for key, count in saved.items()
                        if isinstance(key, str) and isinstance(count, int)
                    }
            except (OSError, ValueError):
                pass

    @staticmethod
    def _key(tag, batch):
        return json.dumps([tag, batch.publisher, batch.first_id])

    def printed(self, tag, batch):
        return self.printed_of.get(self._key(tag, batch), 0)

    def cut(self, progress):
        """
        Remember C{(tag, batch, events printed)} for each batch of the group
        stopped in.
        """
        for tag, batch, count in progress:
            self.printed_of[self._key(tag, batch)] = count
        self._save()

    def done(self, tag, batch):
        if self.printed_of.pop(self._key(tag, batch), None) is not None:
            self._save()

    def _save(self):
        if self.path is None:
            return
        try:
            with open(self.path + ".new", "w") as f:
                json.dump(self.printed_of, f)
            os.replace(self.path + ".new", self.path)
        except OSError:
            pass


#: Seconds in each unit of a relative --from TIME.
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

FROM_EXPECTED = (
    "expected a log position (a whole number), an ISO-8601 date-time with Z or an offset "
    "(e.g. 2026-12-02T06:00:00Z) or an age (e.g. -10m, -2h, -30s)"
)


def parse_from(text, now):
    """
    Return C{("position", int)} or C{("time", seconds since the epoch)} for
    a C{--from} value: a whole number, an ISO-8601 date-time that says its
    offset, or an age before C{now} such as C{-10m}.

    @raise ValueError: with a one-line reason naming what was expected.
    """
    import re
    from datetime import datetime

    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):
        return "position", int(text)
    age = re.fullmatch(r"-([0-9]+(?:\.[0-9]+)?)([smhd])", text)
    if age:
        return "time", now - float(age.group(1)) * AGE_UNITS[age.group(2)]
    if re.fullmatch(r"-[0-9]+(?:\.[0-9]+)?", text):
        raise ValueError(f"--from: an age needs a unit (s, m, h or d), as in {text}m; found {text!r}")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--from: {FROM_EXPECTED}, found {text!r:.60}") from None
    if "T" not in text.upper() and " " not in text:
        raise ValueError(f"--from: expected a date-time, not only a date (e.g. {text}T00:00:00Z), found {text!r}")
    if when.tzinfo is None:
        raise ValueError(
            f"--from: the date-time needs Z or an offset (e.g. {text}Z or {text}+02:00), found {text!r}"
        )
    return "time", when.timestamp()


class _FromAction(argparse.Action):
    """
    C{--from POSITION|TIME}: a position goes to C{from_position}, a time to
    C{from_time}; anything else exits with one line saying what was expected.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        import time

        try:
            kind, value = parse_from(values, time.time())
        except ValueError as e:
            parser.exit(2, f"fitbroker: {e}\n")
        if kind == "position":
            namespace.from_position, namespace.from_time = value, None
        else:
            namespace.from_position, namespace.from_time = None, value


def _join_from(argv):
    """
    Keep C{--from -10m} one option: argparse takes a value that starts
    with a dash and is not a number for another option.
    """
    joined = []
    it = iter(argv)
    for arg in it:
        if arg == "--from":
            value = next(it, None)
            if value is not None and value[:1] == "-":
                joined.append(f"--from={value}")
                continue
            joined.append(arg)
            if value is not None:
                joined.append(value)
            continue
        joined.append(arg)
    return joined


def _check_from(config, args):
    """
    Refuse C{--from} in one line unless it is a position and every channel
    named is ordered, or a time and every channel named is kept on disk.
    """
    if getattr(args, "from_time", None) is not None:
        _check_from_time(config, args)
        return
    if args.from_position is None:
        return
    from fit_broker.sequencer import ORDERED_SCOPES

    if args.from_position < 1:
        raise CommandError(f"--from: expected a log position (1 or more), found {args.from_position}")
    if args.skip_backlog:
        raise CommandError("--from and --skip-backlog contradict each other; use one")
    unordered = [
        tag for tag in args.channels
        if config.channel(tag) is not None and config.channel(tag).qos.ordering not in ORDERED_SCOPES
    ]
    if unordered:
        raise CommandError(
            f"--from: not an ordered channel: {', '.join(unordered)}; log positions exist only on "
            'channels whose QoS class has ordering "channel" or "global"'
        )


def _check_from_time(config, args):
    if args.skip_backlog:
        raise CommandError("--from and --skip-backlog contradict each other; use one")
    elsewhere = [
        tag for tag in args.channels
        if config.channel(tag) is not None and config.channel(tag).qos.persistence != "disk"
    ]
    if elsewhere:
        raise CommandError(
            f"--from TIME: not a disk channel: {', '.join(elsewhere)}; a replay from a time needs "
            'channels whose class has persistence = "disk" (ordered memory channels take --from POSITION)'
        )


async def _tail(reactor, args):
    from twisted.internet.defer import Deferred

    from fit_broker.errors import RequestFailed

    config, client = _load(args)
    may = lambda s: s.may_subscribe(client)  # noqa: E731
    for tag in args.channels:
        _check_channel(config, tag, may, "subscribe to")
    if args.count is not None and args.count < 1:
        raise CommandError("--count: expected a positive number")
    _check_from(config, args)
    state_dir = _state_dir(args, config, client)
    session = await _connect(reactor, config, client, state_dir=state_dir)
    await _learn_channels(session, config, args.channels, may, "subscribe to")
    try:
        _check_from(config, args)
    except CommandError:
        session.stop()
        raise
    finished = Deferred()
    printed = [0]
    out = sys.stdout
    partial = PartlyPrinted(state_dir)

    def printer(tag):
        def show(batches):
            progress = []
            for batch in batches:
                skip = partial.printed(tag, batch)
                count = len(batch.contents)
                for event in batch.events()[skip:]:
                    if args.count is not None and printed[0] >= args.count:
                        # not acknowledged: this group comes again next time, and
                        # what was printed of it is skipped then
                        progress.append((tag, batch, event.event_id - batch.first_id))
                        partial.cut(progress)
                        out.flush()
                        reactor.callLater(0, lambda: finished.called or finished.callback(None))
                        return Deferred()
                    out.write(event_json(tag, event) + "\n")
                    printed[0] += 1
                progress.append((tag, batch, count))
            out.flush()
            for batch in batches:
                partial.done(tag, batch)
            if args.count is not None and printed[0] >= args.count and not finished.called:
                # finish once what was printed is recorded as printed
                reactor.callLater(0, lambda: finished.called or finished.callback(None))

        return show

    try:
        for tag in args.channels:
            try:
                reply = await session.subscriber.subscribe(
                    tag, printer(tag), resume=not args.skip_backlog, takeover=args.takeover,
                    batches=True, from_position=args.from_position, from_time=args.from_time,
                )
            except RequestFailed as e:
                if e.status == "busy":
                    raise CommandError(f"{e.text}; use --takeover to replace it") from None
                raise
            if args.skip_backlog:
                print(
                    f"skipped {reply.info.get('skipped', 0)} event(s) queued on {tag} while away",
                    file=sys.stderr,
                )
        where = f"; delivery state in {state_dir}" if state_dir else "; no delivery state kept"
        if args.from_time is not None:
            from datetime import datetime, timezone

            since = datetime.fromtimestamp(args.from_time, timezone.utc).isoformat(timespec="seconds")
            where += f"; replaying from {since.replace('+00:00', 'Z')}"
        print(f"subscribed to {', '.join(args.channels)} as {client}{where}", file=sys.stderr)
        await finished
    finally:
        session.stop()


#: Seconds `status` waits for the replicas that are not linked yet.
STATUS_LINK_WAIT = 2.0


def replica_status(info, sent=None, received=None):
    """
    Return what the status table shows of one replica's status reply: its
    C{info}, or C{None} when it did not answer.

    The clock offset is the replica's clock less ours at the moment it
    answered, taken as halfway through the round trip from C{sent} to
    C{received} (our clock), so it is known to within half that round trip.
    """
    if not isinstance(info, dict):
        return {"up": False}
    row = {"up": True, "error": info.get("error")}
    now, started = info.get("now"), info.get("started")
    if _number(now) and _number(started):
        row["uptime"] = max(0.0, now - started)
    if _number(now) and _number(sent) and _number(received):
        row["offset"] = now - (sent + received) / 2
        row["round_trip"] = received - sent
    channels = {}
    for tag, channel in sorted((info.get("channels") or {}).items()):
        if not isinstance(channel, dict):
            continue
        counters = channel.get("counters") or {}
        queues = [q for q in (channel.get("subscribers") or {}).values() if isinstance(q, dict)]

        def total(key):
            return sum(q.get(key, 0) for q in queues if _number(q.get(key, 0)))

        channels[tag] = {
            "in": counters.get("accepted", 0),
            "out": total("delivered"),
            "waiting": total("waiting"),
            "discards": total("expired") + total("overflowed")
            + counters.get("expired-on-arrival", 0),
        }
        if channel.get("recovering") is True:
            # a disk channel getting its lost log back from its peers
            channels[tag]["recovering"] = True
    row["channels"] = channels
    agreement = info.get("agreement")
    if isinstance(agreement, dict):
        row["agreement"] = {
            key: agreement.get(key)
            for key in ("leader", "regency", "decided", "stable_checkpoint", "position")
        }
    table = info.get("table")
    if isinstance(table, dict):
        row["table"] = table.get("version")
    return row


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def _columns(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]


def status_table(statuses):
    """
    Return the text of the status table for C{statuses}, replica name ->
    L{replica_status}: one line per replica, then one per channel and
    replica that answered.
    """
    replicas = [("REPLICA", "STATE", "UPTIME", "CLOCK OFFSET", "ROUND TRIP")]
    channels = [("CHANNEL", "REPLICA", "IN", "OUT", "WAITING", "DISCARDS")]
    for name, row in statuses.items():
        if not row["up"]:
            replicas.append((name, "down", "-", "-", "-"))
            continue
        state = f"refused: {row['error']}" if row.get("error") else "up"
        replicas.append(
            (
                name,
                state,
                _duration(row["uptime"]) if "uptime" in row else "?",
                f"{row['offset']:+.3f} s" if "offset" in row else "?",
                f"{row['round_trip'] * 1000:.0f} ms" if "round_trip" in row else "?",
            )
        )
        for tag, counts in row["channels"].items():
            shown = f"{tag} (recovering)" if counts.get("recovering") else tag
            channels.append(
                (shown, name, *(str(counts[k]) for k in ("in", "out", "waiting", "discards")))
            )
    agreement = [("REPLICA", "LEADER", "REGENCY", "DECIDED", "CHECKPOINT", "POSITION", "TABLE")]
    for name, row in statuses.items():
        if row.get("up") and row.get("agreement"):
            a = row["agreement"]
            agreement.append(
                (name, *(_shown(a.get(k)) for k in ("leader", "regency", "decided", "stable_checkpoint", "position")),
                 _shown(row.get("table")))
            )
    lines = _columns(replicas)
    if len(agreement) > 1:
        lines += [""] + _columns(agreement)
    if len(channels) > 1:
        lines += [""] + _columns(channels)
    return "\n".join(lines)


def _shown(value):
    return "-" if value is None else str(value)


async def _settled(reactor, proxy, timeout):
    """
    Wait until every replica is linked or failed its latest attempt to
    connect, or C{timeout} seconds passed.
    """
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        known = set(proxy.links) | set(proxy.unreachable) | set(proxy.refusals)
        if len(known) >= proxy.replicas:
            return
        await deferLater(reactor, 0.05, lambda: None)


async def _status(reactor, args):
    from fit_broker import units
    from fit_broker.client.session import open_session
    from fit_broker.units import Request

    config, client = _load(args)
    session = open_session(config, client, reactor)
    proxy = session.proxy
    names = [f"replica-{index}" for index in range(len(config.replicas))]
    replies = dict.fromkeys(names, "unreachable")
    answered = {}
    sent = None
    try:
        try:
            await proxy.wait_for_links(1, CONNECT_TIMEOUT)
        except FitBrokerError as e:
            raise CommandError(f"cannot reach the cluster: {e}") from None
        await _settled(reactor, proxy, STATUS_LINK_WAIT)

        def observe(index, reply):
            answered[index] = reactor.seconds()
            if reply.ok:
                replies[f"replica-{index}"] = reply.info
            else:
                replies[f"replica-{index}"] = {"error": f"{reply.status}: {reply.text}"}

        sent = reactor.seconds()
        try:
            await proxy.invoke(
                Request(proxy.next_seq(), units.STATUS),
                len(proxy.links),
                timeout=CONNECT_TIMEOUT,
                retry=False,
                observe=observe,
            )
        except FitBrokerError:
            pass
    finally:
        session.stop()
    if args.json:
        print(json.dumps(replies, indent=2, sort_keys=True))
        return
    statuses = {
        f"replica-{index}": replica_status(replies[name], sent, answered.get(index))
        for index, name in enumerate(names)
    }
    print(status_table(statuses))


async def _init(reactor, args):
    from fit_broker.init import init_cluster

    hosts = args.hosts.split(",") if args.hosts else None
    path = init_cluster(
        args.directory, args.replicas, args.faults, args.clients, args.first_port, args.name,
        syslog_client=SYSLOG_CLIENT, syslog_port=args.syslog_port, force=args.force,
        hosts=hosts, metrics_port=args.metrics_port,
    )
    print(f"wrote {path}, syslog.toml and the keys beside it (private keys readable by their owner only)")
    print("start each replica, then publish and subscribe:")
    for index in range(args.replicas):
        where = f"on {hosts[index]}: " if hosts else ""
        print(f"  {where}twistd -n fitbroker --config {path} --replica-id {index}")
    print(f"  fitbroker tail --config {path} events")
    print(f"  fitbroker publish --config {path} events hello")
    print(f"syslog from legacy probes (port {args.syslog_port}) into channel syslog:")
    print(f"  twistd -n fitbroker-syslog --config {path}")


def _name_list(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def admin_change(args):
    """
    Return the control-table change C{fitbroker admin ACTION} asks for, as
    the dict L{fit_broker.client.admin.sign_change} signs, or C{None} for
    C{table}.
    """
    action = args.admin_action
    if action == "table":
        return None
    change = {"op": action, "tag": args.tag}
    if action == "create-channel":
        change["class"] = args.qos_class
        for option in ("qop", "scheme", "voter", "topic"):
            if getattr(args, option) is not None:
                change[option] = getattr(args, option)
        change["publishers"] = _name_list(args.publishers)
        change["subscribers"] = _name_list(args.subscribers)
    elif action == "set-class":
        change["class"] = args.qos_class
    elif action in ("grant", "revoke"):
        change["client"] = args.target
        change["role"] = args.role
    return change


def change_summary(change):
    """
    Return what C{change} does, in a few words.
    """
    op, tag = change["op"], change["tag"]
    if op == "create-channel":
        return f"created channel {tag}"
    if op == "remove-channel":
        return f"removed channel {tag}"
    if op == "set-class":
        return f"channel {tag} is now of class {change['class']}"
    verb = "publish to" if change["role"] == "publish" else "subscribe to"
    if op == "grant":
        return f"{change['client']} may {verb} {tag}"
    return f"{change['client']} may no longer {verb} {tag}"


def _one_line(text, limit=300):
    """
    Return replica-chosen C{text} as one printable line of at most C{limit}
    characters.
    """
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def table_text(info):
    """
    Return the text of C{fitbroker admin table} for the C{table} reply info
    C{{"version": v, "table": describe()}}.
    """
    table = info.get("table") if isinstance(info.get("table"), dict) else {}
    admins = ", ".join(map(str, table.get("admins") or ())) or "none"
    lines = [
        f"control table of cluster {table.get('cluster', '?')}, version {info.get('version', '?')} "
        f"(administrators: {admins})"
    ]
    rows = [("CHANNEL", "CLASS", "QOP", "SCHEME", "VOTER", "PUBLISHERS", "SUBSCRIBERS")]
    channels = table.get("channels") if isinstance(table.get("channels"), dict) else {}
    for tag, spec in sorted(channels.items()):
        if not isinstance(spec, dict):
            continue
        rows.append(
            (
                str(tag),
                *(str(spec.get(k, "?")) for k in ("class", "qop", "scheme", "voter")),
                ",".join(map(str, spec.get("publishers") or ())) or "-",
                ",".join(map(str, spec.get("subscribers") or ())) or "-",
            )
        )
    lines += _columns([tuple(_one_line(cell, 200) for cell in row) for row in rows])
    return "\n".join(lines)


async def _admin_session(reactor, config, client, signing):
    """
    Connect as C{client}; return C{(proxy, keys, stop)}.  With C{signing},
    the client's key ring is read even when no channel's scheme needs it:
    table changes are signed with it.
    """
    from fit_broker.credentials import client_credentials
    from fit_broker.keys import load_keyring

    keys, endpoints = client_credentials(config, client, reactor)
    if signing and keys is None:
        if config.keys_dir is None:
            raise CommandError(
                f"{config.path}: [cluster] keys_dir: expected the keys folder, since table changes "
                "are signed with the administrator's key"
            )
        keys = load_keyring(config.keys_dir, client)
    session = await _connect(reactor, config, client, keys=keys, endpoints=endpoints)
    return session.proxy, keys, session.stop


async def _admin(reactor, args):
    from fit_broker.client.admin import Administrator
    from fit_broker.errors import RequestFailed

    config, client = _load(args)
    change = admin_change(args)
    if change is not None and not config.is_admin(client):
        raise CommandError(
            f"{config.path}: client {client!r} is not an administrator ([cluster] admins: "
            f"{', '.join(sorted(config.admins)) or 'none'}); say which with --as CLIENT"
        )
    proxy, keys, stop = await _admin_session(reactor, config, client, change is not None)
    try:
        administrator = Administrator(proxy, keys)
        if change is None:
            info = await administrator.table()
        else:
            info = await administrator.change(change)
    except RequestFailed as e:
        what = "the table" if change is None else "the change"
        raise CommandError(f"the replicas refused {what}: {_one_line(e.text)}") from None
    finally:
        stop()
    if change is None:
        print(json.dumps(info, indent=2, sort_keys=True) if args.json else table_text(info))
    else:
        print(f"{change_summary(change)}: control table version {info.get('version')}")


async def _sink(reactor, args):
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from fit_broker.listening import check_listeners
    from fit_broker.sink.service import make_sink_service
    from fit_broker.sink.tap import load

    cluster, settings = load(args.config or DEFAULT_CONFIG, args.sink_config)
    service = make_sink_service(cluster, settings, reactor)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    check_listeners(service)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print(f"forwarding {', '.join(settings.channels)} as {settings.client}", file=sys.stderr)
    await Deferred()


def main(argv=None):
    args = _parser().parse_args(_join_from(sys.argv[1:] if argv is None else argv))
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
