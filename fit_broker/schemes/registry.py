"""
Finding protection schemes by name among the plugins.
"""

import os

from twisted.plugin import getPlugins

from fit_broker import schemes
from fit_broker.errors import UnknownComponent
from fit_broker.interfaces import IProtectionScheme


def add_plugin_folder(path):
    """
    Make the scheme modules in folder C{path} visible to L{find_scheme}.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UnknownComponent(f"plugin folder {path!r} does not exist")
    if path not in schemes.__path__:
        schemes.__path__.append(path)


def available_schemes():
    """
    Return a dict of scheme name -> scheme for every plugin found.
    """
    found = {}
    for scheme in getPlugins(IProtectionScheme, schemes):
        found.setdefault(scheme.name, scheme)
    return found


def find_scheme(name):
    """
    Return the scheme called C{name}, or raise L{UnknownComponent} listing
    the names that exist.
    """
    found = available_schemes()
    try:
        return found[name]
    except KeyError:
        raise UnknownComponent(
            f"no protection scheme called {name!r}; available: {', '.join(sorted(found))}"
        ) from None


def scheme_uses_keys(scheme):
    """
    Whether C{scheme} needs key material: every scheme does unless it says
    otherwise with C{uses_keys = False} (SI, which trusts the connection's
    identity, and schemes such as the ROT13 demo that authenticate nothing),
    so that a keyed plugin never runs without its keys.
    """
    return getattr(scheme, "uses_keys", scheme.name != "si")


def scheme_lookup(config):
    """
    Return a function from scheme name to scheme for C{config}'s channels,
    after checking that every channel's scheme exists.

    @raise UnknownComponent: naming the channel and the schemes that exist.
    """
    for folder in config.plugin_folders:
        add_plugin_folder(folder)
    found = available_schemes()
    for tag, spec in config.channels.items():
        if spec.scheme not in found:
            raise UnknownComponent(
                f"{config.path}: channel {tag!r} names protection scheme {spec.scheme!r}, "
                f"which no plugin provides; available: {', '.join(sorted(found))}"
            )
        if spec.voter == "signature" and not found[spec.scheme].subscriber_verifiable:
            raise UnknownComponent(
                f"{config.path}: channel {tag!r} uses the signature voter, which needs a scheme "
                f"subscribers can verify (such as pks or pke), not {spec.scheme!r}"
            )
    return found.__getitem__
