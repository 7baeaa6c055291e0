"""
The sink's sans-IO parts: RFC 5424 formatting, settings, the resend
window, rotation, the forwarder's fan-out, and the syslog sink on a
memory transport.
"""

import json
import os
import re
import tomllib

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from fit_broker.config import parse_config
from fit_broker.errors import ConfigError
from fit_broker.init import cluster_toml
from fit_broker.sink._interfaces import ISink
from fit_broker.sink.config import (
    FileSinkSpec,
    SyslogSinkSpec,
    check_against_cluster,
    parse_settings,
)
from fit_broker.sink.file import RotatingFile
from fit_broker.sink.format import (
    json_line,
    octet_counted,
    sd_escape,
    syslog_frame,
    syslog_message,
    timestamp,
)
from fit_broker.sink.forwarder import (
    Backoff,
    FileSink,
    Forwarder,
    StreamWindow,
    SyslogConnectionFactory,
    SyslogSink,
)
from fit_broker.units import Event

# A strict reading of RFC 5424's ABNF for what we emit.
RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) "
    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) - (?P<msgid>[!-~]{1,32}) "
    rb'(?P<sd>\[fitbroker@32473(?: [a-z_]+="(?:[^"\\\]]|\\["\\\]])*")+\]) (?P<msg>.*)$',
    re.S,
)


def event(content=b"hello", event_id=7, urgency=0, publisher="probe", ts=1700000000.25):
    return Event(publisher, event_id, ts, 60.0, urgency, content)


def sd_params(sd):
    return {
        k: re.sub(r"\\(.)", r"\1", v)
        for k, v in re.findall(r'([a-z_]+)="((?:[^"\\\]]|\\.)*)"', sd.decode())
    }


# Formatting.


def test_syslog_message_fields():
    """A message has PRI from facility and urgency, an RFC 3339 UTC time, and the SD naming the event."""
    message = syslog_message("alerts", event(urgency=2), "host-1", facility=16)
    match = RFC5424.match(message)
    assert match, message
    assert int(match["pri"]) == 16 * 8 + 3
    assert match["ts"] == b"2023-11-14T22:13:20.250000Z"
    assert (match["host"], match["app"], match["msgid"]) == (b"host-1", b"fitbroker", b"alerts")
    assert sd_params(match["sd"]) == {
        "channel": "alerts", "publisher": "probe", "event_id": "7", "urgency": "2",
    }
    assert match["msg"] == b"hello"


def test_sd_escaping_hostile_values():
    """Quotes, backslashes and brackets in SD values are escaped, so the SD cannot be broken out of."""
    assert sd_escape('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    message = syslog_message('x"] [evil a="1"]', event(b"m"), "h")
    match = RFC5424.match(message)
    assert match, message
    assert sd_params(match["sd"])["channel"] == 'x"] [evil a="1"]'


def test_header_fields_sanitised():
    """Spaces and control characters in header fields are replaced and lengths capped."""
    message = syslog_message("c" * 40, event(), "bad host\nname", app_name="a b")
    match = RFC5424.match(message)
    assert match and match["host"] == b"bad_host_name" and match["app"] == b"a_b"
    assert len(match["msgid"]) == 32


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e20, 1e20])
def test_unrepresentable_timestamp_is_nil(value):
    """A timestamp that is not a date becomes the NILVALUE instead of an exception."""
    assert timestamp(value) == "-"
    assert RFC5424.match(syslog_message("c", event(ts=value), "h"))


def test_octet_counting_counts_bytes():
    """The frame length counts bytes, not characters, and binary content passes as it is."""
    content = "é\n\x00".encode() + b"\xff"
    frame = syslog_frame("c", event(content), "h")
    length, _, rest = frame.partition(b" ")
    assert int(length) == len(rest) and rest.endswith(content)
    assert octet_counted(b"abc") == b"3 abc"


