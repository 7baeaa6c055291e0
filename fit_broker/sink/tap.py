"""
C{twistd fitbroker-sink}: forward a cluster's voted events to SIEMs.
"""

from twisted.python import usage

from fit_broker.errors import ConfigError, FitBrokerError
from fit_broker.twistd_files import default_twistd_files



def load(cluster_path, settings_path=None):
    """
    Return C{(cluster, settings)} read from their files and checked
    against each other.

    @raise ConfigError: naming the file and key.
    """
    from fit_broker.config import load_config
    from fit_broker.sink.config import check_against_cluster, default_settings_path, load_settings
    from fit_broker.sink.service import syslog_tls_options

    cluster = load_config(cluster_path)
    settings = load_settings(settings_path or default_settings_path(cluster_path))
    check_against_cluster(settings, cluster)
    for spec in settings.sinks:
        if spec.kind == "syslog" and spec.tls:
            syslog_tls_options(spec)
    return cluster, settings


class Options(usage.Options):
    synopsis = "--config FILE [--sink-config FILE]"
    longdesc = (
        "Subscribe to channels of the cluster that FILE describes and forward "
        "every voted event to the sinks of the sink settings (default: "
        "sink.toml next to the cluster file): RFC 5424 syslog over TCP or TLS, "
        "and JSON lines in rotated files; optionally serve a live web console."
    )
    optParameters = [
        ["config", "c", None, "The cluster's TOML file."],
        ["sink-config", "s", None, "The sink settings (default: sink.toml beside the cluster file)."],
    ]

    def postOptions(self):
        if self["config"] is None:
            raise usage.UsageError("--config FILE is required: the cluster to read from")
        try:
            cluster, settings = load(self["config"], self["sink-config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["cluster"] = cluster
        self["settings"] = settings
        default_twistd_files(self, f"fitbroker-sink-{cluster.name}")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from fit_broker.listening import check_listeners
    from fit_broker.sink.service import make_sink_service

    try:
        service = make_sink_service(options["cluster"], options["settings"], reactor)
        check_listeners(service)
    except FitBrokerError as e:
        raise SystemExit(f"fitbroker-sink: {e}") from None
    return service
