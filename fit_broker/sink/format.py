"""
Events as the bytes sinks write: RFC 5424 syslog messages framed by octet
counting (RFC 6587), and JSON lines.  Sans-IO: values in, bytes out.

Every message carries the event's channel, publisher and event id in
structured data, so a receiver can drop the repeats that plain TCP syslog
produces around a reconnection (it is at least once).
"""

import datetime
import math

from fit_broker.cli import event_json

#: Our private enterprise number for SD-IDs, as RFC 5424 section 7.2.2 asks.
SD_ID = "fitbroker@32473"

NILVALUE = "-"

#: Syslog severity per urgency (0 = least urgent): info, warning, err, crit.
SEVERITY_BY_URGENCY = (6, 4, 3, 2)

_MAX_HOSTNAME = 255
_MAX_APP_NAME = 48
_MAX_MSGID = 32


def severity(urgency):
    """
    Return the syslog severity for an event's C{urgency}.
    """
    if urgency <= 0:
        return SEVERITY_BY_URGENCY[0]
    return SEVERITY_BY_URGENCY[min(urgency, len(SEVERITY_BY_URGENCY) - 1)]


def header_field(value, limit):
    """
    Return C{value} as an RFC 5424 header field: printable US-ASCII without
    spaces, at most C{limit} characters, C{-} when nothing is left.
    """
    text = "".join(c if "!" <= c <= "~" else "_" for c in value[:limit])
    return text or NILVALUE


def sd_escape(value):
    """
    Escape a PARAM-VALUE: C{"}, C{\\} and C{]} take a backslash (RFC 5424
    section 6.3.3).
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def timestamp(seconds):
    """
    Return C{seconds} since the epoch as an RFC 3339 UTC timestamp with
    microseconds, or C{-} when it is not a representable time.
    """
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return NILVALUE
    try:
        when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return NILVALUE
    if not 1 <= when.year <= 9999:
        return NILVALUE
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def structured_data(tag, event):
    """
    Return the SD-ELEMENT naming the event for receivers.
    """
    params = (
        ("channel", tag),
        ("publisher", event.publisher),
        ("event_id", str(event.event_id)),
        ("urgency", str(event.urgency)),
    )
    body = " ".join(f'{name}="{sd_escape(value)}"' for name, value in params)
    return f"[{SD_ID} {body}]"


def syslog_message(tag, event, hostname, app_name="fitbroker", facility=16):
    """
    Return the RFC 5424 message of C{event} of channel C{tag}, unframed.

    The MSG is the event's content as it is (MSG-ANY: octets, not
    necessarily UTF-8); the channel is also the MSGID.
    """
    pri = facility * 8 + severity(event.urgency)
    header = " ".join(
        (
            f"<{pri}>1",
            timestamp(event.timestamp),
            header_field(hostname, _MAX_HOSTNAME),
            header_field(app_name, _MAX_APP_NAME),
            NILVALUE,
            header_field(tag, _MAX_MSGID),
            structured_data(tag, event),
        )
    )
    return header.encode("utf-8") + b" " + event.content


def octet_counted(message):
    """
    Frame C{message} with its length in bytes (RFC 6587 section 3.4.1).
    """
    return b"%d %s" % (len(message), message)


def syslog_frame(tag, event, hostname, app_name="fitbroker", facility=16):
    """
    Return C{event} as one octet-counted RFC 5424 frame.
    """
    return octet_counted(syslog_message(tag, event, hostname, app_name, facility))


def json_line(tag, event):
    """
    Return C{event} as one JSON line (the object `fitbroker tail` prints).
    """
    return event_json(tag, event).encode("utf-8") + b"\n"
