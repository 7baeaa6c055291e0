"""
The syslog adapter's own settings, loaded from a TOML file of its own.

The cluster file is shared by every replica and client and admits no keys
it does not know, so the adapter's listeners, routing, spool and limits live
in a separate file (by default C{syslog.toml} next to the cluster file); see
C{docs/syslog.md} and C{etc/syslog.toml}.  As for the cluster file, every
problem is a L{ConfigError} naming the file, the key and what was expected,
raised before anything listens.
"""

import os
import zoneinfo

import attrs

from fit_broker.errors import ConfigError
from fit_broker.keys import check_client_name
from fit_broker.syslog.framing import DEFAULT_MAX_SIZE
from fit_broker.syslog.routing import Router
from fit_broker.toml_reader import TableReader, read_toml, resolve_path

DEFAULT_CLIENT = "syslog"
DEFAULT_FILE = "syslog.toml"

#: The largest message the adapter can keep: UDP datagrams cannot be longer.
MAX_MAX_SIZE = 16 * 1024 * 1024

_TOP_KEYS = frozenset(
    {
        "client",
        "max_size",
        "timezone",
        "max_connections",
        "idle_timeout",
        "stats_interval",
        "batch_size",
        "udp_receive_buffer",
        "listeners",
        "routing",
        "spool",
        "rate_limit",
        "metrics",
    }
)
_LISTENER_KEYS = frozenset(
    {"endpoint", "certificate", "private_key", "ca", "require_client_certificate", "permitted_peers"}
)
_TLS_ONLY_KEYS = _LISTENER_KEYS - {"endpoint"}


@attrs.frozen
class TlsSpec:
    """
    What a C{tls:} listener presents and whom it accepts (RFC 5425).

    @ivar certificate: a PEM file: the server's certificate, then any
        intermediate certificates.
    @ivar private_key: a PEM file with the unencrypted private key.
    @ivar ca: a PEM file of CA certificates that client certificates must
        chain to; C{None} means client certificates are neither asked for
        nor checked.
    @ivar require_client_certificate: refuse clients without a certificate
        (mutual TLS); needs C{ca}.
    @ivar permitted_peers: globs one of a client certificate's DNS names (or
        its common name) must match; empty means any certificate C{ca}
        issued.
    """

    certificate: str
    private_key: str
    ca: str | None = None
    require_client_certificate: bool = False
    permitted_peers: tuple = ()


@attrs.frozen
class ListenerSpec:
    """
    One listener.

    @ivar endpoint: as written: C{udp:PORT[:interface=ADDR]}, C{tls:...}
        (C{tcp:} arguments plus L{tls}), or any Twisted server endpoint
        string (C{tcp:}, C{unix:}, C{ssl:}, ...).
    @ivar kind: C{"udp"}, C{"tls"} or C{"stream"}.
    """

    endpoint: str
    kind: str
    tls: TlsSpec | None = None


@attrs.frozen
class SpoolLimits:
    """
    Bounds on events read and not yet acknowledged by the cluster.

    Stream listeners stop reading once the spool reaches C{high_water} of
    either bound and read again once it is back under C{low_water} of both.
    UDP datagrams are accepted only under the high-water mark, so frames
    that paused connections had already read always find room up to the
    hard bounds.
    """

    max_events: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    high_water: float = 0.8
    low_water: float = 0.5


@attrs.frozen
class RateLimit:
    """
    A token bucket per sender address: C{rate} messages a second on
    average, bursts of up to C{burst}.
    """

    rate: float
    burst: int


