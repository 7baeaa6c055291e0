"""
The control table as replicated state: which channels exist, their class,
QoP mode, scheme and voter, and who may publish and subscribe on each.

The cluster file is the genesis state (version 0).  At run time an
administrator (a client named in C{[cluster] admins}) signs a change with
its Ed25519 key; the signed change is ordered through the replicated log as
the value C{("table", admin, change_bytes, signature)}, and every correct
replica applies it at the same position with L{ControlTable.apply}.  Since
the administrator signs, not the replica that received the request, a
Byzantine replica can neither forge a change nor alter one in flight, and
since C{apply} reads no clock and does no I/O, correct replicas that apply
the same changes hold equal tables (equal L{ControlTable.snapshot} bytes).

A change is a msgpack map in canonical form (keys sorted, shortest
encodings, as L{canonical_pack} writes it), for example::

    {"op": "grant", "serial": 1718000000000000000, "tag": "alerts",
     "client": "console", "role": "subscribe"}

and the signature covers C{b"fitbroker-admin\\0" + cluster name + b"\\0" +
change_bytes} (L{signed_message}), so a change signed for one cluster or for
another purpose is refused here.  C{serial} must exceed the last serial
applied for that administrator, so a replayed change is refused.

Operations and their fields (besides C{op} and C{serial}):

    create-channel  tag, class; optional topic, qop, scheme, voter,
                    publishers, subscribers (lists of client names or "*")
    remove-channel  tag
    set-class       tag, class
    grant, revoke   tag, client (a client name or "*"), role ("publish" or
                    "subscribe")

Classes, clients and administrators are those of the genesis file and do
not change at run time.  A scheme that needs per-channel keys (PKE) is
refused for run-time channels: channel keys are written by C{fitbroker init}.
"""

import re
from types import MappingProxyType

import attrs
import msgpack
from cryptography.exceptions import InvalidSignature
from zope.interface import implementer

from fit_broker import registry
from fit_broker.config import ChannelSpec
from fit_broker.errors import ConfigError, FitBrokerError
from fit_broker.interfaces import IControlTable, IProtectionScheme, IQoPMode, IVoterFactory

DOMAIN = b"fitbroker-admin\0"
VALUE_KIND = "table"
SNAPSHOT_FORMAT = 1

CREATE, REMOVE, SET_CLASS, GRANT, REVOKE = (
    "create-channel", "remove-channel", "set-class", "grant", "revoke"
)
OPS = (CREATE, REMOVE, SET_CLASS, GRANT, REVOKE)
ROLES = ("publish", "subscribe")

#: Bytes of one encoded change: an ordered value is at most 64 KiB in all.
MAX_CHANGE_BYTES = 16 * 1024
SIGNATURE_BYTES = 64
MAX_ADMIN_BYTES = 63
MAX_SERIAL = (1 << 63) - 1
MAX_TAG_BYTES = 128
MAX_TOPIC_BYTES = 1024
MAX_NAME_BYTES = 64
#: Names in one publishers or subscribers list of a change.
MAX_MEMBERS = 1024
#: The table's bounds, in channels and in encoded bytes; genesis may exceed
#: them, run-time changes may not grow the table beyond them.
MAX_CHANNELS = 4096
MAX_TABLE_BYTES = 4 * 1024 * 1024

_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*\Z")

_REQUIRED = {
    CREATE: {"tag", "class"},
    REMOVE: {"tag"},
    SET_CLASS: {"tag", "class"},
    GRANT: {"tag", "client", "role"},
    REVOKE: {"tag", "client", "role"},
}
_OPTIONAL = {CREATE: {"topic", "qop", "scheme", "voter", "publishers", "subscribers"}}

#: Why a change can be refused: the keys of the refusal counters.
REASONS = (
    "malformed",        # not a (admin, bytes, 64-byte signature) triple
    "not-admin",        # the signer is not an administrator of the table
    "no-key",           # no verify key is known for the administrator
    "bad-signature",    # the signature does not verify (wrong key, cluster or bytes)
    "bad-change",       # not a canonical msgpack map of known fields with valid values
    "replayed",         # serial not above the administrator's last applied one
    "unknown-channel",  # the change names a channel the table does not hold
    "channel-exists",   # create-channel of a tag the table holds
    "unknown-class",
    "unknown-client",
    "unknown-component",  # no plugin provides the named QoP mode, voter or scheme
    "unfit",            # the component cannot serve this channel in this cluster
    "no-op",            # the change would change nothing
    "table-full",       # beyond MAX_CHANNELS or MAX_TABLE_BYTES
)


