"""
The sink process's own settings: C{sink.toml} beside the cluster file.

    client = "siem"                       # the cluster client to act as
    channels = ["events", "alerts"]       # what to forward
    window = 64                           # groups per channel a slow sink may trail by
    metrics = "tcp:9480:interface=127.0.0.1"  # optional Prometheus /metrics

    [[sinks]]
    kind = "syslog"
    name = "siem"                         # optional, for counters and logs
    connect = "tcp:127.0.0.1:6514"
    tls = true                            # RFC 5425; then:
    ca = "tls/siem-ca.pem"                # whom to trust (default: the system's)
    server_name = "siem.example"          # default: the host of connect
    certificate = "tls/client.pem"        # optional client certificate
    private_key = "tls/client.key"

    [[sinks]]
    kind = "file"
    path = "/var/log/fitbroker/events.jsonl"
    max_bytes = 104857600                 # rotate past this size
    keep = 5                              # events.jsonl.1 .. .5
    backlog_events = 100000               # (any sink) most events held while
    backlog_bytes = 67108864              # it is down, before every sink waits

    [console]
    listen = "tcp:8480:interface=127.0.0.1"

Every problem is a L{ConfigError} naming the file and the key, raised
before anything connects or listens.
"""

import os

import attrs

from fit_broker.errors import ConfigError
from fit_broker.keys import check_client_name
from fit_broker.toml_reader import TableReader, read_toml, resolve_path
from fit_broker.units import MAX_CREDIT_BYTES, MAX_CREDIT_EVENTS

DEFAULT_FILE = "sink.toml"
DEFAULT_CONSOLE = "tcp:8480:interface=127.0.0.1"
DEFAULT_WINDOW = 64
#: The subscriber's own default credit in bytes, per replica and channel.
DEFAULT_CREDIT_BYTES = 1 << 20
MAX_WINDOW = 4096
DEFAULT_BACKLOG_EVENTS = 100_000
DEFAULT_BACKLOG_BYTES = 64 * 1024 * 1024

_TOP_KEYS = frozenset(
    {"client", "channels", "sinks", "console", "hostname", "stats_interval", "credit", "window", "metrics"}
)
_COMMON_KEYS = frozenset({"kind", "name", "backlog_events", "backlog_bytes"})
_SYSLOG_KEYS = _COMMON_KEYS | {
    "connect", "tls", "ca", "server_name", "certificate", "private_key",
    "facility", "app_name", "window_events", "window_bytes", "confirm_after",
}
_FILE_KEYS = _COMMON_KEYS | {"path", "max_bytes", "keep", "fsync"}
_CONSOLE_KEYS = frozenset({"listen", "channels", "allowed_hosts", "recent"})


@attrs.frozen
class SyslogSinkSpec:
    """
    Forward as RFC 5424 over TCP (or TLS) with octet counting.

    @ivar backlog_events: the most events waiting to be sent (the receiver
        is down or slow) before the forwarder stops giving any sink new
        groups; also in C{backlog_bytes}.  Every sink kind has these.

    @ivar window_events: the most events written but not yet taken as
        received, resent after a reconnection; also in C{window_bytes}.
    @ivar confirm_after: seconds after which bytes written on a connection
        that is still up count as received.  Plain TCP syslog has no
        acknowledgement; this is the repeat window around a receiver restart.
    """

    name: str
    connect: str
    tls: bool = False
    ca: str | None = None
    server_name: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    facility: int = 16
    app_name: str = "fitbroker"
    window_events: int = 20_000
    window_bytes: int = 16 * 1024 * 1024
    confirm_after: float = 1.0
    backlog_events: int = DEFAULT_BACKLOG_EVENTS
    backlog_bytes: int = DEFAULT_BACKLOG_BYTES
    kind: str = "syslog"

    def host(self):
        """
        Return the host of the C{connect} endpoint string, for TLS checks.
        """
        parts = self.connect.split(":")
        for part in parts[1:]:
            if part.startswith("host="):
                return part[5:]
        return parts[1] if len(parts) > 2 else ""


@attrs.frozen
class FileSinkSpec:
    """
    Append JSON lines to C{path}, rotating past C{max_bytes} and keeping
    C{keep} old files.
    """

    name: str
    path: str
    max_bytes: int = 100 * 1024 * 1024
    keep: int = 5
    fsync: bool = False
    backlog_events: int = DEFAULT_BACKLOG_EVENTS
    backlog_bytes: int = DEFAULT_BACKLOG_BYTES
    kind: str = "file"


