"""
The syslog ingest adapter's sans-IO core: RFC 6587 stream framing, RFC 5424
and RFC 3164 parsing into one JSON event format, and routing to channels.

Nothing here touches sockets or the reactor, so every behaviour is tested by
feeding bytes and reading values.
"""
