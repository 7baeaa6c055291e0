"""
Syslog parsing: a corpus of real-world messages, PRI rules, timestamps,
bytes kept exactly, and the JSON event contract.
"""

import base64
import datetime
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fit_broker.syslog.parser import (
    JSON_KEYS,
    LENIENT_REASONS,
    UNPARSED_REASONS,
    SyslogMessage,
    parse,
)

# 2024-01-15T12:00:00Z: every corpus entry is parsed as if received then.
RECEIVED = datetime.datetime(2024, 1, 15, 12, 0, tzinfo=datetime.timezone.utc).timestamp()
SOURCE = "192.0.2.1:514"
BOM = b"\xef\xbb\xbf"


def case(raw, id, **expected):
    return pytest.param(raw, expected, id=id)


CORPUS = [
    # RFC 5424 section 6.5, examples 1-4.
    case(
        b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
        + BOM + b"'su root' failed for lonvick on /dev/pts/8",
        "rfc5424-example-1",
        format="rfc5424", facility=4, severity=2, version=1,
        timestamp="2003-10-11T22:14:15.003Z", hostname="mymachine.example.com",
        app_name="su", procid=None, msgid="ID47", structured_data={},
        msg="'su root' failed for lonvick on /dev/pts/8", msg_b64=None, reason=None,
    ),
    case(
        b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - "
        b"%% It's time to make the do-nuts.",
        "rfc5424-example-2",
        format="rfc5424", facility=20, severity=5, version=1,
        timestamp="2003-08-24T05:14:15.000003-07:00", hostname="192.0.2.1",
        app_name="myproc", procid="8710", msgid=None, structured_data={},
        msg="%% It's time to make the do-nuts.",
    ),
    case(
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
        b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"] '
        + BOM + b"An application event log entry...",
        "rfc5424-example-3",
        format="rfc5424", facility=20, severity=5, app_name="evntslog", msgid="ID47",
        structured_data={
            "exampleSDID@32473": {"iut": "3", "eventSource": "Application", "eventID": "1011"}
        },
        msg="An application event log entry...",
    ),
    case(
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
        b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
        b'[examplePriority@32473 class="high"]',
        "rfc5424-example-4-no-msg",
        format="rfc5424",
        structured_data={
            "exampleSDID@32473": {"iut": "3", "eventSource": "Application", "eventID": "1011"},
            "examplePriority@32473": {"class": "high"},
        },
        msg=None,
    ),
    # util-linux logger 2.3x, default (RFC 5424) output.
    case(
        b"<13>1 2024-01-15T12:59:59.123456+01:00 web01 alice - - "
        b'[timeQuality tzKnown="1" isSynced="1" syncAccuracy="123000"] disk almost full',
        "logger-rfc5424",
        format="rfc5424", facility=1, severity=5,
        timestamp="2024-01-15T12:59:59.123456+01:00", hostname="web01", app_name="alice",
        procid=None, msgid=None,
        structured_data={"timeQuality": {"tzKnown": "1", "isSynced": "1", "syncAccuracy": "123000"}},
        msg="disk almost full",
    ),
    # util-linux logger 2.38.1, bytes captured from the wire.
    case(
        b'<13>1 2026-11-26T23:25:51.953448+00:00 vm root - - [timeQuality tzKnown="1" '
        b'isSynced="0"][x@32473 a="b\\"c"] hello w\xc3\xb6rld',
        "logger-2.38-rfc5424-sd-param",
        format="rfc5424", facility=1, severity=5, timestamp="2026-11-26T23:25:51.953448+00:00",
        hostname="vm", app_name="root", procid=None, msgid=None,
        structured_data={"timeQuality": {"tzKnown": "1", "isSynced": "0"}, "x@32473": {"a": 'b"c'}},
        msg="hello w\u00f6rld", msg_b64=None,
    ),
    case(
        b"<13>1 2026-11-26T23:25:51.948848+00:00 vm root - - - hello w\xc3\xb6rld",
        "logger-2.38-rfc5424-notq",
        format="rfc5424", structured_data={}, msg="hello w\u00f6rld",
    ),
    case(
        b"<155>Nov 26 23:25:51 vm myapp[8605]: hello w\xc3\xb6rld",
        "logger-2.38-rfc3164-pid-local3-err",
        format="rfc3164", facility=19, severity=3, timestamp="2023-11-26T23:25:51+00:00",
        hostname="vm", app_name="myapp", procid="8605", msg="hello w\u00f6rld",
    ),
    # Junos structured-data format.
    case(
        b"<165>1 2024-01-15T12:59:59.123+01:00 srx01 RT_FLOW - RT_FLOW_SESSION_CREATE "
        b'[junos@2636.1.1.1.2.129 source-address="10.0.0.1" source-port="50000" '
        b'destination-address="192.0.2.10" destination-port="443" protocol-id="6"] '
        b"session created 10.0.0.1/50000->192.0.2.10/443",
        "juniper-rfc5424",
        format="rfc5424", facility=20, severity=5, hostname="srx01", app_name="RT_FLOW",
        msgid="RT_FLOW_SESSION_CREATE",
        structured_data={
            "junos@2636.1.1.1.2.129": {
                "source-address": "10.0.0.1",
                "source-port": "50000",
                "destination-address": "192.0.2.10",
                "destination-port": "443",
                "protocol-id": "6",
            }
        },
        msg="session created 10.0.0.1/50000->192.0.2.10/443",
    ),
    # VMware ESXi leaves SD values unquoted.
    case(
        b"<166>1 2024-01-15T11:59:59.123Z esx01.example.com Hostd - - "
        b"[Originator@6876 sub=Vimsvc.ha-eventmgr opID=esxui-13c6 user=root] "
        b"Event 123 : User root logged in",
        "vmware-unquoted-sd",
        format="rfc5424", facility=20, severity=6, app_name="Hostd",
        structured_data={
            "Originator@6876": {"sub": "Vimsvc.ha-eventmgr", "opID": "esxui-13c6", "user": "root"}
        },
        msg="Event 123 : User root logged in", reason="sd-unquoted",
    ),
    case(
        b'<13>1 2024-01-15T11:59:59Z h a - - [x@1 q="say \\"hi\\"" b="back\\\\slash" '
        b'c="close\\]" d="keep\\n two" e="un]escaped"] m',
        "sd-escapes",
        format="rfc5424",
        structured_data={
            "x@1": {
                "q": 'say "hi"',
                "b": "back\\slash",
                "c": "close]",
                "d": "keep\\n two",
                "e": "un]escaped",
            }
        },
        msg="m",
    ),
    case(
        b'<13>1 2024-01-15T11:59:59Z h a - - [origin ip="192.0.2.1" ip="192.0.2.129" '
        b'software="x"] m',
        "sd-repeated-param-is-a-list",
        structured_data={"origin": {"ip": ["192.0.2.1", "192.0.2.129"], "software": "x"}},
    ),
    case(
        b'<13>1 2024-01-15T11:59:59Z h a - - [a x="1"][a y="2"] m',
        "sd-duplicate-id-merged",
        structured_data={"a": {"x": "1", "y": "2"}}, reason="sd-duplicate-id",
    ),
    case(
        b'<13>1 2024-01-15T11:59:59Z h a - - [a x="caf\xe9"] m',
        "sd-invalid-utf8",
        structured_data={"a": {"x": "caf\ufffd"}}, reason="sd-invalid-utf8",
    ),
    case(
        b"<13>1 - - - - - -",
        "rfc5424-all-nil",
        format="rfc5424", facility=1, severity=5, version=1, timestamp=None, hostname=None,
        app_name=None, procid=None, msgid=None, structured_data={}, msg=None,
    ),
    case(b"<13>1 - - - - - - ", "rfc5424-empty-msg", format="rfc5424", msg=""),
    case(
        b"<13>1 2003-02-30T10:00:00Z h a - - - bad date",
        "rfc5424-invalid-date",
        format="rfc5424", timestamp=None, reason="timestamp-invalid", msg="bad date",
    ),
    case(
        b"<13>1 2016-12-31T23:59:60Z h a - - - leap",
        "rfc5424-leap-second-invalid",
        format="rfc5424", timestamp=None, reason="timestamp-invalid",
    ),
    case(
        b"<13>1 2024-01-15T11:59:59+25:00 h a - - - m",
        "rfc5424-offset-out-of-range",
        timestamp=None, reason="timestamp-invalid",
    ),
    case(
        b"<13>1 2024-01-15T11:59:59.5 h a - - - m",
        "rfc5424-missing-offset",
        format="rfc5424", timestamp="2024-01-15T11:59:59.5+00:00", reason="timestamp-no-offset",
    ),
    case(
        b"<13>1 2024-01-15t11:59:59z h a - - - m",
        "rfc5424-lowercase-t-z",
        timestamp="2024-01-15T11:59:59Z", reason=None,
    ),
    case(
        b"<13>1 2024-01-15T11:59:59-00:00 h a - - - m",
        "rfc5424-unknown-local-offset-kept",
        timestamp="2024-01-15T11:59:59-00:00",
    ),
    case(
        b"<13>1 2024-01-15T11:59:59Z h a - - - " + BOM + b"caf\xe9 \xff",
        "rfc5424-invalid-utf8",
        format="rfc5424", msg="caf\ufffd \ufffd",
        msg_b64=base64.b64encode(b"caf\xe9 \xff").decode(),
    ),
    case(
        b"<13>1 2024-01-15T11:59:59Z h a - - [x a=\"b\"",
        "rfc5424-unterminated-sd",
        format="unparsed", reason="rfc5424-sd", facility=None, structured_data=None,
    ),
    case(
        b"<13>1 2024-01-15T11:59:59Z host app - - hello",
        "rfc5424-missing-sd",
        format="unparsed", reason="rfc5424-sd",
    ),
    case(
        b"<13>1 2024-01-15T11:59:59Z host",
        "rfc5424-short-header",
        format="unparsed", reason="rfc5424-header",
    ),
    case(b"<13>1 - - - - - [ a=\"b\"] m", "rfc5424-space-after-bracket", format="unparsed"),
    case(b"<13>1 - - - - - [] m", "rfc5424-empty-sd-element", format="unparsed"),
    case(b"<13>1 - - - - - -m", "rfc5424-no-space-after-sd", format="unparsed"),
    # RFC 3164 section 5.4 examples.
    case(
        b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
        "rfc3164-example-1",
        format="rfc3164", facility=4, severity=2, version=None,
        timestamp="2023-10-11T22:14:15+00:00", hostname="mymachine", app_name="su",
        procid=None, msgid=None, structured_data={},
        msg="'su root' failed for lonvick on /dev/pts/8", reason=None,
    ),
    case(
        b"Use the BFG!",
        "rfc3164-no-pri-is-user-notice",
        format="rfc3164", facility=1, severity=5, timestamp=None, hostname=None,
        app_name=None, msg="Use the BFG!", reason="pri-missing",
    ),
    case(
        b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!",
        "rfc3164-example-2-ip-hostname",
        format="rfc3164", timestamp="2024-02-05T17:32:18+00:00", hostname="10.0.0.99",
        app_name=None, msg="Use the BFG!",
    ),
    case(
        b"<165>Aug 24 05:34:00 CST 1987 mymachine myproc[10]: %% It's time to make the "
        b"do-nuts.  %%  Ingredients: Mix=OK, Jumbo=OK, Fry=OK.",
        "rfc3164-example-3-zone-and-year",
        format="rfc3164", facility=20, severity=5, timestamp="1987-08-24T05:34:00+00:00",
        hostname="mymachine", app_name="myproc", procid="10",
        msg="%% It's time to make the do-nuts.  %%  Ingredients: Mix=OK, Jumbo=OK, Fry=OK.",
        reason="timestamp-zone-unknown",
    ),
    case(
        b"<0>1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org 10.1.2.3 sched[0]: "
        b"That's All Folks!",
        "rfc3164-example-4-kept-as-msg",
        format="rfc3164", facility=0, severity=0, timestamp=None, hostname=None,
        app_name=None,
        msg="1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org 10.1.2.3 sched[0]: "
        "That's All Folks!",
    ),
    # Linux: journald through rsyslog, rsyslog's forward format, logger.
    case(
        b"<30>Jan 15 11:59:58 web01 systemd[1]: Started Session 42 of User alice.",
        "journald-via-rsyslog",
        format="rfc3164", facility=3, severity=6, timestamp="2024-01-15T11:59:58+00:00",
        hostname="web01", app_name="systemd", procid="1",
        msg="Started Session 42 of User alice.",
    ),
    case(
        b"<86>2024-01-15T12:59:58.123456+01:00 web01 sshd[2345]: Accepted publickey for "
        b"alice from 192.0.2.7 port 50022 ssh2",
        "rsyslog-forward-format-rfc3339",
        format="rfc3164", facility=10, severity=6,
        timestamp="2024-01-15T12:59:58.123456+01:00", hostname="web01", app_name="sshd",
        procid="2345", msg="Accepted publickey for alice from 192.0.2.7 port 50022 ssh2",
    ),
    case(
        b"<13>2024-01-15T12:59:59,123+0100 host app: x",
        "rfc3339-in-3164-slot-lenient",
        timestamp="2024-01-15T12:59:59.123+01:00", hostname="host", app_name="app", msg="x",
    ),
    case(
        b"<13>2024-01-15T11:59:59 host app: x",
        "rfc3339-in-3164-slot-no-offset",
        timestamp="2024-01-15T11:59:59+00:00", reason=None,
    ),
    case(
        b"<13>Jan 15 11:59:59 web01 alice: hello world",
        "logger-rfc3164",
        format="rfc3164", facility=1, severity=5, timestamp="2024-01-15T11:59:59+00:00",
        hostname="web01", app_name="alice", procid=None, msg="hello world",
    ),
    case(
        b"<13>Jan 15 11:59:59 alice[1234]: hello",
        "dev-log-style-no-hostname",
        hostname=None, app_name="alice", procid="1234", msg="hello",
    ),
    case(
        b"<14>Jan 15 11:59:59 host oldd[42] no colon after the pid",
        "tag-with-pid-without-colon",
        hostname="host", app_name="oldd", procid="42", msg="no colon after the pid",
    ),
    case(
        b"<14>Jan 15 11:59:59 host postfix/smtpd[991]: connect from unknown[192.0.2.7]",
        "tag-with-slash",
        app_name="postfix/smtpd", procid="991", msg="connect from unknown[192.0.2.7]",
    ),
    case(
        b"<14>Jan 15 11:59:59 host see http://example.com/",
        "colon-without-space-is-not-a-tag",
        hostname="host", app_name=None, msg="see http://example.com/",
    ),
    case(
        b"<14>Jan 15 11:59:59 2001:db8::7 app: v6 sender",
        "ipv6-hostname",
        hostname="2001:db8::7", app_name="app", msg="v6 sender",
    ),
    # Cisco IOS: sequence numbers, "*" (not synchronised) and "." markers.
    case(
        b"<189>123: *Mar  1 18:46:11.123: %SYS-5-CONFIG_I: Configured from console by console",
        "cisco-ios-seq-star",
        format="rfc3164", facility=23, severity=5, timestamp="2024-03-01T18:46:11.123+00:00",
        hostname=None, app_name="%SYS-5-CONFIG_I",
        structured_data={"meta": {"sequenceId": "123"}, "timeQuality": {"isSynced": "0"}},
        msg="Configured from console by console",
    ),
    case(
        b"<187>4521: .Jan 15 11:58:00.456 UTC: %LINK-3-UPDOWN: Interface "
        b"GigabitEthernet0/1, changed state to down",
        "cisco-ios-dot-utc",
        facility=23, severity=3, timestamp="2024-01-15T11:58:00.456+00:00",
        app_name="%LINK-3-UPDOWN",
        structured_data={"meta": {"sequenceId": "4521"}, "timeQuality": {"isSynced": "0"}},
        msg="Interface GigabitEthernet0/1, changed state to down", reason=None,
    ),
    case(
        b"<190>88: Jan 15 2024 11:58:00.456 CET: %SEC-6-IPACCESSLOGP: list 101 denied tcp "
        b"192.0.2.7(1234) -> 10.0.0.1(22), 1 packet",
        "cisco-ios-year-and-ambiguous-zone",
        timestamp="2024-01-15T11:58:00.456+00:00", app_name="%SEC-6-IPACCESSLOGP",
        structured_data={"meta": {"sequenceId": "88"}}, reason="timestamp-zone-unknown",
    ),
    case(
        b"<189>35: %SYS-5-CONFIG_I: Configured from console by vty0 (10.0.0.2)",
        "cisco-ios-no-timestamp",
        timestamp=None, app_name="%SYS-5-CONFIG_I",
        structured_data={"meta": {"sequenceId": "35"}},
        msg="Configured from console by vty0 (10.0.0.2)",
    ),
    case(
        b"<134>25: host-w3k: Feb 13 2007 18:23:21.408 +0000: %ICM_Router_CallRouter-6-10500FF: "
        b"[comp=Router-A][pname=rtr]: Side A rtr process is OK.",
        "ciscolog-host-and-numeric-zone",
        timestamp="2007-02-13T18:23:21.408+00:00", hostname="host-w3k",
        app_name="%ICM_Router_CallRouter-6-10500FF",
        msg="[comp=Router-A][pname=rtr]: Side A rtr process is OK.",
    ),
    case(
        b"<189>001233: *May 22 09:44:36: Ruijie %SYS-5-CONFIG_I: Configured from console",
        "ruijie-host-after-stamp",
        hostname="Ruijie", app_name="%SYS-5-CONFIG_I", msg="Configured from console",
    ),
    # Cisco ASA, with and without timestamp and device id.
    case(
        b"<166>%ASA-6-302013: Built outbound TCP connection 123456 for "
        b"outside:198.51.100.7/443 (198.51.100.7/443) to inside:10.0.0.5/52000 "
        b"(203.0.113.5/52000)",
        "cisco-asa-bare",
        format="rfc3164", facility=20, severity=6, timestamp=None, hostname=None,
        app_name="%ASA-6-302013",
        msg="Built outbound TCP connection 123456 for outside:198.51.100.7/443 "
        "(198.51.100.7/443) to inside:10.0.0.5/52000 (203.0.113.5/52000)",
    ),
    case(
        b"<166>Jan 15 2024 11:59:59 asa-fw01 : %ASA-6-302013: Built outbound TCP connection",
        "cisco-asa-device-id",
        timestamp="2024-01-15T11:59:59+00:00", hostname="asa-fw01",
        app_name="%ASA-6-302013", msg="Built outbound TCP connection",
    ),
    case(
        b"<164>Jan 15 2024 11:59:59: %ASA-4-106023: Deny tcp src outside:192.0.2.7/50000 "
        b'dst inside:10.0.0.1/22 by access-group "outside_in"',
        "cisco-asa-stamp-colon",
        severity=4, timestamp="2024-01-15T11:59:59+00:00", hostname=None,
        app_name="%ASA-4-106023",
    ),
    # Juniper (BSD format).
    case(
        b"<28>Jan 15 11:59:59 srx01 mgd[4321]: UI_COMMIT: User 'admin' requested 'commit' "
        b"operation (comment: none)",
        "juniper-rfc3164",
        facility=3, severity=4, hostname="srx01", app_name="mgd", procid="4321",
        msg="UI_COMMIT: User 'admin' requested 'commit' operation (comment: none)",
    ),
    # Firewalls: pfSense filterlog (no hostname), iptables via the kernel.
    case(
        b"<134>Jan 15 11:59:59 filterlog[12345]: 5,,,1000000103,igb0,match,block,in,4,0x0,,"
        b"64,0,0,DF,6,tcp,60,192.0.2.7,10.0.0.1,50000,22,0,S,123,,64240,,mss",
        "pfsense-filterlog",
        facility=16, severity=6, hostname=None, app_name="filterlog", procid="12345",
        msg="5,,,1000000103,igb0,match,block,in,4,0x0,,64,0,0,DF,6,tcp,60,192.0.2.7,"
        "10.0.0.1,50000,22,0,S,123,,64240,,mss",
    ),
    case(
        b"<4>Jan 15 11:59:59 fw01 kernel: [12345.678901] DROP IN=eth0 OUT= "
        b"MAC=00:11:22:33:44:55:66:77:88:99:aa:bb:08:00 SRC=192.0.2.7 DST=10.0.0.1 LEN=60 "
        b"PROTO=TCP SPT=50000 DPT=22 SYN",
        "iptables-kernel",
        facility=0, severity=4, hostname="fw01", app_name="kernel",
        msg="[12345.678901] DROP IN=eth0 OUT= MAC=00:11:22:33:44:55:66:77:88:99:aa:bb:08:00 "
        "SRC=192.0.2.7 DST=10.0.0.1 LEN=60 PROTO=TCP SPT=50000 DPT=22 SYN",
    ),
    # FortiGate key=value, no header after the PRI.
    case(
        b'<189>date=2024-01-15 time=11:59:59 devname="FGT60F" devid="FGT60FTK0000000" '
        b'logid="0000000013" type="traffic" subtype="forward" level="notice" '
        b'srcip=192.0.2.7 dstip=10.0.0.1 action="deny"',
        "fortigate-key-value",
        format="rfc3164", facility=23, severity=5, timestamp=None, hostname=None,
        app_name=None,
        msg='date=2024-01-15 time=11:59:59 devname="FGT60F" devid="FGT60FTK0000000" '
        'logid="0000000013" type="traffic" subtype="forward" level="notice" '
        'srcip=192.0.2.7 dstip=10.0.0.1 action="deny"',
    ),
    # CEF, with a syslog header and bare.
    case(
        b"<134>Jan 15 11:59:59 ids01 CEF:0|Security|threatmanager|1.0|100|worm successfully "
        b"stopped|10|src=10.0.0.1 dst=2.1.2.2 spt=1232",
        "cef-with-header",
        hostname="ids01", app_name=None,
        msg="CEF:0|Security|threatmanager|1.0|100|worm successfully stopped|10|"
        "src=10.0.0.1 dst=2.1.2.2 spt=1232",
    ),
    case(
        b"CEF:0|Vendor|Product|1.0|100|name|5|src=10.0.0.1",
        "cef-bare",
        format="rfc3164", facility=1, severity=5, app_name=None,
        msg="CEF:0|Vendor|Product|1.0|100|name|5|src=10.0.0.1", reason="pri-missing",
    ),
    case(
        b"12: no pri",
        "sequence-number-needs-pri",
        format="rfc3164", app_name="12", structured_data={}, msg="no pri", reason="pri-missing",
    ),
    # Dell PowerConnect: SP after PRI, upper-case month.
    case(
        b"<130> JAN 01 00:00:06 0.0.0.0-1 UNKN[0x800023]: bootos.c(386) 4 %% Event(0xaaaaaaaa)",
        "dell-powerconnect",
        facility=16, severity=2, timestamp="2024-01-01T00:00:06+00:00", hostname="0.0.0.0-1",
        app_name="UNKN", procid="0x800023", msg="bootos.c(386) 4 %% Event(0xaaaaaaaa)",
    ),
    # Encoding, control characters, multi-line.
    case(
        b"<13>Jan 15 11:59:59 h app: " + BOM + b"hello",
        "bom-stripped-3164",
        msg="hello", msg_b64=None,
    ),
    case(
        b"<13>Jan 15 11:59:59 h app: caf\xe9 \xff",
        "invalid-utf8-3164",
        format="rfc3164", msg="caf\ufffd \ufffd",
        msg_b64=base64.b64encode(b"caf\xe9 \xff").decode(),
    ),
    case(
        b"<13>Jan 15 11:59:59 h app: caf\xc3\xa9 \xe2\x9c\x93",
        "valid-utf8-3164",
        msg="caf\u00e9 \u2713", msg_b64=None,
    ),
    case(
        b"<13>Jan 15 11:59:59 h app: a\x00b\x1bc\x00",
        "nul-and-control-kept",
        msg="a\x00b\x1bc\x00",
    ),
    case(
        b'<11>Jan 15 11:59:59 app01 java[777]: Exception in thread "main"\n'
        b"\tat Foo.bar(Foo.java:1)\n",
        "multi-line",
        severity=3, hostname="app01", app_name="java", procid="777",
        msg='Exception in thread "main"\n\tat Foo.bar(Foo.java:1)\n',
    ),
    # PRI rules.
    case(b"<192>Jan 15 11:59:59 h app: x", "pri-192", format="unparsed", reason="pri-out-of-range"),
    case(b"<999>x", "pri-999", format="unparsed", reason="pri-out-of-range"),
    case(b"<1000>x", "pri-1000", format="unparsed", reason="pri-too-long"),
    case(b"<>Jan 15 11:59:59 h app: x", "pri-empty", format="unparsed", reason="pri-empty"),
    case(b"<1a>x", "pri-not-digits", format="unparsed", reason="pri-malformed"),
    case(b"<13 hello", "pri-unterminated", format="unparsed", reason="pri-malformed"),
    case(b"<", "pri-lone-bracket", format="unparsed", reason="pri-malformed"),
    case(
        b"<013>Jan 15 11:59:59 h app: x",
        "pri-leading-zero",
        format="rfc3164", facility=1, severity=5, reason="pri-leading-zero",
    ),
    case(b"<0>kernel: panic", "pri-zero", format="rfc3164", facility=0, severity=0),
    case(b"<191>x", "pri-191", format="rfc3164", facility=23, severity=7, msg="x"),
    # Empty messages.
    case(
        b"",
        "empty-input",
        format="unparsed", reason="empty", msg="", facility=None, structured_data=None,
    ),
    case(
        b"<13>",
        "pri-only",
        format="rfc3164", facility=1, severity=5, msg="", structured_data={}, reason=None,
    ),
    case(
        b"<13>Jan 15 11:59:59 host app:",
        "tag-and-empty-msg",
        hostname="host", app_name="app", msg="",
    ),
    case(b"<13>Jan 15 11:59:59 lonely", "single-word-stays-msg", hostname=None, msg="lonely"),
    case(
        b"<13>Feb 30 11:59:59 host app: x",
        "rfc3164-invalid-date",
        timestamp=None, hostname="host", reason="timestamp-invalid",
    ),
]


