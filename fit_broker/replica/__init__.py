"""
L2, replica side: Twisted services and protocols that move frames between
clients and the broker state machine (L3).
"""
