"""
Finding named components among the plugins of L{fit_broker.plugins}.

Each kind of component is an interface: the registry of that kind is the set
of plugins providing it, built-in or dropped into a folder the configuration
names.  Callers, the configuration reader first, depend on names and
interfaces only, never on implementation modules.
"""

import os
import pickle

from twisted.logger import Logger
from twisted.plugin import getPlugins

from fit_broker import plugins
from fit_broker.errors import UnknownComponent
from fit_broker.interfaces import IOrderingFactory, IProtectionScheme, IQoPMode, IVoterFactory

KINDS = {
    IQoPMode: "QoP mode",
    IOrderingFactory: "ordering protocol",
    IVoterFactory: "voter",
    IProtectionScheme: "protection scheme",
}

log = Logger()

# (interface, search path) -> {name: plugin}: scanning reads every plugin
# folder, and some lookups (a publish's quorum) happen per request.
_found = {}


def add_plugin_folder(path):
    """
    Make the plugin modules in folder C{path} visible to every lookup.

    @raise UnknownComponent: when C{path} is not a folder.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UnknownComponent(f"plugin folder {path!r} does not exist")
    if path not in plugins.__path__:
        _forget_foreign_cache(path)
        plugins.__path__.append(path)


def _forget_foreign_cache(path):
    """
    Remove the C{dropin.cache} of folder C{path} when it records modules of
    another package: Twisted trusts the module names in a cache that is
    newer than the modules, so a folder once scanned as a drop-in of
    C{fit_broker.schemes} (before all kinds moved to L{fit_broker.plugins})
    would hide its modules for good.
    """
    cache = os.path.join(path, "dropin.cache")
    try:
        with open(cache, "rb") as f:
            dropins = pickle.load(f)
        prefix = plugins.__name__ + "."
        if all(dropin.moduleName.startswith(prefix) for dropin in dropins.values()):
            return
    except FileNotFoundError:
        return
    except Exception:
        pass  # unreadable: Twisted rebuilds it, and so do we
    try:
        os.remove(cache)
    except OSError as e:
        log.warn("cannot remove the stale plugin cache {cache}: {error}", cache=cache, error=e.strerror)


def add_plugin_folders(config):
    """
    Add every folder of C{config.plugin_folders}.
    """
    for folder in config.plugin_folders:
        add_plugin_folder(folder)


def available(interface):
    """
    Return a dict of name -> plugin for every plugin providing C{interface};
    of two with one name, the first found (built-ins first) wins.
    """
    return dict(_scan(interface))


def _scan(interface):
    """
    Return the cached name -> plugin map of C{interface} for the current
    search path; a folder's modules are scanned once per process.
    """
    key = (interface, tuple(plugins.__path__))
    found = _found.get(key)
    if found is None:
        found = {}
        for plugin in getPlugins(interface, plugins):
            found.setdefault(plugin.name, plugin)
        _found[key] = found
    return found


def names(interface):
    """
    Return the sorted names of the plugins providing C{interface}.
    """
    return sorted(available(interface))


def find(interface, name):
    """
    Return the plugin providing C{interface} called C{name}.

    @raise UnknownComponent: in one line listing the names that exist.
    """
    found = _scan(interface)
    try:
        return found[name]
    except KeyError:
        raise UnknownComponent(
            f"no {KINDS.get(interface, interface.__name__)} called {name!r}; "
            f"available: {', '.join(sorted(found))}"
        ) from None
