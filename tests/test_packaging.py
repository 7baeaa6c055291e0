"""
The built wheel ships the twistd plugin without shadowing Twisted's own package.
"""

import os
import subprocess
import sys
import zipfile

import pytest

from tests.processes import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), ROOT],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("fit_broker-*.whl")
    return path


def test_wheel_holds_the_plugin_and_no_twisted_init(wheel):
    """The wheel has twisted/plugins/fitbroker_plugin.py and neither twisted/__init__.py nor twisted/plugins/__init__.py."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/fitbroker_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "fit_broker/schemes/si.py" in names
    for kind in ("schemes", "qop_modes", "voters", "orderings"):
        assert f"fit_broker/plugins/builtin_{kind}.py" in names
    assert not any(name.startswith("tests/") for name in names)


def test_installed_wheel_is_found_by_twistd(wheel, tmp_path):
    """Unpacked where Python looks, the wheel's twistd plugin and built-in voter plugins are found by getPlugins."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "import fit_broker\n"
        "assert fit_broker.__file__.startswith(%r), fit_broker.__file__\n"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
        "from fit_broker import plugins\n"
        "from fit_broker.interfaces import IVoterFactory\n"
        "print(sorted(p.name for p in getPlugins(IVoterFactory, plugins)))\n" % str(target)
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()
    assert "'fitbroker'" in result.stdout.decode()
    assert "['f-plus-one', 'first-copy', 'signature']" in result.stdout.decode()


def test_wheel_holds_every_module_of_the_package(wheel):
    """Every module under fit_broker/ in the tree is in the wheel, so no package is left out of pyproject's list."""
    names = set(zipfile.ZipFile(wheel).namelist())
    package = os.path.join(ROOT, "fit_broker")
    missing = []
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
                if relative not in names:
                    missing.append(relative)
    assert missing == []
