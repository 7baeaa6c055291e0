"""
The protection schemes against their contract: round trips, every kind of
tampering refused with its reason, hostile input never raising, and the
registry finding schemes by name, drop-ins included.
"""

import os
import random
import shutil
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from fit_broker import plugins
from fit_broker.errors import ConfigError, UnknownComponent
from fit_broker.interfaces import IKeyRing, IProtectionScheme
from fit_broker.keys import KeyRing, generate_keyrings
from fit_broker.schemes import registry
from fit_broker.schemes.pke import OpenFailed
from fit_broker.schemes.pks import PublisherSignatures
from fit_broker.units import BATCH_FIELDS, PAYLOAD, PROOF, pack_contents, payload_count

CHANNEL = "alerts"
REPLICAS = 4
PLUGINS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins")
REASONS = {"no-key", "malformed", "wrong-publisher", "bad-mac", "bad-proof", "bad-signature"}


@pytest.fixture(scope="module")
def rings():
    """Key rings of a 4-replica cluster with a publisher, a subscriber and an intruder."""
    made = generate_keyrings(
        REPLICAS,
        ["probe", "console", "mallory"],
        {CHANNEL: ["probe", "console", "mallory"], "other": ["probe", "console"]},
    )
    mallory = made["mallory"]
    # Mallory's own secrets under the probe's name: a signature or MAC by the wrong key.
    made["forger"] = KeyRing(
        identity="probe",
        mac_keys={("probe", r): mallory.mac_key("mallory", r) for r in range(REPLICAS)},
        signing_keys={"probe": mallory.signing_key("mallory")},
        verify_keys=dict(mallory.verify_keys),
        channel_keys=dict(mallory.channel_keys),
    )
    return made


def contents_of(n=5, seed=0):
    rnd = random.Random(seed)
    return [b"event %d " % i + rnd.randbytes(40) for i in range(n)]


def make_batch(publisher="probe", first_id=1, n=5, seed=0):
    """A wire batch as a publisher seals it, before protection."""
    return (publisher, first_id, 1_700_000_000.5, 60.0, 2, pack_contents(contents_of(n, seed)), b"")


def replace_field(batch, index, value):
    return batch[:index] + (value,) + batch[index + 1 :]


def flip(data, position):
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


