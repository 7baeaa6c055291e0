"""
Finding protection schemes by name among the plugins.
"""

from fit_broker import registry
from fit_broker.errors import UnknownComponent
from fit_broker.interfaces import IProtectionScheme

add_plugin_folder = registry.add_plugin_folder


def available_schemes():
    """
    Return a dict of scheme name -> scheme for every plugin found.
    """
    return registry.available(IProtectionScheme)


def find_scheme(name):
    """
    Return the scheme called C{name}, or raise L{UnknownComponent} listing
    the names that exist.
    """
    return registry.find(IProtectionScheme, name)


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
    registry.add_plugin_folders(config)
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
