"""
The built-in ordering protocols, as plugins.
"""

from fit_broker.ordering import no_ordering

__all__ = ["no_ordering"]