@pytest.mark.parametrize("raw, expected", CORPUS)
def test_corpus(raw, expected):
    """Each corpus message parses to the expected fields and keeps its raw bytes."""
    message = parse(raw, SOURCE, RECEIVED)
    actual = {key: getattr(message, key) for key in expected}
    assert actual == expected
    assert message.raw == raw
    assert message.source == SOURCE
    assert message.truncated is False
    known = UNPARSED_REASONS if message.format == "unparsed" else LENIENT_REASONS
    assert set(message.reasons) <= set(known)


@pytest.mark.parametrize("raw, expected", CORPUS)
def test_corpus_json(raw, expected):
    """Each corpus message serialises to compact JSON with exactly the contract's keys."""
    encoded = parse(raw, SOURCE, RECEIVED).to_json_bytes()
    event = json.loads(encoded.decode("utf-8"))
    assert tuple(event) == JSON_KEYS
    assert base64.b64decode(event["raw_b64"]) == raw
    assert b'": ' not in encoded and b'", "' not in encoded


def test_unparsed_keeps_whole_input_as_msg():
    """An unparsed message carries the whole input as lossy text and its exact bytes."""
    message = parse(b"<999>\xff bad", SOURCE, RECEIVED)
    assert message.format == "unparsed"
    assert message.msg == "<999>\ufffd bad"
    assert base64.b64decode(message.msg_b64) == b"<999>\xff bad"
    assert (message.facility, message.severity, message.structured_data) == (None, None, None)


