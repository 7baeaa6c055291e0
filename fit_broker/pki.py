"""
A cluster's key material: its certificate authority, a TLS certificate per
replica and per client, and the keys of the protection schemes.

L{write_cluster_material} lays a directory out so that each party's
subdirectory is all that party needs, ready to copy to its host::

    <directory>/
        cluster.json                cluster name, replicas, clients, channels
        ca.crt                      the cluster's CA certificate
        ca.key                      the CA's private key (0600; keep offline)
        replicas/replica-<N>/       one per replica
            ca.crt  tls.crt  tls.key (0600)
            party.json  mac-keys.json (0600)  verify-keys.json
        clients/<name>/             one per client
            ca.crt  tls.crt  tls.key (0600)
            party.json  mac-keys.json (0600)  verify-keys.json
            signing.key (0600)  channel-keys.json (0600)

A replica's mac-keys.json also holds its Ed25519 signing key and the MAC key
of its link with each other replica; its verify-keys.json, every replica's
verify key (see L{fit_broker.keys}).  Replica certificates serve both ends of
the links between replicas: each replica connects to the others with its own.

Identities live in DNS subject alternative names, which TLS hostname checks
(service_identity) already understand: C{replica-<N>.<cluster>} for a replica,
which also carries the IP address C{127.0.0.1}, and
C{<name>.clients.<cluster>} for a client.  L{identity_from_certificate}
turns a peer's certificate back into the party's identity.
"""

import datetime
import ipaddress
import json
import os
import re

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fit_broker import keys
from fit_broker.errors import ConfigError

MANIFEST_FILE = "cluster.json"
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"

CLIENTS_LABEL = "clients"
DEFAULT_REPLICA_ADDRESSES = ("127.0.0.1",)

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_REPLICA_LABEL = re.compile(r"replica-(0|[1-9][0-9]{0,5})\Z")


def check_cluster_name(name):
    """
    Raise L{ConfigError} unless C{name} is a lowercase DNS name, the suffix
    of every identity in the cluster.
    """
    labels = name.split(".") if isinstance(name, str) else []
    if not labels or len(name) > 200 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"cluster name {name!r}: expected a lowercase DNS name such as 'prod.example'"
        )


def replica_hostname(cluster_name, index):
    """
    Return the DNS name that identifies replica C{index} in TLS.
    """
    return f"{keys.replica_identity(index)}.{cluster_name}"


def client_hostname(cluster_name, name):
    """
    Return the DNS name that identifies client C{name} in TLS.
    """
    return f"{name}.{CLIENTS_LABEL}.{cluster_name}"


def identity_from_certificate(certificate, cluster_name=None):
    """
    Return the identity a certificate names: C{'replica-N'} or a client
    name, or C{None} when it names neither.

    @param certificate: a C{cryptography} certificate, or PEM bytes.
    @param cluster_name: when given, only names in this cluster count.
    """
    if isinstance(certificate, bytes):
        certificate = x509.load_pem_x509_certificate(certificate)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    for dns_name in san.value.get_values_for_type(x509.DNSName):
        first, _, rest = dns_name.lower().partition(".")
        if _REPLICA_LABEL.match(first):
            if cluster_name is None or rest == cluster_name:
                return first
        elif rest.startswith(CLIENTS_LABEL + ".") and _LABEL.match(first):
            if cluster_name is None or rest == f"{CLIENTS_LABEL}.{cluster_name}":
                return first
    return None


def _now(now):
    return now if now is not None else datetime.datetime.now(datetime.timezone.utc)


def _new_private_key():
    # ECDSA P-256: what every TLS stack, legacy syslog probes included, accepts.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(private_key):
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