@attrs.frozen
class SyslogSettings:
    """
    Everything the adapter needs besides the cluster file.

    @ivar routing: the validated C{[routing]} table (see
        L{fit_broker.syslog.routing}); each service builds its own router.
    @ivar timezone: the IANA zone for timestamps without one; C{None} = UTC.
    @ivar udp_receive_buffer: the kernel receive buffer asked for UDP
        sockets, in bytes, so that bursts wait in the kernel instead of
        being dropped there; 0 keeps the system default.
    @ivar idle_timeout: seconds after which a silent connection is closed;
        0 keeps connections open forever, as senders expect.
    @ivar metrics: the server endpoint string Prometheus metrics are
        served on, or C{None} for none.
    @ivar path: the file these came from, for messages.
    """

    listeners: tuple
    routing: dict = attrs.field(factory=lambda: {"default": "syslog"})
    client: str = DEFAULT_CLIENT
    max_size: int = DEFAULT_MAX_SIZE
    timezone: str | None = None
    spool: SpoolLimits = SpoolLimits()
    rate_limit: RateLimit | None = None
    max_connections: int = 1000
    idle_timeout: float = 0.0
    stats_interval: float = 60.0
    batch_size: int = 500
    udp_receive_buffer: int = 4 * 1024 * 1024
    metrics: str | None = None
    path: str = "<syslog settings>"

    def router(self):
        """
        Return a new L{Router} for the routing table.
        """
        return Router.from_config(self.routing, where="routing")

    def tzinfo(self):
        """
        Return the zone for timestamps without one (C{None} = UTC).
        """
        return None if self.timezone is None else zoneinfo.ZoneInfo(self.timezone)

    def channels(self):
        """
        Return every channel the routing table can send to.
        """
        router = self.router()
        names = {router.default, *(rule.channel for rule in router.rules)}
        if router.malformed_channel is not None:
            names.add(router.malformed_channel)
        return names


def _listener(reader, folder):
    reader.unknown_keys(_LISTENER_KEYS)
    endpoint = reader.get("endpoint", str, "an endpoint string", None)
    if not endpoint:
        reader.fail(
            "endpoint",
            "an endpoint string like 'udp:5514:interface=127.0.0.1', "
            "'tcp:5514:interface=127.0.0.1' or 'tls:6514' (the key is missing)",
        )
    prefix = endpoint.split(":", 1)[0].lower()
    if prefix == "udp":
        try:
            parse_udp_endpoint(endpoint)
        except ValueError as e:
            reader.fail("endpoint", f"'udp:PORT[:interface=ADDRESS]': {e}")
    if prefix != "tls":
        extra = sorted(set(reader.table) & _TLS_ONLY_KEYS)
        if extra:
            reader.fail(extra[0], "no TLS key: it applies to 'tls:' endpoints only")
        return ListenerSpec(endpoint, "udp" if prefix == "udp" else "stream")
    certificate = reader.get("certificate", str, "a PEM file", None)
    private_key = reader.get("private_key", str, "a PEM file", None)
    for key, value in (("certificate", certificate), ("private_key", private_key)):
        if not value:
            reader.fail(key, "a PEM file (a 'tls:' listener needs it; the key is missing)")
    ca = reader.get("ca", str, "a PEM file of CA certificates", None)
    require = reader.get("require_client_certificate", bool, "true or false", False)
    peers = reader.get("permitted_peers", list, "a list of name globs", [])
    if not all(isinstance(p, str) and p for p in peers):
        reader.fail("permitted_peers", "a list of name globs (non-empty strings)")
    if (require or peers) and ca is None:
        reader.fail("ca", "the CA file that client certificates must chain to")
    return ListenerSpec(
        endpoint,
        "tls",
        TlsSpec(
            certificate=resolve_path(folder, certificate),
            private_key=resolve_path(folder, private_key),
            ca=resolve_path(folder, ca) if ca else None,
            require_client_certificate=require,
            permitted_peers=tuple(p.lower() for p in peers),
        ),
    )


def _split_endpoint(description):
    """
    Split an endpoint string at unescaped colons, undoing backslash escapes
    (C{interface=\\:\\:1}), as Twisted's endpoint strings do.
    """
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_udp_endpoint(description):
    """
    Return C{(port, interface)} of C{udp:PORT[:interface=ADDRESS]}.

    Twisted has endpoint strings for streams only; this is the same syntax
    for datagrams (C{port=PORT} is accepted too).

    @raise ValueError: saying what is wrong.
    """
    parts = _split_endpoint(description)
    if parts[0].lower() != "udp":
        raise ValueError(f"not a udp endpoint: {description!r}")
    port, interface = None, ""
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            if port is not None:
                raise ValueError(f"unexpected argument {part!r}")
            port = part
        elif key == "port":
            port = value
        elif key == "interface":
            interface = value
        else:
            raise ValueError(f"unknown argument {key!r} (port and interface only)")
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"a port number is needed, found {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} outside 0..65535")
    return number, interface


def tls_endpoint_as_tcp(description):
    """
    Return the C{tcp:} endpoint string under a C{tls:} one.
    """
    return "tcp:" + description.split(":", 1)[1]


