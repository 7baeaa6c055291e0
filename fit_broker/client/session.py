"""
A client's connection to a cluster: the proxy, a publisher and a subscriber.
"""

import attrs

from fit_broker.client.proxy import ServiceProxy
from fit_broker.client.publisher import Publisher
from fit_broker.client.subscriber import Subscriber
from fit_broker.credentials import client_credentials
from fit_broker.errors import ConfigError
from fit_broker.schemes.registry import scheme_lookup


@attrs.define
class Session:
    proxy: ServiceProxy
    publisher: Publisher
    subscriber: Subscriber

    def stop(self):
        self.subscriber.stop()
        self.proxy.stop()


def open_session(config, client, reactor, keys=None, endpoints=None, **options):
    """
    Start connecting to every replica of C{config} as C{client}.

    Without C{keys} and C{endpoints}, the client's key ring and TLS
    certificate are read from the cluster's keys folder when it uses them.

    @param options: C{credit} for the subscriber, C{batch_size} and
        C{max_in_flight} for the publisher, C{timeout} for the proxy.
    """
    if client not in config.clients:
        raise ConfigError(
            f"{config.path}: client {client!r} is not in [clients]; "
            f"known: {', '.join(sorted(config.clients)) or 'none'}"
        )
    schemes = scheme_lookup(config)
    if endpoints is None and keys is None:
        keys, endpoints = client_credentials(config, client, reactor)
    proxy_options = {k: options.pop(k) for k in ("timeout",) if k in options}
    proxy = ServiceProxy(config, client, reactor, endpoints, **proxy_options)
    publisher_options = {k: options.pop(k) for k in ("batch_size", "max_in_flight") if k in options}
    publisher = Publisher(proxy, reactor, schemes, keys, **publisher_options)
    subscriber = Subscriber(proxy, reactor, schemes, keys, **options)
    proxy.start()
    return Session(proxy, publisher, subscriber)
