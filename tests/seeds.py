"""
Choosing the runs of a seeded simulation test: every test file that draws
its runs from C{(kind, seed)} pairs takes C{--NAME KIND:N} (repeatable) to
replay chosen runs, marks known bugs as strict expected failures, and says
how to replay a failing run.
"""

import shlex

import pytest


def add_seed_options(parser, group, option, seeds_help, seed_help):
    """
    Add C{OPTIONs N} (how many seeds to run) and C{OPTION KIND:N}
    (repeatable: replay only those runs) under the help group C{group}.
    """
    group = parser.getgroup(group)
    group.addoption(f"{option}s", type=int, default=None, metavar="N", help=seeds_help)
    group.addoption(option, action="append", default=[], metavar="KIND:N", help=seed_help)


def replay_command(path, option, kind, seed):
    """The command that runs seed C{seed} of C{kind} in test file C{path} alone."""
    return f"python3 -m pytest {path} -p no:cacheprovider -q " + shlex.quote(f"{option}={kind}:{seed}")


def chosen_runs(config, option, kinds):
    """
    The C{(kind, seed)} runs named by C{option} (such as C{--seed}) on the
    command line, or C{None} if it was not given.
    """
    chosen = config.getoption(option.lstrip("-").replace("-", "_"))
    if not chosen:
        return None
    runs = []
    for text in chosen:
        kind, _, seed = text.rpartition(":")
        if kind not in kinds or not seed.isdigit():
            raise pytest.UsageError(f"{option} {text!r}: expected KIND:N, KIND one of {', '.join(kinds)}")
        runs.append((kind, int(seed)))
    return runs


def parametrize_runs(metafunc, runs, known_bugs):
    """
    Parametrize C{kind} and C{seed} over C{runs}; a run in C{known_bugs}
    (C{(kind, seed)} -> why) is expected to fail until the bug is fixed.
    """
    metafunc.parametrize(
        ("kind", "seed"),
        [
            pytest.param(
                kind, seed, id=f"{kind}-{seed}",
                marks=[pytest.mark.xfail(strict=True, reason=known_bugs[(kind, seed)])]
                if (kind, seed) in known_bugs else [],
            )
            for kind, seed in runs
        ],
    )
