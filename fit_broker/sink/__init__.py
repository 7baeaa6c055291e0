"""
Forwarding voted events to SIEMs: RFC 5424 syslog over TCP or TLS, JSON
lines in rotated files, and a live web console.
"""
