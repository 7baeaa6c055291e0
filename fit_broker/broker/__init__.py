"""
L3, the broker state machine: control table, channels, per-subscriber
queues, routing, deduplication, TTL and priorities.  No I/O, no clock: every
call takes C{now}.
"""
