"""
twistd plugins of FIT Broker.  Only names here: the modules load on use.
"""

from twisted.application.service import ServiceMaker

fitbroker = ServiceMaker(
    "FIT Broker replica",
    "fit_broker.tap",
    "Run a replica of a fault- and intrusion-tolerant event broker "
    "(no options: an embedded local cluster).",
    "fitbroker",
)

fitbroker_syslog = ServiceMaker(
    "FIT Broker syslog ingest",
    "fit_broker.syslog.tap",
    "Receive syslog (RFC 3164 and 5424 over UDP, TCP and TLS) from legacy "
    "probes and publish each message into the cluster.",
    "fitbroker-syslog",
)

fitbroker_sink = ServiceMaker(
    "FIT Broker SIEM sink",
    "fit_broker.sink.tap",
    "Forward voted events to SIEMs (RFC 5424 syslog over TCP or TLS, "
    "rotated JSON-lines files) and serve a live web console.",
    "fitbroker-sink",
)
