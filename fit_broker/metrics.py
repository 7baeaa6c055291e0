"""
Prometheus metrics over HTTP for replicas, the syslog adapter and sinks.

Metrics are read at scrape time from the same status snapshots that
C{fitbroker status} prints, so there is one set of counters and nothing is
counted twice.  The exposition is C{prometheus_client}'s (the standard text
format, content negotiation included), served by its WSGI application the
way C{prometheus_client.twisted.MetricsResource} serves it, but on the
injected reactor instead of the global one.
"""

import re
import threading

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import make_wsgi_app
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

from fit_broker.errors import ConfigError
from fit_broker.listening import MustListen

#: How long a scrape waits for the reactor thread to read the counters.
SCRAPE_TIMEOUT = 5.0

#: Snapshot keys whose dicts are collections: each key of such a dict
#: becomes a label value.  Maps the key to C{(label, name part)}.
COLLECTIONS = {
    "channels": ("channel", "channel"),
    "subscribers": ("subscriber", "queue"),
}

#: Snapshot keys that only group counters and add nothing to the name.
TRANSPARENT = frozenset({"counters"})

#: Leaf names that are levels (gauges), not counts since start.
GAUGES = frozenset(
    {
        "waiting",
        "waiting-bytes",
        "bytes",
        "unacknowledged",
        "spool-events",
        "spool-bytes",
        "connections-open",
        "links-up",
        "clock-offset-seconds",
        "uptime-seconds",
    }
)

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]+")


def _name_part(text):
    return _NOT_NAME.sub("_", str(text)).strip("_").lower()


def counter_families(
    prefix, snapshot, labels=None, collections=COLLECTIONS, gauges=GAUGES, transparent=TRANSPARENT,
    documentation=None,
):
    """
    Return Prometheus metric families for the numbers in a status snapshot.

    The nested dict is walked: a dict under a key of C{collections} (such
    as C{channels}) holds one entry per channel, whose key becomes a label
    (C{channel="events"}); any other dict adds its key to the metric's name;
    numbers are the samples.  A leaf C{"refused:unauthorized"} becomes
    family C{..._refused} with label C{reason="unauthorized"}, so every
    refusal reason is one series of one family.  Leaves named in C{gauges}
    are gauges, the rest counters.  Booleans, strings and other values are
    skipped, so a snapshot may carry information that is not a metric.

    @param prefix: the families' common name prefix, such as
        C{fitbroker_replica}.
    @param labels: labels every sample carries, such as C{{"replica": "0"}}.
    @param documentation: family name -> its help text, for names whose
        generated help (the snapshot path in words) is not enough.
    @return: a list of L{CounterMetricFamily} and L{GaugeMetricFamily}.
    """
    base = dict(labels or {})
    found = {}

    def add(path, leaf, value, sample_labels):
        leaf = str(leaf)
        reason = None
        if ":" in leaf:
            leaf, reason = leaf.split(":", 1)
        parts = [p for p in path if p]
        part = _name_part(leaf)
        if part and (not parts or parts[-1] != part):
            parts.append(part)
        name = "_".join([_name_part(prefix), *parts])
        sample = dict(sample_labels)
        if reason is not None:
            sample["reason"] = reason
        kind = "gauge" if leaf in gauges else "counter"
        key = (name, tuple(sample))
        entry = found.get(key)
        if entry is None:
            entry = found[key] = (kind, [])
        if entry[0] == kind:
            entry[1].append((tuple(str(v) for v in sample.values()), value))

    def walk(node, path, sample_labels):
        for key, value in node.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                add(path, key, value, sample_labels)
            elif isinstance(value, dict):
                if key in collections:
                    label, part = collections[key]
                    for member, inner in value.items():
                        if isinstance(inner, dict):
                            walk(inner, path + [part], {**sample_labels, label: member})
                elif key in transparent:
                    walk(value, path, sample_labels)
                else:
                    walk(value, path + [_name_part(key)], sample_labels)

    walk(snapshot, [], base)
    families = []
    names = set()
    for (name, label_names), (kind, samples) in found.items():
        if name in names:
            # The same name with other labels cannot share a family.
            continue
        names.add(name)
        text = (documentation or {}).get(name) or (
            name.replace("_", " ") + " (see docs/status.md)"
        )
        if kind == "gauge":
            family = GaugeMetricFamily(name, text, labels=list(label_names))
        else:
            family = CounterMetricFamily(name, text, labels=list(label_names))
        for values, value in samples:
            family.add_metric(list(values), value)
        families.append(family)
    return families


