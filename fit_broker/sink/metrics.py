"""
The sink process's Prometheus metrics: each sink's counters and state, the
forwarder's open groups, and what the voters of its subscriber saw of each
replica (mismatching copies, copies withheld, credit overrun), which no
replica can report about itself.

Read at scrape time from the running objects, like the other processes'
metrics (L{fit_broker.metrics}); names are listed in docs/status.md.
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fit_broker.metrics import counter_families

#: The states a sink reports, each a series of C{fitbroker_sink_state}.
SINK_STATES = ("up", "down", "retrying")

_REPLICA = ":replica-"


def _split_evidence(counters):
    """
    Return C{(evidence, rest)}: C{{(reason, replica): n}} for counters named
    C{reason:replica-N}, and the other counters.
    """
    evidence, rest = {}, {}
    for key, value in counters.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        reason, found, replica = str(key).rpartition(_REPLICA)
        if found and reason and replica.isdigit():
            evidence[(reason, replica)] = evidence.get((reason, replica), 0) + value
        else:
            rest[key] = value
    return evidence, rest


def sink_families(client):
    """
    Return the metric families of a running L{fit_broker.sink.service.SinkClient}.
    """
    forwarder = client.forwarder
    families = []
    snapshot = forwarder.snapshot()
    families += counter_families(
        "fitbroker_sink",
        {"sinks": snapshot},
        collections={"sinks": ("sink", "")},
        gauges={"held", "held-bytes"},
    )
    state = GaugeMetricFamily(
        "fitbroker_sink_state", "1 for the state each sink is in, 0 for the others", labels=["sink", "state"]
    )
    for name, counters in snapshot.items():
        for value in SINK_STATES:
            state.add_metric([name, value], 1 if counters.get("state") == value else 0)
    families.append(state)
    forwarded = CounterMetricFamily(
        "fitbroker_sink_forwarder_forwarded", "events every sink took (acknowledged to the replicas)"
    )
    forwarded.add_metric([], forwarder.forwarded)
    open_groups = GaugeMetricFamily(
        "fitbroker_sink_forwarder_open_groups", "groups handed over and not yet held by every sink"
    )
    open_groups.add_metric([], forwarder.open_groups)
    waiting = GaugeMetricFamily(
        "fitbroker_sink_forwarder_waiting_events",
        "events offered to no sink yet because a sink's backlog is full",
    )
    waiting.add_metric([], forwarder.waiting_events)
    window = GaugeMetricFamily(
        "fitbroker_sink_forwarder_window", "open groups allowed per channel before the stream holds"
    )
    window.add_metric([], client.settings.window)
    families += [forwarded, open_groups, waiting, window]

    session = client.session
    links = GaugeMetricFamily("fitbroker_sink_links_up", "replicas the sink's session is linked to")
    links.add_metric([], len(session.proxy.links) if session is not None else 0)
    replicas = GaugeMetricFamily("fitbroker_sink_replicas", "replicas in the cluster")
    replicas.add_metric([], len(client.cluster.replicas))
    families += [links, replicas]
    if session is not None:
        families += _subscriber_families(session, len(client.cluster.replicas))
    return families


def _subscriber_families(session, replica_count):
    subscriber = session.subscriber
    families = []
    voter_evidence = CounterMetricFamily(
        "fitbroker_sink_voter_evidence",
        "copies a replica sent that the channel's voter held against it, by reason",
        labels=["channel", "replica", "reason"],
    )
    withheld = GaugeMetricFamily(
        "fitbroker_sink_voter_withheld",
        "undecided batches other replicas vouched for and this replica did not (yet)",
        labels=["channel", "replica"],
    )
    pending = GaugeMetricFamily(
        "fitbroker_sink_voter_pending", "batches waiting for f+1 matching copies", labels=["channel"]
    )
    plain = {}
    for tag, voter in sorted(subscriber.voters.items()):
        evidence, plain[tag] = _split_evidence(voter.counters)
        for (reason, replica), value in sorted(evidence.items()):
            voter_evidence.add_metric([tag, replica, reason], value)
        lag = getattr(voter, "lag", None)
        if lag is not None:
            votes, undecided = lag(), voter.pending
            pending.add_metric([tag], undecided)
            for index in range(replica_count):
                withheld.add_metric([tag, str(index)], max(0, undecided - votes.get(index, 0)))
    families += [voter_evidence, withheld, pending]
    families += counter_families(
        "fitbroker_sink_voter", {"channels": plain}, collections={"channels": ("channel", "")}, gauges=()
    )
    evidence, rest = _split_evidence(subscriber.counters)
    subscriber_evidence = CounterMetricFamily(
        "fitbroker_sink_subscriber_evidence",
        "copies a replica sent that the subscriber held against it (over-credit: beyond the credit it had)",
        labels=["replica", "reason"],
    )
    for (reason, replica), value in sorted(evidence.items()):
        subscriber_evidence.add_metric([replica, reason], value)
    families.append(subscriber_evidence)
    families += counter_families("fitbroker_sink_subscriber", rest, gauges=())
    families += counter_families("fitbroker_sink_client", dict(session.proxy.counters), gauges=())
    return families
