"""
Syslog messages parsed from bytes into L{SyslogMessage} values, sans-IO.

RFC 5424 is parsed strictly; RFC 3164 is parsed as devices really send it
(missing hostnames, years and zones, Cisco sequence numbers and clock
markers, ASA device ids, RFC 3339 stamps in the 3164 slot).  Nothing here
decodes a whole message as text: fields are cut from the bytes and decoded
one at a time, so an invalid byte costs one U+FFFD in one field, never the
event, and C{msg_b64} keeps the exact bytes of a MSG that is not UTF-8.

Choices where the RFCs and the common receivers leave room (they are part of
the event contract in C{docs/syslog-event-format.md}):

  - A 3164 timestamp without a year gets the year that puts it closest to
    the reception time (a December stamp received on 1 January is last
    year's).  Without a zone it is read in C{local_tz}, which defaults to
    UTC, not to the receiver's zone: a receiver's zone says nothing about
    the sender's, and UTC keeps results independent of the host.
  - A 3164 TAG is recognised only as C{tag:}, C{tag[pid]:} or C{tag[pid]};
    a first word without a colon stays in MSG rather than being lost.
  - A repeated SD-PARAM name keeps every value: the value becomes a list
    of strings in order of appearance (RFC 5424 7.2.1 repeats C{ip}).
  - Cisco sequence numbers go to C{structured_data["meta"]["sequenceId"]}
    and the C{*} / C{.} clock markers to
    C{structured_data["timeQuality"]["isSynced"] = "0"}, the RFC 5424
    SD-IDs for those facts (as syslog-ng does).
"""

import base64
import binascii
import datetime
import json
import re

import attrs

RFC5424 = "rfc5424"
RFC3164 = "rfc3164"
UNPARSED = "unparsed"

DEFAULT_MAX_SIZE = 65536

#: The PRI assumed for a message that has none (RFC 3164 4.3.3: user.notice).
DEFAULT_PRI = 13

#: The keys of L{SyslogMessage.to_json_bytes}, in order: the console contract.
JSON_KEYS = (
    "format",
    "facility",
    "severity",
    "version",
    "timestamp",
    "hostname",
    "app_name",
    "procid",
    "msgid",
    "structured_data",
    "msg",
    "source",
    "raw_b64",
    "truncated",
    "msg_b64",
)

#: Why a message is unparsed; each is one C{reason} code, to count.
UNPARSED_REASONS = (
    "empty",
    "pri-empty",  # "<>"
    "pri-too-long",  # more than three digits
    "pri-out-of-range",  # above 191
    "pri-malformed",  # not digits, or no ">"
    "rfc5424-header",  # fewer header fields than RFC 5424 requires
    "rfc5424-sd",  # structured data missing or malformed
    "internal-error",  # a parser bug; never expected
)

#: Leniencies a parsed message may list in its C{reason}.
LENIENT_REASONS = (
    "pri-missing",  # no PRI: 13 assumed
    "pri-leading-zero",
    "timestamp-invalid",  # timestamp set to None
    "timestamp-no-offset",  # a 5424 stamp read in the configured zone
    "timestamp-zone-unknown",  # an ambiguous zone name; configured zone used
    "sd-unquoted",
    "sd-duplicate-id",
    "sd-invalid-utf8",
)

