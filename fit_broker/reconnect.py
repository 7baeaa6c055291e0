"""
Links that come back: one place for how clients and replicas reconnect.

A client's proxy keeps a connection to every replica, and every replica
keeps one to every other; both retry the same way, so that a replica that
restarts is found again within seconds by everyone, and one that stays down
is not hammered.
"""

from twisted.application.internet import ClientService, backoffPolicy

#: Seconds before the first retry, doubled (with jitter) up to MAX_DELAY.
INITIAL_DELAY = 0.1
MAX_DELAY = 5.0
FACTOR = 2.0


def retry_policy(initial_delay=INITIAL_DELAY, max_delay=MAX_DELAY, factor=FACTOR):
    """
    Return the backoff between connection attempts: exponential from
    C{initial_delay} seconds to at most C{max_delay}, with jitter so that
    many parties that lost the same replica do not all retry in step.
    """
    return backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay, factor=factor)


def reconnecting(endpoint, factory, clock, policy=None):
    """
    Return a L{ClientService}, not yet started, that keeps one connection of
    C{factory} to C{endpoint} open, retrying after failures and losses with
    C{policy} (by default L{retry_policy}).

    @param clock: the reactor, or a test clock, that times the retries.
    """
    return ClientService(
        endpoint, factory, retryPolicy=policy or retry_policy(), clock=clock
    )
