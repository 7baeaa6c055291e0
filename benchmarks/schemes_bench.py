"""
Micro-benchmark of the protection schemes: events per second on one core.

Each party runs on its own scheme instance, as in separate processes, so
that no cache carries over from one to the next: the publisher protects a
batch, a replica checks it, a subscriber checks the first copy it gets and
then a duplicate from another replica, and opens it (decrypting, for PKE,
and decoding the contents).

    python benchmarks/schemes_bench.py [--batch 100] [--size 256] [--seconds 1] [scheme ...]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fit_broker.keys import generate_keyrings  # noqa: E402
from fit_broker.schemes.registry import find_scheme  # noqa: E402
from fit_broker.units import pack_contents  # noqa: E402

SCHEMES = ("si", "ha", "pks", "pke")
STAGES = ("protect", "check_batch", "delivered", "delivered dup", "open", "protect+check")


def _rate(seconds, events_per_call, call):
    """
    Return events per second of C{call}, best of three runs of about
    C{seconds} / 3 each, so that a neighbour's burst of work on a shared
    machine does not set the figure.
    """
    best = 0.0
    for _ in range(3):
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds / 3
        while True:
            call()
            calls += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, calls * events_per_call / (now - start))
    return best


def bench(name, batch_size, size, seconds):
    rings = generate_keyrings(4, ["probe", "console"], {"alerts": ["probe", "console"]})
    publisher, replica, subscriber = rings["probe"], rings["replica-0"], rings["console"]
    scheme = find_scheme(name)
    fresh = type(scheme)
    ids = iter(range(1, 1 << 62, batch_size))

    def new_batch():
        contents = [os.urandom(size) for _ in range(batch_size)]
        return ("probe", next(ids), time.time(), 60.0, 1, pack_contents(contents), b"")

    plain = new_batch()
    protected = [scheme.protect(publisher, "alerts", new_batch()) for _ in range(64)]
    turn = iter(range(1 << 62))

    def next_protected():
        return protected[next(turn) % len(protected)]

    def protect():
        scheme.protect(publisher, "alerts", plain)

    def check_batch():
        # A replica sees each batch once: no cache may help it.
        assert fresh().check_batch(replica, "alerts", "probe", next_protected()) is None

    def delivered():
        assert fresh().check_delivered(subscriber, "alerts", next_protected()) is None

    warm = fresh()
    for batch in protected:
        warm.check_delivered(subscriber, "alerts", batch)

    def delivered_dup():
        assert warm.check_delivered(subscriber, "alerts", next_protected()) is None

    def open_batch():
        scheme.open(subscriber, "alerts", next_protected())

    def protect_and_check():
        batch = scheme.protect(publisher, "alerts", plain)
        fresh().check_batch(replica, "alerts", "probe", batch)

    calls = {
        "protect": protect,
        "check_batch": check_batch,
        "delivered": delivered,
        "delivered dup": delivered_dup,
        "open": open_batch,
        "protect+check": protect_and_check,
    }
    rates = {stage: _rate(seconds, batch_size, call) for stage, call in calls.items()}
    overhead = len(protected[0][6]) + len(protected[0][5]) - len(plain[5])
    return rates, overhead


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--size", type=int, default=256, help="bytes per event")
    parser.add_argument("--seconds", type=float, default=1.5, help="time per figure")
    parser.add_argument("schemes", nargs="*", default=list(SCHEMES))
    args = parser.parse_args(argv)
    print(f"batch {args.batch}, {args.size}-byte events: events/s on one core")
    print(f"{'scheme':8}" + "".join(f"{stage:>15}" for stage in STAGES) + f"{'bytes/batch':>13}")
    for name in args.schemes:
        rates, overhead = bench(name, args.batch, args.size, args.seconds)
        print(
            f"{name:8}"
            + "".join(f"{rates[stage]:>15,.0f}" for stage in STAGES)
            + f"{overhead:>13}"
        )


if __name__ == "__main__":
    main()