def test_json_exact_form():
    """The JSON event is compact, ordered as documented, and null where absent."""
    message = parse(b"<13>Jan 15 11:59:59 host app[7]: hi", "192.0.2.1:514", RECEIVED)
    assert message.to_json_bytes() == (
        b'{"format":"rfc3164","facility":1,"severity":5,"version":null,'
        b'"timestamp":"2024-01-15T11:59:59+00:00","hostname":"host","app_name":"app",'
        b'"procid":"7","msgid":null,"structured_data":{},"msg":"hi",'
        b'"source":"192.0.2.1:514","raw_b64":"PDEzPkphbiAxNSAxMTo1OTo1OSBob3N0IGFwcFs3XTogaGk=",'
        b'"truncated":false,"msg_b64":null}'
    )


def test_json_is_utf8_not_ascii_escaped():
    """Non-ASCII text is written as UTF-8 and control characters as JSON escapes."""
    encoded = parse(b"<13>h\xc3\xa9\x00", None, RECEIVED).to_json_bytes()
    assert "\u00e9".encode() in encoded
    assert b"\\u0000" in encoded
    assert json.loads(encoded)["source"] is None


def test_reasons_split():
    """Several leniencies are reported together, each countable on its own."""
    message = parse(b'<013>1 2024-01-15T11:59:59 h a - - [x a=b][x c="\xff"] m', None, RECEIVED)
    assert message.reasons == (
        "pri-leading-zero",
        "timestamp-no-offset",
        "sd-unquoted",
        "sd-duplicate-id",
        "sd-invalid-utf8",
    )
    assert parse(b"<13>x", None, RECEIVED).reasons == ()


