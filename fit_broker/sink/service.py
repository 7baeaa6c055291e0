"""
The sink process as a Twisted service tree: a client session that
subscribes to the configured channels, the forwarder and its sinks (each
syslog sink kept connected by a C{ClientService}), a timer that logs the
counters, and the web console and Prometheus metrics when configured.
"""

import socket

from twisted.application.internet import ClientService, TimerService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.ssl import TLSVersion, optionsForClientTLS, platformTrust
from twisted.logger import Logger

from fit_broker.errors import ConfigError, FitBrokerError
from fit_broker.sink.config import check_against_cluster
from fit_broker.sink.forwarder import FileSink, Forwarder, SyslogConnectionFactory, SyslogSink
from fit_broker.tls import own_certificate_files, read_pem, trust_root

#: Seconds between attempts to subscribe while the cluster is not reachable.
SUBSCRIBE_RETRY = 5.0


def syslog_tls_options(spec):
    """
    Return the client TLS options of a syslog sink: TLS 1.2 or later, the
    receiver's certificate checked against C{spec.ca} (or the system's
    trust store) for C{spec.server_name}, and our certificate if given.

    @raise ConfigError: naming the file that is missing or wrong.
    """
    if spec.ca is not None:
        trust = trust_root(read_pem(spec.ca, "the CA certificates"), spec.ca)
    else:
        trust = platformTrust()
    extra = {"raiseMinimumTo": TLSVersion.TLSv1_2}
    if spec.certificate is not None:
        extra.update(own_certificate_files(spec.certificate, spec.private_key))
    return optionsForClientTLS(
        spec.server_name or spec.host(), trustRoot=trust, extraCertificateOptions=extra
    )


class _CountingEndpoint:
    """
    An endpoint that tells the sink about failed connection attempts.
    """

    def __init__(self, endpoint, sink):
        self.endpoint = endpoint
        self.sink = sink

    def connect(self, factory):
        return self.endpoint.connect(factory).addErrback(self.sink.connect_failed)

    def __repr__(self):
        return f"<syslog sink {self.sink.name}: {self.sink.spec.connect}>"


def syslog_endpoint(spec, sink, reactor):
    """
    Return the client endpoint of syslog sink C{spec}, TLS-wrapped if asked.
    """
    try:
        endpoint = clientFromString(reactor, spec.connect)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"sink {spec.name}: invalid endpoint {spec.connect!r}: {e}") from None
    if spec.tls:
        endpoint = wrapClientTLS(syslog_tls_options(spec), endpoint)
    return _CountingEndpoint(endpoint, sink)


class SinkClient(Service):
    """
    Subscribes to the channels as the configured client and feeds the
    forwarder; observers (the console) see every group as it arrives.

    @ivar observers: callables taking C{(tag, events)}.
    @ivar session: the client session, while running.
    """

    log = Logger()

    def __init__(self, cluster, settings, forwarder, reactor, keys=None, endpoints=None, open_session=None):
        self.cluster = cluster
        self.settings = settings
        self.forwarder = forwarder
        self.reactor = reactor
        self.keys = keys
        self.endpoints = endpoints
        self.session = None
        self.observers = []
        self.subscribed = set()
        self._retry = None
        if open_session is None:
            from fit_broker.client.session import open_session
        self._open_session = open_session

    def startService(self):
        super().startService()
        self.session = self._open_session(
            self.cluster,
            self.settings.client,
            self.reactor,
            keys=self.keys,
            endpoints=self.endpoints,
            credit=self.settings.credit,
            credit_bytes=self.settings.credit_bytes(),
            window=self.settings.window,
        )
        self._subscribe_all()

    def _subscribe_all(self):
        self._retry = None
        for tag in self.settings.console_channels():
            if tag not in self.subscribed:
                self._subscribe(tag)

    def _subscribe(self, tag):
        forwarded = tag in self.settings.channels
        d = self.session.subscriber.subscribe(tag, self._taker(tag, forwarded), resume=forwarded)

        def done(_):
            self.subscribed.add(tag)
            self.log.info(
                "sink subscribed to {tag} as {client}{what}",
                tag=tag, client=self.settings.client,
                what="" if forwarded else " (console only)",
            )

        def failed(failure):
            failure.trap(FitBrokerError)
            self.log.warn(
                "sink cannot subscribe to {tag} yet: {error}; trying again in {delay} s",
                tag=tag, error=failure.value, delay=SUBSCRIBE_RETRY,
            )
            if self.running and (self._retry is None or not self._retry.active()):
                self._retry = self.reactor.callLater(SUBSCRIBE_RETRY, self._subscribe_all)

        d.addCallbacks(done, failed)

    def _taker(self, tag, forwarded):
        observers = self.observers
        forward = self.forwarder.forward

        def take(events):
            for observer in observers:
                try:
                    observer(tag, events)
                except Exception:
                    self.log.failure("console observer failed on {tag}", tag=tag)
            if forwarded:
                return forward(tag, events)
            return None

        return take

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        for sink in self.forwarder.sinks:
            sink.stop()
        held = self.forwarder.waiting_events + sum(sink.held() for sink in self.forwarder.sinks)
        if held:
            self.log.warn(
                "sink stopped with {held} event(s) not written; the replicas keep them "
                "for this client",
                held=held,
            )
        if self.session is not None:
            self.session.stop()
            self.session = None

    def health(self):
        """
        Return the replicas' link states and the sinks' counters, for the console.
        """
        proxy = self.session.proxy if self.session is not None else None
        replicas = []
        for spec in self.cluster.replicas:
            entry = {"index": spec.index, "connect": spec.connect, "linked": False}
            if proxy is not None:
                entry["linked"] = spec.index in proxy.links
                if spec.index in proxy.refusals:
                    entry["refused"] = proxy.refusals[spec.index]
            replicas.append(entry)
        return {
            "client": self.settings.client,
            "replicas": replicas,
            "channels": {
                tag: {
                    "forwarded": tag in self.settings.channels,
                    "subscribed": tag in self.subscribed,
                }
                for tag in self.settings.console_channels()
            },
            "sinks": self.forwarder.snapshot(),
            "forwarded": self.forwarder.forwarded,
            "client_counters": dict(proxy.counters) if proxy is not None else {},
        }


