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
