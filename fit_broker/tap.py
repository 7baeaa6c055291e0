"""
C{twistd fitbroker}: run one replica of a cluster, or the embedded local cluster.
"""

from twisted.python import usage

from fit_broker.config import load_config
from fit_broker.errors import ConfigError
from fit_broker.twistd_files import default_twistd_files

PROGRAM = "fitbroker"



class Options(usage.Options):
    synopsis = "[--config FILE --replica-id N]"
    longdesc = (
        "Run replica N of the cluster that FILE describes. With no options, "
        "run an embedded local cluster of 4 replicas for a first try, and write "
        "its client configuration to ./fitbroker-local/."
    )
    optParameters = [
        ["config", "c", None, "The cluster's TOML file."],
        ["replica-id", "i", None, "This replica's index in the file's [[replicas]], from 0."],
    ]

    def postOptions(self):
        config_path, replica = self["config"], self["replica-id"]
        if (config_path is None) != (replica is None):
            raise usage.UsageError("--config and --replica-id go together")
        if config_path is None:
            self["cluster"] = None
            default_twistd_files(self, "fitbroker-local")
            return
        try:
            cluster = load_config(config_path)
        except ConfigError as e:
            config_problem(self, PROGRAM, str(e))
        try:
            index = int(replica)
        except ValueError:
            raise usage.UsageError(f"--replica-id: expected an integer, found {replica!r}") from None
        if not 0 <= index < len(cluster.replicas):
            config_problem(
                self,
                PROGRAM,
                f"--replica-id: {config_path} has replicas 0 to {len(cluster.replicas) - 1}, "
                f"found {index}",
            )
        self["cluster"] = cluster
        self["replica-id"] = index
        default_twistd_files(self, f"fitbroker-{cluster.name}-replica-{index}")


def config_problem(options, program, message):
    """
    Stop on a problem with a configuration file: in one line under twistd
    (which prints its whole usage block before a L{usage.UsageError}, burying
    the line that matters), as a L{usage.UsageError} for other callers.
    """
    if options.parent is not None:
        raise SystemExit(f"{program}: {message}")
    raise usage.UsageError(message)


def prepare_to_start(service, options, program):
    """
    Under twistd, try the ports C{service} will listen on while the terminal
    is still there, and let a listen error after twistd daemonized reach it
    too; see L{fit_broker.listening}.

    @raise SystemExit: with the one-line reason when a port is taken.
    """
    from fit_broker.listening import ListenError, check_listeners, report_to_twistd

    if options.parent is None:
        return service
    try:
        check_listeners(service)
    except ListenError as e:
        raise SystemExit(f"{program}: {e}") from None
    report_to_twistd(service, options.parent, program)
    return service


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from fit_broker.credentials import replica_credentials
    from fit_broker.errors import FitBrokerError
    from fit_broker.local import make_local_cluster
    from fit_broker.replica.service import make_replica_service
    from fit_broker.schemes.registry import scheme_lookup

    cluster = options["cluster"]
    try:
        if cluster is None:
            service = make_local_cluster(reactor)
        else:
            index = options["replica-id"]
            schemes = scheme_lookup(cluster)
            keys, tls_options, identify = replica_credentials(cluster, index)
            service = make_replica_service(
                cluster,
                index,
                reactor,
                schemes,
                keys,
                identify=identify,
                tls_options=tls_options,
            )
    except FitBrokerError as e:
        raise SystemExit(f"{PROGRAM}: {e}") from None
    return prepare_to_start(service, options, PROGRAM)
