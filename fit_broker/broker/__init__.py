"""
L3, the broker service algorithm: control table, channels, per-subscriber
queues, routing, deduplication, TTL and priorities.  No I/O, no clock: every
call takes C{now}.
"""
