"""
A malicious certified publisher for loopback tests: it sends each replica
different one-event batches (batch n goes to replica n mod 4 only), so no
batch can ever gather f+1 votes and each one sits in voters until evicted.

    python -m tests.split_publisher CONFIG CLIENT CHANNELS BATCHES [PER_SECOND]

It prints one JSON line, {"sent": N}, when done.
"""

import json
import sys


def main(argv):
    config_path, client, channels, total = argv[0], argv[1], argv[2].split(","), int(argv[3])
    per_second = float(argv[4]) if len(argv) > 4 else 2000.0
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    from fit_broker import units
    from fit_broker.client.session import open_session
    from fit_broker.config import load_config
    from fit_broker.units import Request, pack_contents

    config = load_config(config_path)
    result = {"sent": 0}

    async def run():
        session = open_session(config, client, reactor, timeout=10.0)
        try:
            replicas = len(config.replicas)
            await session.proxy.wait_for_links(replicas, 30)
            publisher = session.publisher
            base = 10**15
            step = 50
            for start in range(0, total, step):
                for n in range(start, min(total, start + step)):
                    tag = channels[n % len(channels)]
                    scheme = publisher.schemes(config.channels[tag].scheme)
                    ttl = config.channels[tag].qos.ttl
                    batch = (client, base + n, reactor.seconds(), ttl, 0, pack_contents([b"junk %d" % n]), b"")
                    batch = scheme.protect(publisher.keys, tag, batch)
                    session.proxy.send(n % replicas, Request(0, units.PUBLISH, tag, 0, (batch,)))
                    result["sent"] += 1
                await deferLater(reactor, step / per_second, lambda: None)
            await deferLater(reactor, 0.5, lambda: None)
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            session.stop()
            reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.run()
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
