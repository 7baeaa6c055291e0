"""
The agreement engine under the seeded simulation of tests/agreement_sim.py:
thousands of runs spread over adversary kinds, each checking agreement,
validity and no duplicate decisions at every decision and liveness after
the network heals.

A failing run prints how to replay it: ``--agreement-seed KIND:N``;
``--agreement-seeds N`` runs N seeds in all.
"""

import pytest

from tests.agreement_sim import KINDS, Broken, Sim
from tests.seeds import chosen_runs, parametrize_runs
from tests.seeds import replay_command as _replay_command

DEFAULT_SEEDS = 2016

# (kind, seed) -> why: runs that find a known bug, expected to fail until it is fixed.
KNOWN_BUGS = {}


def replay_command(kind, seed):
    return _replay_command("tests/test_agreement_sim.py", "--agreement-seed", kind, seed)


def pytest_generate_tests(metafunc):
    if "kind" not in metafunc.fixturenames:
        return
    runs = chosen_runs(metafunc.config, "--agreement-seed", KINDS)
    if runs is None:
        total = metafunc.config.getoption("agreement_seeds") or DEFAULT_SEEDS
        per_kind = max(1, total // len(KINDS))
        runs = [(kind, seed) for kind in KINDS for seed in range(per_kind)]
    parametrize_runs(metafunc, runs, KNOWN_BUGS)


def test_agreement_run(kind, seed):
    """A seeded run keeps agreement, validity and single decision of each value, and every required value is decided after healing."""
    sim = Sim(kind, seed)
    try:
        summary = sim.run()
    except Broken as e:
        pytest.fail(f"{e}\nreplay: {replay_command(kind, seed)}", pytrace=False)
    assert summary["decided"] >= 0 and not sim.required or all(k in sim.where for k in sim.required)


def test_real_signatures():
    """Runs with Ed25519 signatures instead of the keyed-hash stand-in keep every property too."""
    for kind, seed in (("mutate", 1), ("equivocate", 2), ("crash", 3), ("lying_state", 4)):
        sim = Sim(kind, seed, ed25519=True)
        try:
            sim.run()
        except Broken as e:
            pytest.fail(f"{e}\nreplay with Ed25519: Sim({kind!r}, {seed}, ed25519=True).run()", pytrace=False)
        assert all(k in sim.where for k in sim.required)
