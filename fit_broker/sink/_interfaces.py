"""
The seam between the forwarder and its sinks.
"""

from zope.interface import Attribute, Interface


class ISink(Interface):
    """
    Somewhere events go.  Called from the reactor thread only.
    """

    name = Attribute("The sink's name, unique in the settings file.")
    on_taken = Attribute(
        "Callable C{(sink, group)}, set by the forwarder: call it once the"
        " sink holds every event of the group durably."
    )

    def offer(group):
        """
        Take a L{fit_broker.sink.forwarder.Group}; never raise: keep it and
        retry until it is written.
        """

    def snapshot():
        """
        Return the counters: forwarded, retried, repeats-possible, held,
        held-bytes, state.
        """

    def held():
        """
        Return how many events wait in this sink now.
        """

    def held_bytes():
        """
        Return how many bytes (as the sink writes them) wait in it now.
        """

    def full():
        """
        Whether what waits reached the sink's backlog bound (in events or
        bytes): the forwarder then offers no sink new groups.
        """

    def stop():
        """
        Cancel timers and close files; what is held stays unacknowledged.
        """
