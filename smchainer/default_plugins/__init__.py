"""The built-in plugins, registered like any other but ``trylast``.

:data:`DEFAULT_PLUGINS` lists their module paths; the plugin manager imports
and registers each one (see :func:`smchainer.plugins.get_plugin_manager`).
"""
DEFAULT_PLUGINS = (
    "smchainer.default_plugins.serving",
)
