"""
BFT mode on a simulated network: with f of 3f+1 replicas Byzantine, every
subscriber delivers exactly the published events, each once; with f+1, what
the documentation says happens.
"""

import pytest

from fit_broker.schemes.registry import available_schemes
from tests import byzantine
from tests.simnet import SimNet, cluster_config

SCHEMES = [name for name in ("si", "ha", "pks", "pke") if name in available_schemes()]

BEHAVIOURS = {
    "alter": lambda: byzantine.alter,
    "forge": byzantine.forge_events,
    "replay": byzantine.replay,
    "withhold": lambda: byzantine.withhold,
    "equivocate": lambda: byzantine.equivocate,
    "other-channel": lambda: byzantine.other_channel("secret"),
    "garbage": byzantine.garbage,
    "flood": byzantine.flood,
    "lying-acks": lambda: byzantine.lying_acks,
}


def bft_net(scheme="si", faulty=None, voter=None, **qos):
    config = cluster_config(
        ("events", "secret"), qop="bft", scheme=scheme, voter=voter,
        clients=("probe", "console", "dashboard"), **qos
    )
    return SimNet(config, faulty=faulty, keys=scheme != "si")


def subscribe(net, session, tag="events"):
    got = []
    d = session.subscriber.subscribe(tag, got.extend)
    net.run()
    assert d.called and d.result.ok, d.result
    return got


def publish_rounds(net, session, rounds=4, per_round=120):
    published = {}
    for r in range(rounds):
        contents = [b"r%d-event-%d" % (r, i) for i in range(per_round)]
        d = session.publisher.publish_many("events", contents)
        net.run(0.5)
        assert d.called, "publish not acknowledged"
        ids = d.result
        published.update(zip(ids, contents))
    return published


def check_c0(got, published):
    ids = [e.event_id for e in got]
    assert len(ids) == len(set(ids)), "duplicated"
    delivered = {e.event_id: e.content for e in got}
    unexpected = {i for i, c in delivered.items() if published.get(i) != c}
    assert not unexpected, f"{len(unexpected)} unexpected (forged or altered)"
    lost = set(published) - set(delivered)
    assert not lost, f"{len(lost)} lost"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_f_byzantine_replicas_change_nothing(scheme, behaviour):
    """With one of four replicas Byzantine, two subscribers deliver exactly the published events, once each."""
    net = bft_net(scheme, faulty={2: BEHAVIOURS[behaviour]()})
    pub = net.client("probe")
    console, dashboard = net.client("console"), net.client("dashboard")
    got_console = subscribe(net, console)
    got_dashboard = subscribe(net, dashboard)
    secret = subscribe(net, dashboard, "secret")
    published = publish_rounds(net, pub)
    net.run(1)
    check_c0(got_console, published)
    check_c0(got_dashboard, published)
    assert secret == [], "events of another channel were delivered"
    for session in (console, dashboard):
        voter = session.subscriber.voters["events"]
        assert voter.pending <= voter.max_pending
        assert voter.pending_bytes <= voter.max_pending_bytes


def test_alteration_is_attributed():
    """The voter counts mismatching copies against the replica that sent them."""
    net = bft_net(faulty={1: byzantine.alter})
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    published = publish_rounds(net, pub, rounds=1)
    net.run(1)
    check_c0(got, published)
    counters = sub.subscriber.voters["events"].counters
    assert counters.get("mismatch:replica-1", 0) > 0
    assert not any(k.startswith("mismatch:replica-") and k != "mismatch:replica-1" for k in counters)


def test_withholding_replica_shows_in_lag():
    """A replica that withholds everything never vouches, and the others carry delivery."""
    net = bft_net(faulty={3: byzantine.withhold})
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    published = publish_rounds(net, pub, rounds=2)
    net.run(1)
    check_c0(got, published)
    assert sub.subscriber.voters["events"].lag().get(3, 0) == 0


def test_flood_stays_within_credit():
    """A flooding replica holds at most the credit it was given of pending copies; the excess is dropped and counted."""
    net = bft_net(faulty={0: byzantine.flood(per_delivery=30_000)})
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    published = publish_rounds(net, pub, rounds=2)
    net.run(1)
    check_c0(got, published)
    voter = sub.subscriber.voters["events"]
    assert voter.lag().get(0, 0) <= sub.subscriber.credit
    assert sub.subscriber.counters.get("over-credit:replica-0", 0) > 0


def test_forged_events_expire_from_the_voter():
    """Forged events vouched by one replica stay pending, then expire with a count; none is delivered."""
    net = bft_net(faulty={1: byzantine.forge_events()}, ttl=5)
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    published = publish_rounds(net, pub, rounds=1)
    assert sub.subscriber.voters["events"].pending > 0
    net.run(8)
    check_c0(got, published)
    voter = sub.subscriber.voters["events"]
    assert voter.pending == 0 and voter.counters["expired"] > 0


