"""
Options for the seeded simulation tests (tests/test_seeded_sim.py).
"""


def pytest_addoption(parser):
    group = parser.getgroup("seeded simulation")
    group.addoption(
        "--seeds", type=int, default=None, metavar="N",
        help="run N seeds per adversary kind in tests/test_seeded_sim.py (default 20)",
    )
    group.addoption(
        "--seed", action="append", default=[], metavar="KIND:N",
        help="run only seed N of adversary KIND (repeatable), to replay a failing run",
    )