class SchemeContract:
    """
    What every protection scheme promises.  Subclasses name the scheme and
    the reason each tampering gets from a replica (C{batch_reasons}) and
    from a subscriber (C{delivered_reasons}); C{None} means the scheme
    leaves that case to the voter or to the connection's identity.
    """

    name = None
    batch_reasons = {}
    delivered_reasons = {}

    @pytest.fixture
    def scheme(self):
        return registry.find_scheme(self.name)

    def replicas(self, scheme, rings, batch, publisher="probe", channel=CHANNEL):
        """Return the set of verdicts of every replica."""
        return {
            scheme.check_batch(rings[f"replica-{r}"], channel, publisher, batch)
            for r in range(REPLICAS)
        }

    def subscriber(self, scheme, rings, batch, channel=CHANNEL):
        return scheme.check_delivered(rings["console"], channel, batch)

    def refused(self, scheme, rings, batch, case, channel=CHANNEL):
        """Check what replicas and the subscriber say of a tampered batch."""
        assert self.replicas(scheme, rings, batch, channel=channel) == {self.batch_reasons[case]}
        assert self.subscriber(scheme, rings, batch, channel) == self.delivered_reasons[case]

    def protected(self, scheme, rings, **kwargs):
        """Protect a batch and check it passes untouched, which also warms any cache."""
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch(**kwargs))
        assert self.replicas(scheme, rings, batch) == {None}
        assert self.subscriber(scheme, rings, batch) is None
        return batch

    def test_provides_interface(self, scheme):
        """The scheme is a plugin providing IProtectionScheme under its name."""
        assert verifyObject(IProtectionScheme, scheme)
        assert scheme.name == self.name
        assert isinstance(scheme.subscriber_verifiable, bool)

    def test_found_by_name(self, scheme):
        """The registry finds the module-level instance by the scheme's name."""
        module = sys.modules[f"fit_broker.schemes.{self.name}"]
        assert getattr(module, self.name) is scheme
        assert registry.available_schemes()[self.name] is scheme

    def test_round_trip(self, scheme, rings):
        """Every replica and the subscriber accept a protected batch, and the subscriber opens it."""
        original = make_batch()
        batch = scheme.protect(rings["probe"], CHANNEL, original)
        assert len(batch) == len(BATCH_FIELDS)
        assert batch[:PAYLOAD] == original[:PAYLOAD]
        assert isinstance(batch[PAYLOAD], bytes) and isinstance(batch[PROOF], bytes)
        assert self.replicas(scheme, rings, batch) == {None}
        assert self.subscriber(scheme, rings, batch) is None
        assert scheme.open(rings["console"], CHANNEL, batch) == contents_of()

    def test_tampered_payload(self, scheme, rings):
        """A changed payload is refused."""
        batch = self.protected(scheme, rings)
        payload = batch[PAYLOAD]
        self.refused(scheme, rings, replace_field(batch, PAYLOAD, flip(payload, len(payload) - 3)), "payload")

    @pytest.mark.parametrize(
        "index, value",
        [(0, "console"), (1, 2), (2, 1_700_000_001.5), (3, 120.0), (4, 3)],
        ids=["publisher", "first_id", "timestamp", "ttl", "urgency"],
    )
    def test_tampered_field(self, scheme, rings, index, value):
        """Every field but the proof is covered: changing one is refused, even the publisher's name with a connection under that name."""
        batch = self.protected(scheme, rings)
        case = "field" if index else "publisher"
        tampered = replace_field(batch, index, value)
        assert self.replicas(scheme, rings, tampered, publisher=tampered[0]) == {
            self.batch_reasons[case]
        }
        assert self.subscriber(scheme, rings, tampered) == self.delivered_reasons[case]

    def test_int_timestamp_equals_float(self, scheme, rings):
        """A codec that turns 60.0 into 60 changes no verdict."""
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        same = replace_field(batch, 3, 60)
        assert self.replicas(scheme, rings, same) == {None}
        assert self.subscriber(scheme, rings, same) is None

    def test_wrong_key(self, scheme, rings):
        """A batch protected with another party's keys under the probe's name is refused."""
        batch = scheme.protect(rings["forger"], CHANNEL, make_batch())
        self.refused(scheme, rings, batch, "wrong-key")

    def test_proof_from_another_batch(self, scheme, rings):
        """A proof taken from another batch does not fit."""
        batch = self.protected(scheme, rings)
        other = self.protected(scheme, rings, first_id=100, seed=1)
        self.refused(scheme, rings, replace_field(batch, PROOF, other[PROOF]), "other-batch")

    def test_other_channel(self, scheme, rings):
        """A batch replayed on another channel is refused."""
        batch = self.protected(scheme, rings)
        self.refused(scheme, rings, batch, "channel", channel="other")

    def test_wrong_publisher(self, scheme, rings):
        """A replica refuses a batch naming another publisher than the connection's."""
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        assert self.replicas(scheme, rings, batch, publisher="console") == {
            self.batch_reasons["wrong-publisher"]
        }

    def test_no_key(self, scheme, rings):
        """A party without the publisher's key cannot accept its batches."""
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        bare_replica = KeyRing(identity="replica-0", replica_index=0)
        bare_client = KeyRing(identity="console")
        assert verifyObject(IKeyRing, bare_replica)
        assert scheme.check_batch(bare_replica, CHANNEL, "probe", batch) == self.batch_reasons["no-key"]
        assert scheme.check_delivered(bare_client, CHANNEL, batch) == self.delivered_reasons["no-key"]

    def test_malformed_proof(self, scheme, rings):
        """A proof cut short is a reason, not an exception."""
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        self.refused(scheme, rings, replace_field(batch, PROOF, batch[PROOF][:7]), "malformed")

    def test_every_proof_byte_matters(self, scheme, rings):
        """Flipping any byte of the proof is refused by some replica (by the subscriber too, when it can check), even after the genuine batch verified."""
        batch = self.protected(scheme, rings)
        for i in range(len(batch[PROOF])):
            flipped = replace_field(batch, PROOF, flip(batch[PROOF], i))
            verdicts = self.replicas(scheme, rings, flipped)
            assert verdicts - {None} and verdicts <= REASONS | {None}, i
            if self.delivered_reasons["payload"] is not None:
                assert self.subscriber(scheme, rings, flipped) in REASONS

    @settings(
        max_examples=150,
        deadline=None,
        # One mixin method runs under several classes; each run depends on its fixtures only.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(
        proof=st.one_of(st.binary(max_size=300), st.none(), st.integers(), st.text()),
        field=st.sampled_from([0, 1, 2, 3, 4, 5]),
        value=st.one_of(
            st.none(), st.text(), st.integers(), st.floats(), st.binary(), st.lists(st.integers())
        ),
        shape=st.sampled_from(["batch", "short", "long"]),
    )
    def test_hostile_input_never_raises(self, scheme, rings, proof, field, value, shape):
        """Any bytes or values from a peer give None or a reason string, never an exception."""
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        hostile = replace_field(replace_field(batch, PROOF, proof), field, value)
        if shape == "short":
            hostile = hostile[:4]
        elif shape == "long":
            hostile = hostile + (b"extra",)
        assert scheme.check_delivered(rings["console"], CHANNEL, hostile) in (None, *REASONS)
        reason = scheme.check_batch(rings["replica-1"], CHANNEL, "probe", hostile)
        assert reason in (None, *REASONS)