class _SnapshotCollector:
    """
    A C{prometheus_client} collector that asks the reactor thread for the
    metric families at each scrape: the counters belong to that thread,
    and the WSGI application runs in a pool thread.
    """

    log = Logger()

    def __init__(self, reactor, collect, timeout=SCRAPE_TIMEOUT):
        self.reactor = reactor
        self.read = collect
        self.timeout = timeout

    def collect(self):
        done = threading.Event()
        box = []

        def read():
            try:
                box.append(list(self.read()))
            except Exception:
                self.log.failure("reading metrics failed")
            finally:
                done.set()

        self.reactor.callFromThread(read)
        if not done.wait(self.timeout) or not box:
            self.log.warn("a scrape found no metrics within {timeout} s", timeout=self.timeout)
            return []
        return box[0]


class _ReactorThreads:
    """
    The reactor's thread pool as L{WSGIResource} uses it, looked up at the
    first scrape: a service tree can be built (and tested) on a reactor
    without threads.
    """

    def __init__(self, reactor):
        self.reactor = reactor

    def callInThread(self, f, *args, **kwargs):
        self.reactor.callInThread(f, *args, **kwargs)


def metrics_resource(reactor, collect):
    """
    Return a web resource whose child C{metrics} serves the families that
    C{collect()} returns, in the Prometheus exposition format.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(reactor, collect))
    root = Resource()
    root.putChild(
        b"metrics", WSGIResource(reactor, _ReactorThreads(reactor), make_wsgi_app(registry))
    )
    return root


class _QuietSite(Site):
    """
    A site that keeps scrapes (one every few seconds, forever) out of the log.
    """

    def log(self, request):
        pass


def metrics_service(endpoint, reactor, collect):
    """
    Return a service serving C{/metrics} on the server endpoint string
    C{endpoint}, such as C{tcp:9400:interface=127.0.0.1}.

    @param collect: called in the reactor thread at every scrape; returns
        an iterable of C{prometheus_client.core} metric families (see
        L{counter_families}).
    @return: an L{IService} that stops start-up with one line when the
        port cannot be bound.
    @raise ConfigError: when C{endpoint} is not a server endpoint string.
    """
    try:
        listening = serverFromString(reactor, endpoint)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"metrics: invalid endpoint {endpoint!r}: {e}") from None
    site = _QuietSite(metrics_resource(reactor, collect))
    site.displayTracebacks = False
    service = MustListen(listening, site)
    service.setName(f"metrics {endpoint}")
    return service


def replica_families(replica):
    """
    Return the metric families of a L{fit_broker.replica.service.Replica}:
    its status snapshot's counters and queue levels, the links (client
    connections) open, its start time and uptime, all labelled with the
    replica's index.
    """
    snapshot = dict(replica.snapshot())
    started = snapshot.pop("started", None)
    now = snapshot.pop("now", None)
    labels = {"replica": str(replica.index)}
    families = counter_families("fitbroker_replica", snapshot, labels)
    links = GaugeMetricFamily(
        "fitbroker_replica_links_up",
        "client connections open at this replica",
        labels=["replica"],
    )
    links.add_metric([labels["replica"]], len(getattr(replica, "connections", ())))
    families.append(links)
    if isinstance(started, (int, float)) and isinstance(now, (int, float)):
        start = GaugeMetricFamily(
            "fitbroker_replica_start_time_seconds",
            "when the replica started, in seconds since the epoch by its clock",
            labels=["replica"],
        )
        start.add_metric([labels["replica"]], started)
        uptime = GaugeMetricFamily(
            "fitbroker_replica_uptime_seconds", "seconds since the replica started", labels=["replica"]
        )
        uptime.add_metric([labels["replica"]], max(0.0, now - started))
        families += [start, uptime]
    return families


def syslog_families(adapter):
    """
    Return the metric families of a running syslog adapter
    (L{fit_broker.syslog.service.SyslogAdapter}): the bridge's counters,
    spool level and the replicas it is linked to.
    """
    families = counter_families("fitbroker_syslog", adapter.counter_log.snapshot())
    links = GaugeMetricFamily(
        "fitbroker_syslog_links_up", "replicas the adapter's publishing session is linked to"
    )
    session = adapter.session
    links.add_metric([], len(session.proxy.links) if session is not None else 0)
    families.append(links)
    replicas = GaugeMetricFamily("fitbroker_syslog_replicas", "replicas in the cluster")
    replicas.add_metric([], len(adapter.cluster.replicas))
    families.append(replicas)
    return families