_BOM = b"\xef\xbb\xbf"
_UTC = datetime.timezone.utc
_MONTHS = {
    name: number
    for number, name in enumerate(
        (b"jan", b"feb", b"mar", b"apr", b"may", b"jun",
         b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"),
        start=1,
    )
}
#: Zone names that mean one offset everywhere; any other abbreviation (CST,
#: IST, ...) is ambiguous and is read as the configured zone instead.
_UTC_NAMES = frozenset({b"UTC", b"GMT", b"UT", b"Z"})

_VERSION = re.compile(rb"([1-9][0-9]{0,2}) ")

_RFC3339 = re.compile(
    rb"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    rb"(?:([.,])([0-9]{1,9}))?"
    rb"([Zz]|[+-][0-9]{2}:?[0-9]{2})?\Z"
)

# A 3164 stamp: optional Cisco clock marker, "Mmm dd [yyyy] hh:mm:ss[.fff]",
# then one of: a Cisco ending ("[ zone]:"), an RFC 3164 5.4 "zone yyyy"
# trailer, or nothing; always followed by SP or the end.
_BSD_STAMP = re.compile(
    rb"""
    (?P<marker>[*.])?
    (?P<month>[A-Za-z]{3})\ {1,2}(?P<day>[0-9]{1,2})
    (?:\ (?P<year>[0-9]{4}))?
    \ (?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})
    (?:[.,](?P<fraction>[0-9]{1,9}))?
    (?:
        (?:\ (?P<zone>[A-Za-z]{1,5}|[+-][0-9]{2}:?[0-9]{2}))?(?P<colon>:)(?=\ |\Z)
      | \ (?P<trailer_zone>[A-Za-z]{3,5})\ (?P<trailer_year>[0-9]{4})(?=\ |\Z)
      | (?=\ |\Z)
    )
    """,
    re.VERBOSE,
)
_ISO_STAMP = re.compile(
    rb"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}"
    rb"(?:[.,][0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:?[0-9]{2})?(?=\ |\Z)"
)
_CISCO_SEQUENCE = re.compile(rb"([0-9]{1,20}): ")
_CISCO_HOST = re.compile(rb"([A-Za-z0-9_][A-Za-z0-9._-]{0,254}): ")
_HOSTNAME = re.compile(
    rb"([A-Za-z0-9_][A-Za-z0-9._-]{0,254}|[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]{0,60}[0-9A-Fa-f]) "
)
# TAG: printable ASCII but ":", "[" and "]"; then an optional [PID], then a
# colon; then SP or the end.
_TAG = re.compile(
    rb"(?P<tag>[\x21-\x39\x3b-\x5a\x5c\x5e-\x7e]{1,128})"
    rb"(?:\[(?P<pid>[\x21-\x5c\x5e-\x7e]{0,128})\])?"
    rb"(?P<colon>:)?(?=\ |\Z)"
)
# The common RFC 3164 shape, "<PRI>Mmm dd hh:mm:ss host tag[pid]: msg", in one
# match.  Everything it accepts parses to the same result through the
# general path (tests/test_syslog_parser.py checks this); anything else
# (leading-zero or out-of-range PRI, other month spellings, years, zones,
# fractions, clock markers, Cisco fields, no tag) is left to that path.
_FAST_3164 = re.compile(
    rb"<(?P<pri>1[0-8][0-9]|19[01]|[1-9][0-9]?|0)>"
    rb"(?P<stamp>(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    rb"\ {1,2}[0-9]{1,2}\ [0-9]{2}:[0-9]{2}:[0-9]{2})"
    rb"\ (?P<host>[A-Za-z0-9_][A-Za-z0-9._-]{0,254})"
    rb"\ (?P<tag>[\x21-\x39\x3b-\x5a\x5c\x5e-\x7e]{1,128})"
    rb"(?:\[(?P<pid>[\x21-\x5c\x5e-\x7e]{0,128})\])?"
    rb":(?:\ |\Z)"
)
# SD-NAME: PRINTUSASCII but "=", SP, "]" and '"' (RFC 5424 6.3.2).
_SD_NAME = re.compile(rb"[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]+")
_SD_QUOTED = re.compile(rb'((?:[^"\\]++|\\.)*+)"', re.DOTALL)
_SD_UNQUOTED = re.compile(rb"[^ \]]*")
_SD_ESCAPE = re.compile(rb'\\([\\"\]])')


