"""
Mutual TLS between replicas and clients, on pyOpenSSL through Twisted.

Both sides trust only the cluster's CA: a server requires a client
certificate the CA issued, and a client checks the server's certificate and
that it names the replica it meant to reach (service_identity, through
C{optionsForClientTLS}).  Which client connected is then read from its
certificate with L{peer_identity}, once the handshake is over (a protocol
providing L{twisted.internet.interfaces.IHandshakeListener} is told when).

The arguments are PEM bytes, as L{fit_broker.pki.load_tls_material} returns
them: C{server_tls_options(*load_tls_material(directory, "replica-0"))}.
L{own_certificate} and L{trust_root} also serve the syslog adapter's TLS
listeners and the sinks' TLS connections, which name PEM files of their own.
"""

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import crypto
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from fit_broker.errors import ConfigError
from fit_broker.pki import identity_from_certificate


def _named(name, text):
    return f"{name}: {text}" if name else text


def read_pem(path, what):
    """
    Return the bytes of the PEM file at C{path}, C{what} saying in errors
    what it should hold (C{"the TLS certificate"}).

    @raise ConfigError: naming the file.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from None


def ca_certificates(ca_pem, name=None):
    """
    Return the C{cryptography} certificates in C{ca_pem}, C{name} (the
    file) naming it in errors.

    @raise ConfigError: in one line, when there are none or one is broken.
    """
    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except ValueError as e:
        raise ConfigError(_named(name, f"expected PEM CA certificates: {e}")) from None


def trust_root(ca_pem, name=None):
    """
    Return a trust root that accepts only certificates the CAs in
    C{ca_pem} issued.
    """
    return trustRootFromCertificates(
        [Certificate(crypto.X509.from_cryptography(c)) for c in ca_certificates(ca_pem, name)]
    )


def own_certificate(cert_pem, key_pem, cert_name=None, key_name=None):
    """
    Return the C{CertificateOptions} arguments that present the certificate
    in C{cert_pem} (then any intermediate certificates after it) with the
    private key in C{key_pem}; C{cert_name} and C{key_name} (the files) name
    them in errors.

    These are C{cryptography} objects, which pyOpenSSL takes without the
    deprecation its own X509 and PKey types now carry.

    @raise ConfigError: in one line naming the file that is wrong.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise ConfigError(_named(cert_name, f"expected PEM certificates: {e}")) from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(_named(key_name, f"expected an unencrypted PEM private key: {e}")) from None
    if chain[0].public_key() != key.public_key():
        raise ConfigError(
            _named(key_name, f"the private key does not belong to {cert_name or 'the certificate'}")
        )
    options = {"certificate": chain[0], "privateKey": key}
    if len(chain) > 1:
        options["extraCertChain"] = chain[1:]
    return options


def own_certificate_files(certificate, private_key):
    """
    Return L{own_certificate} of the PEM files C{certificate} and
    C{private_key}.
    """
    return own_certificate(
        read_pem(certificate, "the TLS certificate"),
        read_pem(private_key, "the TLS private key"),
        certificate,
        private_key,
    )


def server_tls_options(ca_pem, cert_pem, key_pem):
    """
    Return TLS options for a server that presents C{cert_pem} and accepts
    only clients whose certificate C{ca_pem} issued.
    """
    return CertificateOptions(
        trustRoot=trust_root(ca_pem),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        **own_certificate(cert_pem, key_pem),
    )


def client_tls_options(ca_pem, cert_pem, key_pem, server_hostname):
    """
    Return a client connection creator that presents C{cert_pem} and accepts
    only a server whose certificate C{ca_pem} issued for C{server_hostname}
    (a DNS name such as C{replica-0.<cluster>}, or an IP address).
    """
    return optionsForClientTLS(
        server_hostname,
        trustRoot=trust_root(ca_pem),
        extraCertificateOptions={
            "raiseMinimumTo": TLSVersion.TLSv1_2,
            **own_certificate(cert_pem, key_pem),
        },
    )


def peer_identity(transport, cluster_name=None):
    """
    Return the identity (C{'replica-N'} or a client name) in the certificate
    of the peer of C{transport}, or C{None} before the handshake completed,
    without TLS, or when the certificate names no party.

    Only certificates that passed verification reach this point, so the
    name is as trustworthy as the CA.
    """
    get_certificate = getattr(transport, "getPeerCertificate", None)
    if get_certificate is None:
        return None
    try:
        certificate = get_certificate()
    except Exception:
        # No TLS connection yet, or already torn down.
        return None
    if certificate is None:
        return None
    return identity_from_certificate(certificate.to_cryptography(), cluster_name)