def test_oversize_is_truncated():
    """A message over max_size is cut to max_size bytes, marked truncated, and still parsed."""
    raw = b"<13>Jan 15 11:59:59 host app: " + b"x" * 100
    message = parse(raw, None, RECEIVED, max_size=40)
    assert message.truncated is True
    assert message.raw == raw[:40]
    assert message.app_name == "app"
    assert message.msg == "x" * 10
    assert json.loads(message.to_json_bytes())["truncated"] is True


def test_truncation_inside_utf8_sequence_keeps_bytes():
    """A cut in the middle of a UTF-8 sequence keeps the exact bytes in msg_b64."""
    raw = b"<13>Jan 15 11:59:59 host app: \xe2\x9c\x93"
    message = parse(raw, None, RECEIVED, max_size=len(raw) - 1)
    assert message.msg == "\ufffd"
    assert base64.b64decode(message.msg_b64) == b"\xe2\x9c"


def test_exactly_max_size_is_not_truncated():
    """A message of exactly max_size bytes is kept whole."""
    raw = b"<13>" + b"y" * 60
    message = parse(raw, None, RECEIVED, max_size=64)
    assert (message.truncated, message.raw) == (False, raw)


def test_framer_truncation_is_carried():
    """A frame the framer already cut stays marked truncated."""
    assert parse(b"<13>abc", None, RECEIVED, truncated=True).truncated is True
    assert parse(b"<999>", None, RECEIVED, truncated=True).truncated is True


