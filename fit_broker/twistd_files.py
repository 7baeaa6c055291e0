"""
Pid and log files for processes that twistd runs from one folder.
"""

_TWISTD_DEFAULT_PIDFILE = "twistd.pid"
_TWISTD_DEFAULT_LOGFILE = None


def default_twistd_files(options, stem):
    """
    Name twistd's pid and log files after C{stem} unless the user chose, so
    that several replicas, the syslog adapter and sinks started from one
    folder do not trip over each other.

    @param options: a plugin's L{twisted.python.usage.Options}; its parent
        holds twistd's own options (none when not run by twistd).
    """
    parent = options.parent
    if parent is None:
        return
    if parent.get("pidfile") == _TWISTD_DEFAULT_PIDFILE:
        parent["pidfile"] = f"{stem}.pid"
    if (
        "logfile" in parent
        and parent["logfile"] is _TWISTD_DEFAULT_LOGFILE
        and not parent.get("nodaemon")
    ):
        parent["logfile"] = f"{stem}.log"
