"""
The control table as replicated state, the administrator's client and the
`fitbroker admin` commands (against fake replicas that apply changes with
real control tables, since no replica serves the admin method yet).
"""

import json
import os
import subprocess
import sys
import tomllib

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from fit_broker import cli, units
from fit_broker.client.admin import Administrator, admin_quorum, next_serial, sign_change
from fit_broker.client.proxy import ServiceProxy
from fit_broker.config import parse_config
from fit_broker.control import (
    MAX_CHANGE_BYTES,
    MAX_MEMBERS,
    MAX_SERIAL,
    BadSnapshot,
    ControlTable,
    TableDiff,
    canonical_pack,
    check_value,
    signed_message,
    table_value,
)
from fit_broker.errors import ConfigError, NoQuorum, RequestFailed
from fit_broker.init import cluster_toml
from fit_broker.interfaces import IControlTable
from fit_broker.keys import KeyRing
from fit_broker.units import Reply
from fit_broker.wire.codec import decode, encode_reply
from fit_broker.wire.framing import FrameDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENTS = ("ops", "boss", "probe", "console")


def cluster_text(replicas=4, events_qop="bft", channels=("events", "alerts")):
    """
    The test cluster's file: C{events} in class C{fast} (BFT unless
    C{events_qop} says), C{alerts} open to every publisher, C{channels}
    listed in that order.
    """
    rows = {
        "events": ("events", "events", "fast", events_qop, "si", ["probe"], ["console"]),
        "alerts": ("alerts", "alerts", "default", "cft", "si", ["*"], ["console"]),
    }
    return cluster_toml(
        "test", 1, range(7400, 7400 + replicas), list(CLIENTS), [rows[tag] for tag in channels],
        keys_dir=None, tls=False, admins=["ops", "boss"],
        classes={"fast": {"capacity": 5, "ttl": 10}, "slow": {"ttl": 600}},
    )


CLUSTER = cluster_text()


def make_config(text=CLUSTER, path="cluster.toml"):
    return parse_config(path, tomllib.loads(text))


CONFIG = make_config()

# Fixed keys, so that a child process signs as the parent expects.
SIGNING = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i, name in enumerate(CLIENTS)}
VERIFY = {name: key.public_key() for name, key in SIGNING.items()}
REPLICA_KEYS = KeyRing("replica-0", replica_index=0, verify_keys=dict(VERIFY))


def ring(name):
    return KeyRing(name, signing_keys={name: SIGNING[name]}, verify_keys=dict(VERIFY))


_serial = [0]


def signed(change, admin="ops", cluster="test", signer=None):
    """
    Return C{(admin, change_bytes, signature)} for C{change}, with a fresh
    serial unless it names one, signed by C{signer}'s key (C{admin}'s by default).
    """
    _serial[0] += 1
    serial = change.get("serial", _serial[0])
    key_owner = signer or admin
    change_bytes, signature = sign_change(ring(key_owner), cluster, key_owner, change, serial=serial)
    return admin, change_bytes, signature


def raw(change_bytes, admin="ops"):
    """
    Sign C{change_bytes} exactly as given (possibly malformed).
    """
    return admin, change_bytes, SIGNING[admin].sign(signed_message("test", change_bytes))


def genesis():
    return ControlTable.genesis(CONFIG)


def apply(table, triple):
    return table.apply(*triple, REPLICA_KEYS.verify_key)


def create(tag="new", **fields):
    return dict({"op": "create-channel", "tag": tag, "class": "slow"}, **fields)


# Genesis and each operation.


def test_genesis_is_the_cluster_file_at_version_zero():
    """The genesis table holds the file's channels, admins and classes, at version 0."""
    table = genesis()
    assert table.version == 0
    assert dict(table.channels) == CONFIG.channels
    assert table.admins == {"ops", "boss"}
    assert table.describe()["classes"]["fast"]["capacity"] == 5
    assert verifyObject(IControlTable, table)


def test_create_channel_with_defaults():
    """A created channel gets the file reader's defaults: cft, si, the mode's voter, topic = tag, nobody."""
    table = genesis()
    ok, text = apply(table, signed(create()))
    assert ok, text
    assert text == "version 1: created channel 'new'"
    spec = table.channels["new"]
    assert (spec.qop, spec.scheme, spec.voter, spec.topic) == ("cft", "si", "first-copy", "new")
    assert spec.qos is CONFIG.classes["slow"]
    assert spec.publishers == frozenset() and spec.subscribers == frozenset()
    assert table.version == 1 and table.counters["applied"] == 1


