"""
C{twistd fitbroker-syslog}: the syslog ingest adapter as a publisher of a cluster.
"""

from twisted.python import usage

from fit_broker.errors import ConfigError
from fit_broker.tap import config_problem, prepare_to_start
from fit_broker.twistd_files import default_twistd_files

PROGRAM = "fitbroker-syslog"



class Options(usage.Options):
    synopsis = "--config FILE [--syslog-config FILE]"
    longdesc = (
        "Receive syslog (RFC 3164 and 5424 over UDP, TCP and TLS) and publish "
        "each message as an event into the cluster that FILE describes. The "
        "adapter's listeners, routing rules and limits are in its own TOML file "
        "(default: syslog.toml next to the cluster file); see docs/syslog.md."
    )
    optParameters = [
        ["config", "c", None, "The cluster's TOML file."],
        [
            "syslog-config",
            "s",
            None,
            "The adapter's TOML file (default: syslog.toml in the cluster file's folder).",
        ],
    ]

    def postOptions(self):
        from fit_broker.config import load_config
        from fit_broker.syslog.config import (
            check_against_cluster,
            default_settings_path,
            load_settings,
        )
        from fit_broker.syslog.service import tls_options

        if self["config"] is None:
            raise usage.UsageError("--config FILE is required: the cluster to publish into")
        path = self["syslog-config"] or default_settings_path(self["config"])
        try:
            cluster = load_config(self["config"])
            settings = load_settings(path)
            check_against_cluster(settings, cluster)
            for spec in settings.listeners:
                if spec.tls is not None:
                    tls_options(spec.tls)
        except ConfigError as e:
            config_problem(self, PROGRAM, str(e))
        self["cluster"] = cluster
        self["settings"] = settings
        default_twistd_files(self, f"fitbroker-syslog-{cluster.name}")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from fit_broker.syslog.service import make_syslog_service

    try:
        service = make_syslog_service(options["cluster"], options["settings"], reactor)
    except ConfigError as e:
        raise SystemExit(f"{PROGRAM}: {e}") from None
    return prepare_to_start(service, options, PROGRAM)

