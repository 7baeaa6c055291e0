"""
The secrets one party holds, and the key files that carry them.

Each party (replica or client) gets a directory of its own so that an
operator can copy exactly that directory to the host that runs it; see
L{fit_broker.pki.write_cluster_material} for the whole layout.  A party's
directory holds:

    party.json          identity, cluster name, replica index (public)
    mac-keys.json       MAC keys shared between a publisher and a replica;
                        for a replica also the key of each replica-to-replica
                        link and its own Ed25519 signing key (0600)
    verify-keys.json    Ed25519 public keys of every publisher, and for a
                        replica those of every replica (public)
    signing.key         the client's Ed25519 private key, PKCS#8 PEM (0600)
    channel-keys.json   symmetric keys of the client's channels (0600)

Secrets are base64 in JSON: small, diffable, and readable by any tool.
"""

import base64
import binascii
import json
import os
import re
import secrets
import stat

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IKeyRing

PARTY_FILE = "party.json"
MAC_KEYS_FILE = "mac-keys.json"
VERIFY_KEYS_FILE = "verify-keys.json"
SIGNING_KEY_FILE = "signing.key"
CHANNEL_KEYS_FILE = "channel-keys.json"

REPLICAS_DIR = "replicas"
CLIENTS_DIR = "clients"

MAC_KEY_SIZE = 32
CHANNEL_KEY_SIZE = 32

_REPLICA_NAME = re.compile(r"replica-(0|[1-9][0-9]{0,5})\Z")
# A client name is one DNS label, so that it fits in a certificate's DNS SAN.
_CLIENT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def replica_identity(index):
    """
    Return the identity of replica number C{index}.
    """
    return f"replica-{index}"


def replica_index_of(identity):
    """
    Return the index of replica C{identity}, or C{None} for a client name.
    """
    match = _REPLICA_NAME.match(identity)
    return int(match.group(1)) if match else None


def check_client_name(name):
    """
    Raise L{ConfigError} unless C{name} can name a client: one lowercase DNS
    label that does not look like a replica's identity.
    """
    if not isinstance(name, str) or not _CLIENT_NAME.match(name):
        raise ConfigError(
            f"client name {name!r}: expected one lowercase DNS label "
            "(a-z, 0-9 and '-', at most 63 characters)"
        )
    if name.startswith("replica-"):
        raise ConfigError(f"client name {name!r}: names starting 'replica-' are for replicas")


def party_directory(directory, identity):
    """
    Return the directory of C{identity} inside the cluster material directory
    C{directory}.
    """
    sub = REPLICAS_DIR if replica_index_of(identity) is not None else CLIENTS_DIR
    return os.path.join(directory, sub, identity)


def resolve_party_directory(directory, identity):
    """
    Return the directory holding C{identity}'s files: C{directory} itself
    when it holds a C{party.json} (a party directory copied to its host),
    else C{identity}'s directory inside the cluster directory C{directory}.

    @raise ConfigError: when neither exists.
    """
    if os.path.exists(os.path.join(directory, PARTY_FILE)):
        return directory
    party_dir = party_directory(directory, identity)
    if not os.path.isdir(party_dir):
        raise ConfigError(
            f"{party_dir}: missing; expected the key directory of {identity!r} "
            f"(or give a directory holding its {PARTY_FILE})"
        )
    return party_dir


def _secret_repr(value):
    return f"<{len(value)} keys>"