class BadSnapshot(FitBrokerError, ValueError):
    """
    Bytes given to L{ControlTable.restore} are not a table snapshot.
    """


class Refusal(Exception):
    """
    Why a change is refused: C{reason} (one of L{REASONS}) and a line of text.
    """

    def __init__(self, reason, text):
        super().__init__(text)
        self.reason = reason
        self.text = text


def _canonical(value):
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def canonical_pack(value):
    """
    Return the one msgpack encoding of C{value} that changes and snapshots
    use: maps with their keys sorted, bytes as bin, shortest forms.
    """
    return msgpack.packb(_canonical(value), use_bin_type=True)


def signed_message(cluster_name, change_bytes):
    """
    Return what an administrator signs for C{change_bytes} in cluster
    C{cluster_name}: domain-separated, so the signature means nothing to
    another cluster or any other use of the key.
    """
    return DOMAIN + cluster_name.encode("utf-8") + b"\0" + change_bytes


def table_value(admin, change_bytes, signature):
    """
    Return the value that orders a signed change through the log.
    """
    return (VALUE_KIND, admin, change_bytes, signature)


def check_value(value):
    """
    Return C{None} when C{value} has the shape of a signed table change, or
    a reason string: the stateless check an orderer's C{validate} may run
    before voting for a proposal.
    """
    if type(value) not in (tuple, list) or len(value) != 4 or value[0] != VALUE_KIND:
        return "malformed: expected ('table', admin, change_bytes, signature)"
    _, admin, change_bytes, signature = value
    try:
        _check_envelope(admin, change_bytes, signature)
    except Refusal as refusal:
        return f"{refusal.reason}: {refusal.text}"
    return None


