"""
The built-in ordering protocols, as plugins.
"""

from fit_broker.ordering import mod_smart, multi_paxos

__all__ = ["mod_smart", "multi_paxos"]