@attrs.frozen
class TlsMaterial:
    """
    What one party needs for mutual TLS, as PEM bytes: the CA it trusts,
    its certificate and its private key.  Unpacks into
    L{fit_broker.tls.server_tls_options} and friends.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = attrs.field(repr=False)

    def __iter__(self):
        return iter((self.ca_pem, self.cert_pem, self.key_pem))


@attrs.frozen
class CertificateAuthority:
    """
    A CA certificate and its private key, able to issue party certificates.
    """

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)

    @property
    def cert_pem(self):
        return _cert_pem(self.certificate)

    @property
    def key_pem(self):
        return _key_pem(self.private_key)

    def issue(
        self,
        dns_names=(),
        ip_addresses=(),
        common_name=None,
        validity_days=365,
        now=None,
        not_before=None,
        not_after=None,
        server=True,
        client=True,
    ):
        """
        Issue a certificate with a fresh key.

        @param not_before: defaults to an hour before C{now}, to absorb
            clock skew between hosts.
        @param not_after: defaults to C{validity_days} after C{now}; give a
            past date for an expired certificate.
        @return: L{TlsMaterial}.
        """
        now = _now(now)
        not_before = not_before or now - datetime.timedelta(hours=1)
        not_after = not_after or now + datetime.timedelta(days=validity_days)
        key = _new_private_key()
        names = [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if not names:
            raise ValueError("a certificate needs at least one DNS name or IP address")
        common_name = common_name or (list(dns_names) + list(ip_addresses))[0]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        ca_key_id = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), False
            )
        )
        certificate = builder.sign(self.private_key, hashes.SHA256())
        return TlsMaterial(self.cert_pem, _cert_pem(certificate), _key_pem(key))


def new_certificate_authority(cluster_name, validity_days=3650, now=None):
    """
    Return a fresh self-signed L{CertificateAuthority} for C{cluster_name}.
    """
    now = _now(now)
    key = _new_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FIT Broker"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"FIT Broker CA {cluster_name}"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(certificate, key)


def issue_replica_certificate(
    ca, cluster_name, index, validity_days=365, now=None, addresses=DEFAULT_REPLICA_ADDRESSES
):
    """
    Issue replica C{index}'s certificate, good for serving and for
    connecting to other replicas.
    """
    return ca.issue(
        dns_names=[replica_hostname(cluster_name, index)],
        ip_addresses=addresses,
        validity_days=validity_days,
        now=now,
    )


def issue_client_certificate(ca, cluster_name, name, validity_days=365, now=None):
    """
    Issue client C{name}'s certificate, good for connecting only.
    """
    keys.check_client_name(name)
    return ca.issue(
        dns_names=[client_hostname(cluster_name, name)],
        validity_days=validity_days,
        now=now,
        server=False,
    )


def write_cluster_material(
    directory,
    cluster_name,
    replicas,
    clients,
    channels,
    validity_days=365,
    *,
    ca=None,
    now=None,
    replica_addresses=DEFAULT_REPLICA_ADDRESSES,
    overwrite=False,
):
    """
    Generate and write everything a cluster needs into C{directory} (see the
    module docstring for the layout).

    @param channels: channel -> names of the clients allowed to publish or
        subscribe on it; those clients get the channel's key.
    @param ca: a L{CertificateAuthority} to issue from instead of a new one.
    @param overwrite: replace the material of an existing cluster; without
        it, a directory that already holds C{cluster.json} is refused so
        that keys in use are never lost by mistake.
    @return: the manifest written to C{cluster.json}.
    """
    check_cluster_name(cluster_name)
    clients = list(clients)
    for name in clients:
        keys.check_client_name(name)
    channels = {channel: sorted(set(allowed)) for channel, allowed in channels.items()}
    rings = keys.generate_keyrings(replicas, clients, channels)

    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if os.path.exists(manifest_path) and not overwrite:
        raise ConfigError(
            f"{manifest_path}: a cluster's material is already there; "
            "expected an empty directory (or pass overwrite=True)"
        )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca = ca or new_certificate_authority(cluster_name, now=now)
    keys.write_public_file(os.path.join(directory, CA_CERT_FILE), ca.cert_pem)
    keys.write_private_file(os.path.join(directory, CA_KEY_FILE), ca.key_pem)

    for identity, ring in rings.items():
        if ring.replica_index is not None:
            material = issue_replica_certificate(
                ca, cluster_name, ring.replica_index, validity_days, now, replica_addresses
            )
        else:
            material = issue_client_certificate(ca, cluster_name, identity, validity_days, now)
        party_dir = keys.party_directory(directory, identity)
        os.makedirs(party_dir, mode=0o700, exist_ok=True)
        keys.write_public_file(os.path.join(party_dir, CA_CERT_FILE), material.ca_pem)
        keys.write_public_file(os.path.join(party_dir, CERT_FILE), material.cert_pem)
        keys.write_private_file(os.path.join(party_dir, KEY_FILE), material.key_pem)
        keys.write_keyring(party_dir, ring, cluster_name)

    manifest = {
        "cluster": cluster_name,
        "replicas": replicas,
        "clients": clients,
        "channels": channels,
    }
    keys.write_public_file(
        manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    return manifest


# Loading.


def load_manifest(directory):
    """
    Return the manifest C{write_cluster_material} wrote into C{directory}.
    """
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; expected the cluster manifest") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: expected the cluster manifest as JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cluster"), str):
        raise ConfigError(f"{path}: expected an object with a 'cluster' name")
    return manifest


def _load_certificate_pem(path):
    data = keys.read_key_file(path, "a PEM certificate", secret=False)
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise ConfigError(f"{path}: expected a PEM certificate: {e}") from None
    return data


def _load_key_pem(path, check_modes):
    data = keys.read_key_file(path, "a PEM private key", secret=True, check_modes=check_modes)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: expected an unencrypted PEM private key: {e}") from None
    return data, key


def load_certificate_authority(directory, check_modes=True):
    """
    Return the L{CertificateAuthority} stored in the cluster directory, to
    issue more certificates from it.
    """
    cert_pem = _load_certificate_pem(os.path.join(directory, CA_CERT_FILE))
    _, key = _load_key_pem(os.path.join(directory, CA_KEY_FILE), check_modes)
    return CertificateAuthority(x509.load_pem_x509_certificate(cert_pem), key)


def load_tls_material(directory, identity, check_modes=True):
    """
    Return the L{TlsMaterial} of C{identity}.

    @param directory: the cluster directory, or the party's own directory.
    """
    party_dir = keys.resolve_party_directory(directory, identity)
    ca_pem = _load_certificate_pem(os.path.join(party_dir, CA_CERT_FILE))
    cert_pem = _load_certificate_pem(os.path.join(party_dir, CERT_FILE))
    key_pem, key = _load_key_pem(os.path.join(party_dir, KEY_FILE), check_modes)
    certificate = x509.load_pem_x509_certificate(cert_pem)
    if certificate.public_key() != key.public_key():
        raise ConfigError(
            f"{os.path.join(party_dir, KEY_FILE)}: expected the private key of "
            f"{os.path.join(party_dir, CERT_FILE)}, but it is another key"
        )
    named = identity_from_certificate(certificate)
    if named != identity:
        raise ConfigError(
            f"{os.path.join(party_dir, CERT_FILE)}: names {named!r}, expected {identity!r}"
        )
    return TlsMaterial(ca_pem, cert_pem, key_pem)
