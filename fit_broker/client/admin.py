"""
The administrator's side of the control table: signing changes, sending
them to every replica, and reading the table the replicas agree on.

A change counts as made once a quorum of replicas (L{admin_quorum}) said it
was applied at the same version, and the table as read once f+1 replicas
answered identically: at least one of them is correct.
"""

import threading
import time

from twisted.internet.defer import Deferred

from fit_broker import units
from fit_broker.control import canonical_pack, signed_message
from fit_broker.errors import ConfigError, NoQuorum
from fit_broker.units import Request

_serial_lock = threading.Lock()
_last_serial = 0


def next_serial():
    """
    Return the serial of a new change: the time in nanoseconds, strictly
    increasing within this process, so that a later change of one
    administrator always carries a higher serial than its earlier ones.
    """
    global _last_serial
    with _serial_lock:
        _last_serial = max(time.time_ns(), _last_serial + 1)
        return _last_serial


def sign_change(keys, cluster_name, admin, change, serial=None):
    """
    Encode C{change} (a dict such as C{{"op": "grant", "tag": ..., ...}})
    with its serial, and sign it as C{admin} for cluster C{cluster_name}.

    @param serial: the serial to carry, or C{None} for L{next_serial}; it
        replaces any C{"serial"} in C{change}.
    @return: C{(change_bytes, signature)}.
    @raise ConfigError: when C{keys} holds no signing key of C{admin}.
    """
    key = keys.signing_key(admin) if keys is not None else None
    if key is None:
        raise ConfigError(
            f"no signing key of {admin!r}: administrators sign table changes with the key "
            "`fitbroker init` wrote for them"
        )
    change = dict(change, serial=next_serial() if serial is None else serial)
    change_bytes = canonical_pack(change)
    return change_bytes, key.sign(signed_message(cluster_name, change_bytes))


def admin_quorum(config):
    """
    Return how many replicas must report a change applied: the highest
    publish quorum of the cluster's channels (2f+1 when one is BFT), or
    f+1 for a cluster without channels.
    """
    quorums = [config.acks_needed(tag) for tag in config.channels]
    return max(quorums, default=config.faults + 1)


def _frozen(value):
    """
    Return a hashable form of reply data, equal for equal data whatever
    the order of map keys.
    """
    if isinstance(value, dict):
        return ("map", tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_frozen(v) for v in value))
    return (type(value).__name__, value)


class Administrator:
    """
    Changes the control table as the proxy's client, with its key ring.

    @ivar proxy: a L{fit_broker.client.proxy.ServiceProxy} (or anything with
        its C{config}, C{client}, C{reactor}, C{timeout}, C{next_seq} and
        C{invoke}).
    """

    def __init__(self, proxy, keys):
        self.proxy = proxy
        self.keys = keys
        self.admin = proxy.client

    def change(self, change, timeout=None):
        """
        Sign C{change} and send it to every replica.

        @return: a Deferred firing with the reply info (C{{"version": v,
            ...}}) once L{admin_quorum} replicas reported the change applied
            at the same version, or failing with
            L{fit_broker.errors.RequestFailed} carrying the replicas'
            reason when so many refused that the quorum cannot be reached,
            or with L{NoQuorum}.
        """
        config = self.proxy.config
        change_bytes, signature = sign_change(self.keys, config.name, self.admin, change)
        request = Request(
            self.proxy.next_seq(),
            units.ADMIN,
            options={"change": change_bytes, "signature": signature},
        )

        def key(info):
            version = info.get("version")
            if type(version) is not int:
                return None
            return version

        return self._agreed(request, admin_quorum(config), key, timeout, str(change.get("op")))

    def table(self, timeout=None):
        """
        Ask every replica for the control table.

        @return: a Deferred firing with the info C{{"version": v, "table":
            {...}}} that f+1 replicas answered identically.
        """
        request = Request(self.proxy.next_seq(), units.TABLE)
        return self._agreed(request, self.proxy.config.faults + 1, _frozen, timeout, "table")

    def _agreed(self, request, quorum, key, timeout, what):
        """
        Send C{request} and fire once C{quorum} ok replies have equal
        C{key(info)}: the proxy's quorum alone counts replies, not what they
        say, and a faulty replica may answer ok with another version.
        """
        proxy = self.proxy
        timeout = proxy.timeout if timeout is None else timeout
        result = Deferred()
        votes = {}
        state = {"timer": None}

        def finish(outcome, fail=False):
            if result.called:
                return
            timer = state["timer"]
            if timer is not None and timer.active():
                timer.cancel()
            if fail:
                result.errback(outcome)
            else:
                result.callback(outcome)

        def observe(index, reply):
            info = reply.info if isinstance(reply.info, dict) else {}
            try:
                k = key(info)
            except Exception:
                k = None
            if k is None:
                return
            voters = votes.setdefault(k, {})
            voters.setdefault(index, info)
            if len(voters) >= quorum:
                finish(info)

        def quorum_met(reply):
            # quorum ok replies, but not quorum equal ones: wait for more
            if result.called:
                return
            state["timer"] = proxy.reactor.callLater(max(0.0, timeout), split)

        def split():
            counts = sorted((len(v) for v in votes.values()), reverse=True)
            finish(
                NoQuorum(
                    f"{what}: replicas answered ok but disagree ({counts} matching replies, "
                    f"{quorum} needed)"
                ),
                fail=True,
            )

        d = proxy.invoke(request, quorum, timeout=timeout, observe=observe)
        d.addCallbacks(quorum_met, lambda failure: finish(failure, fail=True))
        return result


def table_channels(config, info):
    """
    Return C{tag -> ChannelSpec} for the channels of a control table as
    L{Administrator.table} gives it, with the QoS classes of C{config}
    (channels of a class this file lacks are left out).
    """
    from fit_broker.config import ChannelSpec

    channels = {}
    rows = info.get("table", {}).get("channels", {}) if isinstance(info, dict) else {}
    for tag, row in rows.items():
        try:
            qos = config.classes.get(row["class"])
            if qos is None:
                continue
            channels[tag] = ChannelSpec(
                tag, row["topic"], qos, row["qop"], row["scheme"], row["voter"],
                frozenset(row["publishers"]), frozenset(row["subscribers"]),
            )
        except (KeyError, TypeError):
            continue
    return channels