def test_json_line():
    """A JSON line is the tail's object with one newline; undecodable content goes base64."""
    line = json_line("c", event(b"\xff"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record["content"] is None and record["content_b64"] == "/w=="
    assert record["publisher"] == "probe" and record["event_id"] == 7


# Settings.

GOOD = {
    "client": "console",
    "channels": ["events"],
    "sinks": [
        {"kind": "syslog", "connect": "tcp:127.0.0.1:6514"},
        {"kind": "file", "name": "archive", "path": "out/events.jsonl", "max_bytes": 2048, "keep": 2},
    ],
    "console": {},
}


def test_settings_parse(tmp_path):
    """A full settings file becomes sink specs with defaults and paths beside the file."""
    settings = parse_settings(str(tmp_path / "sink.toml"), GOOD)
    syslog, file = settings.sinks
    assert isinstance(syslog, SyslogSinkSpec) and syslog.name == "syslog-0" and not syslog.tls
    assert isinstance(file, FileSinkSpec) and file.path == str(tmp_path / "out/events.jsonl")
    assert settings.console.listen == "tcp:8480:interface=127.0.0.1"


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"client": "Bad Name"}, "[client]"),
        ({"channels": []}, "[channels]"),
        ({"sinks": [{"kind": "kafka"}]}, "[sinks[0].kind]"),
        ({"sinks": [{"kind": "syslog", "connect": "udp:1.2.3.4:514"}]}, "[sinks[0].connect]"),
        ({"sinks": [{"kind": "syslog", "connect": "tcp:h:1", "ca": "x.pem"}]}, "[sinks[0].ca]"),
        ({"sinks": [{"kind": "file"}]}, "[sinks[0].path]"),
        ({"sinks": [{"kind": "file", "path": "x", "keep": -1}]}, "[sinks[0].keep]"),
        ({"sinks": [{"kind": "file", "path": "x", "nope": 1}]}, "[sinks[0].nope]"),
        ({"console": {"listen": 8480}}, "[console.listen]"),
        ({"extra": 1}, "[extra]"),
    ],
)
def test_settings_errors_name_file_and_key(change, fragment):
    """Each mistake is one ConfigError naming the file and the key."""
    with pytest.raises(ConfigError) as error:
        parse_settings("/etc/sink.toml", {**GOOD, **change})
    assert str(error.value).startswith("/etc/sink.toml: ") and fragment in str(error.value)


def cluster_text(subscribers=("console",)):
    """A cluster file whose channel C{events} C{probe} publishes to and C{subscribers} read."""
    return cluster_toml(
        "t", 1, range(7401, 7405), ["console", "probe"],
        [("events", "events", "default", "cft", "si", ["probe"], list(subscribers))],
        keys_dir=None, tls=False, admins=[], classes={},
    )


def cluster(subscribers=("console",)):
    return parse_config("/etc/cluster.toml", tomllib.loads(cluster_text(subscribers)))


def test_settings_checked_against_cluster():
    """A channel the client may not read is refused before start, naming both files."""
    settings = parse_settings("/etc/sink.toml", GOOD)
    check_against_cluster(settings, cluster())
    with pytest.raises(ConfigError, match=r"/etc/sink.toml: \[channels\]: /etc/cluster.toml does not let"):
        check_against_cluster(settings, cluster(subscribers=("probe",)))


# The resend window.


def test_window_sends_then_resends_unconfirmed():
    """Frames sent less than confirm_after ago are sent again on the next connection; older ones are not."""
    window = StreamWindow(100, 1 << 20, confirm_after=1.0)
    window.add("a", [b"1", b"2"])
    assert window.take(0.0) == (b"12", ["a"])
    window.add("b", [b"3"])
    assert window.take(1.5) == (b"3", ["b"])  # "a" confirmed at 1.5
    assert window.resend(1.6) == (b"3", 1)


def test_window_full_holds_group():
    """A full window holds the rest of a group until older frames are confirmed."""
    window = StreamWindow(2, 1 << 20, confirm_after=1.0)
    window.add("a", [b"1", b"2", b"3"])
    assert window.take(0.0) == (b"12", [])
    assert window.blocked() and window.held() == 1
    assert window.take(0.5) == (b"", [])
    assert window.take(1.0) == (b"3", ["a"])
    assert not window.blocked()


def test_window_bytes_bound():
    """The window is bounded in bytes as well as events; one oversized frame still goes alone."""
    window = StreamWindow(100, 10, confirm_after=1.0)
    window.add("a", [b"x" * 8, b"y" * 8])
    assert window.take(0.0) == (b"x" * 8, [])
    window2 = StreamWindow(100, 10, confirm_after=1.0)
    window2.add("b", [b"z" * 50])
    assert window2.take(0.0) == (b"z" * 50, ["b"])


def test_backoff_doubles_to_maximum():
    """Retry delays double up to the maximum and start over after a reset."""
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


# Rotation.


def test_rotation_by_size(tmp_path):
    """Lines go to a new file before the size would pass max_bytes; only keep old files remain."""
    path = str(tmp_path / "e.jsonl")
    rotating = RotatingFile(path, max_bytes=20, keep=2)
    for i in range(10):
        rotating.append([b"%09d\n" % i])  # 10 bytes each: two per file
    rotating.close()
    assert sorted(os.listdir(tmp_path)) == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    assert open(path, "rb").read() == b"000000008\n000000009\n"
    assert open(path + ".2", "rb").read() == b"000000004\n000000005\n"
    assert rotating.rotations == 4