@implementer(IKeyRing)
@attrs.define(eq=False)
class KeyRing:
    """
    The secrets and public keys one party holds.

    Secrets never appear in the repr, so a key ring can be logged.

    @ivar replica_index: the replica's number, or C{None} for a client.
    @ivar mac_keys: C{(publisher, replica index) -> bytes}.
    @ivar signing_keys: publisher -> Ed25519 private key it may sign as.
    @ivar verify_keys: publisher -> Ed25519 public key.
    @ivar channel_keys: channel -> symmetric key.
    @ivar peer_mac_keys: replica index -> the MAC key this replica shares
        with that replica for their links (replicas only).
    @ivar replica_signing_key: this replica's Ed25519 private key, or
        C{None} (clients, and key folders written before replicas signed).
    @ivar replica_verify_keys: replica index -> its Ed25519 public key.
    """

    identity: str
    replica_index: int | None = None
    mac_keys: dict = attrs.field(factory=dict, repr=_secret_repr)
    signing_keys: dict = attrs.field(factory=dict, repr=_secret_repr)
    verify_keys: dict = attrs.field(factory=dict, repr=_secret_repr)
    channel_keys: dict = attrs.field(factory=dict, repr=_secret_repr)
    peer_mac_keys: dict = attrs.field(factory=dict, repr=_secret_repr)
    replica_signing_key: Ed25519PrivateKey | None = attrs.field(
        default=None, repr=lambda key: "None" if key is None else "<key>"
    )
    replica_verify_keys: dict = attrs.field(factory=dict, repr=_secret_repr)

    def mac_key(self, publisher, replica):
        return self.mac_keys.get((publisher, replica))

    def peer_mac_key(self, replica):
        """
        Return the key this replica shares with replica C{replica} for the
        frames on their links, or C{None}.
        """
        return self.peer_mac_keys.get(replica)

    def replica_verify_key(self, replica):
        """
        Return replica C{replica}'s Ed25519 public key, or C{None}.
        """
        return self.replica_verify_keys.get(replica)

    def signing_key(self, publisher):
        return self.signing_keys.get(publisher)

    def verify_key(self, publisher):
        return self.verify_keys.get(publisher)

    def channel_key(self, channel):
        return self.channel_keys.get(channel)


