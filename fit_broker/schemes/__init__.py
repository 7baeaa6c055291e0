"""
The built-in protection schemes: SI, HA, PKS and PKE.

They are found, with drop-in schemes, as plugins of L{fit_broker.plugins}
(L{fit_broker.schemes.registry}).
"""