def test_rotation_keeps_nothing_when_keep_zero(tmp_path):
    """With keep = 0 a full file is removed, so the folder holds one file."""
    path = str(tmp_path / "e.jsonl")
    rotating = RotatingFile(path, max_bytes=10, keep=0)
    rotating.append([b"a" * 9 + b"\n", b"b" * 9 + b"\n"])
    rotating.close()
    assert os.listdir(tmp_path) == ["e.jsonl"] and open(path, "rb").read() == b"b" * 9 + b"\n"


# Forwarder and sinks.


class RecordingSink:
    def __init__(self, name):
        self.name = name
        self.groups = []
        self.on_taken = None

    def offer(self, group):
        self.groups.append(group)

    def full(self):
        return False

    def take(self):
        self.on_taken(self, self.groups.pop(0))


def test_forwarder_fires_when_every_sink_took():
    """The group's Deferred fires only after the last sink took it; sinks get it at once."""
    a, b = RecordingSink("a"), RecordingSink("b")
    forwarder = Forwarder([a, b])
    d = forwarder.forward("events", [event()])
    assert len(a.groups) == len(b.groups) == 1
    a.take()
    assert not d.called
    b.take()
    assert d.called and forwarder.forwarded == 1
    assert forwarder.forward("events", []).called


def test_file_sink_retries_without_loss(tmp_path):
    """A file sink that cannot write holds the group, retries with backoff, then writes it once."""
    clock = Clock()
    folder = tmp_path / "blocked"
    folder.write_text("a file where a folder should be")
    spec = FileSinkSpec("archive", str(folder / "e.jsonl"))
    sink = FileSink(spec, clock)
    verifyObject(ISink, sink)
    forwarder = Forwarder([sink])
    d = forwarder.forward("events", [event(b"one"), event(b"two", 8)])
    assert not d.called and sink.held() == 2 and sink.snapshot()["state"] == "retrying"
    clock.advance(0.5)
    assert sink.counters["retried"] == 2
    folder.unlink()
    clock.advance(1.0)
    assert d.called and sink.held() == 0
    lines = (folder / "e.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["content"] for x in lines] == ["one", "two"]
    assert sink.snapshot()["forwarded"] == 2


def make_syslog_sink(clock, **options):
    spec = SyslogSinkSpec("siem", "tcp:127.0.0.1:1", **options)
    sink = SyslogSink(spec, "host", clock)
    verifyObject(ISink, sink)
    return sink


def connect(sink):
    protocol = SyslogConnectionFactory(sink).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def frames(data):
    out = []
    while data:
        length, _, rest = data.partition(b" ")
        out.append(rest[: int(length)])
        data = rest[int(length) :]
    return out


def test_syslog_sink_holds_while_down_and_resends_after_loss():
    """Down: the group waits. Up: it is written and taken. Lost: the recent window is sent again and counted."""
    clock = Clock()
    sink = make_syslog_sink(clock, confirm_after=1.0)
    forwarder = Forwarder([sink])
    d1 = forwarder.forward("events", [event(b"one", 1), event(b"two", 2)])
    assert not d1.called and sink.snapshot()["state"] == "down"
    protocol, transport = connect(sink)
    assert d1.called
    assert [f.rsplit(b" ", 1)[1] for f in frames(transport.value())] == [b"one", b"two"]
    clock.advance(2.0)
    d2 = forwarder.forward("events", [event(b"three", 3)])
    assert d2.called
    protocol.connectionLost(Failure(ConnectionError("receiver went away")))
    d3 = forwarder.forward("events", [event(b"four", 4)])
    assert not d3.called
    _, transport2 = connect(sink)
    assert d3.called
    # "one" and "two" were confirmed by age; "three" is sent again, then "four".
    assert [f.rsplit(b" ", 1)[1] for f in frames(transport2.value())] == [b"three", b"four"]
    assert sink.counters["repeats-possible"] == 1 and sink.counters["retried"] == 1


def test_syslog_sink_pauses_with_transport():
    """While the transport asks to pause, groups are held rather than buffered without bound."""
    clock = Clock()
    sink = make_syslog_sink(clock)
    forwarder = Forwarder([sink])
    protocol, transport = connect(sink)
    protocol.pauseProducing()
    d = forwarder.forward("events", [event()])
    assert not d.called and transport.value() == b""
    protocol.resumeProducing()
    assert d.called and transport.value()


def test_slow_sink_does_not_stop_others_writing(tmp_path):
    """With the syslog sink down, the file sink still writes the group at once; the Deferred waits for both."""
    clock = Clock()
    syslog = make_syslog_sink(clock)
    file = FileSink(FileSinkSpec("archive", str(tmp_path / "e.jsonl")), clock)
    forwarder = Forwarder([syslog, file])
    d = forwarder.forward("events", [event()])
    assert (tmp_path / "e.jsonl").read_bytes() and not d.called
    assert forwarder.snapshot()["siem"]["held"] == 1
    connect(syslog)
    assert d.called


# The twistd plugin's options and service tree.

CLUSTER_TOML = cluster_text()

SINK_TOML = """
client = "console"
channels = ["events"]
[[sinks]]
kind = "syslog"
connect = "tcp:127.0.0.1:6514"
[[sinks]]
kind = "file"
path = "events.jsonl"
"""


def test_tap_options_and_service_tree(tmp_path):
    """Options read sink.toml beside the cluster file; the tree has the client, forwarder and a connector per syslog sink."""
    from twisted.application.internet import ClientService
    from twisted.internet.testing import MemoryReactorClock

    from fit_broker.sink.service import SinkClient
    from fit_broker.sink.tap import Options, makeService

    (tmp_path / "cluster.toml").write_text(CLUSTER_TOML)
    (tmp_path / "sink.toml").write_text(SINK_TOML)
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "cluster.toml")])
    service = makeService(options, MemoryReactorClock())
    children = list(service)
    assert sum(isinstance(c, ClientService) for c in children) == 1
    assert any(isinstance(c, SinkClient) for c in children)
    assert [s.name for s in service.forwarder.sinks] == ["syslog-0", "file-1"]
    assert service.console is None


