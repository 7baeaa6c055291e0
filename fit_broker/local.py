"""
The embedded local cluster: four replicas in one process, for a first try.
"""

import os

from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from fit_broker.config import load_config
from fit_broker.credentials import replica_credentials
from fit_broker.init import init_cluster
from fit_broker.replica.service import make_replica_service
from fit_broker.schemes.registry import scheme_lookup

LOCAL_FOLDER = "fitbroker-local"
FIRST_PORT = 7410
#: Replica i of the embedded cluster serves Prometheus metrics on
#: 127.0.0.1 port METRICS_FIRST_PORT + i.
METRICS_FIRST_PORT = 9410
REPLICAS = 4
CLIENTS = ("local", "probe", "console")
SYSLOG_CLIENT = "syslog"

HEADING = """\
# The embedded local cluster that `twistd -n fitbroker` runs: 4 replicas in
# one process on 127.0.0.1, tolerating f = 1 Byzantine replica, every link
# over mutual TLS.  `fitbroker publish` and `fitbroker tail` use this file
# when run from the folder that holds fitbroker-local/.  Rewritten at each
# start; the keys beside it are kept."""


def write_local_config(folder, first_port=FIRST_PORT):
    """
    Write the embedded cluster's configuration and keys into C{folder}
    (keeping keys already there); return the configuration's path.
    """
    return init_cluster(
        folder,
        replicas=REPLICAS,
        faults=1,
        clients=CLIENTS,
        first_port=first_port,
        name="local",
        syslog_client=SYSLOG_CLIENT,
        heading=HEADING,
        reuse_keys=True,
    )


def describe_channels(config):
    """
    Return the channels of C{config} as C{events (BFT, HA), ...}: each with
    its own mode and scheme, taken from the file so the greeting cannot drift.
    """
    return ", ".join(
        f"{tag} ({spec.qop.upper()}, {spec.scheme.upper()}"
        f"{'' if spec.qos.ordering == 'none' else ', ' + spec.qos.ordering + ' order'})"
        for tag, spec in config.channels.items()
    )


class _Greeting(Service):
    """
    Tells a new user, once the replicas listen, what to type next.
    """

    log = Logger()

    def __init__(self, path, channels, extra=""):
        self.path = path
        self.channels = channels
        self.extra = extra

    def startService(self):
        super().startService()
        self.log.info(
            "FIT Broker local cluster is running: 4 replicas, f = 1, mutual TLS; "
            "configuration in {path}\n"
            "  In another terminal, from this folder:\n"
            "    fitbroker tail events            # watch the events channel\n"
            "    fitbroker publish events hello   # publish an event\n"
            "  Channels: {channels}.{extra}\n"
            "  Stop with Ctrl-C.",
            path=self.path,
            channels=self.channels,
            extra=self.extra,
        )


def make_local_cluster(
    reactor, folder=LOCAL_FOLDER, first_port=FIRST_PORT, syslog=True,
    metrics_port=METRICS_FIRST_PORT,
):
    """
    Return a service running the whole embedded cluster.

    @param metrics_port: replica i serves metrics on 127.0.0.1 port
        C{metrics_port + i}; C{None} serves none.
    """
    path = write_local_config(folder, first_port)
    config = load_config(path)
    schemes = scheme_lookup(config)
    top = MultiService()
    for index in range(len(config.replicas)):
        keys, tls_options, identify = replica_credentials(config, index)
        metrics = None
        if metrics_port is not None:
            metrics = f"tcp:{metrics_port + index}:interface=127.0.0.1"
        make_replica_service(
            config, index, reactor, schemes, keys, identify=identify, tls_options=tls_options,
            metrics=metrics,
        ).setServiceParent(top)
    extra = ""
    if syslog:
        extra = _add_syslog(top, config, reactor)
    _Greeting(os.path.abspath(path), describe_channels(config), extra).setServiceParent(top)
    return top


def _add_syslog(top, config, reactor):
    """
    Start the syslog adapter with the settings C{init} wrote beside the
    cluster file (127.0.0.1:5514 unless edited), and return how to try it.
    """
    from fit_broker.syslog.config import default_settings_path, load_settings
    from fit_broker.syslog.service import make_syslog_service

    path = default_settings_path(config.path)
    settings = load_settings(path)
    make_syslog_service(config, settings, reactor).setServiceParent(top)
    listening = ", ".join(spec.endpoint for spec in settings.listeners)
    return (
        f"\n  Syslog on {listening} goes to channel syslog (settings in {path}):\n"
        "    fitbroker tail syslog\n"
        "    logger -n 127.0.0.1 -P 5514 --udp 'hello from syslog'"
    )