def test_create_channel_with_every_field():
    """Every optional field of create-channel lands in the new row."""
    table = genesis()
    change = create(
        "audit", qop="bft", scheme="pks", voter="signature", topic="Audit trail",
        publishers=["probe", "ops"], subscribers=["*"],
    )
    ok, text = apply(table, signed(change))
    assert ok, text
    spec = table.channels["audit"]
    assert (spec.qop, spec.scheme, spec.voter, spec.topic) == ("bft", "pks", "signature", "Audit trail")
    assert spec.publishers == {"probe", "ops"} and spec.may_subscribe("anyone")


def test_remove_channel():
    """remove-channel drops the row, and the version goes up."""
    table = genesis()
    before = table.channels
    ok, text = apply(table, signed({"op": "remove-channel", "tag": "alerts"}))
    assert ok, text
    assert "alerts" not in table.channels and "alerts" in before
    assert table.version == 1


def test_set_class():
    """set-class gives the channel the named class of the file."""
    table = genesis()
    ok, _ = apply(table, signed({"op": "set-class", "tag": "events", "class": "slow"}))
    assert ok
    assert table.channels["events"].qos.ttl == 600.0
    assert table.channels["events"].publishers == {"probe"}


@pytest.mark.parametrize("role, field", [("publish", "publishers"), ("subscribe", "subscribers")])
def test_grant_then_revoke(role, field):
    """grant adds a client to the role's list and revoke takes it out again."""
    table = genesis()
    change = {"tag": "events", "client": "ops", "role": role}
    ok, text = apply(table, signed(dict(change, op="grant")))
    assert ok and "'ops' may" in text
    assert "ops" in getattr(table.channels["events"], field)
    ok, text = apply(table, signed(dict(change, op="revoke")))
    assert ok and "no longer" in text
    assert "ops" not in getattr(table.channels["events"], field)
    assert table.version == 2


def test_wildcard_grant():
    """'*' may be granted, as the file allows it."""
    table = genesis()
    ok, _ = apply(table, signed({"op": "grant", "tag": "events", "client": "*", "role": "subscribe"}))
    assert ok and table.channels["events"].may_subscribe("console")


# Refusals of well-formed changes the table cannot take.

SMALL = cluster_text(replicas=3, events_qop="cft")


@pytest.mark.parametrize(
    "change, reason, fragment",
    [
        (create("events"), "channel-exists", "exists"),
        (create(**{"class": "gold"}), "unknown-class", "classes: default, fast, slow"),
        (create(qop="paxos"), "unknown-component", "no QoP mode called 'paxos'"),
        (create(voter="psychic"), "unknown-component", "no voter"),
        (create(scheme="rot99"), "unknown-component", "no protection scheme"),
        (create(scheme="pke"), "unfit", "fitbroker init"),
        (create(voter="signature"), "unfit", "signature voter"),
        (create(publishers=["mallory"]), "unknown-client", "mallory"),
        (create(subscribers=["console", "eve"]), "unknown-client", "eve"),
        ({"op": "remove-channel", "tag": "nope"}, "unknown-channel", "nope"),
        ({"op": "set-class", "tag": "nope", "class": "fast"}, "unknown-channel", "nope"),
        ({"op": "set-class", "tag": "events", "class": "fast"}, "no-op", "already"),
        ({"op": "set-class", "tag": "events", "class": "gold"}, "unknown-class", "gold"),
        ({"op": "grant", "tag": "nope", "client": "ops", "role": "publish"}, "unknown-channel", "nope"),
        ({"op": "grant", "tag": "events", "client": "eve", "role": "publish"}, "unknown-client", "eve"),
        ({"op": "grant", "tag": "events", "client": "probe", "role": "publish"}, "no-op", "already"),
        ({"op": "revoke", "tag": "events", "client": "ops", "role": "subscribe"}, "no-op", "not in"),
        ({"op": "revoke", "tag": "nope", "client": "ops", "role": "subscribe"}, "unknown-channel", "nope"),
    ],
)
def test_semantic_refusals(change, reason, fragment):
    """A change the table cannot take is refused with its reason, counted, and changes nothing."""
    table = genesis()
    before = table.snapshot()
    ok, text = apply(table, signed(change))
    assert not ok
    assert text.startswith(f"{reason}: ") and fragment in text, text
    assert table.snapshot() == before and table.version == 0
    assert table.counters[f"refused:{reason}"] == 1 and table.counters["applied"] == 0


