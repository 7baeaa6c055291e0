"""
Writing a new cluster: its configuration file and all its key material.
"""

import os

from fit_broker import pki
from fit_broker.errors import ConfigError

CLUSTER_FILE = "cluster.toml"

CLASSES = """\
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
"""


def sample_channels(clients, syslog_client=None):
    """
    Return the sample channels as C{(tag, topic, class, qop, scheme,
    publishers, subscribers)} rows: BFT channels under each protection
    scheme, open to every client.
    """
    everyone = list(clients)
    rows = [
        ("events", "Monitoring events, MAC-authenticated", "standard", "bft", "ha", everyone, everyone),
        ("signed", "Events signed by their publisher", "standard", "bft", "pks", everyone, everyone),
        ("sealed", "Signed events encrypted for subscribers", "standard", "bft", "pke", everyone, everyone),
        ("alerts", "IDS alerts", "alarm", "bft", "ha", everyone, everyone),
        ("health", "Health checks, crash-tolerant only", "standard", "cft", "si", everyone, everyone),
    ]
    if syslog_client is not None:
        rows.append(
            ("syslog", "Syslog from legacy probes", "standard", "bft", "ha",
             [syslog_client], [c for c in everyone if c != syslog_client])
        )
    return rows


def _quote_list(names):
    return "[" + ", ".join(f'"{name}"' for name in names) + "]"


def cluster_toml(
    name, faults, replica_ports, clients, channels, keys_dir=".", tls=True, heading="", admins=None,
):
    """
    Return the text of a cluster file.

    @param admins: the clients that may see the whole status; by default the
        first client, the one the command line acts as.
    """
    if admins is None:
        admins = clients[:1]
    lines = [heading.rstrip(), ""] if heading else []
    lines += [
        "[cluster]",
        f'name = "{name}"',
        f"faults = {faults}",
        f'default_client = "{clients[0]}"',
        f"admins = {_quote_list(admins)}",
        f'keys_dir = "{keys_dir}"',
        f"tls = {'true' if tls else 'false'}",
        "",
    ]
    for port in replica_ports:
        lines += [
            "[[replicas]]",
            f'listen = "tcp:{port}:interface=127.0.0.1"',
            f'connect = "tcp:127.0.0.1:{port}"',
            "",
        ]
    for client in clients:
        lines += [f"[clients.{client}]", ""]
    lines.append(CLASSES)
    for tag, topic, qos, qop, scheme, publishers, subscribers in channels:
        lines += [
            "[[channels]]",
            f'tag = "{tag}"',
            f'topic = "{topic}"',
            f'class = "{qos}"',
            f'qop = "{qop}"',
            f'scheme = "{scheme}"',
            f"publishers = {_quote_list(publishers)}",
            f"subscribers = {_quote_list(subscribers)}",
            "",
        ]
    return "\n".join(lines)


def init_cluster(
    directory, replicas=4, faults=1, clients=("local",), first_port=7500, name="fitbroker",
    syslog_client=None, heading="", reuse_keys=False,
):
    """
    Write a working cluster into C{directory}: a CA, certificates and keys
    for every replica and client, and C{cluster.toml}, the one file every
    replica and client is given.  Return that file's path.

    @param reuse_keys: keep key material already in C{directory} (the
        embedded cluster restarts with the keys its clients hold).
    """
    clients = list(dict.fromkeys(clients))
    if not clients:
        raise ConfigError("--clients: expected at least one client name")
    if syslog_client is not None and syslog_client not in clients:
        clients.append(syslog_client)
    if replicas < 3 * faults + 1:
        raise ConfigError(
            f"--replicas: BFT channels need n >= 3f+1 = {3 * faults + 1} replicas "
            f"for --faults {faults}, found {replicas}"
        )
    channels = sample_channels(clients, syslog_client)
    have_keys = os.path.exists(os.path.join(directory, pki.MANIFEST_FILE))
    if not (reuse_keys and have_keys):
        pki.write_cluster_material(
            directory,
            name,
            replicas,
            clients,
            {tag: sorted(set(pubs) | set(subs)) for tag, _, _, _, _, pubs, subs in channels},
        )
    path = os.path.join(directory, CLUSTER_FILE)
    text = cluster_toml(
        name, faults, range(first_port, first_port + replicas), clients, channels, heading=heading
    )
    with open(path, "w") as f:
        f.write(text)
    return path
