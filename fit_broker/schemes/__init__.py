"""
The plugin package of protection schemes.

Built-in schemes are modules of this package; drop-in folders named by the
configuration are appended to its search path by
L{fit_broker.schemes.registry.add_plugin_folder}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list = []