def test_bft_channel_refused_where_the_cluster_cannot_run_it():
    """A QoP mode the cluster is too small for is refused, saying why."""
    table = ControlTable.genesis(make_config(SMALL))
    ok, text = apply(table, signed(create(qop="bft")))
    assert not ok and text.startswith("unfit: ") and "3f+1" in text


# Malformed changes.


def _bytes(value):
    return msgpack.packb(value, use_bin_type=True)


GOOD_CREATE = create("made")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"tag": "x"}, "field 'op'"),
        (dict(GOOD_CREATE, op="rename-channel"), "field 'op'"),
        (dict(GOOD_CREATE, op=3), "field 'op'"),
        (dict(GOOD_CREATE, serial=0), "field 'serial'"),
        (dict(GOOD_CREATE, serial=-5), "field 'serial'"),
        (dict(GOOD_CREATE, serial=MAX_SERIAL + 1), "field 'serial'"),
        (dict(GOOD_CREATE, serial="7"), "field 'serial'"),
        (dict(GOOD_CREATE, serial=True), "field 'serial'"),
        (dict(GOOD_CREATE, serial=1.5), "field 'serial'"),
        ({"op": "create-channel", "serial": 1, "class": "slow"}, "missing field(s) 'tag'"),
        ({"op": "create-channel", "serial": 1, "tag": "x"}, "missing field(s) 'class'"),
        ({"op": "set-class", "serial": 1, "tag": "events"}, "missing field(s) 'class'"),
        ({"op": "grant", "serial": 1, "tag": "events", "client": "ops"}, "missing field(s) 'role'"),
        ({"op": "revoke", "serial": 1, "tag": "events", "role": "publish"}, "missing field(s) 'client'"),
        ({"op": "remove-channel", "serial": 1, "tag": "events", "class": "fast"}, "unknown field(s) 'class'"),
        (dict(GOOD_CREATE, serial=1, colour="red"), "unknown field(s) 'colour'"),
        (dict(GOOD_CREATE, serial=1, tag=""), "field 'tag'"),
        (dict(GOOD_CREATE, serial=1, tag=5), "field 'tag'"),
        (dict(GOOD_CREATE, serial=1, tag="has space"), "field 'tag'"),
        (dict(GOOD_CREATE, serial=1, tag="-leading"), "field 'tag'"),
        (dict(GOOD_CREATE, serial=1, tag="x" * 129), "field 'tag'"),
        ({"op": "remove-channel", "serial": 1, "tag": "a\nb"}, "field 'tag'"),
        (dict(GOOD_CREATE, serial=1, **{"class": 3}), "field 'class'"),
        (dict(GOOD_CREATE, serial=1, qop=""), "field 'qop'"),
        (dict(GOOD_CREATE, serial=1, scheme="s" * 65), "field 'scheme'"),
        (dict(GOOD_CREATE, serial=1, voter=["f-plus-one"]), "field 'voter'"),
        (dict(GOOD_CREATE, serial=1, topic=7), "field 'topic'"),
        (dict(GOOD_CREATE, serial=1, topic="t" * 1025), "field 'topic'"),
        (dict(GOOD_CREATE, serial=1, publishers="probe"), "field 'publishers'"),
        (dict(GOOD_CREATE, serial=1, publishers=["probe", 3]), "field 'publishers'"),
        (dict(GOOD_CREATE, serial=1, publishers=[""]), "field 'publishers'"),
        (dict(GOOD_CREATE, serial=1, subscribers=["console", "console"]), "no name twice"),
        (dict(GOOD_CREATE, serial=1, subscribers=[f"c{i}" for i in range(MAX_MEMBERS + 1)]),
         "field 'subscribers'"),
        ({"op": "grant", "serial": 1, "tag": "events", "client": "ops", "role": "admin"}, "field 'role'"),
        ({"op": "grant", "serial": 1, "tag": "events", "client": 9, "role": "publish"}, "field 'client'"),
        ({"op": "grant", "serial": 1, "tag": "events", "client": "", "role": "publish"}, "field 'client'"),
    ],
)
def test_malformed_fields_are_refused(change, fragment):
    """A missing, unknown, mistyped or out-of-bounds field is refused as bad-change, naming it."""
    table = genesis()
    change.setdefault("serial", 1)
    ok, text = apply(table, raw(canonical_pack(change)))
    assert not ok
    assert text.startswith("bad-change: ") and fragment in text, text
    assert table.version == 0 and table.counters["refused:bad-change"] == 1


