"""
Routing of syslog messages to broker channels, from a TOML table.

A table looks like this (inside the adapter's configuration file)::

    [routing]
    default = "syslog"                  # required
    malformed_channel = "syslog-raw"    # optional; absent = counted drop
    malformed_urgency = 0               # optional, default 0
    urgency = { warning = 2 }           # optional overrides, see below

    [[routing.rules]]                   # first match wins
    facility = ["auth", "authpriv"]     # name, number, or a list of them
    severity = { min = "warning" }      # warning or more severe
    app_name = "sshd*"                  # fnmatch glob(s), case-sensitive
    hostname = "*.dmz.example.com"      # fnmatch glob(s), case-insensitive
    source = ["192.0.2.0/24", "2001:db8::/32"]
    channel = "security"                # required

A rule without criteria matches everything.  C{severity} is a level (name
or number), a list of levels, or a range C{{min = ..., max = ...}} where
C{min} is the least severe level accepted and C{max} the most severe, as in
syslog.conf's C{*.warning}: lower numbers are more severe, so
C{{min = "warning", max = "crit"}} accepts codes 2, 3 and 4.

Urgency comes from the severity: emerg, alert and crit are 3 (urgent), err
2, warning and notice 1, info and debug 0, unless the C{urgency} table says
otherwise.
"""

import fnmatch
import ipaddress

import attrs

from fit_broker.errors import ConfigError
from fit_broker.syslog.parser import UNPARSED

#: Facility names (RFC 5424 table 1, with the names glibc and rsyslog use).
FACILITIES = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "security": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "ntp": 12,
    "audit": 13,
    "alert": 14,
    "clock": 15,
    **{f"local{n}": 16 + n for n in range(8)},
}

#: Severity names, with the aliases syslog.conf accepts.
SEVERITIES = {
    "emerg": 0,
    "panic": 0,
    "alert": 1,
    "crit": 2,
    "err": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}

#: Urgency per severity code 0..7 unless configured otherwise.
DEFAULT_URGENCY = (3, 3, 3, 2, 1, 1, 0, 0)

#: The largest urgency accepted (QoS classes have at most 16 levels).
MAX_URGENCY = 15

_RULE_KEYS = frozenset({"facility", "severity", "app_name", "hostname", "source", "channel"})
_TABLE_KEYS = frozenset({"rules", "default", "malformed_channel", "malformed_urgency", "urgency"})
_SEVERITY_EXPECTED = (
    "a severity name (emerg, alert, crit, err, warning, notice, info, debug) "
    "or a number from 0 to 7"
)
_FACILITY_EXPECTED = "a facility name (kern, user, ..., local7) or a number from 0 to 23"


@attrs.frozen
class Rule:
    """
    One routing rule; C{None} criteria match anything.

    @ivar facilities: facility codes accepted.
    @ivar severities: severity codes accepted.
    @ivar app_names: globs, matched case-sensitively.
    @ivar hostnames: lower-case globs, matched case-insensitively.
    @ivar networks: networks the source address must be in.
    """

    channel: str
    facilities: frozenset | None = None
    severities: frozenset | None = None
    app_names: tuple | None = None
    hostnames: tuple | None = None
    networks: tuple | None = None

    def matches(self, msg, address):
        """
        Whether C{msg}, from C{address} (an ip_address or None), matches.
        """
        if self.facilities is not None and msg.facility not in self.facilities:
            return False
        if self.severities is not None and msg.severity not in self.severities:
            return False
        if self.app_names is not None and not (
            msg.app_name is not None
            and any(fnmatch.fnmatchcase(msg.app_name, g) for g in self.app_names)
        ):
            return False
        if self.hostnames is not None and not (
            msg.hostname is not None
            and any(fnmatch.fnmatchcase(msg.hostname.lower(), g) for g in self.hostnames)
        ):
            return False
        if self.networks is not None and not (
            address is not None and any(address in net for net in self.networks)
        ):
            return False
        return True


class Router:
    """
    Chooses a channel and an urgency for each L{SyslogMessage}.

    @ivar counters: C{routed} (sent to a rule's channel), C{default} (no
        rule matched), C{malformed} (unparsed, sent to the malformed
        channel), C{dropped-malformed} (unparsed, no malformed channel).
    """

    def __init__(
        self,
        rules,
        default,
        malformed_channel=None,
        urgency=DEFAULT_URGENCY,
        malformed_urgency=0,
    ):
        self.rules = tuple(rules)
        self.default = default
        self.malformed_channel = malformed_channel
        self.urgency = tuple(urgency)
        self.malformed_urgency = malformed_urgency
        self._needs_address = any(r.networks is not None for r in self.rules)
        self.counters = {"routed": 0, "default": 0, "malformed": 0, "dropped-malformed": 0}

    @classmethod
    def from_config(cls, table, where="routing"):
        """
        Build a router from a TOML table; raise L{ConfigError} naming the
        key (C{where} is the table's own key, for the messages).
        """
        return _load(table, where)

    def route(self, msg):
        """
        Return C{(channel, urgency)} for C{msg}, or C{(None, None)} when an
        unparsed message has no malformed channel to go to (counted).
        """
        if msg.format == UNPARSED:
            if self.malformed_channel is None:
                self.counters["dropped-malformed"] += 1
                return None, None
            self.counters["malformed"] += 1
            return self.malformed_channel, self.malformed_urgency
        urgency = self.urgency[msg.severity]
        address = source_address(msg.source) if self._needs_address else None
        for rule in self.rules:
            if rule.matches(msg, address):
                self.counters["routed"] += 1
                return rule.channel, urgency
        self.counters["default"] += 1
        return self.default, urgency


