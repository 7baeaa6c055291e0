"""
FIT Broker: a fault- and intrusion-tolerant publish/subscribe event broker.
"""

__version__ = "0.1.0"
