"""
What a replica or client needs to prove who it is: its key ring and, with
TLS on, its certificate, both read from the cluster's keys folder.
"""

from twisted.internet.endpoints import clientFromString, wrapClientTLS

from fit_broker.errors import ConfigError
from fit_broker.keys import load_keyring, replica_identity
from fit_broker.pki import load_tls_material, replica_hostname
from fit_broker.schemes.registry import scheme_lookup, scheme_uses_keys
from fit_broker.tls import client_tls_options, peer_identity, server_tls_options


def _keys_dir(config, why):
    if config.keys_dir is None:
        raise ConfigError(f"{config.path}: [cluster.keys_dir]: expected the keys folder, {why}")
    return config.keys_dir


def _needs_keys(config):
    """
    Whether C{config} needs a keys folder: TLS is on, a channel's scheme
    uses key material, or the file names a keys folder and replicas agree
    (ordered channels, or administrators who change the table: their links
    and signatures use the replicas' keys, and replicas check the
    administrators' signatures).  The channels' schemes are looked up first,
    so that a scheme no plugin provides is reported as such, not as a
    missing folder.
    """
    schemes = scheme_lookup(config)
    if config.tls or any(scheme_uses_keys(schemes(spec.scheme)) for spec in config.channels.values()):
        return True
    agreeing = config.admins or any(spec.qos.ordering != "none" for spec in config.channels.values())
    return config.keys_dir is not None and bool(agreeing)


def replica_credentials(config, index):
    """
    Return C{(keys, tls_options, identify)} for replica C{index}; each is
    C{None} when the cluster does not use it.
    """
    if not _needs_keys(config):
        return None, None, None
    folder = _keys_dir(config, "since channels use keyed schemes or TLS is on")
    identity = replica_identity(index)
    keys = load_keyring(folder, identity)
    if not config.tls:
        return keys, None, None
    material = load_tls_material(folder, identity)
    options = server_tls_options(material.ca_pem, material.cert_pem, material.key_pem)
    return keys, options, lambda transport: peer_identity(transport, config.name)


def replica_peer_tls(config, index):
    """
    Return, with TLS on, a callable from a replica's index to the client TLS
    options replica C{index} connects to it with: its own replica
    certificate, and that replica's name (C{replica-N.<cluster>}) checked in
    the one it shows; C{None} with TLS off.
    """
    if not config.tls:
        return None
    folder = _keys_dir(config, "since TLS is on")
    material = load_tls_material(folder, replica_identity(index))
    made = {}

    def options(peer):
        if peer not in made:
            made[peer] = client_tls_options(
                material.ca_pem, material.cert_pem, material.key_pem,
                replica_hostname(config.name, peer),
            )
        return made[peer]

    return options


def client_credentials(config, client, reactor):
    """
    Return C{(keys, endpoints)} for C{client}: its key ring (or C{None}) and,
    with TLS on, one TLS endpoint per replica that checks the replica's
    identity (or C{None} for the configured plain endpoints).
    """
    if not _needs_keys(config):
        return None, None
    folder = _keys_dir(config, "since channels use keyed schemes or TLS is on")
    keys = load_keyring(folder, client)
    if not config.tls:
        return keys, None
    material = load_tls_material(folder, client)
    endpoints = [
        wrapClientTLS(
            client_tls_options(
                material.ca_pem,
                material.cert_pem,
                material.key_pem,
                replica_hostname(config.name, spec.index),
            ),
            clientFromString(reactor, spec.connect),
        )
        for spec in config.replicas
    ]
    return keys, endpoints