def source_address(source):
    """
    Return the IP address in C{source} (C{"ip"}, C{"ip:port"},
    C{"[ipv6]:port"} or a bare IPv6 address), IPv4-mapped IPv6 addresses
    as IPv4; C{None} for anything else (a Unix socket path, say).
    """
    if not source:
        return None
    host = source
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _fail(where, expected, value=attrs.NOTHING):
    found = "" if value is attrs.NOTHING else f", found {value!r}"
    raise ConfigError(f"[{where}]: expected {expected}{found}")


def _check_keys(table, allowed, where):
    extra = sorted(set(table) - allowed)
    if extra:
        _fail(f"{where}.{extra[0]}", f"one of the keys {', '.join(sorted(allowed))}")


def _channel(value, where):
    if not isinstance(value, str) or not value:
        _fail(where, "a channel name (a non-empty string)", value)
    return value


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _code(value, names, top, expected, where):
    if isinstance(value, bool):
        _fail(where, expected, value)
    if isinstance(value, int) and 0 <= value <= top:
        return value
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    _fail(where, expected, value)


def _facilities(value, where):
    values = _as_list(value)
    if not values:
        _fail(where, _FACILITY_EXPECTED + " (or a non-empty list of them)", value)
    return frozenset(_code(v, FACILITIES, 23, _FACILITY_EXPECTED, where) for v in values)


def _severities(value, where):
    if isinstance(value, dict):
        _check_keys(value, {"min", "max"}, where)
        least = _code(value.get("min", 7), SEVERITIES, 7, _SEVERITY_EXPECTED, f"{where}.min")
        most = _code(value.get("max", 0), SEVERITIES, 7, _SEVERITY_EXPECTED, f"{where}.max")
        if most > least:
            _fail(
                where,
                "min (the least severe level accepted) to be no more severe "
                "than max (the most severe); lower numbers are more severe",
                value,
            )
        return frozenset(range(most, least + 1))
    values = _as_list(value)
    if not values:
        _fail(where, _SEVERITY_EXPECTED + " (or a list or a {min, max} table)", value)
    return frozenset(_code(v, SEVERITIES, 7, _SEVERITY_EXPECTED, where) for v in values)


def _globs(value, where, lower):
    values = _as_list(value)
    if not values or not all(isinstance(v, str) and v for v in values):
        _fail(where, "a glob pattern or a non-empty list of them (strings)", value)
    return tuple(v.lower() if lower else v for v in values)


def _networks(value, where):
    values = _as_list(value)
    if not values:
        _fail(where, "a network like '192.0.2.0/24' or a non-empty list of them", value)
    networks = []
    for v in values:
        try:
            if not isinstance(v, str):
                raise TypeError(v)
            networks.append(ipaddress.ip_network(v, strict=False))
        except (TypeError, ValueError):
            _fail(where, "a network like '192.0.2.0/24' or '2001:db8::/32'", v)
    return tuple(networks)


def _urgency_value(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_URGENCY:
        _fail(where, f"an urgency from 0 to {MAX_URGENCY}", value)
    return value


def _load_rule(table, where):
    if not isinstance(table, dict):
        _fail(where, "a table with a channel and optional criteria", table)
    _check_keys(table, _RULE_KEYS, where)
    if "channel" not in table:
        _fail(f"{where}.channel", "a channel name (the key is missing)")
    parsers = {
        "facilities": ("facility", _facilities),
        "severities": ("severity", _severities),
        "app_names": ("app_name", lambda v, w: _globs(v, w, lower=False)),
        "hostnames": ("hostname", lambda v, w: _globs(v, w, lower=True)),
        "networks": ("source", _networks),
    }
    criteria = {
        field: parse(table[key], f"{where}.{key}")
        for field, (key, parse) in parsers.items()
        if key in table
    }
    return Rule(_channel(table["channel"], f"{where}.channel"), **criteria)


def _load(table, where):
    if not isinstance(table, dict):
        _fail(where, "a table", table)
    _check_keys(table, _TABLE_KEYS, where)
    if "default" not in table:
        _fail(f"{where}.default", "a channel name (the key is missing)")
    default = _channel(table["default"], f"{where}.default")
    malformed = table.get("malformed_channel")
    if malformed is not None:
        malformed = _channel(malformed, f"{where}.malformed_channel")
    malformed_urgency = _urgency_value(
        table.get("malformed_urgency", 0), f"{where}.malformed_urgency"
    )
    urgency = list(DEFAULT_URGENCY)
    overrides = table.get("urgency", {})
    if not isinstance(overrides, dict):
        _fail(f"{where}.urgency", "a table of severity = urgency", overrides)
    for name, value in overrides.items():
        key = f"{where}.urgency.{name}"
        code = int(name) if isinstance(name, str) and name in "01234567" and name else name
        urgency[_code(code, SEVERITIES, 7, _SEVERITY_EXPECTED, key)] = _urgency_value(value, key)
    rules = table.get("rules", [])
    if not isinstance(rules, list):
        _fail(f"{where}.rules", "an array of [[rules]] tables", rules)
    return Router(
        [_load_rule(rule, f"{where}.rules[{i}]") for i, rule in enumerate(rules)],
        default,
        malformed,
        urgency,
        malformed_urgency,
    )
