"""
Writing a new cluster: its configuration file and all its key material.
"""

import ipaddress
import os
import re

from fit_broker import pki
from fit_broker.errors import ConfigError
from fit_broker.keys import complete_replica_keys

CLUSTER_FILE = "cluster.toml"

_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
SYSLOG_FILE = "syslog.toml"
SYSLOG_PORT = 5514

#: The sample QoS classes: name to C{[classes.<name>]} keys.
CLASSES = {
    "standard": {
        "urgency_levels": 4, "ordering": "none", "capacity": 10000, "ttl": 300,
        "overflow": "drop-oldest",
    },
    "alarm": {
        "urgency_levels": 4, "ordering": "none", "capacity": 50000, "ttl": 3600,
        "overflow": "drop-oldest",
    },
    "ordered": {
        "urgency_levels": 1, "ordering": "global", "capacity": 50000, "ttl": 3600,
        "overflow": "drop-oldest",
    },
}


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
        ("audit", "Audit trail, in one order at every console", "ordered", "bft", "ha", everyone, everyone),
    ]
    if syslog_client is not None:
        rows.append(
            ("syslog", "Syslog from legacy probes", "standard", "bft", "ha",
             [syslog_client], [c for c in everyone if c != syslog_client])
        )
    return rows


def check_hosts(hosts, replicas):
    """
    Return the hosts of C{--hosts h1,h2,...}, one per replica, checked.

    @raise ConfigError: for a count other than C{replicas} or a name that
        is neither an IP address nor a DNS name.
    """
    hosts = [h.strip() for h in hosts]
    if len(hosts) != replicas:
        raise ConfigError(
            f"--hosts: expected {replicas} hosts (one per replica), found {len(hosts)}"
        )
    for host in hosts:
        if not (_is_ip(host) or _DNS_NAME.fullmatch(host)):
            raise ConfigError(f"--hosts: expected a DNS name or an IP address, found {host!r}")
    return hosts


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _escape(host):
    """Escape an address for an endpoint string, then for a TOML string."""
    return host.replace(":", "\\\\:")


def host_ports(hosts, first_port):
    """
    Return each replica's port when replica i runs on C{hosts[i]}: the
    first on a host gets C{first_port}, a second on the same host the next
    port, and so on, so that every host opens the same ports.
    """
    seen = {}
    ports = []
    for host in hosts:
        ports.append(first_port + seen.get(host, 0))
        seen[host] = seen.get(host, 0) + 1
    return ports


def replica_lines(port, host=None, metrics_port=None):
    """
    Return the C{[[replicas]]} keys of a replica on C{port}: on 127.0.0.1
    without C{host}; else listening on C{host} when it is an IP address (on
    all IPv4 interfaces when it is a name) and reached at C{host}.  Clients
    check the replica's identity in its certificate (C{replica-N.<cluster>}),
    never the host, so hosts can change without new certificates.  Metrics,
    when asked for, stay on the loopback interface.
    """
    if host is None:
        listen, connect = f"tcp:{port}:interface=127.0.0.1", f"tcp:127.0.0.1:{port}"
    elif not _is_ip(host):
        listen, connect = f"tcp:{port}", f"tcp:{host}:{port}"
    elif ipaddress.ip_address(host).version == 6:
        listen = f"tcp6:{port}:interface={_escape(host)}"
        connect = f"tcp:host={_escape(host)}:port={port}"
    else:
        listen, connect = f"tcp:{port}:interface={host}", f"tcp:{host}:{port}"
    lines = [f'listen = "{listen}"', f'connect = "{connect}"']
    if metrics_port is not None:
        lines.append(f'metrics = "tcp:{metrics_port}:interface=127.0.0.1"')
    return lines