def parse_settings(path, data):
    """
    Build L{SyslogSettings} from the parsed TOML C{data} of file C{path}.
    """
    top = TableReader(path, data)
    top.unknown_keys(_TOP_KEYS)
    folder = os.path.dirname(os.path.abspath(path))

    client = top.get("client", str, "a client name", DEFAULT_CLIENT)
    try:
        check_client_name(client)
    except ConfigError:
        top.fail("client", f"a client name (one lowercase DNS label), found {client!r}")

    listeners_data = top.get("listeners", list, "an array of [[listeners]] tables", None)
    if not listeners_data:
        top.fail(
            "listeners",
            "at least one [[listeners]] table with an endpoint such as "
            "'udp:5514:interface=127.0.0.1'",
        )
    listeners = []
    for index in range(len(listeners_data)):
        listeners.append(_listener(top.sub("listeners", index), folder))

    routing = data.get("routing")
    if routing is None:
        top.fail("routing", "a [routing] table with at least a default channel")
    try:
        Router.from_config(routing, where="routing")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

    spool = top.sub("spool")
    spool.unknown_keys({"max_events", "max_bytes", "high_water", "low_water"})
    high = spool.number("high_water", float, 0.8, 0.0, 1.0, low_open=True)
    low = spool.number("low_water", float, 0.5, 0.0, 1.0)
    if low >= high:
        spool.fail("low_water", f"a fraction below high_water ({high}), found {low}")
    limits = SpoolLimits(
        max_events=spool.number("max_events", int, 100_000, 1),
        max_bytes=spool.number("max_bytes", int, 64 * 1024 * 1024, 1024),
        high_water=high,
        low_water=low,
    )

    rate_limit = None
    if "rate_limit" in data:
        rate = top.sub("rate_limit")
        rate.unknown_keys({"messages_per_second", "burst"})
        if "messages_per_second" not in rate.table:
            rate.fail("messages_per_second", "a positive number (the key is missing)")
        per_second = rate.number("messages_per_second", float, None, 0.0, low_open=True)
        burst = rate.number("burst", int, max(1, int(per_second)), 1)
        rate_limit = RateLimit(per_second, burst)

    timezone = top.get("timezone", str, "an IANA zone name such as 'Europe/Lisbon'", None)
    if timezone is not None:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            top.fail("timezone", f"an IANA zone name such as 'Europe/Lisbon', found {timezone!r}")

    return SyslogSettings(
        listeners=tuple(listeners),
        routing=routing,
        client=client,
        max_size=top.number("max_size", int, DEFAULT_MAX_SIZE, 480, MAX_MAX_SIZE),
        timezone=timezone,
        spool=limits,
        rate_limit=rate_limit,
        max_connections=top.number("max_connections", int, 1000, 1),
        idle_timeout=top.number("idle_timeout", float, 0.0, 0.0),
        stats_interval=top.number("stats_interval", float, 60.0, 0.0, low_open=True),
        batch_size=top.number("batch_size", int, 500, 1, 10_000),
        udp_receive_buffer=top.number("udp_receive_buffer", int, 4 * 1024 * 1024, 0),
        metrics=top.get(
            "metrics", str, "a server endpoint string like 'tcp:9409:interface=127.0.0.1'", None
        ),
        path=path,
    )


def load_settings(path):
    """
    Read and validate the adapter's settings file at C{path}.
    """
    return parse_settings(path, read_toml(path, "syslog settings file"))


def default_settings_path(cluster_path):
    """
    Return where the settings are when not named: next to the cluster file.
    """
    return os.path.join(os.path.dirname(os.path.abspath(cluster_path)), DEFAULT_FILE)


def check_against_cluster(settings, cluster):
    """
    Check that C{cluster} lets the adapter do what C{settings} ask: its
    client exists and may publish to every channel routing can choose.

    @raise ConfigError: naming both files.
    """
    if settings.client not in cluster.clients:
        raise ConfigError(
            f"{settings.path}: [client]: client {settings.client!r} is not in [clients] of "
            f"{cluster.path}; known: {', '.join(sorted(cluster.clients)) or 'none'}"
        )
    for tag in sorted(settings.channels()):
        spec = cluster.channel(tag)
        if spec is None:
            raise ConfigError(
                f"{settings.path}: [routing]: channel {tag!r} is not in {cluster.path}; "
                f"channels: {', '.join(sorted(cluster.channels)) or 'none'}"
            )
        if not spec.may_publish(settings.client):
            raise ConfigError(
                f"{settings.path}: [routing]: {cluster.path} does not let client "
                f"{settings.client!r} publish to channel {tag!r} (add it to the "
                "channel's publishers)"
            )