def test_truncated_rfc5424_header_is_unparsed():
    """A 5424 message cut inside its header is unparsed, marked truncated."""
    raw = b"<13>1 2024-01-15T11:59:59Z host app - - - message"
    message = parse(raw, None, RECEIVED, max_size=20)
    assert (message.format, message.reason, message.truncated) == (
        "unparsed",
        "rfc5424-header",
        True,
    )


def ts(year, month, day, hour=0, minute=0, second=0):
    return datetime.datetime(
        year, month, day, hour, minute, second, tzinfo=datetime.timezone.utc
    ).timestamp()


@pytest.mark.parametrize(
    "raw, received_at, expected",
    [
        (b"<13>Dec 31 23:59:59 h a: x", ts(2024, 1, 1, 0, 0, 5), "2023-12-31T23:59:59+00:00"),
        (b"<13>Jan  1 00:00:01 h a: x", ts(2023, 12, 31, 23, 59), "2024-01-01T00:00:01+00:00"),
        (b"<13>Jul 20 12:00:00 h a: x", ts(2024, 1, 15), "2023-07-20T12:00:00+00:00"),
        (b"<13>Jun 30 12:00:00 h a: x", ts(2024, 1, 15), "2024-06-30T12:00:00+00:00"),
        (b"<13>Feb 29 12:00:00 h a: x", ts(2023, 6, 1), "2024-02-29T12:00:00+00:00"),
    ],
    ids=["december-in-january", "january-in-december", "past", "future", "leap-day"],
)
def test_year_closest_to_reception(raw, received_at, expected):
    """A 3164 stamp without a year gets the year that puts it closest to reception."""
    assert parse(raw, None, received_at).timestamp == expected