def _quote_list(names):
    return "[" + ", ".join(f'"{name}"' for name in names) + "]"


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def cluster_toml(
    name, faults, replica_ports, clients, channels, keys_dir=".", tls=True, heading="", admins=None,
    hosts=None, metrics_ports=None, classes=CLASSES, plugin_folders=(),
):
    """
    Return the text of a cluster file.

    @param channels: C{(tag, topic, class, qop, scheme, publishers,
        subscribers)} rows, as L{sample_channels} returns, each perhaps with
        a voter name last.
    @param keys_dir: the folder of the cluster's keys, or C{None} for a
        cluster without keys (no channel may then use a scheme that needs
        them).
    @param tls: whether replicas and clients talk mutual TLS (needs keys).
    @param hosts: the host of each replica, or C{None} for 127.0.0.1.
    @param metrics_ports: each replica's loopback metrics port, or C{None}.
    @param admins: the clients that may see the whole status; by default the
        first client, the one the command line acts as.
    @param classes: the QoS classes, name to C{[classes.<name>]} keys; by
        default the sample L{CLASSES}.
    @param plugin_folders: folders of plugins the cluster loads, if any.
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
    ]
    if plugin_folders:
        lines.append(f"plugin_folders = {_quote_list(plugin_folders)}")
    if keys_dir is not None:
        lines.append(f'keys_dir = "{keys_dir}"')
    lines += [f"tls = {_toml_value(tls)}", ""]
    for index, port in enumerate(replica_ports):
        lines += [
            "[[replicas]]",
            *replica_lines(
                port,
                hosts[index] if hosts else None,
                metrics_ports[index] if metrics_ports else None,
            ),
            "",
        ]
    for client in clients:
        lines += [f"[clients.{client}]", ""]
    for class_name, keys in classes.items():
        lines.append(f"[classes.{class_name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    for tag, topic, qos, qop, scheme, publishers, subscribers, *voter in channels:
        lines += [
            "[[channels]]",
            f'tag = "{tag}"',
            f'topic = "{topic}"',
            f'class = "{qos}"',
            f'qop = "{qop}"',
            f'scheme = "{scheme}"',
            *(f'voter = "{v}"' for v in voter if v),
            f"publishers = {_quote_list(publishers)}",
            f"subscribers = {_quote_list(subscribers)}",
            "",
        ]
    return "\n".join(lines)


def syslog_toml(client, port):
    """
    Return the text of the syslog adapter's settings for a new cluster:
    UDP and TCP on 127.0.0.1:C{port}, everything to channel C{syslog}.
    """
    return f"""\
# The syslog ingest adapter's settings for the cluster file beside this one.
#
#   twistd -n fitbroker-syslog --config cluster.toml
#   logger -n 127.0.0.1 -P {port} --udp "hello from syslog"
#   fitbroker tail --config cluster.toml syslog
#
# Listeners take Twisted endpoint strings (udp:PORT:interface=ADDRESS for
# datagrams); listen beyond loopback by changing the interface.  Every other
# setting (TLS listeners, routing rules, spool, rate limits) is described in
# etc/syslog.toml and docs/syslog.md of the source tree.

client = "{client}"

[[listeners]]
endpoint = "udp:{port}:interface=127.0.0.1"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[routing]
default = "syslog"
"""


def init_cluster(
    directory, replicas=4, faults=1, clients=("local",), first_port=7500, name="fitbroker",
    syslog_client=None, heading="", reuse_keys=False, syslog_port=SYSLOG_PORT, force=False,
    hosts=None, metrics_port=None,
):
    """
    Write a working cluster into C{directory}: a CA, certificates and keys
    for every replica and client, and C{cluster.toml}, the one file every
    replica and client is given.  Return that file's path.

    @param hosts: replica i runs on C{hosts[i]} (see L{replica_lines});
        by default every replica runs on 127.0.0.1.
    @param metrics_port: replica i serves metrics on the loopback port
        C{metrics_port} plus its offset from C{first_port}; C{None}: none.
    @param reuse_keys: keep key material already in C{directory} (the
        embedded cluster restarts with the keys its clients hold).
    @param syslog_client: also write a client of that name, a C{syslog}
        channel it publishes to, and C{syslog.toml} for the adapter
        (listening on C{syslog_port}); a kept C{syslog.toml} is left alone
        when keys are reused.
    @param force: replace the keys and files of a cluster already there.
    """
    if hosts:
        hosts = check_hosts(hosts, replicas)
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
    if have_keys and not (reuse_keys or force):
        raise ConfigError(
            f"{directory}: a cluster is already there; pass --force to replace its keys and "
            "configuration (clients and replicas holding the old keys stop working)"
        )
    if not (reuse_keys and have_keys):
        pki.write_cluster_material(
            directory,
            name,
            replicas,
            clients,
            {tag: sorted(set(pubs) | set(subs)) for tag, _, _, _, _, pubs, subs in channels},
            overwrite=force,
        )
    else:
        # a folder from before replicas linked up gains their keys, keeping all others
        manifest = pki.load_manifest(directory)
        complete_replica_keys(directory, manifest.get("replicas", replicas), manifest["cluster"])
    path = os.path.join(directory, CLUSTER_FILE)
    ports = list(range(first_port, first_port + replicas))
    metrics_ports = None
    if hosts:
        ports = host_ports(hosts, first_port)
    if metrics_port is not None:
        metrics_ports = [metrics_port + p - first_port for p in ports]
    text = cluster_toml(
        name, faults, ports, clients, channels, heading=heading, hosts=hosts,
        metrics_ports=metrics_ports,
    )
    with open(path, "w") as f:
        f.write(text)
    syslog_path = os.path.join(directory, SYSLOG_FILE)
    if syslog_client is not None and not (reuse_keys and os.path.exists(syslog_path)):
        with open(syslog_path, "w") as f:
            f.write(syslog_toml(syslog_client, syslog_port))
    return path
