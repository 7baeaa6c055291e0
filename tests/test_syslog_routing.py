"""
Syslog routing: rules from a TOML table, first match wins, urgency from
severity, unparsed messages, and precise errors for invalid tables.
"""

import ipaddress
import tomllib

import pytest

from fit_broker.errors import ConfigError
from fit_broker.syslog.parser import SyslogMessage, parse
from fit_broker.syslog.routing import DEFAULT_URGENCY, Router, source_address

RECEIVED = 1705320000.0


def message(facility=1, severity=5, app_name=None, hostname=None, source=None):
    return SyslogMessage(
        "rfc3164",
        facility=facility,
        severity=severity,
        app_name=app_name,
        hostname=hostname,
        structured_data={},
        msg="x",
        source=source,
    )


def router(rules=(), **table):
    return Router.from_config({"default": "syslog", "rules": list(rules), **table})


def test_toml_table():
    """A router loads from the TOML text an operator writes."""
    table = tomllib.loads(
        """
        default = "syslog"
        malformed_channel = "syslog-raw"
        urgency = { warning = 2 }

        [[rules]]
        facility = ["auth", "authpriv"]
        severity = { min = "warning" }
        channel = "security"

        [[rules]]
        hostname = "*.dmz.example.com"
        source = "192.0.2.0/24"
        channel = "dmz"
        """
    )
    r = Router.from_config(table)
    assert r.route(message(facility=10, severity=4)) == ("security", 2)
    assert r.route(message(facility=10, severity=6)) == ("syslog", 0)
    dmz = message(hostname="WWW.dmz.example.com", source="192.0.2.9:514")
    assert r.route(dmz) == ("dmz", 1)
    assert r.route(parse(b"<999>", None, RECEIVED)) == ("syslog-raw", 0)


def test_first_match_wins():
    """When several rules match, the first one listed chooses the channel."""
    r = router([{"facility": "auth", "channel": "first"}, {"facility": 4, "channel": "second"}])
    assert r.route(message(facility=4)) == ("first", 1)
    assert r.counters["routed"] == 1


def test_default_when_nothing_matches():
    """A message no rule matches goes to the default channel, counted."""
    r = router([{"facility": "mail", "channel": "mail"}])
    assert r.route(message(facility=1)) == ("syslog", 1)
    assert r.counters["default"] == 1


def test_rule_without_criteria_matches_everything():
    """A rule with only a channel catches every parsed message."""
    r = router([{"channel": "all"}])
    assert r.route(message(facility=23, severity=7)) == ("all", 0)


@pytest.mark.parametrize(
    "facility, codes",
    [
        ("kern", {0}),
        ("LOCAL7", {23}),
        (16, {16}),
        (["auth", "security", 10], {4, 10}),
        ("ntp", {12}),
    ],
)
def test_facility_by_name_or_number(facility, codes):
    """Facilities are accepted as names (any case), numbers, or lists of either."""
    r = router([{"facility": facility, "channel": "hit"}])
    hits = {code for code in range(24) if r.route(message(facility=code))[0] == "hit"}
    assert hits == codes


@pytest.mark.parametrize(
    "severity, codes",
    [
        ({"min": "warning"}, {0, 1, 2, 3, 4}),
        ({"max": "err"}, {3, 4, 5, 6, 7}),
        ({"min": "warning", "max": "crit"}, {2, 3, 4}),
        ({"min": 4, "max": 2}, {2, 3, 4}),
        ({"min": "emerg", "max": "emerg"}, {0}),
        ({}, set(range(8))),
        ("err", {3}),
        ("ERROR", {3}),
        (["emerg", "alert", 7], {0, 1, 7}),
    ],
)
def test_severity_forms(severity, codes):
    """Severity is a level, a list, or a min (least severe) / max (most severe) range."""
    r = router([{"severity": severity, "channel": "hit"}])
    hits = {code for code in range(8) if r.route(message(severity=code))[0] == "hit"}
    assert hits == codes


def test_app_name_glob_is_case_sensitive():
    """app_name globs match the tag exactly, case included; no app_name never matches."""
    r = router([{"app_name": ["sshd*", "%ASA-*"], "channel": "hit"}])
    assert r.route(message(app_name="sshd"))[0] == "hit"
    assert r.route(message(app_name="%ASA-6-302013"))[0] == "hit"
    assert r.route(message(app_name="SSHD"))[0] == "syslog"
    assert r.route(message(app_name=None))[0] == "syslog"


def test_hostname_glob_is_case_insensitive():
    """hostname globs ignore case, as DNS names do; no hostname never matches."""
    r = router([{"hostname": "FW-*.Example.COM", "channel": "hit"}])
    assert r.route(message(hostname="fw-01.example.com"))[0] == "hit"
    assert r.route(message(hostname="web.example.com"))[0] == "syslog"
    assert r.route(message(hostname=None))[0] == "syslog"


@pytest.mark.parametrize(
    "source, hit",
    [
        ("192.0.2.7", True),
        ("192.0.2.7:514", True),
        ("198.51.100.1:514", False),
        ("[2001:db8::1]:6514", True),
        ("2001:db8::1", True),
        ("[::ffff:192.0.2.7]:514", True),
        ("/dev/log", False),
        (None, False),
    ],
)
def test_source_network(source, hit):
    """source rules match the sender's address in IPv4 or IPv6 networks, port or not."""
    r = router([{"source": ["192.0.2.0/24", "2001:db8::/32"], "channel": "hit"}])
    assert (r.route(message(source=source))[0] == "hit") is hit


