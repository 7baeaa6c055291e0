"""
Listening that fails loudly: a process that cannot bind its port stops at
start with one line saying which, instead of running without it.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError


class MustListen(StreamServerEndpointService):
    """
    A L{StreamServerEndpointService} that ends start-up with a clear message
    when its endpoint cannot listen (a port in use, no permission).
    """

    _raiseSynchronously = True

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise SystemExit(
                f"fitbroker: cannot listen on {e.interface or '*'}:{e.port}: {reason} "
                "(is another instance running?)"
            ) from None
