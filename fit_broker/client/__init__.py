"""
L1, the event broker interface for publishers and subscribers, and the L2
service proxy under it.
"""
