"""
Prometheus metrics: status snapshots as labelled families, and a replica's
/metrics endpoint scraped over HTTP on 127.0.0.1.
"""

import time
import urllib.request

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock

from benchmarks.cluster import free_ports
from fit_broker.config import parse_config
from fit_broker.errors import ConfigError
from fit_broker.metrics import counter_families, metrics_service, syslog_families
from fit_broker.replica.service import make_replica_service
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.syslog.config import parse_settings
from fit_broker.syslog.service import make_syslog_service
from fit_broker.units import Request, pack_contents
from tests.simnet import cluster_config


def samples(families):
    """Name and sorted labels -> value, over every sample of C{families}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }


def test_nested_snapshot_becomes_labelled_families():
    """Channels and subscribers become labels, `refused:X` a reason label, `waiting` a gauge."""
    snapshot = {
        "connections": {"refused-hello": 2},
        "requests": {"requests": 7},
        "channels": {
            "events": {
                "counters": {"accepted": 5, "refused:bad-ttl": 1, "refused:unauthorized": 3},
                "subscribers": {"console": {"delivered": 4, "waiting": 1}},
            }
        },
        "started": "not a number",
        "flag": True,
    }
    families = counter_families("fitbroker_replica", snapshot, {"replica": "2"})
    kinds = {f.name: f.type for f in families}
    assert kinds["fitbroker_replica_channel_queue_waiting"] == "gauge"
    assert kinds["fitbroker_replica_channel_accepted"] == "counter"
    assert "fitbroker_replica_flag" not in kinds and "fitbroker_replica_started" not in kinds
    got = samples(families)
    r = ("replica", "2")
    assert got[("fitbroker_replica_requests_total", (r,))] == 7
    assert got[("fitbroker_replica_connections_refused_hello_total", (r,))] == 2
    assert got[("fitbroker_replica_channel_accepted_total", (("channel", "events"), r))] == 5
    refused = "fitbroker_replica_channel_refused_total"
    assert got[(refused, (("channel", "events"), ("reason", "bad-ttl"), r))] == 1
    assert got[(refused, (("channel", "events"), ("reason", "unauthorized"), r))] == 3
    queue = (("channel", "events"), r, ("subscriber", "console"))
    assert got[("fitbroker_replica_channel_queue_delivered_total", queue)] == 4
    assert got[("fitbroker_replica_channel_queue_waiting", queue)] == 1


def test_invalid_metrics_endpoint_is_a_config_error():
    """A metrics endpoint that is not an endpoint string stops start-up with one line."""
    with pytest.raises(ConfigError, match="metrics: invalid endpoint 'nonsense:1'"):
        metrics_service("nonsense:1", MemoryReactorClock(), lambda: [])


def test_replica_metrics_key_is_read():
    """`[[replicas]] metrics` is optional, and must be an endpoint string."""
    data = {
        "replicas": [
            {"listen": "tcp:1", "connect": "tcp:h:1", "metrics": "tcp:9400:interface=127.0.0.1"},
            {"listen": "tcp:2", "connect": "tcp:h:2"},
        ],
        "clients": {"a": {}},
    }
    config = parse_config("c.toml", data)
    assert [r.metrics for r in config.replicas] == ["tcp:9400:interface=127.0.0.1", None]
    data["replicas"][1]["metrics"] = 9400
    with pytest.raises(ConfigError, match=r"c.toml: \[replicas\[1\].metrics\]: expected a server endpoint"):
        parse_config("c.toml", data)


def _event(first_id, timestamp, ttl=30.0):
    return ("probe", first_id, timestamp, ttl, 0, pack_contents([b"x", b"y"]), b"")


def test_replica_serves_its_counters_over_http():
    """A scrape of a replica's /metrics on 127.0.0.1 shows the counters its status shows."""
    reactor = EPollReactor()
    port = free_ports(1)[0]
    config = cluster_config(("events",), clients=("probe", "console"))
    config = attrs.evolve(
        config,
        replicas=(
            attrs.evolve(config.replicas[0], metrics=f"tcp:{port}:interface=127.0.0.1"),
            *config.replicas[1:],
        ),
    )
    service = make_replica_service(
        config, 0, reactor, scheme_lookup(config), endpoint=_unused(reactor)
    )
    replica = service.replica
    now = reactor.seconds()
    replica.handle("console", Request(1, "subscribe", "events"))
    replica.handle("probe", Request(2, "publish", "events", 0, (_event(1, now), _event(3, now))))
    replica.handle("probe", Request(3, "publish", "events", 0, (_event(5, now, ttl=-1.0),)))
    replica.handle("console", Request(4, "receive", "events", 2))
    result = {}

    def scrape():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                result["type"] = response.headers["Content-Type"]
                result["text"] = response.read().decode("utf-8")
        except Exception as e:
            result["error"] = e
        reactor.callFromThread(finish)

    def finish():
        service.stopService().addBoth(lambda _: reactor.stop())

    service.startService()
    reactor.callLater(0, reactor.callInThread, scrape)
    reactor.callLater(20, finish)
    reactor.run(installSignalHandlers=False)

    assert "error" not in result, result.get("error")
    assert result["type"].startswith("text/plain")
    got = samples(text_string_to_metric_families(result["text"]))
    snapshot = replica.snapshot()
    counters = snapshot["channels"]["events"]["counters"]
    queue = snapshot["channels"]["events"]["subscribers"]["console"]
    r = ("replica", "0")
    channel = (("channel", "events"), r)
    subscriber = (("channel", "events"), r, ("subscriber", "console"))
    assert got[("fitbroker_replica_channel_accepted_total", channel)] == counters["accepted"] == 4
    assert got[("fitbroker_replica_channel_refused_total", (("channel", "events"), ("reason", "bad-ttl"), r))] == (
        counters["refused:bad-ttl"]
    ) == 1
    assert got[("fitbroker_replica_channel_queue_delivered_total", subscriber)] == queue["delivered"] == 2
    assert got[("fitbroker_replica_channel_queue_waiting", subscriber)] == queue["waiting"] == 2
    assert got[("fitbroker_replica_requests_total", (r,))] == snapshot["requests"]["requests"]
    assert got[("fitbroker_replica_links_up", (r,))] == 0
    assert 0 <= got[("fitbroker_replica_uptime_seconds", (r,))] < 60


