"""
Options for the seeded simulation tests (tests/test_seeded_sim.py).
"""

import pytest

from tests.seeds import add_seed_options


def pytest_addoption(parser):
    add_seed_options(
        parser, "seeded simulation", "--seed",
        seeds_help="run N seeds per adversary kind in tests/test_seeded_sim.py (default 20)",
        seed_help="run only seed N of adversary KIND (repeatable), to replay a failing run",
    )
    add_seed_options(
        parser, "agreement simulation", "--agreement-seed",
        seeds_help="run N seeds in all, spread over the kinds, in tests/test_agreement_sim.py (default 2016)",
        seed_help="run only seed N of agreement kind KIND (repeatable), to replay a failing run",
    )


@pytest.fixture(autouse=True, scope="session")
def _delivery_state_in_a_temporary_folder(tmp_path_factory):
    """
    Subscribers started by the tests (`fitbroker tail` keeps delivery state
    by default) write it under a temporary folder, never the user's.
    """
    import os

    folder = str(tmp_path_factory.mktemp("xdg-state"))
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = folder
    yield folder
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old
