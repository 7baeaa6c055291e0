"""
The cluster configuration and control table, loaded from TOML.

One file describes a cluster: its replicas, its clients, the QoS classes and
the channels (the control table).  Replicas, clients and the command line all
read the same file.  Every problem is reported as a L{ConfigError} naming the
file, the key and what was expected, before anything listens.

QoP modes, voters and ordering protocols are checked by name against the
plugins L{fit_broker.registry} finds, built-in or in the file's
C{plugin_folders}: this module never imports their implementations.
"""

import os

import attrs

from fit_broker import registry
from fit_broker.errors import ConfigError, RequestFailed, UnknownComponent
from fit_broker.interfaces import IOrderingFactory, IQoPMode, IVoterFactory
from fit_broker.qos import FSYNC_POLICIES, ORDERING_SCOPES, OVERFLOW_POLICIES, PERSISTENCE, QoSClass
from fit_broker.toml_reader import TableReader, read_toml


@attrs.frozen
class ReplicaSpec:
    """
    @ivar listen: the server endpoint string the replica listens on.
    @ivar connect: the client endpoint string clients reach it with.
    @ivar metrics: the server endpoint string its Prometheus metrics are
        served on, or C{None} for none.
    @ivar data: the folder its agreement journal and disk channels live in (absolute), or C{None}
        for the default (L{ClusterConfig.data_folder}).
    """

    index: int
    listen: str
    connect: str
    metrics: str | None = None
    data: str | None = None


@attrs.frozen
class ChannelSpec:
    """
    One row of the control table.
    """

    tag: str
    topic: str
    qos: QoSClass
    qop: str
    scheme: str
    voter: str
    publishers: frozenset
    subscribers: frozenset

    def may_publish(self, client):
        return client in self.publishers or "*" in self.publishers

    def may_subscribe(self, client):
        return client in self.subscribers or "*" in self.subscribers


@attrs.frozen
class ClusterConfig:
    """
    @ivar path: the file this was loaded from; relative paths in it are
        relative to its folder.
    @ivar max_clock_skew: how far in the future a publisher's timestamp may
        be, in seconds, before replicas refuse its events.
    @ivar admins: clients that may see the whole status of the cluster and
        change the control table at run time.
    @ivar orderer: the name of the ordering protocol the replicas run
        (L{IOrderingFactory}), or C{None} when the cluster cannot run one
        (see L{orderer_problem}).
    @ivar orderer_problem: why no ordering protocol runs, or C{None}.
    @ivar leader_timeout: seconds without progress before replicas replace
        the leader (doubling while no leader succeeds).
    @ivar checkpoint_interval: decided instances between two checkpoints.
    """

    path: str
    name: str
    faults: int
    replicas: tuple
    clients: frozenset
    default_client: str | None
    classes: dict
    channels: dict
    plugin_folders: tuple = ()
    max_clock_skew: float = 300.0
    keys_dir: str | None = None
    tls: bool = False
    admins: frozenset = frozenset()
    orderer: str | None = None
    orderer_problem: str | None = None
    leader_timeout: float = 2.0
    checkpoint_interval: int = 64

    @property
    def folder(self):
        return os.path.dirname(os.path.abspath(self.path))

    def resolve(self, relative):
        """
        Return C{relative} as a path relative to this file's folder.
        """
        return os.path.join(self.folder, relative)

    def channel(self, tag):
        return self.channels.get(tag)

    def data_folder(self, index):
        """
        Return the folder replica C{index} keeps its disk channels in: its
        C{data} key, else one per cluster file and replica under the state
        home, so two clusters on a host never share one.
        """
        data = self.replicas[index].data
        if data is not None:
            return data
        import hashlib

        from fit_broker.state_home import state_home

        digest = hashlib.sha256(os.path.abspath(self.path).encode()).hexdigest()[:16]
        return os.path.join(state_home(), "data", digest, f"replica-{index}")

    def authorised(self, tag, client, publish):
        """
        Return the spec of channel C{tag} if C{client} may publish to it (or
        subscribe to it, with C{publish} false).

        @raise RequestFailed: naming the channel and this file otherwise.
        """
        spec = self.channels.get(tag)
        if spec is None:
            raise RequestFailed("unknown-channel", f"no channel {tag!r} in {self.path}")
        allowed = spec.may_publish(client) if publish else spec.may_subscribe(client)
        if not allowed:
            raise RequestFailed(
                "unauthorized",
                f"client {client!r} may not {'publish to' if publish else 'subscribe to'} "
                f"channel {tag!r} (control table in {self.path})",
            )
        return spec

    def is_admin(self, client):
        """
        Whether C{client} may see the whole status (named in C{admins}).
        """
        return client in self.admins

    def acks_needed(self, tag):
        mode = registry.find(IQoPMode, self.channels[tag].qop)
        return mode.acks_needed(len(self.replicas), self.faults)