@attrs.frozen
class ConsoleSpec:
    """
    The web console: where it listens, which channels it may tail, and the
    Host headers it answers (a guard against DNS rebinding).
    """

    listen: str = DEFAULT_CONSOLE
    channels: tuple = ()
    allowed_hosts: tuple = ("127.0.0.1", "localhost", "[::1]")
    recent: int = 100


@attrs.frozen
class SinkSettings:
    """
    @ivar credit: events per replica and channel the subscriber may hold
        undecided or waiting for a hand-over.
    @ivar window: groups per channel handed to the forwarder and not yet
        held by every sink: how far a healthy sink may run ahead of one
        that is down before the stream holds.  A replica keeps at most
        C{MAX_CREDIT_EVENTS} events and C{MAX_CREDIT_BYTES} bytes sent to a
        subscriber and not acknowledged, and each open group holds up to a
        credit's worth, so C{(window + 1) * credit} must stay within that
        (and L{credit_bytes} is cut to fit).
    @ivar metrics: the server endpoint string Prometheus metrics are
        served on, or C{None}.
    """

    client: str
    channels: tuple
    sinks: tuple
    console: ConsoleSpec | None = None
    hostname: str | None = None
    stats_interval: float = 60.0
    credit: int = 1000
    window: int = DEFAULT_WINDOW
    metrics: str | None = None
    path: str = "<sink settings>"

    def credit_bytes(self):
        """
        Return the credit in bytes per replica and channel: the subscriber's
        default, or less, so that C{window + 1} credits of open groups stay
        within what a replica keeps unacknowledged.
        """
        return max(1, min(DEFAULT_CREDIT_BYTES, MAX_CREDIT_BYTES // (self.window + 1)))

    def console_channels(self):
        """
        Return every channel the console may tail, forwarded ones first.
        """
        extra = self.console.channels if self.console is not None else ()
        return tuple(dict.fromkeys(self.channels + tuple(extra)))


def _strings(reader, key, default, what):
    values = reader.get(key, list, f"a list of {what}", default)
    if not all(isinstance(v, str) and v for v in values):
        reader.fail(key, f"a list of {what} (non-empty strings)")
    return tuple(values)


def _backlog(reader):
    return {
        "backlog_events": reader.number("backlog_events", int, DEFAULT_BACKLOG_EVENTS, 1),
        "backlog_bytes": reader.number("backlog_bytes", int, DEFAULT_BACKLOG_BYTES, 1024),
    }


def _syslog_sink(reader, name, folder):
    reader.unknown_keys(_SYSLOG_KEYS)
    connect = reader.get("connect", str, "an endpoint string", None)
    if not connect or not connect.lower().startswith(("tcp:", "unix:")):
        reader.fail("connect", "an endpoint string like 'tcp:127.0.0.1:6514'")
    tls = reader.get("tls", bool, "true or false", False)
    files = {}
    for key in ("ca", "certificate", "private_key"):
        value = reader.get(key, str, "a PEM file", None)
        if value is not None and not tls:
            reader.fail(key, "no TLS key: it applies with tls = true only")
        files[key] = resolve_path(folder, value) if value else None
    if (files["certificate"] is None) != (files["private_key"] is None):
        reader.fail("private_key", "both certificate and private_key, or neither")
    spec = SyslogSinkSpec(
        name=name,
        connect=connect,
        tls=tls,
        server_name=reader.get("server_name", str, "a DNS name or address", None),
        facility=reader.number("facility", int, 16, 0, 23),
        app_name=reader.get("app_name", str, "a name", "fitbroker"),
        window_events=reader.number("window_events", int, 20_000, 1),
        window_bytes=reader.number("window_bytes", int, 16 * 1024 * 1024, 1024),
        confirm_after=reader.number("confirm_after", float, 1.0, 0.0),
        **_backlog(reader),
        **files,
    )
    if tls and not (spec.server_name or spec.host()):
        reader.fail("server_name", "the name the receiver's certificate carries")
    return spec


def _file_sink(reader, name, folder):
    reader.unknown_keys(_FILE_KEYS)
    path = reader.get("path", str, "a file path", None)
    if not path:
        reader.fail("path", "the file to append JSON lines to (the key is missing)")
    return FileSinkSpec(
        name=name,
        path=resolve_path(folder, path),
        max_bytes=reader.number("max_bytes", int, 100 * 1024 * 1024, 1024),
        keep=reader.number("keep", int, 5, 0, 1000),
        fsync=reader.get("fsync", bool, "true or false", False),
        **_backlog(reader),
    )


def parse_settings(path, data):
    """
    Build L{SinkSettings} from the parsed TOML C{data} of file C{path}.
    """
    top = TableReader(path, data)
    top.unknown_keys(_TOP_KEYS)
    folder = os.path.dirname(os.path.abspath(path))
    client = top.get("client", str, "a client name", None)
    if client is None:
        top.fail("client", "the cluster client to act as (the key is missing)")
    try:
        check_client_name(client)
    except ConfigError:
        top.fail("client", f"a client name (one lowercase DNS label), found {client!r}")
    channels = _strings(top, "channels", None, "channel names")
    if not channels:
        top.fail("channels", "a non-empty list of channels to forward")
    sinks_data = top.get("sinks", list, "an array of [[sinks]] tables", None)
    if not sinks_data:
        top.fail("sinks", "at least one [[sinks]] table (kind = 'syslog' or 'file')")
    sinks, names = [], set()
    for index in range(len(sinks_data)):
        reader = top.sub("sinks", index)
        kind = reader.get("kind", str, "'syslog' or 'file'", None)
        name = reader.get("name", str, "a name", f"{kind}-{index}")
        if not name or name in names:
            reader.fail("name", f"a name no other sink has, found {name!r}")
        names.add(name)
        if kind == "syslog":
            sinks.append(_syslog_sink(reader, name, folder))
        elif kind == "file":
            sinks.append(_file_sink(reader, name, folder))
        else:
            reader.fail("kind", f"'syslog' or 'file', found {kind!r}")
    credit = top.number("credit", int, 1000, 1, 100_000)
    window = top.number("window", int, DEFAULT_WINDOW, 1, MAX_WINDOW)
    if (window + 1) * credit > MAX_CREDIT_EVENTS:
        top.fail(
            "window",
            f"at most {MAX_CREDIT_EVENTS // credit - 1} with credit = {credit}: (window + 1) x credit "
            f"must stay within the {MAX_CREDIT_EVENTS} events a replica keeps unacknowledged, "
            f"found {window}",
        )
    metrics = top.get("metrics", str, "a server endpoint string like 'tcp:9480:interface=127.0.0.1'", None)
    if metrics is not None and not metrics:
        top.fail("metrics", "a server endpoint string like 'tcp:9480:interface=127.0.0.1', found ''")
    console = None
    if "console" in data:
        table = top.sub("console")
        table.unknown_keys(_CONSOLE_KEYS)
        console = ConsoleSpec(
            listen=table.get("listen", str, "an endpoint string", DEFAULT_CONSOLE),
            channels=_strings(table, "channels", [], "channel names"),
            allowed_hosts=tuple(
                h.lower()
                for h in _strings(table, "allowed_hosts", list(ConsoleSpec().allowed_hosts), "host names")
            ),
            recent=table.number("recent", int, 100, 0, 10_000),
        )
    return SinkSettings(
        client=client,
        channels=channels,
        sinks=tuple(sinks),
        console=console,
        hostname=top.get("hostname", str, "a host name", None),
        stats_interval=top.number("stats_interval", float, 60.0, 0.0, low_open=True),
        credit=credit,
        window=window,
        metrics=metrics,
        path=path,
    )


def load_settings(path):
    """
    Read and validate the sink settings file at C{path}.
    """
    return parse_settings(path, read_toml(path, "sink settings file"))


def default_settings_path(cluster_path):
    """
    Return where the settings are when not named: next to the cluster file.
    """
    return os.path.join(os.path.dirname(os.path.abspath(cluster_path)), DEFAULT_FILE)


def check_against_cluster(settings, cluster):
    """
    Check that C{cluster} knows the client and lets it subscribe to every
    channel the settings forward or show.

    @raise ConfigError: naming both files.
    """
    if settings.client not in cluster.clients:
        raise ConfigError(
            f"{settings.path}: [client]: client {settings.client!r} is not in [clients] of "
            f"{cluster.path}; known: {', '.join(sorted(cluster.clients)) or 'none'}"
        )
    for tag in settings.console_channels():
        key = "channels" if tag in settings.channels else "console.channels"
        spec = cluster.channel(tag)
        if spec is None:
            raise ConfigError(
                f"{settings.path}: [{key}]: channel {tag!r} is not in {cluster.path}; "
                f"channels: {', '.join(sorted(cluster.channels)) or 'none'}"
            )
        if not spec.may_subscribe(settings.client):
            raise ConfigError(
                f"{settings.path}: [{key}]: {cluster.path} does not let client "
                f"{settings.client!r} subscribe to channel {tag!r}"
            )