@attrs.frozen(slots=False)
class SyslogMessage:
    """
    One syslog message, parsed or not.

    Not slotted: attrs builds a frozen dict class with plain C{__dict__}
    stores, half the cost of a slotted one's C{object.__setattr__} calls,
    and one is built per message ingested.

    @ivar format: C{"rfc5424"}, C{"rfc3164"} or C{"unparsed"}.
    @ivar timestamp: an RFC 3339 string with the sender's offset, or C{None}
        when absent or invalid (then C{reason} says which).
    @ivar structured_data: SD-ID -> {PARAM-NAME -> value}; a value is a
        string, or a list of strings when the name was repeated.  C{{}}
        when the message has none; C{None} only when unparsed.
    @ivar msg: MSG as text (BOM stripped, invalid UTF-8 as U+FFFD); for an
        unparsed message, the whole input as text.
    @ivar msg_b64: base64 of the exact bytes behind C{msg}, only when they
        are not valid UTF-8.
    @ivar source: the sender's address as the transport reported it.
    @ivar raw: the bytes received, without framing (cut to the maximum size
        when C{truncated}).
    @ivar reason: comma-separated codes saying why the message is unparsed
        (one of L{UNPARSED_REASONS}) or what leniency was needed to parse
        it (L{LENIENT_REASONS}); C{None} when neither.
    """

    format: str
    facility: int | None = None
    severity: int | None = None
    version: int | None = None
    timestamp: str | None = None
    hostname: str | None = None
    app_name: str | None = None
    procid: str | None = None
    msgid: str | None = None
    structured_data: dict | None = None
    msg: str | None = None
    msg_b64: str | None = None
    source: str | None = None
    raw: bytes = b""
    truncated: bool = False
    reason: str | None = None

    @property
    def reasons(self):
        """
        The codes in C{reason}, for counters keyed by reason.
        """
        return tuple(self.reason.split(",")) if self.reason else ()

    def to_dict(self):
        """
        Return the JSON event as a dict with exactly the keys of L{JSON_KEYS}.
        """
        return {
            "format": self.format,
            "facility": self.facility,
            "severity": self.severity,
            "version": self.version,
            "timestamp": self.timestamp,
            "hostname": self.hostname,
            "app_name": self.app_name,
            "procid": self.procid,
            "msgid": self.msgid,
            "structured_data": self.structured_data,
            "msg": self.msg,
            "source": self.source,
            "raw_b64": base64.b64encode(self.raw).decode("ascii"),
            "truncated": self.truncated,
            "msg_b64": self.msg_b64,
        }

    def to_json_bytes(self):
        """
        Return the compact UTF-8 JSON event that consoles rely on.

        Written field by field (the same bytes as C{json.dumps} of
        L{to_dict} with C{ensure_ascii=False} and compact separators, which
        the tests check) in one f-string with the None checks inline: this
        runs once per message ingested.
        """
        facility = self.facility
        severity = self.severity
        version = self.version
        timestamp = self.timestamp
        hostname = self.hostname
        app_name = self.app_name
        procid = self.procid
        msgid = self.msgid
        sd = self.structured_data
        msg = self.msg
        source = self.source
        msg_b64 = self.msg_b64
        return (
            f'{{"format":{_quote(self.format)}'
            f',"facility":{"null" if facility is None else int.__repr__(facility)}'
            f',"severity":{"null" if severity is None else int.__repr__(severity)}'
            f',"version":{"null" if version is None else int.__repr__(version)}'
            f',"timestamp":{"null" if timestamp is None else _quote(timestamp)}'
            f',"hostname":{"null" if hostname is None else _quote(hostname)}'
            f',"app_name":{"null" if app_name is None else _quote(app_name)}'
            f',"procid":{"null" if procid is None else _quote(procid)}'
            f',"msgid":{"null" if msgid is None else _quote(msgid)}'
            f',"structured_data":{"null" if sd is None else _ENCODER.encode(sd) if sd else "{}"}'
            f',"msg":{"null" if msg is None else _quote(msg)}'
            f',"source":{"null" if source is None else _quote(source)}'
            f',"raw_b64":"{_b64(self.raw, newline=False).decode("ascii")}"'
            f',"truncated":{"true" if self.truncated else "false"}'
            f',"msg_b64":{"null" if msg_b64 is None else _quote(msg_b64)}}}'
        ).encode("utf-8")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_quote = json.encoder.encode_basestring
_b64 = binascii.b2a_base64


class _Malformed(Exception):
    """
    The input cannot be parsed; C{args[0]} is the reason code.
    """