def _unused(reactor):
    """A server endpoint on a free loopback port, for the replica's own listener."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    return TCP4ServerEndpoint(reactor, free_ports(1)[0], interface="127.0.0.1")


SYSLOG = """
metrics = "tcp:9409:interface=127.0.0.1"
[[listeners]]
endpoint = "udp:5514:interface=127.0.0.1"
[routing]
default = "syslog"
"""


def test_syslog_adapter_metrics():
    """syslog.toml's `metrics` adds a metrics listener; its families carry the bridge's counters."""
    import tomllib

    settings = parse_settings("syslog.toml", tomllib.loads(SYSLOG))
    assert settings.metrics == "tcp:9409:interface=127.0.0.1"
    cluster = cluster_config(("syslog",), clients=("syslog", "console"))
    service = make_syslog_service(cluster, settings, MemoryReactorClock())
    assert "metrics tcp:9409:interface=127.0.0.1" in [s.name for s in service]
    service.bridge.count("accepted", 3)
    got = samples(syslog_families(service.adapter))
    assert got[("fitbroker_syslog_accepted_total", ())] == 3
    assert got[("fitbroker_syslog_spool_events", ())] == 0
    assert got[("fitbroker_syslog_links_up", ())] == 0
    with pytest.raises(ConfigError, match=r"\[metrics\]: expected a server endpoint"):
        parse_settings("syslog.toml", tomllib.loads(SYSLOG.replace('"tcp:9409:interface=127.0.0.1"', "1")))


def test_embedded_cluster_serves_metrics_on_9410(tmp_path):
    """The embedded cluster's replica i serves metrics on 127.0.0.1:9410+i."""
    from fit_broker.local import make_local_cluster

    service = make_local_cluster(MemoryReactorClock(), folder=str(tmp_path), syslog=False)
    names = [child.name for replica in service if replica.name and replica.name.startswith("replica-")
             for child in replica]
    assert [n for n in names if n and n.startswith("metrics")] == [
        f"metrics tcp:{9410 + i}:interface=127.0.0.1" for i in range(4)
    ]