CASES = (
    "payload",
    "field",
    "publisher",
    "wrong-key",
    "other-batch",
    "channel",
    "wrong-publisher",
    "no-key",
    "malformed",
)


def _reasons(default, **exceptions):
    table = dict.fromkeys(CASES, default)
    table.update({case.replace("_", "-"): reason for case, reason in exceptions.items()})
    return table


class TestSimpleIdentification(SchemeContract):
    """SI attaches nothing: replicas trust the connection, subscribers the voter."""

    name = "si"
    batch_reasons = _reasons(None)
    delivered_reasons = _reasons(None)


class TestHashAuthenticators(SchemeContract):
    """HA: each replica checks its own MAC; subscribers rely on the voter."""

    name = "ha"
    batch_reasons = _reasons(
        "bad-proof",
        wrong_key="bad-mac",
        wrong_publisher="wrong-publisher",
        no_key="no-key",
        malformed="malformed",
    )
    delivered_reasons = _reasons(None)

    def test_one_tag_per_replica(self, rings):
        """The proof is the digest and one 32-byte tag per replica, whatever the batch holds."""
        scheme = registry.find_scheme("ha")
        for n in (1, 100):
            batch = scheme.protect(rings["probe"], CHANNEL, make_batch(n=n))
            assert len(batch[PROOF]) == 1 + 32 + 32 * REPLICAS

    def test_replica_checks_only_its_own_tag(self, rings):
        """Corrupting replica 2's tag is refused by replica 2 alone."""
        scheme = registry.find_scheme("ha")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        proof = batch[PROOF]
        start = 33 + 2 * 32
        bad = replace_field(batch, PROOF, proof[:start] + bytes(32) + proof[start + 32 :])
        verdicts = [
            scheme.check_batch(rings[f"replica-{r}"], CHANNEL, "probe", bad) for r in range(REPLICAS)
        ]
        assert verdicts == [None, None, "bad-mac", None]

    def test_digest_recomputed_with_forged_tags(self, rings):
        """A batch altered along with its digest still fails on the MAC."""
        scheme = registry.find_scheme("ha")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        altered = scheme.protect(rings["forger"], CHANNEL, replace_field(batch, 4, 0))
        assert scheme.check_batch(rings["replica-0"], CHANNEL, "probe", altered) == "bad-mac"

    def test_client_key_ring_cannot_check(self, rings):
        """A key ring without a replica index has no tag to check."""
        scheme = registry.find_scheme("ha")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        assert scheme.check_batch(rings["console"], CHANNEL, "probe", batch) == "no-key"

    def test_publisher_without_keys(self):
        """Protecting without MAC keys is a configuration error, said plainly."""
        with pytest.raises(ConfigError, match="no MAC keys"):
            registry.find_scheme("ha").protect(KeyRing(identity="probe"), CHANNEL, make_batch())