@pytest.mark.parametrize(
    "change_bytes, fragment",
    [
        (b"\xc1", "not one msgpack value"),
        (_bytes(["op", "remove-channel"]), "expected a map"),
        (_bytes({"tag": "alerts", "op": "remove-channel", "serial": 1}), "canonical"),
        (_bytes({"op": "remove-channel", "serial": 1, "tag": "alerts"}) + b"\x00", "not one msgpack value"),
        (b"\x84" + _bytes("op") + _bytes("grant") + _bytes("op") + _bytes("remove-channel")
         + _bytes("serial") + _bytes(1) + _bytes("tag") + _bytes("alerts"), "canonical"),
        (b"\x83" + _bytes("op") + _bytes("remove-channel") + _bytes("serial")
         + b"\xcf" + (1).to_bytes(8, "big") + _bytes("tag") + _bytes("alerts"), "canonical"),
        (_bytes({b"": 1, "op": "remove-channel"}), "map keys must be strings"),
        (_bytes({"op": "remove-channel", "serial": 1, "tag": b"alerts"}), "not one msgpack value"),
        (b"\xa3\xff\xfe\xfd", "not one msgpack value"),
    ],
)
def test_malformed_encodings_are_refused(change_bytes, fragment):
    """Bytes other than one canonical msgpack map (trailing, duplicate keys, long forms) are refused."""
    table = genesis()
    ok, text = apply(table, raw(change_bytes))
    assert not ok
    assert text.startswith("bad-change: ") and fragment in text, text
    assert table.version == 0


@pytest.mark.parametrize(
    "triple",
    [
        (7, b"\x80", b"s" * 64),
        ("", b"\x80", b"s" * 64),
        ("ops", b"", b"s" * 64),
        ("ops", "text", b"s" * 64),
        ("ops", b"x" * (MAX_CHANGE_BYTES + 1), b"s" * 64),
        ("ops", b"\x80", b"s" * 63),
        ("ops", b"\x80", None),
    ],
)
def test_malformed_envelopes_are_refused(triple):
    """An admin, change or signature of the wrong type or size is refused as malformed before any check."""
    table = genesis()
    ok, text = table.apply(*triple, REPLICA_KEYS.verify_key)
    assert not ok and text.startswith("malformed: ")
    assert table.counters["refused:malformed"] == 1


# Who signed, and when.


def test_change_signed_by_a_non_admin_is_refused():
    """A client that is not in [cluster] admins cannot change the table, even with a valid signature."""
    table = genesis()
    ok, text = apply(table, signed(create(), admin="probe"))
    assert not ok and text.startswith("not-admin: ") and "boss, ops" in text


def test_change_signed_with_the_wrong_key_is_refused():
    """A change claiming an admin but signed with another key (a replica's forgery) is refused."""
    table = genesis()
    ok, text = apply(table, signed(create(), admin="ops", signer="probe"))
    assert not ok and text.startswith("bad-signature: ")
    admin, change_bytes, signature = signed(create())
    ok, text = apply(table, (admin, change_bytes[:-1] + b"\xa1", signature))
    assert not ok and text.startswith("bad-signature: ")
    assert table.version == 0


def test_change_for_another_cluster_is_refused():
    """A signature made for another cluster's name does not verify here."""
    table = genesis()
    ok, text = apply(table, signed(create(), cluster="prod"))
    assert not ok and text.startswith("bad-signature: ") and "'test'" in text


def test_signature_without_the_domain_is_refused():
    """A signature over the bare change bytes (another use of the key) is refused."""
    table = genesis()
    change_bytes = canonical_pack(dict(create(), serial=1))
    ok, text = apply(table, ("ops", change_bytes, SIGNING["ops"].sign(change_bytes)))
    assert not ok and text.startswith("bad-signature: ")


def test_admin_without_verify_key_is_refused():
    """An admin whose verify key the replica lacks is refused as no-key."""
    table = genesis()
    ok, text = table.apply(*signed(create()), lambda name: None)
    assert not ok and text.startswith("no-key: ")


def test_replayed_change_is_refused():
    """The same signed change applied twice, or one with a lower serial, is refused as replayed."""
    table = genesis()
    first = signed(create("one", serial=100))
    assert apply(table, first)[0]
    ok, text = apply(table, first)
    assert not ok and text.startswith("replayed: ") and "100" in text
    ok, _ = apply(table, signed(create("two", serial=50)))
    assert not ok
    assert "two" not in table.channels
    assert apply(table, signed(create("two", serial=50), admin="boss"))[0], "serials are per admin"
    assert table.serials == {"ops": 100, "boss": 50}
    assert table.counters["refused:replayed"] == 2


