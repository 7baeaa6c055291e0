"""
A Byzantine replica process for loopback tests: a real replica whose
outgoing frames a behaviour of L{tests.byzantine} rewrites.

    python -m tests.byzantine_replica CONFIG INDEX BEHAVIOUR

BEHAVIOUR is one of alter, forge, replay, garbage, withhold (send nothing to
subscribers), acks-without-storing (acknowledge every publish and store
nothing), bogus-copies (100 KB invented full copies claiming a TTL of 1e12 s
with each delivery) and requests-to-clients (request frames and long error
replies with everything sent).
"""

import sys


def main(argv):
    config_path, index, name = argv[0], int(argv[1]), argv[2]
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.task import LoopingCall
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from fit_broker.config import load_config
    from fit_broker.credentials import replica_credentials
    from fit_broker.replica.service import Replica
    from fit_broker.schemes.registry import scheme_lookup
    from tests import byzantine

    def unchanged(protocol, message):
        return [message]

    behaviours = {
        "alter": lambda: byzantine.alter,
        "forge": byzantine.forge_events,
        "replay": byzantine.replay,
        "garbage": byzantine.garbage,
        "withhold": lambda: byzantine.withhold,
        "acks-without-storing": lambda: unchanged,
        "bogus-copies": byzantine.bogus_full_copies,
        "requests-to-clients": lambda: byzantine.requests_to_clients,
    }
    if name not in behaviours:
        sys.exit(f"unknown behaviour {name!r}; known: {', '.join(behaviours)}")
    kind = byzantine.AcksWithoutStoring if name == "acks-without-storing" else Replica
    config = load_config(config_path)
    keys, tls_options, identify = replica_credentials(config, index)
    replica = kind(config, index, reactor, scheme_lookup(config), keys, identify)
    for channel in replica.broker.channels.values():
        channel.light_copies = None
    behaviour = behaviours[name]()
    factory = Factory.forProtocol(lambda: byzantine.ByzantineReplicaProtocol(replica, behaviour))
    if tls_options is not None:
        factory = TLSMemoryBIOFactory(tls_options, False, factory)
    serverFromString(reactor, config.replicas[index].listen).listen(factory)
    LoopingCall(replica.expire).start(1.0)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
