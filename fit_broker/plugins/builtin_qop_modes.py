"""
The built-in QoP modes, as plugins.
"""

from fit_broker.qop import bft, cft

__all__ = ["bft", "cft"]
