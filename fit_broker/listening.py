"""
Listening that fails loudly: a process that cannot bind its port stops at
start with one line saying which, instead of running without it.

twistd daemonizes before it starts services, and its parent process waits
for a status the daemon reports only for an C{Exception}: a listen error
raised as C{SystemExit} there left the parent waiting forever and the
terminal silent.  So the ports are tried while the process still has its
terminal (L{check_listeners}, from the taps' C{makeService}), and a listen
error that happens anyway after daemonizing (another process took the port
in between) is written to twistd's status pipe (L{report_to_twistd}).
"""

import errno
import os
import socket

from twisted.application.internet import StreamServerEndpointService, UDPServer
from twisted.application.service import IServiceCollection
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError

from fit_broker.errors import FitBrokerError

#: twistd's parent reads at most this many bytes of the daemon's status.
_STATUS_BYTES = 100


class ListenError(FitBrokerError):
    """
    A port this process must listen on cannot be bound.
    """

    def __init__(self, interface, port, reason, in_use=True):
        hint = " (is another instance running?)" if in_use else ""
        super().__init__(f"cannot listen on {interface or '*'}:{port}: {reason}{hint}")
        self.interface = interface
        self.port = port
        self.reason = reason


def _reason(error):
    return getattr(error, "strerror", None) or str(error)


def _in_use(error):
    return getattr(error, "errno", None) == errno.EADDRINUSE


class MustListen(StreamServerEndpointService):
    """
    A L{StreamServerEndpointService} that ends start-up with a clear message
    when its endpoint cannot listen (a port in use, no permission).

    @ivar prefix: what the one-line message starts with (the program).
    @ivar report: called with the message before start-up ends, so that a
        daemonized twistd can pass it to the waiting terminal; see
        L{report_to_twistd}.
    """

    _raiseSynchronously = True
    prefix = "fitbroker"
    report = None

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            error = ListenError(
                e.interface, e.port, _reason(e.socketError), _in_use(e.socketError)
            )
            message = f"{self.prefix}: {error}"
            if self.report is not None:
                self.report(message)
            raise SystemExit(message) from None

    def check(self):
        """
        Raise L{ListenError} if this service's port cannot be bound now.
        """
        check_endpoint(self.endpoint)


def check_endpoint(endpoint):
    """
    Raise L{ListenError} if the TCP port of C{endpoint} cannot be bound now;
    endpoints of other kinds are left to start-up.

    Binding and closing is racy (another process may take the port before
    start-up binds it), but it reports the usual mistake, a second instance,
    while the user is still watching.
    """
    if isinstance(endpoint, TCP4ServerEndpoint):
        family, default = socket.AF_INET, "0.0.0.0"
    elif isinstance(endpoint, TCP6ServerEndpoint):
        family, default = socket.AF_INET6, "::"
    else:
        return
    try_bind(family, socket.SOCK_STREAM, endpoint._interface or default, endpoint._port)


def try_bind(family, kind, interface, port):
    """
    Bind a socket as Twisted would (C{SO_REUSEADDR} for streams, as
    twisted.internet.tcp sets it), then close it.

    @raise ListenError: when the bind fails.
    """
    if not port:
        return
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM and os.name == "posix":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, port))
            if kind == socket.SOCK_STREAM:
                probe.listen(1)
        except OSError as e:
            raise ListenError(interface, port, _reason(e), _in_use(e)) from None


def _udp_check(service):
    port = service.args[0]
    interface = service.kwargs.get("interface", "")
    if ":" in interface:
        try_bind(socket.AF_INET6, socket.SOCK_DGRAM, interface, port)
    else:
        try_bind(socket.AF_INET, socket.SOCK_DGRAM, interface or "0.0.0.0", port)


def _walk(service):
    yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from _walk(child)


def check_listeners(service):
    """
    Try every port the service tree C{service} will listen on (its
    L{MustListen} streams and UDP servers).

    @raise ListenError: for the first port that cannot be bound.
    """
    for each in _walk(service):
        if isinstance(each, MustListen):
            each.check()
        elif isinstance(each, UDPServer):
            _udp_check(each)


def report_to_twistd(service, twistd_options, prefix):
    """
    Make the listeners of C{service} start their one-line messages with
    C{prefix} and, once twistd has daemonized, pass them to the terminal
    through twistd's status pipe (twistd's parent prints what it receives
    and exits non-zero, where it would otherwise wait forever).

    @param twistd_options: twistd's own options (the plugin options'
        C{parent}), where it keeps the status pipe; C{None} outside twistd.
    """

    def report(message):
        pipe = twistd_options.get("statusPipe") if twistd_options is not None else None
        if pipe is None:
            return
        twistd_options["statusPipe"] = None
        data = ("1 " + message).encode("utf-8", "backslashreplace")[:_STATUS_BYTES]
        try:
            os.write(pipe, data)
            os.close(pipe)
        except OSError:
            pass

    for each in _walk(service):
        if isinstance(each, MustListen):
            each.prefix = prefix
            each.report = report