class SignedContract(SchemeContract):
    """PKS and PKE: every batch verifies on its own, at replicas and subscribers."""

    batch_reasons = _reasons(
        "bad-proof",
        wrong_key="bad-signature",
        wrong_publisher="wrong-publisher",
        no_key="no-key",
        malformed="malformed",
    )
    # A subscriber has no connection to compare the publisher with.
    delivered_reasons = dict(batch_reasons, **{"wrong-publisher": None})

    def test_subscriber_verifiable(self, scheme):
        """A signature scheme lets a voter trust one verified copy."""
        assert scheme.subscriber_verifiable is True

    def test_one_signature_per_batch(self, rings):
        """Protecting signs once; copies of one batch from every replica cost one verification."""
        scheme = type(registry.find_scheme(self.name))()
        signer = _Counting(rings["probe"].signing_key("probe"), "sign")
        publisher = KeyRing(
            identity="probe",
            signing_keys={"probe": signer},
            channel_keys=dict(rings["probe"].channel_keys),
        )
        batch = scheme.protect(publisher, CHANNEL, make_batch(n=100))
        assert signer.calls == 1
        verifier = _Counting(rings["console"].verify_key("probe"), "verify")
        subscriber = KeyRing(
            identity="console",
            verify_keys={"probe": verifier},
            channel_keys=dict(rings["console"].channel_keys),
        )
        for _ in range(REPLICAS):
            assert scheme.check_delivered(subscriber, CHANNEL, batch) is None
        assert verifier.calls == 1
        forged = replace_field(batch, PROOF, batch[PROOF][:-1] + bytes([batch[PROOF][-1] ^ 1]))
        assert scheme.check_delivered(subscriber, CHANNEL, forged) == "bad-signature"
        assert verifier.calls == 2

    def test_cache_is_bounded(self, rings):
        """The memory of verified digests stays within its bound."""
        scheme = type(registry.find_scheme(self.name))(cache_size=16)
        for first_id in range(50):
            batch = scheme.protect(rings["probe"], CHANNEL, make_batch(first_id=first_id))
            assert scheme.check_delivered(rings["console"], CHANNEL, batch) is None
            assert len(scheme._verified) <= 16

    def test_cache_is_per_verify_key(self, rings):
        """A digest verified under one cluster's key does not vouch under another key of the same name."""
        scheme = type(registry.find_scheme(self.name))()
        other = generate_keyrings(1, ["probe", "console"], {CHANNEL: ["probe", "console"]})
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        assert scheme.check_delivered(rings["console"], CHANNEL, batch) is None
        assert scheme.check_delivered(other["console"], CHANNEL, batch) == "bad-signature"

    def test_publisher_without_signing_key(self, rings):
        """Protecting without a signing key is a configuration error, said plainly."""
        with pytest.raises(ConfigError, match="no signing key"):
            registry.find_scheme(self.name).protect(KeyRing(identity="probe"), CHANNEL, make_batch())


class _Counting:
    """
    Wraps a key and counts the calls of one of its methods.
    """

    def __init__(self, key, method):
        self.key = key
        self.calls = 0
        self.method = method

    def __getattr__(self, name):
        attribute = getattr(self.key, name)
        if name == self.method:

            def counted(*args):
                self.calls += 1
                return attribute(*args)

            return counted
        return attribute