def generate_keyrings(replicas, clients, channels):
    """
    Make fresh secrets for a cluster and return C{identity -> KeyRing} for
    every replica and client.

    Every client may publish, so every client has a signing key and MAC keys
    with every replica.  A client gets the keys of the channels that list it;
    replicas never get channel keys, so they route PKE content blind.  Each
    replica gets a signing key, every replica's verify key, and one MAC key
    per pair of replicas, for the links between them.

    @param channels: channel -> names of the clients allowed on it, where
        C{"*"} stands for every client, as in the control table.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas: expected a positive integer, got {replicas!r}")
    clients = list(clients)
    for name in clients:
        if not isinstance(name, str) or not name or replica_index_of(name) is not None:
            raise ConfigError(f"client name {name!r}: expected a name that is not a replica's")
    if len(set(clients)) != len(clients):
        raise ConfigError(f"clients: names must be unique, got {clients!r}")
    members = {}
    for channel, allowed in channels.items():
        allowed = set(clients) if "*" in allowed else set(allowed)
        unknown = sorted(allowed - set(clients))
        if unknown:
            raise ConfigError(f"channel {channel!r}: unknown clients {unknown}")
        members[channel] = allowed

    signing = {name: Ed25519PrivateKey.generate() for name in clients}
    verify = {name: key.public_key() for name, key in signing.items()}
    macs = {
        (name, r): secrets.token_bytes(MAC_KEY_SIZE) for name in clients for r in range(replicas)
    }
    channel_keys = {channel: secrets.token_bytes(CHANNEL_KEY_SIZE) for channel in channels}
    replica_signing = {r: Ed25519PrivateKey.generate() for r in range(replicas)}
    replica_verify = {r: key.public_key() for r, key in replica_signing.items()}
    links = {
        (a, b): secrets.token_bytes(MAC_KEY_SIZE)
        for a in range(replicas)
        for b in range(a + 1, replicas)
    }

    rings = {}
    for r in range(replicas):
        identity = replica_identity(r)
        rings[identity] = KeyRing(
            identity=identity,
            replica_index=r,
            mac_keys={(name, r): macs[name, r] for name in clients},
            verify_keys=dict(verify),
            peer_mac_keys={j: links[min(r, j), max(r, j)] for j in range(replicas) if j != r},
            replica_signing_key=replica_signing[r],
            replica_verify_keys=dict(replica_verify),
        )
    for name in clients:
        rings[name] = KeyRing(
            identity=name,
            mac_keys={(name, r): macs[name, r] for r in range(replicas)},
            signing_keys={name: signing[name]},
            verify_keys=dict(verify),
            channel_keys={
                channel: key for channel, key in channel_keys.items() if name in members[channel]
            },
        )
    return rings


# Writing.


def write_private_file(path, data):
    """
    Write C{data} to C{path} readable by its owner only, replacing the file
    atomically so that a reader never sees half a key.
    """
    _write_file(path, data, 0o600)


def write_public_file(path, data):
    """
    Write C{data} to C{path} readable by everyone.
    """
    _write_file(path, data, 0o644)


def _write_file(path, data, mode):
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _json_bytes(value):
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_keyring(directory, keyring, cluster_name):
    """
    Write C{keyring}'s files into the party directory C{directory}, which
    must exist.
    """
    party = {
        "identity": keyring.identity,
        "cluster": cluster_name,
        "replica_index": keyring.replica_index,
    }
    write_public_file(os.path.join(directory, PARTY_FILE), _json_bytes(party))
    macs = [
        {"publisher": publisher, "replica": replica, "key": _b64(key)}
        for (publisher, replica), key in sorted(keyring.mac_keys.items())
    ]
    secret = {"mac_keys": macs}
    if keyring.peer_mac_keys:
        secret["peer_mac_keys"] = [
            {"replica": replica, "key": _b64(key)}
            for replica, key in sorted(keyring.peer_mac_keys.items())
        ]
    if keyring.replica_signing_key is not None:
        secret["replica_signing_key"] = _b64(keyring.replica_signing_key.private_bytes_raw())
    write_private_file(os.path.join(directory, MAC_KEYS_FILE), _json_bytes(secret))
    verify = {
        name: _b64(key.public_bytes_raw()) for name, key in sorted(keyring.verify_keys.items())
    }
    public = {"verify_keys": verify}
    if keyring.replica_verify_keys:
        public["replica_verify_keys"] = [
            {"replica": replica, "key": _b64(key.public_bytes_raw())}
            for replica, key in sorted(keyring.replica_verify_keys.items())
        ]
    write_public_file(os.path.join(directory, VERIFY_KEYS_FILE), _json_bytes(public))
    if keyring.signing_keys:
        if list(keyring.signing_keys) != [keyring.identity]:
            raise ConfigError(
                f"{keyring.identity}: a key file holds only the party's own signing key"
            )
        pem = keyring.signing_keys[keyring.identity].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(os.path.join(directory, SIGNING_KEY_FILE), pem)
    if keyring.replica_index is None:
        channels = {name: _b64(key) for name, key in sorted(keyring.channel_keys.items())}
        write_private_file(
            os.path.join(directory, CHANNEL_KEYS_FILE),
            _json_bytes({"channel_keys": channels}),
        )


# Reading.


def load_keyring(directory, identity, check_modes=True):
    """
    Read the key files of party C{identity}.

    @param directory: the cluster material directory, or the party's own
        directory (the one holding C{party.json}), as copied to its host.
    @param check_modes: refuse secret files that group or others can read,
        as ssh does, so that a careless copy is noticed.
    @raise ConfigError: naming the file and what was expected, when a file
        is missing or malformed.
    """
    party_dir = resolve_party_directory(directory, identity)
    party = _read_json(party_dir, PARTY_FILE, "the party description", secret=False)
    if party.get("identity") != identity:
        raise ConfigError(
            f"{os.path.join(party_dir, PARTY_FILE)}: identity is "
            f"{party.get('identity')!r}, expected {identity!r}"
        )
    replica_index = replica_index_of(identity)
    if party.get("replica_index") != replica_index:
        raise ConfigError(
            f"{os.path.join(party_dir, PARTY_FILE)}: replica_index is "
            f"{party.get('replica_index')!r}, expected {replica_index!r}"
        )

    def secret(name, what):
        return _read_json(party_dir, name, what, secret=True, check_modes=check_modes)

    mac_path = os.path.join(party_dir, MAC_KEYS_FILE)
    mac_json = secret(MAC_KEYS_FILE, "the MAC keys")
    mac_keys = _parse_mac_keys(mac_path, mac_json)
    verify_path = os.path.join(party_dir, VERIFY_KEYS_FILE)
    verify_json = _read_json(
        party_dir, VERIFY_KEYS_FILE, "the publishers' verify keys", secret=False
    )
    verify_keys = _parse_verify_keys(verify_path, verify_json)
    replica_keys = {}
    if replica_index is not None:
        replica_keys = _parse_replica_keys(
            replica_index, mac_path, mac_json, verify_path, verify_json
        )
    signing_keys = {}
    channel_keys = {}
    if replica_index is None:
        signing_keys[identity] = _read_signing_key(
            os.path.join(party_dir, SIGNING_KEY_FILE), check_modes
        )
        channel_keys = _parse_channel_keys(
            os.path.join(party_dir, CHANNEL_KEYS_FILE),
            secret(CHANNEL_KEYS_FILE, "the channel keys"),
        )
    return KeyRing(
        identity=identity,
        replica_index=replica_index,
        mac_keys=mac_keys,
        signing_keys=signing_keys,
        verify_keys=verify_keys,
        channel_keys=channel_keys,
        **replica_keys,
    )


def read_key_file(path, what, secret, check_modes=True):
    """
    Return the bytes of key file C{path}, holding C{what}.

    @param secret: the file holds a secret: with C{check_modes}, refuse it
        when group or others may read it.
    @raise ConfigError: naming the file and what was expected.
    """
    try:
        with open(path, "rb") as f:
            if secret and check_modes:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & 0o077:
                    raise ConfigError(
                        f"{path}: mode {mode:04o} lets others read {what}; expected 0600"
                    )
            return f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: missing; expected {what} (written by fit_broker.pki.write_cluster_material)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from None


def _read_json(party_dir, name, what, secret, check_modes=True):
    path = os.path.join(party_dir, name)
    data = read_key_file(path, what, secret, check_modes)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: expected {what} as JSON, but it does not parse: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object holding {what}")
    return value


def _decode_key(path, where, value, size):
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {where}: expected a base64 string of {size} bytes")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{path}: {where}: expected base64, got {value[:16]!r}...") from None
    if len(key) != size:
        raise ConfigError(f"{path}: {where}: expected {size} bytes, got {len(key)}")
    return key


def _parse_mac_keys(path, value):
    keys = {}
    for where, entry in _objects(path, value.get("mac_keys"), "mac_keys"):
        publisher = entry.get("publisher")
        if not isinstance(publisher, str) or not publisher:
            raise ConfigError(f"{path}: {where}.publisher: expected a client name")
        replica = _replica_of(path, where, entry)
        keys[publisher, replica] = _decode_key(path, f"{where}.key", entry.get("key"), MAC_KEY_SIZE)
    return keys


def _objects(path, entries, field):
    """
    Yield C{(where, entry)} for each object of the list C{field}, C{where}
    naming it in errors.
    """
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a '{field}' list")
    for n, entry in enumerate(entries):
        where = f"{field}[{n}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where}: expected an object")
        yield where, entry


def _replica_of(path, where, entry):
    replica = entry.get("replica")
    if type(replica) is not int or replica < 0:
        raise ConfigError(f"{path}: {where}.replica: expected a replica index")
    return replica


def _parse_verify_keys(path, value):
    entries = value.get("verify_keys")
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: expected a 'verify_keys' object of publisher -> key")
    keys = {}
    for name, raw in entries.items():
        key = _decode_key(path, f"verify_keys.{name}", raw, 32)
        try:
            keys[name] = Ed25519PublicKey.from_public_bytes(key)
        except ValueError as e:
            raise ConfigError(f"{path}: verify_keys.{name}: not an Ed25519 public key: {e}") from None
    return keys


def _parse_replica_entries(path, entries, field, size):
    """
    Return C{replica index -> key bytes} of the optional list C{field} of
    C{{"replica": N, "key": base64}} objects (absent in older key folders).
    """
    if entries is None:
        return {}
    keys = {}
    for where, entry in _objects(path, entries, field):
        replica = _replica_of(path, where, entry)
        keys[replica] = _decode_key(path, f"{where}.key", entry.get("key"), size)
    return keys


def _parse_replica_keys(index, mac_path, mac_json, verify_path, verify_json):
    """
    Return the L{KeyRing} fields of replica C{index}'s own keys: its links'
    MAC keys, its signing key and every replica's verify key; each stays
    empty when an older key folder lacks it.
    """
    peer_mac_keys = _parse_replica_entries(
        mac_path, mac_json.get("peer_mac_keys"), "peer_mac_keys", MAC_KEY_SIZE
    )
    peer_mac_keys.pop(index, None)
    signing_key = None
    raw = mac_json.get("replica_signing_key")
    if raw is not None:
        signing_key = Ed25519PrivateKey.from_private_bytes(
            _decode_key(mac_path, "replica_signing_key", raw, 32)
        )
    verify_keys = {}
    raw_verify = _parse_replica_entries(
        verify_path, verify_json.get("replica_verify_keys"), "replica_verify_keys", 32
    )
    for replica, key in raw_verify.items():
        try:
            verify_keys[replica] = Ed25519PublicKey.from_public_bytes(key)
        except ValueError as e:
            raise ConfigError(
                f"{verify_path}: replica_verify_keys: replica {replica}: "
                f"not an Ed25519 public key: {e}"
            ) from None
    own = verify_keys.get(index)
    if (
        signing_key is not None
        and own is not None
        and own.public_bytes_raw() != signing_key.public_key().public_bytes_raw()
    ):
        raise ConfigError(
            f"{verify_path}: replica_verify_keys: the key of replica {index} does not match "
            f"the replica_signing_key in {mac_path}"
        )
    return {
        "peer_mac_keys": peer_mac_keys,
        "replica_signing_key": signing_key,
        "replica_verify_keys": verify_keys,
    }


def complete_replica_keys(directory, replicas, cluster_name):
    """
    Add to the replicas' key files in the cluster directory C{directory}
    what key folders written before replicas talked to each other lack (a
    signing key each, every replica's verify key, a MAC key per pair of
    replicas), keeping every key already there.  Return the indexes of the
    replicas whose files were rewritten.

    @raise ConfigError: when two replicas hold different keys for their link.
    """
    rings = [load_keyring(directory, replica_identity(r)) for r in range(replicas)]
    changed = set()
    for r, ring in enumerate(rings):
        if ring.replica_signing_key is None:
            ring.replica_signing_key = Ed25519PrivateKey.generate()
            changed.add(r)
    for a in range(replicas):
        for b in range(a + 1, replicas):
            key_a, key_b = rings[a].peer_mac_key(b), rings[b].peer_mac_key(a)
            if key_a is not None and key_b is not None and key_a != key_b:
                raise ConfigError(
                    f"{directory}: replica-{a} and replica-{b} hold different keys for their "
                    "link; expected the same key in both mac-keys.json files"
                )
            key = key_a or key_b or secrets.token_bytes(MAC_KEY_SIZE)
            for r, other, held in ((a, b, key_a), (b, a, key_b)):
                if held is None:
                    rings[r].peer_mac_keys[other] = key
                    changed.add(r)
    verify = {r: ring.replica_signing_key.public_key() for r, ring in enumerate(rings)}
    raw = {r: key.public_bytes_raw() for r, key in verify.items()}
    for r, ring in enumerate(rings):
        held = {j: key.public_bytes_raw() for j, key in ring.replica_verify_keys.items()}
        if any(held.get(j) != key for j, key in raw.items()):
            ring.replica_verify_keys = {**ring.replica_verify_keys, **verify}
            changed.add(r)
    for r in sorted(changed):
        write_keyring(
            resolve_party_directory(directory, replica_identity(r)), rings[r], cluster_name
        )
    return sorted(changed)


def _parse_channel_keys(path, value):
    entries = value.get("channel_keys")
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: expected a 'channel_keys' object of channel -> key")
    return {
        name: _decode_key(path, f"channel_keys.{name}", raw, CHANNEL_KEY_SIZE)
        for name, raw in entries.items()
    }


def _read_signing_key(path, check_modes):
    data = read_key_file(path, "an Ed25519 signing key", True, check_modes)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{path}: expected an unencrypted PKCS#8 PEM Ed25519 private key: {e}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key
