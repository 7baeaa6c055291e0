"""
The plugin package of FIT Broker's named components: QoP modes, ordering
protocols, voters and protection schemes.

Built-ins are the C{builtin_*} modules of this package; drop-in folders named
by the configuration's C{plugin_folders} are appended to its search path by
L{fit_broker.registry.add_plugin_folder}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list = []