def parse(
    data,
    source,
    received_at,
    max_size=DEFAULT_MAX_SIZE,
    local_tz=None,
    truncated=False,
):
    """
    Parse one syslog message (one datagram or one frame, without framing).

    @param data: the message bytes.
    @param source: the sender's address, copied to the event.
    @param received_at: reception time (POSIX seconds), used to infer the
        year of 3164 timestamps.
    @param max_size: longer input is cut to this many bytes and marked
        truncated.
    @param local_tz: a C{tzinfo} for timestamps that carry no zone (3164,
        and 5424 stamps missing their offset); C{None} means UTC.
    @param truncated: the framer already cut this message.
    @return: a L{SyslogMessage}; this never raises on any input.
    """
    data = bytes(data)
    if len(data) > max_size:
        data = data[:max_size]
        truncated = True
    tz = local_tz or _UTC
    common = None
    try:
        fast = _FAST_3164.match(data)
        if fast is not None:
            return _fast_3164(fast, data, source, received_at, tz, truncated)
        common = {"source": source, "raw": data, "truncated": truncated}
        return _parse(data, received_at, tz, common)
    except _Malformed as error:
        return _unparsed(data, error.args[0], common)
    except Exception:
        # Hostile input must never stop ingest; a parser bug shows up as a
        # counted reason (the fuzz tests assert it never appears).
        if common is None:
            common = {"source": source, "raw": data, "truncated": truncated}
        return _unparsed(data, "internal-error", common)


def _fast_3164(match, data, source, received_at, tz, truncated):
    """
    Build the message for a C{_FAST_3164} match: the fields the general
    path would read, cut from one match.  The timestamp goes through the
    same cache (same key) as the general path's.
    """
    pri = int(match[1])
    key = ("3164", match[2], tz, received_at)
    hit = _STAMPS.get(key)
    if hit is None:
        _cached_stamp(
            key, [], _bsd_timestamp, _BSD_STAMP.match(data, match.start(2)), received_at, tz
        )
        hit = _STAMPS[key]
    pid = match[5]
    rest = data[match.end() :]
    if rest[:3] == _BOM:
        rest = rest[3:]
    try:
        text, b64 = rest.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = _text(rest)
    return SyslogMessage(
        RFC3164,
        pri >> 3,
        pri & 7,
        None,
        hit[0],
        match[3].decode("ascii"),
        match[4].decode("ascii"),
        pid.decode("ascii") if pid else None,
        None,
        {},
        text,
        b64,
        source,
        data,
        truncated,
        _reason(hit[1]) if hit[1] else None,
    )


def _unparsed(data, reason, common):
    text, b64 = _text(data)
    return SyslogMessage(UNPARSED, msg=text, msg_b64=b64, reason=reason, **common)


def _parse(data, received_at, tz, common):
    if not data:
        raise _Malformed("empty")
    notes = []
    if data[0] == 0x3C:  # "<"
        pri, pos = _read_pri(data, notes)
        version = _VERSION.match(data, pos)
        if version:
            return _parse_5424(
                data, version.end(), pri, int(version[1]), tz, notes, common
            )
    else:
        pri, pos = DEFAULT_PRI, 0
        notes.append("pri-missing")
    return _parse_3164(data, pos, pri, received_at, tz, notes, common)


def _read_pri(data, notes):
    """
    Return C{(pri, offset after it)}; only 1-3 digits valued 0..191 pass.
    """
    end = 1
    while end < len(data) and end <= 4 and 0x30 <= data[end] <= 0x39:
        end += 1
    digits = data[1:end]
    if len(digits) > 3:
        raise _Malformed("pri-too-long")
    if end < len(data) and data[end] == 0x3E:  # ">"
        if not digits:
            raise _Malformed("pri-empty")
        value = int(digits)
        if value > 191:
            raise _Malformed("pri-out-of-range")
        if len(digits) > 1 and digits[0] == 0x30:
            notes.append("pri-leading-zero")
        return value, end + 1
    raise _Malformed("pri-malformed")