def _names(reader, key):
    value = reader.get(key, list, "a list of client names", [])
    if not all(isinstance(v, str) and v for v in value):
        reader.fail(key, "a list of client names (strings)")
    return frozenset(value)


def _named(reader, key, interface, name):
    """
    Return the plugin providing C{interface} called C{name}, or stop with one
    line naming the key and the names that exist.
    """
    found = registry.available(interface)
    if name not in found:
        location = f"{reader.where}.{key}" if reader.where else key
        raise UnknownComponent(
            f"{reader.path}: [{location}]: expected one of {', '.join(sorted(found))}, "
            f"found {name!r}, which no plugin provides"
        )
    return found[name]


def _plugin_folders(cluster, folder):
    """
    Return the plugin folders named in table C{cluster}, relative to
    C{folder}, after adding each to the plugin search path: the names the
    rest of the file uses may come from them.
    """
    folders = cluster.get("plugin_folders", list, "a list of folders", [])
    if not all(isinstance(f, str) for f in folders):
        cluster.fail("plugin_folders", "a list of folder paths (strings)")
    paths = tuple(os.path.join(folder, f) for f in folders)
    for given, path in zip(folders, paths):
        if not os.path.isdir(path):
            cluster.fail("plugin_folders", f"existing folders, found {given!r} (no folder {path})")
        registry.add_plugin_folder(path)
    return paths


def _load_class(reader, name):
    reader.unknown_keys(
        {"urgency_levels", "ordering", "capacity", "ttl", "overflow", "max_bytes",
         "persistence", "fsync", "fsync_interval"}
    )
    levels = reader.get("urgency_levels", int, "an integer from 1 to 16", 4)
    if not 1 <= levels <= 16:
        reader.fail("urgency_levels", f"an integer from 1 to 16, found {levels}")
    ordering = reader.get("ordering", str, "'none', 'channel' or 'global'", "none")
    if ordering not in ORDERING_SCOPES:
        reader.fail(
            "ordering",
            f"'none', 'channel' or 'global' (a scope; the protocol is [cluster] orderer), "
            f"found {ordering!r}",
        )
    capacity = reader.get("capacity", int, "a positive integer", 10_000)
    if capacity < 1:
        reader.fail("capacity", f"a positive integer, found {capacity}")
    ttl = reader.get("ttl", float, "a positive number of seconds", 300.0)
    if ttl <= 0:
        reader.fail("ttl", f"a positive number of seconds, found {ttl}")
    overflow = reader.get("overflow", str, "'drop-oldest' or 'drop-newest'", "drop-oldest")
    if overflow not in OVERFLOW_POLICIES:
        reader.fail("overflow", f"'drop-oldest' or 'drop-newest', found {overflow!r}")
    max_bytes = reader.get("max_bytes", int, "a positive number of bytes", 16 * 1024 * 1024)
    if max_bytes < 1:
        reader.fail("max_bytes", f"a positive number of bytes, found {max_bytes}")
    persistence = reader.get("persistence", str, "'memory' or 'disk'", "memory")
    if persistence not in PERSISTENCE:
        reader.fail("persistence", f"'memory' or 'disk', found {persistence!r}")
    fsync = reader.get("fsync", str, "'always', 'interval' or 'never'", "always")
    if fsync not in FSYNC_POLICIES:
        reader.fail("fsync", f"'always', 'interval' or 'never', found {fsync!r}")
    fsync_interval = reader.get("fsync_interval", float, "a positive number of milliseconds", 50.0)
    if not 0 < fsync_interval <= 3_600_000:
        reader.fail("fsync_interval", f"a number of milliseconds in (0, 3600000], found {fsync_interval}")
    return QoSClass(
        name, levels, ordering, capacity, ttl, overflow, max_bytes=max_bytes,
        persistence=persistence, fsync=fsync, fsync_interval=fsync_interval,
    )


