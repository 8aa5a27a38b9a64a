"""The built-in plugins, registered like any other but ``trylast``.

:data:`DEFAULT_PLUGINS` lists their module paths; the plugin manager imports
and registers each one (see :func:`smchainer.plugins.get_plugin_manager`).
"""
DEFAULT_PLUGINS = (
    # Among trylast implementations pluggy asks the first registered first, so
    # the model-specific VGG defaults come before the generic NumPy ones.
    "smchainer.default_plugins.vgg",
    "smchainer.default_plugins.serving",
)