def test_feb_29_without_leap_year_nearby_is_invalid():
    """Feb 29 with no leap year among the candidate years is a null timestamp and a reason."""
    message = parse(b"<13>Feb 29 12:00:00 h a: x", None, ts(2022, 6, 1))
    assert (message.timestamp, message.reason) == (None, "timestamp-invalid")


def test_local_tz_fixed_offset():
    """A 3164 stamp without zone is read in the configured zone and keeps its offset."""
    zone = datetime.timezone(datetime.timedelta(hours=-5))
    message = parse(b"<13>Jan 15 06:59:59 h a: x", None, RECEIVED, local_tz=zone)
    assert message.timestamp == "2024-01-15T06:59:59-05:00"


def test_local_tz_zoneinfo_dst():
    """A named zone gives each stamp the offset in force on its date."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo("Europe/Lisbon")
    winter = parse(b"<13>Jan 15 11:00:00 h a: x", None, RECEIVED, local_tz=zone)
    summer = parse(b"<13>Jul 15 11:00:00 h a: x", None, ts(2024, 7, 1), local_tz=zone)
    assert winter.timestamp == "2024-01-15T11:00:00+00:00"
    assert summer.timestamp == "2024-07-15T11:00:00+01:00"


def test_local_tz_does_not_change_explicit_offsets():
    """Stamps with an offset or a UTC zone name keep it whatever the configured zone."""
    zone = datetime.timezone(datetime.timedelta(hours=9))
    assert (
        parse(b"<13>1 2024-01-15T11:59:59+02:00 h a - - -", None, RECEIVED, local_tz=zone).timestamp
        == "2024-01-15T11:59:59+02:00"
    )
    assert (
        parse(b"<13>5: Jan 15 11:59:59 UTC: %X-1-Y: z", None, RECEIVED, local_tz=zone).timestamp
        == "2024-01-15T11:59:59+00:00"
    )


def test_fraction_digits_kept_as_sent():
    """Fractional seconds keep the sender's digits (no rounding to milliseconds)."""
    raw = b"<13>1 2024-01-15T11:59:59.000000003Z h a - - -"
    assert parse(raw, None, RECEIVED).timestamp == "2024-01-15T11:59:59.000000003Z"