def parse_config(path, data):
    """
    Build a L{ClusterConfig} from the parsed TOML C{data} of file C{path}.
    """
    top = TableReader(path, data)
    top.unknown_keys({"cluster", "replicas", "clients", "classes", "channels"})
    cluster = top.sub("cluster")
    cluster.unknown_keys(
        {"name", "faults", "default_client", "plugin_folders", "max_clock_skew", "keys_dir", "tls",
         "admins", "orderer", "leader_timeout", "checkpoint_interval"}
    )
    name = cluster.get("name", str, "the cluster's name", "fitbroker")
    folder = os.path.dirname(os.path.abspath(path))
    plugin_folders = _plugin_folders(cluster, folder)
    faults = cluster.get("faults", int, "the number of faulty replicas tolerated (f)", 1)
    if faults < 0:
        cluster.fail("faults", f"a number >= 0, found {faults}")

    replicas_data = top.get("replicas", list, "an array of [[replicas]] tables", None)
    if not replicas_data:
        top.fail("replicas", "at least one [[replicas]] table with listen and connect")
    replicas = []
    for index in range(len(replicas_data)):
        r = top.sub("replicas", index)
        r.unknown_keys({"listen", "connect", "metrics", "data"})
        data = r.get("data", str, "a folder for the replica's journal and disk channels", None)
        if data is not None and not data:
            r.fail("data", "a folder for the replica's journal and disk channels, found ''")
        replicas.append(
            ReplicaSpec(
                index,
                r.get("listen", str, "a server endpoint string like 'tcp:7400:interface=127.0.0.1'"),
                r.get("connect", str, "a client endpoint string like 'tcp:127.0.0.1:7400'"),
                r.get(
                    "metrics", str, "a server endpoint string like 'tcp:9400:interface=127.0.0.1'", None
                ),
                os.path.join(folder, os.path.expanduser(data)) if data is not None else None,
            )
        )

    clients_table = top.sub("clients")
    clients = frozenset(clients_table.table)
    for client in clients:
        clients_table.sub(client).unknown_keys({"description"})

    default_client = cluster.get("default_client", str, "a client name", None)
    if default_client is not None and default_client not in clients:
        cluster.fail("default_client", f"a client of [clients], found {default_client!r}")

    admins = _names(cluster, "admins")
    for admin in sorted(admins - clients):
        cluster.fail("admins", f"clients of [clients], found {admin!r}")

    classes_table = top.sub("classes")
    classes = {"default": QoSClass("default")}
    for class_name in classes_table.table:
        classes[class_name] = _load_class(classes_table.sub(class_name), class_name)

    channels = {}
    channels_data = top.get("channels", list, "an array of [[channels]] tables", [])
    for index in range(len(channels_data)):
        c = top.sub("channels", index)
        c.unknown_keys(
            {"tag", "topic", "class", "qop", "scheme", "voter", "publishers", "subscribers"}
        )
        tag = c.get("tag", str, "the channel's tag")
        if not tag or tag in channels:
            c.fail("tag", f"a unique non-empty tag, found {tag!r}")
        class_name = c.get("class", str, "a class name", "default")
        if class_name not in classes:
            c.fail("class", f"one of the classes {', '.join(sorted(classes))}, found {class_name!r}")
        qop = c.get("qop", str, "the name of a QoP mode", "cft")
        mode = _named(c, "qop", IQoPMode, qop)
        try:
            mode.check_cluster(len(replicas), faults)
        except ConfigError as e:
            c.fail("qop", f"a mode this cluster can run: {e}")
        voter = c.get("voter", str, "a voter name", mode.default_voter())
        _named(c, "voter", IVoterFactory, voter)
        qos = classes[class_name]
        publishers = _names(c, "publishers")
        subscribers = _names(c, "subscribers")
        for who in (publishers | subscribers) - clients - {"*"}:
            c.fail("publishers", f"names of [clients], found {who!r}")
        channels[tag] = ChannelSpec(
            tag,
            c.get("topic", str, "a topic description", tag),
            qos,
            qop,
            c.get("scheme", str, "a protection scheme name", "si"),
            voter,
            publishers,
            subscribers,
        )

    keys_dir = cluster.get("keys_dir", str, "a folder with the cluster's keys", None)
    orderer, orderer_problem = _orderer(cluster, channels, len(replicas), faults, keys_dir)
    return ClusterConfig(
        path=path,
        name=name,
        faults=faults,
        replicas=tuple(replicas),
        clients=clients,
        default_client=default_client,
        classes=classes,
        channels=channels,
        plugin_folders=plugin_folders,
        max_clock_skew=cluster.get("max_clock_skew", float, "seconds", 300.0),
        keys_dir=os.path.join(folder, keys_dir) if keys_dir else None,
        tls=cluster.get("tls", bool, "true or false", False),
        admins=admins,
        orderer=orderer,
        orderer_problem=orderer_problem,
        leader_timeout=_positive(cluster, "leader_timeout", float, "seconds", 2.0),
        checkpoint_interval=_positive(cluster, "checkpoint_interval", int, "decided instances", 64),
    )


