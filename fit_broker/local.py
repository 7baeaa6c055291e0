"""
The embedded local cluster: four replicas in one process, for a first try.
"""

import os

from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from fit_broker.config import load_config
from fit_broker.replica.service import make_replica_service
from fit_broker.schemes.registry import scheme_lookup

LOCAL_FOLDER = "fitbroker-local"
FIRST_PORT = 7410
REPLICAS = 4

CLUSTER_TEMPLATE = """\
# The embedded local cluster that `twistd -n fitbroker` runs: {replicas} replicas
# in one process on 127.0.0.1, tolerating f = 1 faulty replica.
# `fitbroker publish` and `fitbroker tail` use this file when run from
# the folder that holds fitbroker-local/.

[cluster]
name = "local"
faults = 1
default_client = "local"

{replica_tables}
[clients.local]
description = "the operator at this machine: publishes and subscribes everywhere"

[clients.probe]
description = "a monitoring probe"

[clients.console]
description = "a SIEM or dashboard"

[clients.syslog]
description = "the syslog ingest adapter"

[classes.standard]
urgency_levels = 4
ordering = "none"
capacity = 10000
ttl = 300
overflow = "drop-oldest"

[classes.alarm]
urgency_levels = 4
ordering = "none"
capacity = 50000
ttl = 3600
overflow = "drop-oldest"

[[channels]]
tag = "events"
topic = "General monitoring events"
class = "standard"
publishers = ["local", "probe"]
subscribers = ["local", "console"]

[[channels]]
tag = "alerts"
topic = "IDS alerts"
class = "alarm"
publishers = ["local", "probe"]
subscribers = ["local", "console"]

[[channels]]
tag = "health"
topic = "Health checks"
class = "standard"
publishers = ["local", "probe"]
subscribers = ["local", "console"]

[[channels]]
tag = "syslog"
topic = "Syslog from legacy probes"
class = "standard"
publishers = ["syslog", "local"]
subscribers = ["local", "console"]
"""


def write_local_config(folder, first_port=FIRST_PORT, replicas=REPLICAS):
    """
    Write the embedded cluster's configuration into C{folder}; return its path.
    """
    os.makedirs(folder, exist_ok=True)
    tables = "".join(
        f'[[replicas]]\nlisten = "tcp:{first_port + i}:interface=127.0.0.1"\n'
        f'connect = "tcp:127.0.0.1:{first_port + i}"\n\n'
        for i in range(replicas)
    )
    path = os.path.join(folder, "cluster.toml")
    with open(path, "w") as f:
        f.write(CLUSTER_TEMPLATE.format(replicas=replicas, replica_tables=tables))
    return path


class _Greeting(Service):
    """
    Tells a new user, once the replicas listen, what to type next.
    """

    log = Logger()

    def __init__(self, path):
        self.path = path

    def startService(self):
        super().startService()
        self.log.info(
            "FIT Broker local cluster is running: 4 replicas, f = 1, configuration in "
            "{path}\n"
            "  In another terminal, from this folder:\n"
            "    fitbroker tail events            # watch the events channel\n"
            "    fitbroker publish events hello   # publish an event\n"
            "  Channels: events, alerts, health, syslog. Stop with Ctrl-C.",
            path=self.path,
        )


def make_local_cluster(reactor, folder=LOCAL_FOLDER, first_port=FIRST_PORT):
    """
    Return a service running the whole embedded cluster.
    """
    path = write_local_config(folder, first_port)
    config = load_config(path)
    schemes = scheme_lookup(config)
    top = MultiService()
    for index in range(len(config.replicas)):
        make_replica_service(config, index, reactor, schemes).setServiceParent(top)
    _Greeting(os.path.abspath(path)).setServiceParent(top)
    return top
