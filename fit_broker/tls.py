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
"""

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import crypto
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
)

from fit_broker.errors import ConfigError
from fit_broker.pki import identity_from_certificate


def _trust_root(ca_pem):
    try:
        return Certificate.loadPEM(ca_pem)
    except crypto.Error as e:
        raise ConfigError(f"expected the CA certificate as PEM: {e}") from None


def _own_certificate(cert_pem, key_pem):
    """
    Return C{cryptography} objects, which pyOpenSSL takes without the
    deprecation its own X509 and PKey types now carry.
    """
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise ConfigError(f"expected a PEM certificate: {e}") from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"expected an unencrypted PEM private key: {e}") from None
    if certificate.public_key() != key.public_key():
        raise ConfigError("the private key does not belong to the certificate")
    return {"certificate": certificate, "privateKey": key}


def server_tls_options(ca_pem, cert_pem, key_pem):
    """
    Return TLS options for a server that presents C{cert_pem} and accepts
    only clients whose certificate C{ca_pem} issued.
    """
    return CertificateOptions(
        trustRoot=_trust_root(ca_pem),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        **_own_certificate(cert_pem, key_pem),
    )


def client_tls_options(ca_pem, cert_pem, key_pem, server_hostname):
    """
    Return a client connection creator that presents C{cert_pem} and accepts
    only a server whose certificate C{ca_pem} issued for C{server_hostname}
    (a DNS name such as C{replica-0.<cluster>}, or an IP address).
    """
    return optionsForClientTLS(
        server_hostname,
        trustRoot=_trust_root(ca_pem),
        extraCertificateOptions={
            "raiseMinimumTo": TLSVersion.TLSv1_2,
            **_own_certificate(cert_pem, key_pem),
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