class TestPublisherSignatures(SignedContract):
    """PKS: a signature per batch, payload in clear."""

    name = "pks"

    def test_payload_in_clear(self, rings):
        """PKS leaves the payload as the publisher packed it."""
        original = make_batch()
        batch = registry.find_scheme("pks").protect(rings["probe"], CHANNEL, original)
        assert batch[PAYLOAD] == original[PAYLOAD]
        assert len(batch[PROOF]) == 1 + 32 + 64


class TestPublisherSignaturesEncrypted(SignedContract):
    """PKE: PKS over a payload encrypted with the channel key."""

    name = "pke"

    def test_replicas_route_ciphertext(self, rings):
        """Replicas verify batches they cannot read, and cannot open them."""
        scheme = registry.find_scheme("pke")
        original = make_batch()
        batch = scheme.protect(rings["probe"], CHANNEL, original)
        assert b"event 1 " not in batch[PAYLOAD]
        assert len(batch[PAYLOAD]) == len(original[PAYLOAD]) + 12 + 16
        assert payload_count(batch[PAYLOAD]) == 5
        assert rings["replica-0"].channel_key(CHANNEL) is None
        assert scheme.check_batch(rings["replica-0"], CHANNEL, "probe", batch) is None
        with pytest.raises(OpenFailed) as failure:
            scheme.open(rings["replica-0"], CHANNEL, batch)
        assert failure.value.reason == "no-key"

    def test_wrong_channel_key(self, rings):
        """A payload does not open with another channel's key, and the failure is a ValueError."""
        scheme = registry.find_scheme("pke")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        wrong = KeyRing(identity="console", channel_keys={CHANNEL: rings["probe"].channel_key("other")})
        with pytest.raises(ValueError) as failure:
            scheme.open(wrong, CHANNEL, batch)
        assert failure.value.reason == "bad-ciphertext"
        assert "does not decrypt" in str(failure.value)

    @pytest.mark.parametrize("index, value", [(1, 2), (2, 0.0), (3, 1.0), (4, 0)])
    def test_ciphertext_bound_to_its_batch(self, rings, index, value):
        """A ciphertext under another batch header does not open, even without the signature check."""
        scheme = registry.find_scheme("pke")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
        with pytest.raises(OpenFailed) as failure:
            scheme.open(rings["console"], CHANNEL, replace_field(batch, index, value))
        assert failure.value.reason == "bad-ciphertext"
        with pytest.raises(OpenFailed) as failure:
            scheme.open(rings["console"], "other", batch)
        assert failure.value.reason == "bad-ciphertext"

    def test_malformed_payload(self, rings):
        """A payload too short to hold a nonce and a tag is malformed."""
        scheme = registry.find_scheme("pke")
        batch = replace_field(make_batch(), PAYLOAD, b"short")
        with pytest.raises(OpenFailed) as failure:
            scheme.open(rings["console"], CHANNEL, batch)
        assert failure.value.reason == "malformed"

    @pytest.mark.parametrize("n", [1, 15, 16, 1000])
    def test_replicas_count_events(self, rings, n):
        """The array header stays in clear, so replicas count a batch's events without the key."""
        scheme = registry.find_scheme("pke")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch(n=n))
        assert payload_count(batch[PAYLOAD]) == n
        assert scheme.open(rings["console"], CHANNEL, batch) == contents_of(n)

    def test_count_bound_to_ciphertext(self, rings):
        """A batch whose clear header claims another count neither verifies nor opens."""
        scheme = registry.find_scheme("pke")
        batch = scheme.protect(rings["probe"], CHANNEL, make_batch(n=5))
        recounted = replace_field(batch, PAYLOAD, b"\x94" + batch[PAYLOAD][1:])
        assert scheme.check_delivered(rings["console"], CHANNEL, recounted) == "bad-proof"
        with pytest.raises(OpenFailed) as failure:
            scheme.open(rings["console"], CHANNEL, recounted)
        assert failure.value.reason == "bad-ciphertext"

    def test_nonces_unique(self, rings):
        """No two batches share a nonce."""
        scheme = registry.find_scheme("pke")
        nonces = {scheme.protect(rings["probe"], CHANNEL, make_batch())[PAYLOAD][1:13] for _ in range(200)}
        assert len(nonces) == 200

    def test_payload_must_be_packed_contents(self, rings):
        """A publisher that passes a payload other than packed contents is told so."""
        with pytest.raises(ValueError, match="packed array"):
            registry.find_scheme("pke").protect(
                rings["probe"], CHANNEL, replace_field(make_batch(), PAYLOAD, b"raw bytes")
            )

    def test_publisher_without_channel_key(self, rings):
        """Protecting on a channel the publisher has no key for is a configuration error."""
        publisher = KeyRing(identity="probe", signing_keys=dict(rings["probe"].signing_keys))
        with pytest.raises(ConfigError, match="no key for channel"):
            registry.find_scheme("pke").protect(publisher, CHANNEL, make_batch())


