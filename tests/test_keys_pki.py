"""
Cluster key material: what the PKI writes, with which modes, what each
party's key ring holds, and the errors a missing or broken file gives.
"""

import datetime
import json
import os
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from zope.interface.verify import verifyObject

from fit_broker import keys, pki
from fit_broker.errors import ConfigError
from fit_broker.interfaces import IKeyRing
from fit_broker.schemes.registry import find_scheme
from fit_broker.units import pack_contents

CLUSTER = "test.example"
CLIENTS = ["probe", "console", "syslog"]
CHANNELS = {"alerts": ["probe", "console"], "secrets": ["console"], "syslog": ["syslog", "console"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A cluster of 4 replicas written once for the module's read-only tests."""
    directory = str(tmp_path_factory.mktemp("cluster") / "keys")
    pki.write_cluster_material(directory, CLUSTER, 4, CLIENTS, CHANNELS)
    return directory


@pytest.fixture
def scratch(tmp_path):
    """A cluster of 2 replicas this test may break."""
    directory = str(tmp_path / "keys")
    pki.write_cluster_material(directory, CLUSTER, 2, ["probe", "console"], {"alerts": ["probe"]})
    return directory


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_layout_and_modes(cluster):
    """Every party has its directory; secrets are 0600, public files 0644, directories 0700."""
    assert mode(cluster) == 0o700
    assert mode(os.path.join(cluster, "ca.key")) == 0o600
    assert mode(os.path.join(cluster, "ca.crt")) == 0o644
    manifest = pki.load_manifest(cluster)
    assert manifest == {
        "cluster": CLUSTER,
        "replicas": 4,
        "clients": CLIENTS,
        "channels": {k: sorted(v) for k, v in CHANNELS.items()},
    }
    for r in range(4):
        party = os.path.join(cluster, "replicas", f"replica-{r}")
        assert mode(party) == 0o700
        assert sorted(os.listdir(party)) == [
            "ca.crt",
            "mac-keys.json",
            "party.json",
            "tls.crt",
            "tls.key",
            "verify-keys.json",
        ]
        assert mode(os.path.join(party, "tls.key")) == 0o600
        assert mode(os.path.join(party, "mac-keys.json")) == 0o600
        assert mode(os.path.join(party, "verify-keys.json")) == 0o644
    for name in CLIENTS:
        party = os.path.join(cluster, "clients", name)
        assert sorted(os.listdir(party)) == [
            "ca.crt",
            "channel-keys.json",
            "mac-keys.json",
            "party.json",
            "signing.key",
            "tls.crt",
            "tls.key",
            "verify-keys.json",
        ]
        for secret in ("tls.key", "mac-keys.json", "signing.key", "channel-keys.json"):
            assert mode(os.path.join(party, secret)) == 0o600, secret


def test_replica_key_ring(cluster):
    """A replica holds a MAC key with every publisher, every verify key, and no signing or channel key."""
    ring = keys.load_keyring(cluster, "replica-2")
    assert verifyObject(IKeyRing, ring)
    assert ring.identity == "replica-2" and ring.replica_index == 2
    assert set(ring.mac_keys) == {(name, 2) for name in CLIENTS}
    assert set(ring.verify_keys) == set(CLIENTS)
    assert ring.signing_keys == {} and ring.channel_keys == {}
    assert ring.mac_key("probe", 1) is None


def test_client_key_ring(cluster):
    """A client holds its MAC keys with every replica, its signing key, and only its channels' keys."""
    probe = keys.load_keyring(cluster, "probe")
    console = keys.load_keyring(cluster, "console")
    assert probe.replica_index is None
    assert set(probe.mac_keys) == {("probe", r) for r in range(4)}
    assert set(probe.signing_keys) == {"probe"} and probe.signing_key("console") is None
    assert set(probe.channel_keys) == {"alerts"}
    assert set(console.channel_keys) == {"alerts", "secrets", "syslog"}
    assert probe.channel_key("alerts") == console.channel_key("alerts")
    replica = keys.load_keyring(cluster, "replica-3")
    assert probe.mac_key("probe", 3) == replica.mac_key("probe", 3)
    assert probe.mac_key("probe", 2) != replica.mac_key("probe", 3)
    signed = probe.signing_key("probe").sign(b"message")
    replica.verify_key("probe").verify(signed, b"message")


def test_repr_hides_secrets(cluster):
    """A key ring can be logged: its repr counts keys and shows none."""
    ring = keys.load_keyring(cluster, "probe")
    text = repr(ring)
    assert "probe" in text and "<4 keys>" in text
    for key in ring.mac_keys.values():
        assert repr(key)[2:20] not in text


@pytest.mark.parametrize("name", ["ha", "pks", "pke"])
def test_loaded_keys_work_with_schemes(cluster, name):
    """Key rings read from disk protect at the probe, check at every replica, and open at the console."""
    scheme = find_scheme(name)
    probe = keys.load_keyring(cluster, "probe")
    console = keys.load_keyring(cluster, "console")
    contents = [b"disk full %d" % i for i in range(10)]
    batch = scheme.protect(probe, "alerts", ("probe", 1, 1.0e9, 30.0, 0, pack_contents(contents), b""))
    for r in range(4):
        ring = keys.load_keyring(cluster, f"replica-{r}")
        assert scheme.check_batch(ring, "alerts", "probe", batch) is None
    assert scheme.check_delivered(console, "alerts", batch) is None
    assert scheme.open(console, "alerts", batch) == contents


def test_party_directory_copied_alone(cluster, tmp_path):
    """A party's directory copied to its host loads on its own."""
    copy = tmp_path / "etc-fitbroker"
    shutil.copytree(os.path.join(cluster, "clients", "probe"), copy)
    ring = keys.load_keyring(str(copy), "probe")
    assert set(ring.mac_keys) == {("probe", r) for r in range(4)}
    material = pki.load_tls_material(str(copy), "probe")
    assert pki.identity_from_certificate(material.cert_pem) == "probe"


def test_identity_mismatch(cluster):
    """Loading a party's directory under another identity is refused, naming both."""
    with pytest.raises(ConfigError, match="identity is 'probe', expected 'console'"):
        keys.load_keyring(os.path.join(cluster, "clients", "probe"), "console")


def test_unknown_party(cluster):
    """A party with no directory is named in the error."""
    with pytest.raises(ConfigError, match=r"clients/nobody: missing"):
        keys.load_keyring(cluster, "nobody")
    with pytest.raises(ConfigError, match=r"replicas/replica-9: missing"):
        keys.load_keyring(cluster, "replica-9")


@pytest.mark.parametrize(
    "party, filename",
    [
        ("clients/probe", "mac-keys.json"),
        ("clients/probe", "verify-keys.json"),
        ("clients/probe", "signing.key"),
        ("clients/probe", "channel-keys.json"),
        ("clients/probe", "party.json"),
        ("replicas/replica-0", "mac-keys.json"),
    ],
)
def test_missing_file(scratch, party, filename):
    """A missing key file is named, with what it should have held."""
    path = os.path.join(scratch, party, filename)
    os.unlink(path)
    with pytest.raises(ConfigError) as failure:
        keys.load_keyring(scratch, os.path.basename(party))
    assert str(failure.value).startswith(f"{path}: missing; expected ")


@pytest.mark.parametrize(
    "filename, content, expected",
    [
        ("mac-keys.json", b"{not json", "does not parse"),
        ("mac-keys.json", b"[]", "expected a JSON object"),
        ("mac-keys.json", b'{"mac_keys": {}}', "expected a 'mac_keys' list"),
        ("mac-keys.json", b'{"mac_keys": [{"publisher": "probe", "replica": 0, "key": "!!"}]}', "expected base64"),
        ("mac-keys.json", b'{"mac_keys": [{"publisher": "probe", "replica": 0, "key": "AAAA"}]}', "expected 32 bytes, got 3"),
        ("mac-keys.json", b'{"mac_keys": [{"publisher": "probe", "replica": "0", "key": "AAAA"}]}', "mac_keys[0].replica: expected a replica index"),
        ("verify-keys.json", b'{"verify_keys": []}', "expected a 'verify_keys' object"),
        ("channel-keys.json", b'{"channel_keys": {"alerts": 5}}', "channel_keys.alerts: expected a base64 string"),
        ("signing.key", b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", "expected an unencrypted PKCS#8 PEM Ed25519"),
    ],
)
def test_malformed_file(scratch, filename, content, expected):
    """A malformed key file is named, with what was expected."""
    path = os.path.join(scratch, "clients", "probe", filename)
    keys.write_private_file(path, content)
    with pytest.raises(ConfigError) as failure:
        keys.load_keyring(scratch, "probe")
    assert str(failure.value).startswith(f"{path}: ")
    assert expected in str(failure.value)


def test_secret_readable_by_others_refused(scratch):
    """A secret key file others may read is refused, as ssh does, unless checks are off."""
    path = os.path.join(scratch, "clients", "probe", "mac-keys.json")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644 lets others read the MAC keys; expected 0600"):
        keys.load_keyring(scratch, "probe")
    assert keys.load_keyring(scratch, "probe", check_modes=False).mac_key("probe", 0)


def test_existing_cluster_not_overwritten(scratch):
    """Writing over a cluster's material needs overwrite=True, so keys in use are not lost."""
    before = keys.load_keyring(scratch, "probe").mac_key("probe", 0)
    with pytest.raises(ConfigError, match="already there"):
        pki.write_cluster_material(scratch, CLUSTER, 2, ["probe"], {})
    assert keys.load_keyring(scratch, "probe").mac_key("probe", 0) == before
    pki.write_cluster_material(scratch, CLUSTER, 2, ["probe"], {}, overwrite=True)
    assert keys.load_keyring(scratch, "probe").mac_key("probe", 0) != before


@pytest.mark.parametrize(
    "cluster_name, clients, channels, expected",
    [
        ("Bad_Name", ["probe"], {}, "cluster name 'Bad_Name'"),
        (CLUSTER, ["Probe"], {}, "client name 'Probe'"),
        (CLUSTER, ["replica-1"], {}, "names starting 'replica-' are for replicas"),
        (CLUSTER, ["probe", "probe"], {}, "must be unique"),
        (CLUSTER, ["probe"], {"alerts": ["ghost"]}, "channel 'alerts': unknown clients ['ghost']"),
    ],
)
def test_invalid_cluster(tmp_path, cluster_name, clients, channels, expected):
    """Names that cannot appear in a certificate, and channels naming unknown clients, are refused before anything is written."""
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        pki.write_cluster_material(str(tmp_path / "k"), cluster_name, 2, clients, channels)
    assert not (tmp_path / "k").exists()


def _san(certificate):
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _usages(certificate):
    return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_certificates(cluster):
    """Replica certificates name replica-N.<cluster> and 127.0.0.1; client certificates name <client>.clients.<cluster>."""
    ca = pki.load_certificate_authority(cluster)
    replica = pki.load_tls_material(cluster, "replica-1")
    client = pki.load_tls_material(cluster, "probe")
    assert replica.ca_pem == client.ca_pem == ca.cert_pem
    replica_cert = x509.load_pem_x509_certificate(replica.cert_pem)
    client_cert = x509.load_pem_x509_certificate(client.cert_pem)
    replica_cert.verify_directly_issued_by(ca.certificate)
    client_cert.verify_directly_issued_by(ca.certificate)
    assert _san(replica_cert).get_values_for_type(x509.DNSName) == [f"replica-1.{CLUSTER}"]
    assert [str(ip) for ip in _san(replica_cert).get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert _san(client_cert).get_values_for_type(x509.DNSName) == [f"probe.clients.{CLUSTER}"]
    assert _usages(replica_cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _usages(client_cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert pki.identity_from_certificate(replica_cert) == "replica-1"
    assert pki.identity_from_certificate(client_cert, CLUSTER) == "probe"
    assert pki.identity_from_certificate(client_cert, "other.example") is None
    validity = replica_cert.not_valid_after_utc - replica_cert.not_valid_before_utc
    assert datetime.timedelta(days=365) < validity < datetime.timedelta(days=366)


def test_identity_needs_a_party_name():
    """A certificate naming no replica or client gives no identity."""
    ca = pki.new_certificate_authority(CLUSTER)
    web = ca.issue(dns_names=["www.example.org"])
    bare = ca.issue(ip_addresses=["10.0.0.1"])
    assert pki.identity_from_certificate(web.cert_pem) is None
    assert pki.identity_from_certificate(bare.cert_pem) is None
    assert pki.identity_from_certificate(ca.cert_pem) is None


def test_expired_certificate_and_second_ca():
    """Tests can make an expired certificate and a CA that is not the cluster's."""
    ca = pki.new_certificate_authority(CLUSTER)
    other = pki.new_certificate_authority(CLUSTER)
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = pki.issue_client_certificate(ca, CLUSTER, "probe", now=now - datetime.timedelta(days=400))
    cert = x509.load_pem_x509_certificate(expired.cert_pem)
    assert cert.not_valid_after_utc < now
    stranger = pki.issue_client_certificate(other, CLUSTER, "probe")
    with pytest.raises(Exception):
        x509.load_pem_x509_certificate(stranger.cert_pem).verify_directly_issued_by(ca.certificate)


def test_tls_material_errors(scratch):
    """A key that does not match its certificate, or a certificate naming someone else, is refused."""
    party = os.path.join(scratch, "clients", "probe")
    other = os.path.join(scratch, "clients", "console")
    shutil.copy(os.path.join(other, "tls.key"), os.path.join(party, "tls.key"))
    with pytest.raises(ConfigError, match="tls.key: expected the private key of"):
        pki.load_tls_material(scratch, "probe")
    shutil.copy(os.path.join(other, "tls.crt"), os.path.join(party, "tls.crt"))
    with pytest.raises(ConfigError, match="names 'console', expected 'probe'"):
        pki.load_tls_material(scratch, "probe")
    with open(os.path.join(party, "tls.crt"), "wb") as f:
        f.write(b"not a certificate")
    with pytest.raises(ConfigError, match="tls.crt: expected a PEM certificate"):
        pki.load_tls_material(scratch, "probe")
    os.unlink(os.path.join(party, "ca.crt"))
    with pytest.raises(ConfigError, match="ca.crt: missing"):
        pki.load_tls_material(scratch, "probe")


def test_manifest_errors(tmp_path):
    """A missing or broken manifest is named."""
    with pytest.raises(ConfigError, match="cluster.json: missing"):
        pki.load_manifest(str(tmp_path))
    (tmp_path / "cluster.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="expected an object"):
        pki.load_manifest(str(tmp_path))


def test_ca_issues_more_certificates(scratch):
    """The stored CA issues a certificate for a client added later."""
    ca = pki.load_certificate_authority(scratch)
    late = pki.issue_client_certificate(ca, CLUSTER, "late-comer")
    cert = x509.load_pem_x509_certificate(late.cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert pki.identity_from_certificate(cert, CLUSTER) == "late-comer"


def test_wildcard_channel():
    """A channel open to '*' gives its key to every client, and to no replica."""
    rings = keys.generate_keyrings(2, ["probe", "console"], {"all": ["*"], "one": ["probe"]})
    assert set(rings["console"].channel_keys) == {"all"}
    assert set(rings["probe"].channel_keys) == {"all", "one"}
    assert rings["replica-1"].channel_keys == {}


def test_in_memory_names_need_not_be_dns_labels():
    """Key rings alone accept any client name but a replica's; certificates need DNS labels."""
    rings = keys.generate_keyrings(1, ["Syslog_GW"], {})
    assert rings["Syslog_GW"].mac_key("Syslog_GW", 0)
    with pytest.raises(ConfigError, match="not a replica's"):
        keys.generate_keyrings(1, ["replica-3"], {})