def test_source_address_parsing():
    """Sender strings become addresses, and non-IP sources become None."""
    assert source_address("10.0.0.1:5000") == ipaddress.ip_address("10.0.0.1")
    assert source_address("[::1]:514") == ipaddress.ip_address("::1")
    assert source_address("unix:/dev/log") is None
    assert source_address("") is None


def test_all_criteria_must_match():
    """A rule with several criteria matches only when every one holds."""
    r = router(
        [{"facility": "auth", "severity": {"min": "err"}, "app_name": "sshd", "channel": "hit"}]
    )
    assert r.route(message(facility=4, severity=3, app_name="sshd"))[0] == "hit"
    assert r.route(message(facility=4, severity=5, app_name="sshd"))[0] == "syslog"
    assert r.route(message(facility=4, severity=3, app_name="sudo"))[0] == "syslog"


def test_default_urgency_map():
    """emerg, alert and crit are urgent (3), err 2, warning and notice 1, info and debug 0."""
    r = router()
    assert [r.route(message(severity=code))[1] for code in range(8)] == [3, 3, 3, 2, 1, 1, 0, 0]
    assert DEFAULT_URGENCY == (3, 3, 3, 2, 1, 1, 0, 0)


def test_urgency_overrides():
    """The urgency table overrides single severities by name or digit, keeping the rest."""
    r = router(urgency={"err": 3, "6": 1, "Debug": 1})
    assert [r.route(message(severity=code))[1] for code in range(8)] == [3, 3, 3, 3, 1, 1, 1, 1]


def test_unparsed_to_malformed_channel():
    """Unparsed messages go to the malformed channel with its urgency, counted."""
    r = router(
        [{"channel": "all"}], malformed_channel="syslog-raw", malformed_urgency=1
    )
    assert r.route(parse(b"<1000>x", None, RECEIVED)) == ("syslog-raw", 1)
    assert r.counters["malformed"] == 1


def test_unparsed_dropped_without_malformed_channel():
    """Without a malformed channel an unparsed message is a counted drop."""
    r = router([{"channel": "all"}])
    assert r.route(parse(b"", None, RECEIVED)) == (None, None)
    assert r.counters["dropped-malformed"] == 1


def test_routers_share_no_state():
    """Two routers keep separate counters."""
    a, b = router(), router()
    a.route(message())
    assert a.counters["default"] == 1
    assert b.counters["default"] == 0


@pytest.mark.parametrize(
    "table, where, expected",
    [
        ([], "[routing]", "a table"),
        ({}, "[routing.default]", "the key is missing"),
        ({"default": ""}, "[routing.default]", "a channel name"),
        ({"default": 3}, "[routing.default]", "a channel name"),
        ({"default": "s", "colour": 1}, "[routing.colour]", "one of the keys"),
        ({"default": "s", "malformed_channel": 5}, "[routing.malformed_channel]", "channel"),
        ({"default": "s", "malformed_urgency": -1}, "[routing.malformed_urgency]", "0 to 15"),
        ({"default": "s", "rules": {"channel": "x"}}, "[routing.rules]", "an array"),
        ({"default": "s", "rules": ["x"]}, "[routing.rules[0]]", "a table"),
        ({"default": "s", "rules": [{}]}, "[routing.rules[0].channel]", "missing"),
        (
            {"default": "s", "rules": [{"channel": "a"}, {"channel": "b", "facilty": 1}]},
            "[routing.rules[1].facilty]",
            "one of the keys",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "facility": "kernel"}]},
            "[routing.rules[0].facility]",
            "a facility name",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "facility": 24}]},
            "[routing.rules[0].facility]",
            "0 to 23",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "facility": []}]},
            "[routing.rules[0].facility]",
            "non-empty list",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "severity": "warnig"}]},
            "[routing.rules[0].severity]",
            "a severity name",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "severity": True}]},
            "[routing.rules[0].severity]",
            "0 to 7",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "severity": {"min": 8}}]},
            "[routing.rules[0].severity.min]",
            "0 to 7",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "severity": {"from": 1}}]},
            "[routing.rules[0].severity.from]",
            "one of the keys max, min",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "severity": {"min": "crit", "max": "err"}}]},
            "[routing.rules[0].severity]",
            "lower numbers are more severe",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "hostname": 7}]},
            "[routing.rules[0].hostname]",
            "glob",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "app_name": [""]}]},
            "[routing.rules[0].app_name]",
            "glob",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "source": "192.0.2.0/33"}]},
            "[routing.rules[0].source]",
            "a network",
        ),
        (
            {"default": "s", "rules": [{"channel": "a", "source": 42}]},
            "[routing.rules[0].source]",
            "a network",
        ),
        (
            {"default": "s", "rules": [{"channel": ["a"]}]},
            "[routing.rules[0].channel]",
            "a channel name",
        ),
        ({"default": "s", "urgency": 3}, "[routing.urgency]", "a table"),
        ({"default": "s", "urgency": {"loud": 3}}, "[routing.urgency.loud]", "severity name"),
        ({"default": "s", "urgency": {"8": 3}}, "[routing.urgency.8]", "severity name"),
        ({"default": "s", "urgency": {"err": 16}}, "[routing.urgency.err]", "0 to 15"),
        ({"default": "s", "urgency": {"err": "high"}}, "[routing.urgency.err]", "0 to 15"),
    ],
)
def test_invalid_tables(table, where, expected):
    """An invalid routing table raises ConfigError naming the key and what was expected."""
    with pytest.raises(ConfigError) as raised:
        Router.from_config(table)
    text = str(raised.value)
    assert text.startswith(where)
    assert expected in text


def test_error_names_the_enclosing_table():
    """The caller's key for the table prefixes every error location."""
    with pytest.raises(ConfigError, match=r"^\[syslog\.routing\.default\]"):
        Router.from_config({}, where="syslog.routing")