def test_refused_change_does_not_spend_the_serial():
    """A refused change leaves the admin's last serial as it was, so nothing at all changes."""
    table = genesis()
    ok, _ = apply(table, signed(create("events", serial=10)))
    assert not ok and table.serials == {}
    assert apply(table, signed(create("fresh", serial=5)))[0]


# Determinism, snapshots and diffs.


def _history():
    return [
        signed(create("a", publishers=["probe"], serial=1)),
        signed({"op": "grant", "tag": "a", "client": "console", "role": "subscribe", "serial": 2}),
        signed(create("a", serial=3)),  # refused: exists
        signed({"op": "set-class", "tag": "events", "class": "slow", "serial": 3}, admin="boss"),
        signed({"op": "remove-channel", "tag": "alerts", "serial": 4}),
        signed({"op": "remove-channel", "tag": "alerts", "serial": 4}),  # replayed
        signed(create("b", qop="bft", scheme="ha", serial=5), signer="probe"),  # forged
        signed({"op": "revoke", "tag": "a", "client": "probe", "role": "publish", "serial": 6}),
    ]


def test_tables_fed_the_same_changes_are_equal():
    """Two tables fed the same changes, refused ones included, have equal snapshots and descriptions."""
    history = _history()
    one, two = genesis(), genesis()
    results = [apply(one, t) for t in history]
    assert [apply(two, t) for t in history] == results
    assert [ok for ok, _ in results] == [True, True, False, True, True, False, False, True]
    assert one.snapshot() == two.snapshot() and one == two
    assert one.describe() == two.describe()
    assert one.version == 5


def test_snapshot_does_not_depend_on_the_file_order():
    """Channels listed in another order in the file give the same genesis snapshot."""
    text = cluster_text(channels=("alerts", "events"))
    assert list(make_config(text).channels) == ["alerts", "events"]
    assert ControlTable.genesis(make_config(text)).snapshot() == genesis().snapshot()


def test_restore_gives_an_equal_table():
    """restore(snapshot) equals the table, keeps its serials and goes on identically."""
    table = genesis()
    for triple in _history():
        apply(table, triple)
    copy = ControlTable.restore(table.snapshot(), CONFIG.classes)
    assert copy == table and copy.snapshot() == table.snapshot()
    assert dict(copy.channels) == dict(table.channels)
    assert copy.version == 5 and copy.serials == table.serials
    replay = _history()[1]
    assert apply(copy, replay)[1].startswith("replayed")
    nxt = signed({"op": "grant", "tag": "a", "client": "ops", "role": "publish", "serial": 9})
    assert apply(copy, nxt) == apply(table, nxt)
    assert copy == table


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda s: b"\xc1", "undecodable"),
        (lambda s: _bytes([1, 2]), "expected a map"),
        (lambda s: _bytes(dict(msgpack.unpackb(s), format=2)), "format"),
        (lambda s: _bytes(dict(msgpack.unpackb(s), version=-1)), "version"),
        (lambda s: _bytes(dict(msgpack.unpackb(s), clients=[1])), "clients"),
        (lambda s: canonical_pack(dict(msgpack.unpackb(s), channels=[["x"]])), "8 fields"),
        (lambda s: canonical_pack(dict(msgpack.unpackb(s),
                                       channels=[["x", "x", "gold", "cft", "si", "first-copy", [], []]])),
         "class 'gold'"),
        (lambda s: canonical_pack(dict(msgpack.unpackb(s), admins=["ops", "boss"])), "canonical"),
    ],
)
def test_restore_refuses_what_is_not_a_snapshot(mutate, fragment):
    """Bytes that are not a canonical snapshot, or name a class the file lacks, are refused in one line."""
    with pytest.raises(BadSnapshot) as caught:
        ControlTable.restore(mutate(genesis().snapshot()), CONFIG.classes)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_diff_names_created_removed_and_updated_channels():
    """diff against channels taken before changes lists what a replica must create, drop and update."""
    table = genesis()
    before = table.channels
    assert not table.diff(before)
    apply(table, signed(create("new")))
    apply(table, signed({"op": "remove-channel", "tag": "alerts"}))
    apply(table, signed({"op": "grant", "tag": "events", "client": "ops", "role": "subscribe"}))
    diff = table.diff(before)
    assert isinstance(diff, TableDiff)
    assert [s.tag for s in diff.created] == ["new"]
    assert [s.tag for s in diff.removed] == ["alerts"]
    [(old, new)] = diff.updated
    assert old == CONFIG.channels["events"] and "ops" in new.subscribers
    restored = ControlTable.restore(table.snapshot(), CONFIG.classes)
    assert [s.tag for s in genesis().diff(restored).removed] == ["new"]