def test_never_decodes_whole_message():
    """An invalid byte in MSG does not disturb the header fields parsed before it."""
    message = parse(b"<13>1 2024-01-15T11:59:59Z host app 1 id - \xff\xfe", None, RECEIVED)
    assert (message.hostname, message.app_name, message.procid, message.msgid) == (
        "host",
        "app",
        "1",
        "id",
    )
    assert base64.b64decode(message.msg_b64) == b"\xff\xfe"


def test_message_is_frozen():
    """A parsed message cannot be changed after the fact."""
    message = parse(b"<13>x", None, RECEIVED)
    with pytest.raises(AttributeError):
        message.msg = "y"
    assert isinstance(message, SyslogMessage)


def _general(raw, received_at=RECEIVED, local_tz=None, source=SOURCE):
    """Parse C{raw} through the general path only, bypassing the 3164 fast path."""
    from fit_broker.syslog import parser

    common = {"source": source, "raw": raw, "truncated": False}
    try:
        return parser._parse(raw, received_at, local_tz or datetime.timezone.utc, common)
    except parser._Malformed as error:
        return parser._unparsed(raw, error.args[0], common)


def _check_fast_path(raw, received_at=RECEIVED, local_tz=None):
    """The fast path, when it takes C{raw}, gives the general path's message and JSON."""
    from fit_broker.syslog import parser

    parser._STAMPS.clear()
    fast = parse(raw, SOURCE, received_at, local_tz=local_tz)
    parser._STAMPS.clear()
    general = _general(raw, received_at, local_tz)
    assert fast == general
    assert fast.to_json_bytes() == general.to_json_bytes()
    return parser._FAST_3164.match(raw) is not None


