"""
Errors a user or a peer can cause, each with a precise code and text.
"""

import attrs


class FitBrokerError(Exception):
    """
    Base of the errors FIT Broker reports to users in one line.
    """


class ConfigError(FitBrokerError):
    """
    A configuration file is missing or invalid; the message names the file,
    the key and what was expected.
    """


class UnknownComponent(ConfigError):
    """
    A channel names a component (scheme, voter, mode, ordering) that no
    implementation provides.
    """


class ProtocolError(FitBrokerError):
    """
    A peer sent bytes that are not a valid frame or message.
    """


class RequestFailed(FitBrokerError):
    """
    The cluster answered a request with an error status.
    """

    def __init__(self, status, text):
        super().__init__(f"{text} ({status})")
        self.status = status
        self.text = text


class NoQuorum(FitBrokerError):
    """
    Too few replicas answered in time for the request to succeed.
    """


@attrs.frozen
class Status:
    """
    Status codes carried in replies.
    """

    OK = "ok"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_CHANNEL = "unknown-channel"
    UNKNOWN_METHOD = "unknown-method"
    BAD_REQUEST = "bad-request"
    NOT_SUBSCRIBED = "not-subscribed"
    AUTH_FAILED = "auth-failed"
    QUEUE_FULL = "queue-full"
    BUSY = "busy"