def test_check_is_a_dry_run():
    """check says whether apply would accept a change, and changes and counts nothing."""
    table = genesis()
    good = signed(create())
    assert table.check(*good, REPLICA_KEYS.verify_key) is None
    assert table.check(*signed(create("events")), REPLICA_KEYS.verify_key).startswith("channel-exists")
    assert table.version == 0 and table.counters == {"applied": 0}
    assert apply(table, good)[0]


def test_log_values():
    """A ('table', admin, change, signature) value is checked for shape and applies like apply."""
    value = table_value(*signed(create()))
    assert check_value(value) is None and check_value(list(value)) is None
    assert check_value(("batch", "x")).startswith("malformed")
    assert check_value(("table", "ops", b"", b"s" * 64)).startswith("malformed")
    table = genesis()
    assert table.apply_value(value, REPLICA_KEYS.verify_key)[0]
    ok, text = table.apply_value(("table", "ops"), REPLICA_KEYS.verify_key)
    assert not ok and table.counters["refused:malformed"] == 1


def test_describe_is_plain_data_without_counters():
    """describe holds version, admins, classes and channels, and no local counters."""
    table = genesis()
    apply(table, signed(create("a", publishers=["probe", "ops"])))
    apply(table, signed(create("a")))
    info = table.describe()
    assert set(info) == {"cluster", "version", "admins", "classes", "channels"}
    assert info["version"] == 1 and info["admins"] == ["boss", "ops"]
    assert info["channels"]["a"]["publishers"] == ["ops", "probe"]
    assert json.loads(json.dumps(info)) == info


# The administrator's client.


def test_sign_change_serials_increase_and_signatures_verify():
    """sign_change adds a strictly increasing serial and signs the domain-separated bytes."""
    first = next_serial()
    change_bytes, signature = sign_change(ring("ops"), "test", "ops", {"op": "remove-channel", "tag": "a"})
    decoded = msgpack.unpackb(change_bytes)
    assert decoded["serial"] > first and decoded["op"] == "remove-channel"
    VERIFY["ops"].verify(signature, signed_message("test", change_bytes))
    serials = [next_serial() for _ in range(1000)]
    assert serials == sorted(set(serials))
    with pytest.raises(ConfigError, match="no signing key of 'ops'"):
        sign_change(KeyRing("ops"), "test", "ops", {"op": "remove-channel", "tag": "a"})


def test_admin_quorum_is_the_highest_channel_quorum():
    """Changes need 2f+1 replicas when a channel is BFT, f+1 when all are CFT or there are none."""
    assert admin_quorum(CONFIG) == 3
    assert admin_quorum(make_config(cluster_text(events_qop="cft"))) == 2
    assert admin_quorum(make_config(cluster_text(channels=()))) == 2


class FakeReplica:
    """
    A replica as far as the admin and table methods go: applies changes to
    a real control table; C{lie} makes it answer with a wrong version and table.
    """

    def __init__(self, index, lie=False, silent=False):
        self.index = index
        self.table = genesis()
        self.lie = lie
        self.silent = silent
        self.requests = []

    def handle(self, client, request):
        self.requests.append(request)
        if request.method == units.ADMIN:
            ok, text = self.table.apply(
                client, request.options["change"], request.options["signature"],
                REPLICA_KEYS.verify_key,
            )
            if not ok:
                return Reply(request.seq, "refused", text)
            return Reply(request.seq, "ok", info={"version": self.table.version + 40 * self.lie})
        if request.method == units.TABLE:
            info = {"version": self.table.version, "table": self.table.describe()}
            if self.lie:
                info["table"]["channels"]["events"]["subscribers"] = ["probe"]
            return Reply(request.seq, "ok", info=info)
        return Reply(request.seq, "unknown-method", request.method)


class _Transport:
    def __init__(self, proxy, replica):
        self.proxy = proxy
        self.replica = replica
        self.decoder = FrameDecoder()

    def write(self, data):
        for payload in self.decoder.feed(data):
            reply = self.replica.handle(self.proxy.client, decode(payload))
            if self.replica.silent:
                continue
            [answer] = FrameDecoder().feed(encode_reply(reply))
            self.proxy.reply_received(self.replica.index, decode(answer))

    def writeSequence(self, data):
        for d in data:
            self.write(d)


class _Link:
    def __init__(self, proxy, replica):
        self.transport = _Transport(proxy, replica)


