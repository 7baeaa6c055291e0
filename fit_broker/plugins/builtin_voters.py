"""
The built-in voters, as plugins.
"""

from fit_broker.voters import first_copy, f_plus_one, signature

__all__ = ["f_plus_one", "first_copy", "signature"]