class CounterLog:
    """
    Logs the sinks' counters on one line when they changed.
    """

    log = Logger(namespace="fit_broker.sink")

    def __init__(self, forwarder):
        self.forwarder = forwarder
        self._last = None

    def __call__(self, when="counters", force=False):
        snapshot = self.forwarder.snapshot()
        if snapshot == self._last and not force:
            return
        self._last = snapshot
        text = " ".join(
            f"{name}.{key}={value}"
            for name, counters in snapshot.items()
            for key, value in counters.items()
        )
        self.log.info(
            "sink {when}: forwarded={forwarded} {text}",
            when=when, forwarded=self.forwarder.forwarded, text=text, counters=snapshot,
        )


class _FinalCounters(Service):
    def __init__(self, counter_log):
        self.counter_log = counter_log

    def stopService(self):
        super().stopService()
        self.counter_log("final", force=True)


def make_sink_service(cluster, settings, reactor, keys=None, endpoints=None, open_session=None):
    """
    Return the sink process's service tree for C{cluster} (a
    L{fit_broker.config.ClusterConfig}) and C{settings} (a
    L{fit_broker.sink.config.SinkSettings}).  The top service has
    C{forwarder}, C{client}, C{console} and C{metrics} (or C{None})
    attributes.

    @raise ConfigError: when the cluster does not let the client read a
        channel, or a sink's endpoint or TLS files or the metrics endpoint
        are wrong.
    """
    check_against_cluster(settings, cluster)
    hostname = settings.hostname or socket.gethostname()
    top = MultiService()
    sinks = []
    policy = backoffPolicy(initialDelay=0.5, maxDelay=5.0, factor=2.0)
    for spec in settings.sinks:
        if spec.kind == "file":
            sinks.append(FileSink(spec, reactor))
            continue
        sink = SyslogSink(spec, hostname, reactor)
        sinks.append(sink)
        ClientService(
            syslog_endpoint(spec, sink, reactor),
            SyslogConnectionFactory(sink),
            retryPolicy=policy,
            clock=reactor,
        ).setServiceParent(top)
    forwarder = Forwarder(sinks)
    client = SinkClient(
        cluster, settings, forwarder, reactor, keys=keys, endpoints=endpoints, open_session=open_session
    )
    counter_log = CounterLog(forwarder)
    _FinalCounters(counter_log).setServiceParent(top)
    client.setServiceParent(top)
    timer = TimerService(settings.stats_interval, counter_log)
    timer.clock = reactor
    timer.setServiceParent(top)
    top.forwarder = forwarder
    top.client = client
    top.console = None
    if settings.console is not None:
        from fit_broker.sink.console import console_service

        top.console = console_service(settings.console, client, reactor)
        top.console.setServiceParent(top)
    top.metrics = None
    if settings.metrics is not None:
        from fit_broker.metrics import metrics_service
        from fit_broker.sink.metrics import sink_families

        top.metrics = metrics_service(settings.metrics, reactor, lambda: sink_families(client))
        top.metrics.setServiceParent(top)
    return top
