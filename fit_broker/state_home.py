"""
Where FIT Broker keeps local state on a host: C{$XDG_STATE_HOME/fitbroker},
under C{~/.local/state} when XDG_STATE_HOME is unset or relative.
"""

import os


def state_home():
    """
    Return the folder FIT Broker's local state lives under.
    """
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "fitbroker")