def test_publish_needs_two_f_plus_one_acks():
    """A BFT publish is not acknowledged by f+1 replicas, only by 2f+1."""
    net = bft_net()
    pub = net.client("probe", timeout=5)
    net.kill(0)
    net.kill(1)
    net.run(1)
    d = pub.publisher.publish("events", b"x")
    net.run(1)
    assert not d.called
    net.restart(0)
    net.run(5)
    assert d.called and not isinstance(d.result, Exception)


def test_beyond_threshold_colluding_alteration_with_si_is_delivered():
    """With f+1 = 2 colluding replicas altering identically, SI/HA subscribers deliver the forgery (documented limit)."""
    net = bft_net(faulty={1: byzantine.alter, 2: byzantine.alter})
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    publish_rounds(net, pub, rounds=1)
    net.run(1)
    assert any(e.content.startswith(b"EVIL") for e in got)


@pytest.mark.skipif("pks" not in SCHEMES, reason="needs the pks scheme")
@pytest.mark.parametrize("voter", ["f-plus-one", "signature"])
def test_beyond_threshold_colluding_alteration_with_pks_is_refused(voter):
    """With f+1 colluding replicas altering content, PKS subscribers refuse every altered copy and deliver the truth."""
    net = bft_net("pks", faulty={1: byzantine.alter, 2: byzantine.alter}, voter=voter)
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    published = publish_rounds(net, pub, rounds=1)
    net.run(1)
    assert not any(e.content.startswith(b"EVIL") for e in got)
    if voter == "signature":
        check_c0(got, published)


def test_beyond_threshold_withholding_stalls():
    """With f+1 replicas withholding, BFT delivery stalls rather than deliver on too few copies."""
    net = bft_net(faulty={1: byzantine.withhold, 2: byzantine.withhold, 3: byzantine.withhold})
    pub, sub = net.client("probe"), net.client("console")
    got = subscribe(net, sub)
    publish_rounds(net, pub, rounds=1)
    net.run(1)
    assert got == []


def _refusal(net, scheme, tamper):
    """Publish with a tampered key ring; return the failure and replica 0's channel counters."""
    from twisted.logger import capturedLogs

    pub = net.client("probe")
    tamper(pub.publisher.keys)
    with capturedLogs() as logs:
        d = pub.publisher.publish("events", b"x")
        net.run()
    failure = d.result
    d.addErrback(lambda f: None)
    messages = [e.get("log_format", "").format(**e) for e in logs if "refused" in e.get("log_format", "")]
    return failure, net.replicas[0].broker.channels["events"].counters, messages


def test_wrong_mac_refused_counted_logged():
    """A batch with a wrong MAC is refused by every replica with a counted, logged reason."""
    import os

    net = bft_net("ha")

    def tamper(keys):
        for key in list(keys.mac_keys):
            keys.mac_keys[key] = os.urandom(32)

    failure, counters, messages = _refusal(net, "ha", tamper)
    assert failure.value.status == "auth-failed" and "bad-mac" in failure.value.text
    assert counters["refused:bad-mac"] == 1
    assert any("bad-mac" in m and "'probe'" in m for m in messages)


def test_bad_signature_refused_counted_logged():
    """A batch signed with another key is refused by every replica with a counted, logged reason."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    net = bft_net("pks")

    def tamper(keys):
        keys.signing_keys["probe"] = Ed25519PrivateKey.generate()

    failure, counters, messages = _refusal(net, "pks", tamper)
    assert failure.value.status == "auth-failed" and "bad-signature" in failure.value.text
    assert counters["refused:bad-signature"] == 1
    assert any("bad-signature" in m for m in messages)


def test_unauthorised_publisher_refused_counted_logged():
    """A client the control table does not allow on a channel is refused by replicas, counted and logged."""
    import attrs
    from twisted.logger import capturedLogs

    from fit_broker.units import Request, pack_contents

    config = cluster_config(("events",), qop="bft", scheme="si", clients=("probe", "console"))
    config.channels["events"] = attrs.evolve(
        config.channels["events"], publishers=frozenset({"console"})
    )
    net = SimNet(config)
    pub = net.client("probe")
    refused_locally = pub.publisher.publish("events", b"x")
    assert "may not publish" in str(refused_locally.result.value)
    refused_locally.addErrback(lambda f: None)
    # a hostile client that sends anyway is refused by every replica
    batch = ("probe", 1, net.clock.seconds(), 10.0, 0, pack_contents([b"x"]), b"")
    with capturedLogs() as logs:
        d = pub.proxy.invoke(Request(pub.proxy.next_seq(), "publish", "events", 0, (batch,)), 3)
        net.run()
    assert d.result.value.status == "unauthorized"
    d.addErrback(lambda f: None)
    for replica in net.replicas:
        assert replica.broker.channels["events"].counters["refused:unauthorized"] == 1
    assert sum("may not publish" in str(e.get("text", "")) for e in logs) == 4


def test_long_stream_with_small_credit_never_stalls():
    """Full and digest copies are credited alike on both sides, so a long stream under small credits flows to the end."""
    net = bft_net()
    pub, sub = net.client("probe"), net.client("console", credit=150)
    got = subscribe(net, sub)
    published = publish_rounds(net, pub, rounds=30, per_round=100)
    net.run(2)
    check_c0(got, published)
