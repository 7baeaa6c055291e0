"""
The built-in protection schemes, as plugins.
"""

from fit_broker.schemes.ha import ha
from fit_broker.schemes.pke import pke
from fit_broker.schemes.pks import pks
from fit_broker.schemes.si import si

__all__ = ["ha", "pke", "pks", "si"]