def _check_envelope(admin, change_bytes, signature):
    if type(admin) is not str or not 0 < len(admin.encode("utf-8", "replace")) <= MAX_ADMIN_BYTES:
        raise Refusal("malformed", f"admin must be a client name of 1 to {MAX_ADMIN_BYTES} bytes")
    if type(change_bytes) is not bytes or not 0 < len(change_bytes) <= MAX_CHANGE_BYTES:
        raise Refusal("malformed", f"a change must be 1 to {MAX_CHANGE_BYTES} bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise Refusal("malformed", f"a signature must be {SIGNATURE_BYTES} bytes (Ed25519)")


def _show(value):
    if type(value) is str:
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if type(value) in (list, tuple, dict):
        return f"a {'map' if type(value) is dict else 'list'} of {len(value)}"
    if type(value) is bytes:
        return f"{len(value)} bytes"
    return repr(value)


def _bad(field, expected, found):
    return Refusal("bad-change", f"field {field!r}: expected {expected}, found {_show(found)}")


def _text(change, field, max_bytes, pattern=None, what=None):
    value = change[field]
    what = what or f"a string of 1 to {max_bytes} bytes"
    if type(value) is not str or not value or len(value.encode("utf-8")) > max_bytes:
        raise _bad(field, what, value)
    if pattern is not None and not pattern.match(value):
        raise _bad(field, what, value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _bad(field, f"{what} without control characters", value)
    return value


def _members(change, field):
    value = change[field]
    what = f"a list of at most {MAX_MEMBERS} distinct client names or '*'"
    if type(value) is not list or len(value) > MAX_MEMBERS:
        raise _bad(field, what, value)
    for name in value:
        if type(name) is not str or not 0 < len(name.encode("utf-8")) <= MAX_ADMIN_BYTES:
            raise _bad(field, what, name)
    if len(set(value)) != len(value):
        raise _bad(field, what + " (no name twice)", value)
    return frozenset(value)


def decode_change(change_bytes):
    """
    Return the change map encoded in C{change_bytes}, its fields checked
    for presence, type and bounds (not against any table).

    @raise Refusal: with reason C{bad-change}.
    """
    try:
        change = msgpack.unpackb(
            change_bytes,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_CHANGE_BYTES,
            max_bin_len=0,
            max_ext_len=0,
        )
    except Exception as e:
        raise Refusal("bad-change", f"not one msgpack value: {type(e).__name__}") from None
    if type(change) is not dict:
        raise Refusal("bad-change", f"expected a map, found {_show(change)}")
    if not all(type(k) is str for k in change):
        raise Refusal("bad-change", "map keys must be strings")
    try:
        canonical = canonical_pack(change)
    except Exception as e:
        raise Refusal("bad-change", f"cannot be re-encoded: {type(e).__name__}") from None
    if canonical != change_bytes:
        raise Refusal(
            "bad-change", "not in canonical form (map keys sorted, no key twice, shortest encodings)"
        )
    op = change.get("op")
    if op not in OPS:
        raise _bad("op", f"one of {', '.join(OPS)}", op)
    serial = change.get("serial")
    if type(serial) is not int or not 0 < serial <= MAX_SERIAL:
        raise _bad("serial", "an integer from 1 to 2**63-1", serial)
    required = _REQUIRED[op]
    allowed = required | _OPTIONAL.get(op, set()) | {"op", "serial"}
    missing = sorted(required - set(change))
    if missing:
        raise Refusal("bad-change", f"{op}: missing field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(change) - allowed)
    if unknown:
        raise Refusal(
            "bad-change", f"{op}: unknown field(s) {', '.join(_show(k) for k in unknown)}"
        )
    if op == CREATE:
        _text(change, "tag", MAX_TAG_BYTES, _TAG,
              f"a tag of 1 to {MAX_TAG_BYTES} letters, digits and ._:/- starting with a letter or digit")
    else:
        _text(change, "tag", MAX_TAG_BYTES)
    for field in ("class", "qop", "scheme", "voter"):
        if field in change:
            _text(change, field, MAX_NAME_BYTES)
    if "topic" in change:
        topic = change["topic"]
        if type(topic) is not str or len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
            raise _bad("topic", f"a string of at most {MAX_TOPIC_BYTES} bytes", topic)
    for field in ("publishers", "subscribers"):
        if field in change:
            _members(change, field)
    if "client" in change:
        _text(change, "client", MAX_ADMIN_BYTES)
    if "role" in change and change["role"] not in ROLES:
        raise _bad("role", "'publish' or 'subscribe'", change["role"])
    return change


def _row(spec):
    """
    One channel as the snapshot encodes it.
    """
    return [
        spec.tag, spec.topic, spec.qos.name, spec.qop, spec.scheme, spec.voter,
        sorted(spec.publishers), sorted(spec.subscribers),
    ]


def _row_bytes(spec):
    return len(canonical_pack(_row(spec)))


def _class_info(qos):
    return {
        "urgency_levels": qos.urgency_levels,
        "ordering": qos.ordering,
        "capacity": qos.capacity,
        "ttl": qos.ttl,
        "overflow": qos.overflow,
        "max_bytes": qos.max_bytes,
    }


@attrs.frozen
class TableDiff:
    """
    What changed between two versions of the channels, each tuple sorted by
    tag: the replica creates a channel for each of C{created}, drops those
    of C{removed}, and gives each pair of C{updated} its new spec (class or
    access lists changed).
    """

    created: tuple = ()
    removed: tuple = ()
    updated: tuple = ()

    def __bool__(self):
        return bool(self.created or self.removed or self.updated)


@implementer(IControlTable)
class ControlTable:
    """
    The replicated control table: a deterministic state machine fed signed
    changes in log order.

    The channels mapping is replaced, never changed in place, by each
    applied change, so a caller may keep C{table.channels} from before a
    change and L{diff} against it afterwards.

    @ivar version: changes applied since genesis.
    @ivar admins: the clients whose signed changes are accepted.
    @ivar serials: administrator -> the serial of its last applied change.
    @ivar counters: C{"applied"} and C{"refused:<reason>"} -> count.  Local
        observations: not in the snapshot nor in L{describe}.
    """

    def __init__(self, name, replicas, faults, clients, admins, classes, channels, version=0,
                 serials=None):
        self.name = name
        self.replicas = replicas
        self.faults = faults
        self.clients = frozenset(clients)
        self.admins = frozenset(admins)
        self.classes = dict(classes)
        self._channels = dict(channels)
        self.version = version
        self.serials = dict(serials or {})
        self.counters = {"applied": 0}
        self._bytes = sum(_row_bytes(spec) for spec in self._channels.values())

    @classmethod
    def genesis(cls, config):
        """
        Return the table a L{fit_broker.config.ClusterConfig} describes, at
        version 0.
        """
        return cls(
            config.name, len(config.replicas), config.faults, config.clients, config.admins,
            config.classes, config.channels,
        )

    @property
    def channels(self):
        """
        Tag -> L{ChannelSpec}, read-only.
        """
        return MappingProxyType(self._channels)

    def channel(self, tag):
        return self._channels.get(tag)

    # Applying changes.

    def check(self, admin, change_bytes, signature, verify_key_of):
        """
        Return C{None} when L{apply} would accept this change now, or the
        refusal text: a dry run that changes and counts nothing, for a
        replica to refuse an admin request early.  Only L{apply} at the
        change's log position decides.
        """
        try:
            self._plan(admin, change_bytes, signature, verify_key_of)
        except Refusal as refusal:
            return f"{refusal.reason}: {refusal.text}"
        return None

    def apply(self, admin, change_bytes, signature, verify_key_of):
        """
        Apply one signed change, in log order.

        @param verify_key_of: administrator name -> its Ed25519 public key
            or C{None} (L{fit_broker.keys.KeyRing.verify_key}).
        @return: C{(True, text)} after the version went up by one, or
            C{(False, "<reason>: <why>")} when the change was refused, which
            changed nothing but the refusal counter of that reason.
        """
        try:
            serial, channels, nbytes, summary = self._plan(
                admin, change_bytes, signature, verify_key_of
            )
        except Refusal as refusal:
            key = f"refused:{refusal.reason}"
            self.counters[key] = self.counters.get(key, 0) + 1
            return False, f"{refusal.reason}: {refusal.text}"
        self._channels = channels
        self._bytes = nbytes
        self.serials[admin] = serial
        self.version += 1
        self.counters["applied"] += 1
        return True, f"version {self.version}: {summary}"

    def apply_value(self, value, verify_key_of):
        """
        L{apply} a decided log value C{("table", admin, change_bytes,
        signature)}; a value of another shape is refused as malformed.
        """
        reason = check_value(value)
        if reason is not None:
            key = "refused:malformed"
            self.counters[key] = self.counters.get(key, 0) + 1
            return False, reason
        _, admin, change_bytes, signature = value
        return self.apply(admin, change_bytes, signature, verify_key_of)

    def _plan(self, admin, change_bytes, signature, verify_key_of):
        """
        Return C{(serial, new channels, new byte count, summary)} for an
        acceptable change, or raise L{Refusal}.
        """
        _check_envelope(admin, change_bytes, signature)
        if admin not in self.admins:
            raise Refusal(
                "not-admin",
                f"{_show(admin)} is not an administrator of cluster {self.name!r}; "
                f"administrators: {', '.join(sorted(self.admins)) or 'none'}",
            )
        key = verify_key_of(admin)
        if key is None:
            raise Refusal("no-key", f"no verify key for administrator {admin!r}")
        try:
            key.verify(signature, signed_message(self.name, change_bytes))
        except InvalidSignature:
            raise Refusal(
                "bad-signature",
                f"the signature is not {admin!r}'s over this change for cluster {self.name!r}",
            ) from None
        change = decode_change(change_bytes)
        serial = change["serial"]
        last = self.serials.get(admin, 0)
        if serial <= last:
            raise Refusal(
                "replayed",
                f"serial {serial} of {admin!r} is not above {last}, its last applied change",
            )
        op = change["op"]
        tag = change["tag"]
        channels = dict(self._channels)
        old = channels.get(tag)
        if op == CREATE:
            if old is not None:
                raise Refusal("channel-exists", f"channel {tag!r} exists")
            new = self._new_channel(change)
            summary = f"created channel {tag!r}"
        else:
            if old is None:
                raise Refusal("unknown-channel", f"no channel {tag!r}")
            if op == REMOVE:
                new = None
                summary = f"removed channel {tag!r}"
            elif op == SET_CLASS:
                qos = self._class(change["class"])
                if qos == old.qos:
                    raise Refusal("no-op", f"channel {tag!r} is already of class {qos.name!r}")
                new = attrs.evolve(old, qos=qos)
                summary = f"channel {tag!r} is now of class {qos.name!r}"
            else:
                new, summary = self._access(op, old, change["client"], change["role"])
        nbytes = self._bytes - (_row_bytes(old) if old is not None else 0)
        if new is None:
            del channels[tag]
        else:
            channels[tag] = new
            nbytes += _row_bytes(new)
            if old is None and len(channels) > MAX_CHANNELS:
                raise Refusal("table-full", f"the table holds at most {MAX_CHANNELS} channels")
            if nbytes > MAX_TABLE_BYTES and nbytes > self._bytes:
                raise Refusal(
                    "table-full", f"the table would exceed {MAX_TABLE_BYTES} bytes encoded"
                )
        return serial, channels, nbytes, summary

    def _class(self, name):
        qos = self.classes.get(name)
        if qos is None:
            raise Refusal(
                "unknown-class",
                f"no class {name!r}; classes: {', '.join(sorted(self.classes))}",
            )
        return qos

    def _client(self, name):
        if name != "*" and name not in self.clients:
            raise Refusal(
                "unknown-client",
                f"no client {_show(name)}; clients are those of the cluster file: "
                f"{', '.join(sorted(self.clients)) or 'none'}",
            )

    def _new_channel(self, change):
        tag = change["tag"]
        qos = self._class(change["class"])
        qop = change.get("qop", "cft")
        mode = _component(IQoPMode, qop, "QoP mode")
        try:
            mode.check_cluster(self.replicas, self.faults)
        except ConfigError as e:
            raise Refusal("unfit", f"QoP mode {qop!r}: {e}") from None
        scheme_name = change.get("scheme", "si")
        scheme = _component(IProtectionScheme, scheme_name, "protection scheme")
        if getattr(scheme, "needs_channel_keys", scheme_name == "pke"):
            raise Refusal(
                "unfit",
                f"scheme {scheme_name!r} needs channel keys, which only `fitbroker init` writes; "
                "a channel created at run time can use si, ha or pks",
            )
        voter = change.get("voter", mode.default_voter())
        _component(IVoterFactory, voter, "voter")
        if voter == "signature" and not getattr(scheme, "subscriber_verifiable", False):
            raise Refusal(
                "unfit",
                f"the signature voter needs a scheme subscribers can verify, not {scheme_name!r}",
            )
        members = {}
        for field in ("publishers", "subscribers"):
            names = _members(change, field) if field in change else frozenset()
            for name in sorted(names):
                self._client(name)
            members[field] = names
        return ChannelSpec(
            tag, change.get("topic", tag), qos, qop, scheme_name, voter,
            members["publishers"], members["subscribers"],
        )

    def _access(self, op, old, client, role):
        self._client(client)
        field = "publishers" if role == "publish" else "subscribers"
        names = getattr(old, field)
        verb = "publish to" if role == "publish" else "subscribe to"
        if op == GRANT:
            if client in names:
                raise Refusal("no-op", f"{client!r} may already {verb} {old.tag!r}")
            names = names | {client}
            summary = f"{client!r} may {verb} {old.tag!r}"
        else:
            if client not in names:
                raise Refusal(
                    "no-op", f"{client!r} is not in the {field} of {old.tag!r}"
                )
            names = names - {client}
            summary = f"{client!r} may no longer {verb} {old.tag!r}"
        return attrs.evolve(old, **{field: names}), summary

    # Comparing, saving and showing.

    def diff(self, old):
        """
        Return the L{TableDiff} from C{old} (a channels mapping such as an
        earlier C{table.channels}, or another table) to this table.
        """
        if isinstance(old, ControlTable):
            old = old.channels
        new = self._channels
        return TableDiff(
            created=tuple(new[t] for t in sorted(new) if t not in old),
            removed=tuple(old[t] for t in sorted(old) if t not in new),
            updated=tuple((old[t], new[t]) for t in sorted(new) if t in old and old[t] != new[t]),
        )

    def snapshot(self):
        """
        Return the table as bytes: canonical msgpack, equal on every replica
        that applied the same changes to the same genesis.
        """
        return canonical_pack(
            {
                "format": SNAPSHOT_FORMAT,
                "cluster": self.name,
                "replicas": self.replicas,
                "faults": self.faults,
                "clients": sorted(self.clients),
                "admins": sorted(self.admins),
                "version": self.version,
                "serials": sorted([admin, serial] for admin, serial in self.serials.items()),
                "channels": [_row(self._channels[tag]) for tag in sorted(self._channels)],
            }
        )

    @classmethod
    def restore(cls, data, classes):
        """
        Return the table C{data} (a L{snapshot}) holds, its channels' classes
        taken from C{classes} (name -> L{fit_broker.qos.QoSClass}, the
        cluster file's).

        @raise BadSnapshot: in one line, when C{data} is not a snapshot or
            names a class C{classes} lacks.
        """
        try:
            state = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:
            raise BadSnapshot(f"control table snapshot: undecodable: {type(e).__name__}") from None
        fields = {"format", "cluster", "replicas", "faults", "clients", "admins", "version",
                  "serials", "channels"}
        if type(state) is not dict or set(state) != fields:
            raise BadSnapshot(f"control table snapshot: expected a map of {', '.join(sorted(fields))}")
        if state["format"] != SNAPSHOT_FORMAT:
            raise BadSnapshot(f"control table snapshot: format {state['format']!r}, expected 1")

        def strings(value, what):
            if type(value) is not list or not all(type(v) is str for v in value):
                raise BadSnapshot(f"control table snapshot: {what}: expected a list of strings")
            return value

        def integer(value, what):
            if type(value) is not int or value < 0:
                raise BadSnapshot(f"control table snapshot: {what}: expected an integer >= 0")
            return value

        if type(state["cluster"]) is not str:
            raise BadSnapshot("control table snapshot: cluster: expected a name")
        serials = {}
        if type(state["serials"]) is not list:
            raise BadSnapshot("control table snapshot: serials: expected a list")
        for entry in state["serials"]:
            if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not str:
                raise BadSnapshot("control table snapshot: serials: expected [admin, serial] pairs")
            serials[entry[0]] = integer(entry[1], "serials")
        channels = {}
        if type(state["channels"]) is not list:
            raise BadSnapshot("control table snapshot: channels: expected a list")
        for row in state["channels"]:
            if (
                type(row) is not list
                or len(row) != 8
                or not all(type(v) is str for v in row[:6])
            ):
                raise BadSnapshot("control table snapshot: channels: expected rows of 8 fields")
            tag, topic, class_name, qop, scheme, voter, publishers, subscribers = row
            if class_name not in classes:
                raise BadSnapshot(
                    f"control table snapshot: channel {tag!r} has class {class_name!r}, "
                    f"which the cluster file lacks; classes: {', '.join(sorted(classes))}"
                )
            channels[tag] = ChannelSpec(
                tag, topic, classes[class_name], qop, scheme, voter,
                frozenset(strings(publishers, f"channel {tag!r} publishers")),
                frozenset(strings(subscribers, f"channel {tag!r} subscribers")),
            )
        table = cls(
            state["cluster"],
            integer(state["replicas"], "replicas"),
            integer(state["faults"], "faults"),
            strings(state["clients"], "clients"),
            strings(state["admins"], "admins"),
            classes,
            channels,
            version=integer(state["version"], "version"),
            serials=serials,
        )
        if table.snapshot() != data:
            raise BadSnapshot("control table snapshot: not in canonical form")
        return table

    def __eq__(self, other):
        if not isinstance(other, ControlTable):
            return NotImplemented
        return self.snapshot() == other.snapshot()

    __hash__ = None

    def describe(self):
        """
        Return the table as plain data for C{status} and C{fitbroker admin
        table}: equal on every correct replica at one version (counters are
        left out for that reason).
        """
        return {
            "cluster": self.name,
            "version": self.version,
            "admins": sorted(self.admins),
            "classes": {name: _class_info(self.classes[name]) for name in sorted(self.classes)},
            "channels": {
                tag: {
                    "topic": spec.topic,
                    "class": spec.qos.name,
                    "qop": spec.qop,
                    "scheme": spec.scheme,
                    "voter": spec.voter,
                    "publishers": sorted(spec.publishers),
                    "subscribers": sorted(spec.subscribers),
                }
                for tag, spec in sorted(self._channels.items())
            },
        }


def _component(interface, name, what):
    found = registry.available(interface)
    plugin = found.get(name)
    if plugin is None:
        raise Refusal(
            "unknown-component",
            f"no {what} called {name!r}; available: {', '.join(sorted(found))}",
        )
    return plugin