def _parse_5424(data, pos, pri, version, tz, notes, common):
    fields = []
    for _ in range(5):
        space = data.find(b" ", pos)
        if space <= pos:
            raise _Malformed("rfc5424-header")
        fields.append(data[pos:space])
        pos = space + 1
    stamp, hostname, app_name, procid, msgid = fields
    timestamp = None if stamp == b"-" else _cached_stamp(
        ("5424", stamp, tz), notes, _rfc3339_strict, stamp, tz
    )
    structured_data, pos = _parse_sd(data, pos, notes)
    if pos == len(data):
        text, b64 = None, None
    elif data[pos] == 0x20:
        text, b64 = _text(_strip_bom(data[pos + 1 :]))
    else:
        raise _Malformed("rfc5424-sd")
    return SyslogMessage(
        RFC5424,
        facility=pri >> 3,
        severity=pri & 7,
        version=version,
        timestamp=timestamp,
        hostname=_nil(hostname),
        app_name=_nil(app_name),
        procid=_nil(procid),
        msgid=_nil(msgid),
        structured_data=structured_data,
        msg=text,
        msg_b64=b64,
        reason=_reason(notes),
        **common,
    )


def _parse_sd(data, pos, notes):
    """
    Parse STRUCTURED-DATA at C{pos}; return C{(dict, offset after it)}.
    """
    end = len(data)
    if pos < end and data[pos] == 0x2D:  # "-"
        return {}, pos + 1
    if pos >= end or data[pos] != 0x5B:  # "["
        raise _Malformed("rfc5424-sd")
    elements = {}
    while pos < end and data[pos] == 0x5B:
        name = _SD_NAME.match(data, pos + 1)
        if not name:
            raise _Malformed("rfc5424-sd")
        sd_id = name[0].decode("ascii")
        if sd_id in elements:
            notes.append("sd-duplicate-id")
        params = elements.setdefault(sd_id, {})
        pos = name.end()
        while True:
            if pos >= end:
                raise _Malformed("rfc5424-sd")
            if data[pos] == 0x5D:  # "]"
                pos += 1
                break
            if data[pos] != 0x20:
                raise _Malformed("rfc5424-sd")
            param = _SD_NAME.match(data, pos + 1)
            if not param or data[param.end() : param.end() + 1] != b"=":
                raise _Malformed("rfc5424-sd")
            pos = param.end() + 1
            if data[pos : pos + 1] == b'"':
                quoted = _SD_QUOTED.match(data, pos + 1)
                if not quoted:
                    raise _Malformed("rfc5424-sd")
                raw_value = _SD_ESCAPE.sub(rb"\1", quoted[1])
                pos = quoted.end()
            else:
                # VMware ESXi and others send unquoted values.
                unquoted = _SD_UNQUOTED.match(data, pos)
                raw_value = unquoted[0]
                pos = unquoted.end()
                notes.append("sd-unquoted")
            try:
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                value = raw_value.decode("utf-8", "replace")
                notes.append("sd-invalid-utf8")
            _add_param(params, param[0].decode("ascii"), value)
    return elements, pos


def _add_param(params, name, value):
    if name not in params:
        params[name] = value
    elif isinstance(params[name], list):
        params[name].append(value)
    else:
        params[name] = [params[name], value]


def _parse_3164(data, pos, pri, received_at, tz, notes, common):
    structured_data = {}
    hostname = app_name = procid = timestamp = None
    # Only after a PRI: a bare "12: text" line is more likely a tag.
    sequence = _CISCO_SEQUENCE.match(data, pos) if pos else None
    if sequence:
        structured_data["meta"] = {"sequenceId": sequence[1].decode("ascii")}
        pos = sequence.end()
    stamp = _read_stamp(data, pos, received_at, tz, notes)
    if stamp is None and sequence:
        # CiscoLog: "<PRI>seq: host: stamp: %APP-SEV-ID: ..."
        host = _CISCO_HOST.match(data, pos)
        if host:
            stamp = _read_stamp(data, host.end(), received_at, tz, notes)
            if stamp is not None:
                hostname = host[1].decode("ascii")
    if stamp is not None:
        timestamp, pos, marker, cisco_style = stamp
        if marker:
            structured_data["timeQuality"] = {"isSynced": "0"}
        if hostname is None:
            hostname, pos = _read_hostname(data, pos, cisco_style)
    tag = _TAG.match(data, pos)
    if tag and (tag["colon"] or tag["pid"] is not None):
        app_name = tag["tag"].decode("ascii")
        procid = tag["pid"].decode("ascii") if tag["pid"] else None
        pos = tag.end()
        if data[pos : pos + 1] == b" ":
            pos += 1
    text, b64 = _text(_strip_bom(data[pos:]))
    return SyslogMessage(
        RFC3164,
        facility=pri >> 3,
        severity=pri & 7,
        timestamp=timestamp,
        hostname=hostname,
        app_name=app_name,
        procid=procid,
        structured_data=structured_data,
        msg=text,
        msg_b64=b64,
        reason=_reason(notes),
        **common,
    )