def test_fast_path_matches_general_path_on_corpus():
    """Every corpus message parses the same with and without the RFC 3164 fast path."""
    taken = [_check_fast_path(param.values[0]) for param in CORPUS]
    assert any(taken)


def _piece(*choices):
    """The first choice (the fast path's shape) half the time, else any."""
    return st.one_of(st.just(choices[0]), st.sampled_from(choices))


_FAST_PIECES = st.tuples(
    _piece(b"<134>", b"<0>", b"<13>", b"<191>", b"<192>", b"<013>", b"", b"<1>"),
    _piece(b"Nov", b"Feb", b"NOV", b"Xyz", b"*Nov", b"2024-01-15T10:00:00Z"),
    _piece(b" ", b"  "),
    _piece(b"26", b"1", b"01", b"29", b"30", b"31", b"32", b"1 2024"),
    _piece(b" 23:41:12", b" 24:00:00", b" 23:59:60", b" 12:00:00.123", b" 10:00:00 UTC"),
    _piece(b" ", b"  ", b": ", b" UTC 2024 "),
    _piece(
        b"web01", b"a", b"CET", b"UTC", b"h.example.com", b"2001:db8::1", b"x" * 256, b"_h-1", b""
    ),
    _piece(b" ", b"  ", b" : ", b""),
    _piece(
        b"nginx[1234]:", b"app:", b"1234:", b"2024:", b"app[]:", b"app[1]", b"a[b[c]:",
        b"%ASA-6-1:", b"t" * 129 + b":", b"app[" + b"9" * 129 + b"]:", b"app", b"app[1]x:",
    ),
    _piece(b" ", b"", b"  ", b"x"),
    _piece(b"hello world", b"", BOM + b"bom", b"\xff\xfe", b"caf\xc3\xa9", b"a\nb"),
)


@settings(max_examples=500, deadline=None)
@given(
    _FAST_PIECES.map(b"".join),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.sampled_from(
        [None, datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=-11, minutes=-30))]
    ),
)
def test_fast_path_matches_general_path(raw, received_at, local_tz):
    """Messages near the fast path's shape parse the same with and without it."""
    _check_fast_path(raw, received_at, local_tz)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80).map(lambda tail: b"<134>Nov 26 23:41:12 web01 " + tail))
def test_fast_path_matches_general_path_random_tail(raw):
    """Whatever follows a fast-path header, both paths agree."""
    _check_fast_path(raw)