# The registry.


def test_registry_finds_builtins():
    """The four built-in schemes are found by name."""
    found = registry.available_schemes()
    assert {"si", "ha", "pks", "pke"} <= set(found)
    for name in ("si", "ha", "pks", "pke"):
        assert registry.find_scheme(name).name == name


def test_unknown_scheme_lists_available():
    """An unknown name stops with a message listing the names that exist."""
    with pytest.raises(UnknownComponent) as failure:
        registry.find_scheme("rot26")
    message = str(failure.value)
    assert "'rot26'" in message
    assert "available: " in message
    for name in ("ha", "pke", "pks", "si"):
        assert name in message.split("available: ")[1].split(", ")


@pytest.fixture
def builtin_schemes_only(monkeypatch):
    """Search the built-in plugin package only, and forget drop-in modules, for this test."""
    monkeypatch.setattr(plugins, "__path__", [os.path.dirname(plugins.__file__)])
    monkeypatch.delitem(sys.modules, "fit_broker.plugins.example_scheme", raising=False)
    yield
    sys.modules.pop("fit_broker.plugins.example_scheme", None)


def test_drop_in_scheme(tmp_path, builtin_schemes_only, rings):
    """The example scheme, dropped into a folder added with add_plugin_folder, is found by name and works."""
    with pytest.raises(UnknownComponent):
        registry.find_scheme("rot13-demo")
    shutil.copy(os.path.join(PLUGINS_DIR, "example_scheme.py"), tmp_path / "example_scheme.py")
    registry.add_plugin_folder(str(tmp_path))
    scheme = registry.find_scheme("rot13-demo")
    assert verifyObject(IProtectionScheme, scheme)
    assert scheme.subscriber_verifiable is False
    assert "rot13-demo" in registry.available_schemes()

    batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
    assert batch[PAYLOAD] != make_batch()[PAYLOAD]
    assert scheme.check_batch(rings["replica-0"], CHANNEL, "probe", batch) is None
    assert scheme.open(rings["console"], CHANNEL, batch) == contents_of()
    corrupted = replace_field(batch, PAYLOAD, flip(batch[PAYLOAD], 10))
    assert scheme.check_batch(rings["replica-0"], CHANNEL, "probe", corrupted) == "bad-checksum"
    assert scheme.check_batch(rings["replica-0"], CHANNEL, "console", batch) == "wrong-publisher"


def test_missing_plugin_folder(builtin_schemes_only, tmp_path):
    """Adding a folder that does not exist is refused with its path."""
    with pytest.raises(UnknownComponent, match="does not exist"):
        registry.add_plugin_folder(str(tmp_path / "nowhere"))


def test_verified_digests_need_same_signature(rings):
    """A remembered digest vouches only for the same signature bytes: verdicts never depend on history."""
    scheme = PublisherSignatures()
    batch = scheme.protect(rings["probe"], CHANNEL, make_batch())
    assert scheme.check_delivered(rings["console"], CHANNEL, batch) is None
    resigned = scheme.protect(rings["forger"], CHANNEL, make_batch())
    assert resigned[PROOF][:33] == batch[PROOF][:33]
    assert scheme.check_delivered(rings["console"], CHANNEL, resigned) == "bad-signature"