def _read_hostname(data, pos, cisco_style):
    """
    Return C{(hostname or None, offset)} for the token after a 3164 stamp.

    Like rsyslog, a token of hostname characters followed by SP is taken
    as the hostname.  After a Cisco-style stamp (ending in a colon) the
    hostname usually came earlier, so a token counts only when a
    C{%FAC-SEV-MNEMONIC} tag follows it (Ruijie and others put it there).
    """
    match = _HOSTNAME.match(data, pos)
    if not match:
        return None, pos
    token = match[1]
    if b":" in token and token.count(b":") < 2:
        return None, pos
    end = match.end()
    if cisco_style and data[end : end + 1] != b"%":
        return None, pos
    if data[end : end + 2] == b": ":
        # Cisco ASA device id: "<PRI>stamp host : %ASA-6-302013: ..."
        end += 2
    return token.decode("ascii"), end


def _read_stamp(data, pos, received_at, tz, notes):
    """
    Read a 3164-slot timestamp at C{pos} (after optional spaces).

    @return: C{None} when there is none, else C{(timestamp or None, offset
        after it and one SP, clock marker, ends-in-colon)}.
    """
    start = pos
    while start < len(data) and data[start] == 0x20:
        start += 1
    iso = _ISO_STAMP.match(data, start)
    if iso:
        timestamp = _cached_stamp(("iso", iso[0], tz), notes, _rfc3339_lenient, iso[0], tz)
        return timestamp, _skip_space(data, iso.end()), None, False
    bsd = _BSD_STAMP.match(data, start)
    if not bsd or bsd["month"].lower() not in _MONTHS:
        return None
    timestamp = _cached_stamp(
        ("3164", bsd[0], tz, received_at), notes, _bsd_timestamp, bsd, received_at, tz
    )
    return timestamp, _skip_space(data, bsd.end()), bsd["marker"], bool(bsd["colon"])


#: Rendered timestamps by (slot, stamp bytes, zone[, reception time]):
#: messages of one burst share their stamps, and rendering one costs more
#: than the rest of a 3164 parse.
_STAMPS = {}
_STAMPS_KEPT = 4096


def _cached_stamp(key, notes, render, *args):
    """
    Return C{render(*args, added_notes)}, remembered by C{key} (every input
    the result depends on), adding to C{notes} what it noted.
    """
    hit = _STAMPS.get(key)
    if hit is None:
        added = []
        value = render(*args, added)
        if len(_STAMPS) >= _STAMPS_KEPT:
            _STAMPS.clear()
        hit = _STAMPS[key] = (value, tuple(added))
    if hit[1]:
        notes.extend(hit[1])
    return hit[0]


def _skip_space(data, pos):
    return pos + 1 if data[pos : pos + 1] == b" " else pos


def _bsd_timestamp(match, received_at, tz, notes):
    zone = match["zone"] or match["trailer_zone"]
    if zone is not None:
        tz = _zone(zone, tz, notes)
    month = _MONTHS[match["month"].lower()]
    fields = (
        int(match["day"]),
        int(match["hour"]),
        int(match["minute"]),
        int(match["second"]),
    )
    year = match["year"] or match["trailer_year"]
    try:
        if year is not None:
            moment = datetime.datetime(int(year), month, *fields, tzinfo=tz)
        else:
            moment = _closest_year(month, fields, tz, received_at)
        offset = moment.utcoffset() if moment is not None else None
    except (ValueError, OverflowError, OSError):
        moment = None
    if moment is None:
        notes.append("timestamp-invalid")
        return None
    return _render(moment, match["fraction"], _format_offset(offset))