def test_tap_refuses_unreadable_channel(tmp_path):
    """A channel the client may not subscribe to is a one-line usage error naming the file."""
    from twisted.python.usage import UsageError

    from fit_broker.sink.tap import Options

    (tmp_path / "cluster.toml").write_text(CLUSTER_TOML)
    (tmp_path / "s.toml").write_text(SINK_TOML.replace('client = "console"', 'client = "probe"'))
    with pytest.raises(UsageError, match=r"s\.toml: \[channels\]: .* does not let client 'probe'"):
        Options().parseOptions(
            ["--config", str(tmp_path / "cluster.toml"), "--sink-config", str(tmp_path / "s.toml")]
        )


# The console's pieces.


class RecordingViewer:
    def __init__(self, open=True):
        self.messages = []
        self.open = open

    def send(self, message):
        if self.open:
            self.messages.append(message)
        return self.open


def test_console_hub_recent_then_live():
    """A new viewer gets the channel's recent events, then new ones; a full viewer's drops are counted."""
    from fit_broker.sink.console import ConsoleHub

    hub = ConsoleHub(["events"], recent=2)
    hub.publish("events", [event(b"1", 1), event(b"2", 2), event(b"3", 3)])
    hub.publish("other", [event()])  # not a console channel: ignored
    viewer, full = RecordingViewer(), RecordingViewer(open=False)
    hub.join("events", viewer)
    hub.join("events", full)
    hub.publish("events", [event(b"4", 4)])
    contents = [json.loads(m[len(b"data: "):])["content"] for m in viewer.messages]
    assert contents == ["2", "3", "4"] and hub.dropped == 1
    hub.leave("events", viewer)
    assert hub.viewer_count() == 1


def test_sse_message_cannot_be_split():
    """Line breaks in data become separate data fields, so content cannot forge a message or field."""
    from fit_broker.sink.console import sse_message

    assert sse_message('a\r\nevent: x\rb\n') == b"data: a\ndata: event: x\ndata: b\ndata: \n\n"
    assert sse_message(json.loads(json_line("c", event(b"x\n\ndata: y")))["content"]).count(b"\n\n") == 1


@pytest.mark.parametrize(
    "host, ok",
    [(b"127.0.0.1:8480", True), (b"localhost", True), (b"[::1]:8480", True),
     (b"evil.example:8480", False), (b"127.0.0.1.evil.example", False), (None, False)],
)
def test_host_guard(host, ok):
    """Only the allowed host names may address the console, whatever the port."""
    from fit_broker.sink.console import host_allowed

    assert host_allowed(host, ("127.0.0.1", "localhost", "[::1]")) is ok


def test_page_escapes_channel_names():
    """Names the server renders into the page are escaped and no script is inline."""
    from fit_broker.sink.console import render_page

    page = render_page("<b>t</b>", ['"><script>x()</script>']).decode()
    assert "<script>x()" not in page and "<b>t</b>" not in page
    assert "&quot;&gt;&lt;script&gt;" in page
    assert "<script>" not in page.replace('<script src="console.js" defer></script>', "")