def fake_cluster(reactor, client="ops", lie=(), silent=(), config=CONFIG):
    """
    Return a real L{ServiceProxy} linked to four fake replicas (through the
    codec), and the replicas.
    """
    proxy = ServiceProxy(config, client, reactor, endpoints=[None] * 4, timeout=5.0)
    replicas = [FakeReplica(i, lie=i in lie, silent=i in silent) for i in range(4)]
    for replica in replicas:
        proxy.links[replica.index] = _Link(proxy, replica)
    return proxy, replicas


def _result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_administrator_change_reaches_every_replica():
    """change sends one signed admin request to every replica and fires with the version they applied."""
    clock = Clock()
    proxy, replicas = fake_cluster(clock)
    info = _result(Administrator(proxy, ring("ops")).change(create("web", subscribers=["console"])))
    assert info == {"version": 1}
    for replica in replicas:
        [request] = replica.requests
        assert request.method == "admin" and set(request.options) == {"change", "signature"}
        assert replica.table.channels["web"].subscribers == {"console"}


def test_administrator_change_ignores_a_lying_replica():
    """A replica answering ok with another version is outvoted; the quorum's version is what fires."""
    clock = Clock()
    proxy, _ = fake_cluster(clock, lie={0})
    info = _result(Administrator(proxy, ring("ops")).change(create("web")))
    assert info == {"version": 1}


def test_administrator_change_split_versions_time_out():
    """With too few matching versions (two liars, one silent) change fails with NoQuorum."""
    clock = Clock()
    proxy, _ = fake_cluster(clock, lie={0, 1}, silent={3})
    d = Administrator(proxy, ring("ops")).change(create("web"), timeout=2.0)
    clock.advance(10)
    failure = _result(d)
    assert failure.check(NoQuorum) and "disagree" in str(failure.value)


def test_administrator_change_refused_carries_the_reason():
    """When the replicas refuse, change fails with their reason."""
    clock = Clock()
    proxy, _ = fake_cluster(clock)
    failure = _result(Administrator(proxy, ring("ops")).change(create("events")))
    assert failure.check(RequestFailed)
    assert failure.value.status == "refused" and failure.value.text.startswith("channel-exists: ")


def test_administrator_table_needs_f_plus_one_identical_answers():
    """table fires with the table f+1 replicas answered identically, not a liar's."""
    clock = Clock()
    proxy, _ = fake_cluster(clock, lie={0})
    info = _result(Administrator(proxy, ring("console")).table())
    assert info["version"] == 0
    assert list(info["table"]["channels"]["events"]["subscribers"]) == ["console"]


# The command line.


def test_admin_argument_parsing():
    """Each admin action parses into the change it signs, with --as choosing the client."""
    parse = cli._parser().parse_args
    args = parse(["admin", "create-channel", "web", "--class", "fast", "--qop", "bft", "--scheme", "pks",
                  "--voter", "signature", "--topic", "Web logs", "--publishers", "probe, ops",
                  "--subscribers", "console", "--as", "boss"])
    assert args.client == "boss"
    assert cli.admin_change(args) == {
        "op": "create-channel", "tag": "web", "class": "fast", "qop": "bft", "scheme": "pks",
        "voter": "signature", "topic": "Web logs", "publishers": ["probe", "ops"],
        "subscribers": ["console"],
    }
    assert cli.admin_change(parse(["admin", "create-channel", "w", "--class", "c"])) == {
        "op": "create-channel", "tag": "w", "class": "c", "publishers": [], "subscribers": []
    }
    assert cli.admin_change(parse(["admin", "remove-channel", "w"])) == {"op": "remove-channel", "tag": "w"}
    assert cli.admin_change(parse(["admin", "set-class", "w", "slow"])) == {
        "op": "set-class", "tag": "w", "class": "slow"
    }
    assert cli.admin_change(parse(["admin", "grant", "w", "console", "--subscribe"])) == {
        "op": "grant", "tag": "w", "client": "console", "role": "subscribe"
    }
    assert cli.admin_change(parse(["admin", "revoke", "w", "probe", "--publish"]))["role"] == "publish"
    assert cli.admin_change(parse(["admin", "table", "--json"])) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["admin"],
        ["admin", "grant", "w", "c"],
        ["admin", "grant", "w", "c", "--publish", "--subscribe"],
        ["admin", "create-channel", "w"],
        ["admin", "set-class", "w"],
        ["admin", "rename", "w"],
    ],
)
def test_admin_argument_mistakes(argv, capsys):
    """Missing or conflicting arguments stop argparse with a usage error, not a traceback."""
    with pytest.raises(SystemExit) as caught:
        cli._parser().parse_args(argv)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def install_fake_cluster(reactor, lie=()):
    """
    Make `fitbroker admin` talk to fake replicas: replaces how the command
    connects (used in-process and by the child processes below).
    """
    async def session(reactor_, config, client, signing):
        proxy, replicas = fake_cluster(reactor, client=client, lie=lie, config=config)
        return proxy, ring(client) if signing else None, lambda: None

    cli._admin_session = session


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER)
    return str(path)