def _positive(reader, key, kind, what, default):
    value = reader.get(key, kind, f"a positive number of {what}", default)
    if not value > 0:
        reader.fail(key, f"a positive number of {what}, found {value}")
    return value


def _orderer(cluster, channels, replicas, faults, keys_dir):
    """
    Return C{(orderer name, None)}, or C{(None, why)} when the cluster cannot
    run one.  C{"auto"} (the default) picks the BFT protocol when any channel
    is C{qop = "bft"}, else the CFT one.  A cluster with ordered channels
    that cannot run its orderer stops here with one line; without them it
    only refuses run-time table changes.
    """
    name = cluster.get("orderer", str, "'auto' or the name of an ordering protocol", "auto")
    if name == "auto":
        name = AUTO_BFT if any(spec.qop == "bft" for spec in channels.values()) else AUTO_CFT
    factory = _named(cluster, "orderer", IOrderingFactory, name)
    ordered = sorted(tag for tag, spec in channels.items() if spec.qos.ordering != "none")
    problem = None
    try:
        factory.check_cluster(replicas, faults)
    except ConfigError as e:
        problem = str(e)
    if problem is None and keys_dir is None and factory.byzantine:
        problem = "Byzantine agreement needs the replicas' keys: set [cluster] keys_dir"
    if problem is not None and ordered:
        cluster.fail(
            "orderer",
            f"an ordering protocol this cluster can run, for ordered channels {', '.join(ordered)}: "
            f"{name}: {problem}",
        )
    if problem is not None:
        return None, f"{name}: {problem}"
    return name, None


# What orderer = "auto" means.
AUTO_BFT = "mod-smart"
AUTO_CFT = "multi-paxos"


def load_config(path):
    """
    Read and validate the cluster file at C{path}.
    """
    return parse_config(path, read_toml(path, "configuration file"))