def _closest_year(month, fields, tz, received_at):
    """
    Return the datetime on C{month}/C{fields} in the year nearest reception.
    """
    reference = datetime.datetime.fromtimestamp(received_at, tz).year
    best = None
    for year in (reference - 1, reference, reference + 1):
        try:
            candidate = datetime.datetime(year, month, *fields, tzinfo=tz)
            distance = abs(candidate.timestamp() - received_at)
        except (ValueError, OverflowError):
            continue
        if best is None or distance < best[0]:
            best = (distance, candidate)
    return best[1] if best else None


def _zone(name, default, notes):
    if name.upper() in _UTC_NAMES:
        return _UTC
    if name[:1] in b"+-":
        offset = _parse_offset(name)
        if offset is not None:
            return datetime.timezone(offset)
    notes.append("timestamp-zone-unknown")
    return default


def _parse_offset(text):
    """
    Return the timedelta of C{+HH:MM}, C{+HHMM} (bytes), or C{None}.
    """
    digits = text[1:].replace(b":", b"")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        return None
    offset = datetime.timedelta(hours=hours, minutes=minutes)
    return -offset if text[:1] == b"-" else offset


def _rfc3339_strict(token, tz, notes):
    return _rfc3339(token, tz, notes, strict=True)


def _rfc3339_lenient(token, tz, notes):
    return _rfc3339(token, tz, notes, strict=False)


def _rfc3339(token, tz, notes, strict):
    """
    Validate an RFC 3339 stamp and return it with upper-case C{T}/C{Z}.

    Strict (RFC 5424 6.2.3) wants C{.} before the fraction and C{+HH:MM};
    the 3164 slot also takes C{,} and C{+HHMM}, rendered in RFC 3339 form.
    A stamp without an offset gets C{tz}'s.  Invalid: C{None} and a note.
    """
    match = _RFC3339.match(token)
    if not match:
        notes.append("timestamp-invalid")
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    separator, fraction, offset_text = match[7], match[8], match[9]
    if strict and (
        separator == b"," or (offset_text and len(offset_text) == 5)
    ):
        notes.append("timestamp-invalid")
        return None
    try:
        if offset_text is None:
            moment = datetime.datetime(year, month, day, hour, minute, second, tzinfo=tz)
            offset = _format_offset(moment.utcoffset())
            if strict:
                notes.append("timestamp-no-offset")
        else:
            datetime.datetime(year, month, day, hour, minute, second)
            if offset_text in (b"Z", b"z"):
                offset = "Z"
            else:
                delta = _parse_offset(offset_text)
                if delta is None:
                    raise ValueError(offset_text)
                offset = _format_offset(delta, negative_zero=offset_text[:1] == b"-")
    except (ValueError, OverflowError):
        notes.append("timestamp-invalid")
        return None
    moment = datetime.datetime(year, month, day, hour, minute, second)
    return _render(moment, fraction, offset)


def _render(moment, fraction, offset):
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if fraction:
        text += "." + fraction.decode("ascii")
    return text + offset


def _format_offset(delta, negative_zero=False):
    minutes = int(delta.total_seconds()) // 60
    sign = "-" if minutes < 0 or (minutes == 0 and negative_zero) else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _nil(token):
    """
    Decode a 5424 header field; the NILVALUE C{-} is C{None}.
    """
    if token == b"-":
        return None
    return token.decode("utf-8", "replace")


def _strip_bom(data):
    return data[3:] if data.startswith(_BOM) else data


def _text(data):
    """
    Return C{(text, base64 or None)}: the exact bytes ride along only when
    they are not valid UTF-8.
    """
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return (
            data.decode("utf-8", "replace"),
            base64.b64encode(data).decode("ascii"),
        )


def _reason(notes):
    return ",".join(dict.fromkeys(notes)) or None