def _run_in_process(argv, monkeypatch, capsys):
    from twisted.internet.defer import Deferred

    clock = Clock()
    monkeypatch.setattr(cli, "_admin_session", None)
    install_fake_cluster(clock)
    args = cli._parser().parse_args(argv)
    result = _result(Deferred.fromCoroutine(args.run(clock, args)))
    return result, capsys.readouterr()


def test_admin_change_prints_the_new_version(config_file, monkeypatch, capsys):
    """A change the replicas apply prints one line with the new version."""
    result, out = _run_in_process(
        ["admin", "grant", "events", "ops", "--subscribe", "--config", config_file], monkeypatch, capsys
    )
    assert result is None
    assert out.out == "ops may subscribe to events: control table version 1\n"


def test_admin_table_prints_the_agreed_table(config_file, monkeypatch, capsys):
    """admin table prints the version and one row per channel, or the JSON with --json."""
    _, out = _run_in_process(["admin", "table", "--config", config_file], monkeypatch, capsys)
    lines = out.out.splitlines()
    assert lines[0] == "control table of cluster test, version 0 (administrators: boss, ops)"
    assert lines[1].split() == ["CHANNEL", "CLASS", "QOP", "SCHEME", "VOTER", "PUBLISHERS", "SUBSCRIBERS"]
    assert lines[2].split() == ["alerts", "default", "cft", "si", "first-copy", "*", "console"]
    assert lines[3].split() == ["events", "fast", "bft", "si", "f-plus-one", "probe", "console"]
    _, out = _run_in_process(["admin", "table", "--json", "--config", config_file], monkeypatch, capsys)
    assert json.loads(out.out)["table"]["channels"]["events"]["class"] == "fast"


def test_admin_refusal_is_a_command_error(config_file, monkeypatch, capsys):
    """A refused change becomes one CommandError line holding the replicas' reason."""
    result, _ = _run_in_process(
        ["admin", "set-class", "events", "gold", "--config", config_file], monkeypatch, capsys
    )
    assert isinstance(result.value, cli.CommandError)
    text = str(result.value)
    assert text.startswith("the replicas refused the change: unknown-class: no class 'gold'")
    assert "\n" not in text


def test_admin_change_by_a_non_admin_is_stopped_before_sending(config_file, monkeypatch, capsys):
    """A client outside [cluster] admins is told so without contacting the cluster."""
    result, _ = _run_in_process(
        ["admin", "remove-channel", "events", "--as", "probe", "--config", config_file], monkeypatch, capsys
    )
    assert isinstance(result.value, cli.CommandError) and "not an administrator" in str(result.value)


def test_admin_change_without_keys_folder_says_so(config_file):
    """Without a keys folder, a change stops with one line naming keys_dir."""
    from twisted.internet.defer import Deferred

    args = cli._parser().parse_args(["admin", "remove-channel", "events", "--config", config_file])
    result = _result(Deferred.fromCoroutine(args.run(Clock(), args)))
    assert isinstance(result.value, cli.CommandError) and "keys_dir" in str(result.value)


CHILD = """
import sys
from twisted.internet import reactor
from fit_broker.cli import main
from tests.test_control_table import install_fake_cluster
install_fake_cluster(reactor)
sys.exit(main(sys.argv[1:]))
"""


def fitbroker_admin(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", CHILD, "admin", *argv], cwd=ROOT, capture_output=True, timeout=60, env=env
    )


def test_admin_command_exit_status_and_output(config_file):
    """The command exits 0 with one line on success, and 1 with one line and no traceback on refusal."""
    done = fitbroker_admin("create-channel", "web", "--class", "slow", "--subscribers", "console",
                           "--config", config_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "created channel web: control table version 1\n"
    refused = fitbroker_admin("create-channel", "web", "--class", "slow", "--scheme", "pke",
                              "--config", config_file)
    assert refused.returncode == 1
    err = refused.stderr.decode()
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("fitbroker: the replicas refused the change: unfit: ")
    assert "fitbroker init" in line
