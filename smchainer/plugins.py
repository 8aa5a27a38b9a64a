"""Building the plugin manager: defaults, installed plugins, the user's module.

:func:`get_plugin_manager` is the only way a manager is made. It is a factory,
never run at import, because gunicorn forks workers, mpirun starts ranks and
tests need a fresh manager each.

Environment switches (read when the manager is built):

``SMCHAINER_DISABLE_PLUGIN_AUTOLOAD=1``
    Load no installed plugin except those named in ``SMCHAINER_LOAD_PLUGINS``.
``SMCHAINER_LOAD_PLUGINS=a,b``
    Load only these installed plugins (entry-point names); naming one that is
    not installed is an error.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from smchainer import hookspecs
from smchainer.default_plugins import DEFAULT_PLUGINS
from smchainer.errors import PluginError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "smchainer"
AUTOLOAD_OFF_ENV = "SMCHAINER_DISABLE_PLUGIN_AUTOLOAD"
LOAD_ONLY_ENV = "SMCHAINER_LOAD_PLUGINS"


@dataclass(frozen=True)
class PluginSource:
    """Where a registered plugin came from."""

    kind: str  # "default", "entrypoint" or "user"
    distribution: str | None = None
    version: str | None = None
    path: str | None = None


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, PluginSource] = {}

    def register_from(self, plugin: object, name: str, source: PluginSource) -> None:
        try:
            self.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as error:
            raise PluginError(f"cannot register plugin {name!r}: {error}") from error
        self.sources[name] = source


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _selected_names(
    load_entrypoints: bool | None, only: Iterable[str] | None
) -> tuple[bool, set[str] | None]:
    """(autoload, restriction) from the arguments, else from the environment."""
    if only is None:
        listed = os.environ.get(LOAD_ONLY_ENV, "")
        only = [name.strip() for name in listed.split(",") if name.strip()] or None
    if load_entrypoints is None:
        load_entrypoints = not _truthy(os.environ.get(AUTOLOAD_OFF_ENV))
    restriction = set(only) if only is not None else None
    return load_entrypoints, restriction


def _load_entry_points(
    pm: PluginManager, load_entrypoints: bool, only: set[str] | None
) -> None:
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    found = {ep.name for ep in entry_points}
    if only is not None and only - found:
        missing = ", ".join(sorted(only - found))
        raise PluginError(
            f"{LOAD_ONLY_ENV} names plugins that are not installed: {missing}"
            f" (installed: {', '.join(sorted(found)) or 'none'})"
        )
    for ep in sorted(entry_points, key=lambda ep: ep.name):
        wanted = ep.name in only if only is not None else load_entrypoints
        if not wanted or pm.has_plugin(ep.name):
            continue
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        dist_version = dist.version if dist is not None else None
        try:
            plugin = ep.load()
        except Exception as error:
            raise PluginError(
                f"Error importing plugin {ep.name!r} ({ep.value}) from distribution "
                f"{dist_name or '?'} {dist_version or '?'}: {type(error).__name__}: {error}"
            ) from error
        pm.register_from(
            plugin, ep.name, PluginSource("entrypoint", dist_name, dist_version)
        )


def import_user_module(path: str | os.PathLike[str]) -> types.ModuleType:
    """Import a user's script (``inference.py``, a training script) by path.

    The script's folder goes on ``sys.path`` first so that it can import its
    neighbours, as it could under SageMaker. Its ``__main__`` block does not
    run. Errors raised by the script propagate as :class:`PluginError`.
    """
    file = Path(path).resolve()
    if not file.is_file():
        raise PluginError(f"user module {str(path)!r} does not exist")
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = file.stem
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        raise PluginError(
            f"importing user module {str(file)!r} failed: {type(error).__name__}: {error}"
        ) from error
    return module


def _marked(obj: object) -> bool:
    return hasattr(obj, f"{hookspecs.PROJECT_NAME}_impl")


def sagemaker_arguments(hook_name: str) -> tuple[str, ...]:
    """The arguments SageMaker passes to ``hook_name``: its spec's, without ``context``."""
    spec = getattr(hookspecs, hook_name)
    return tuple(name for name in inspect.signature(spec).parameters if name != "context")


def positional_adapter(hook_name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` as an implementation of ``hook_name`` that pluggy can call.

    SageMaker calls handler functions positionally, so user scripts name the
    arguments as they like (``def input_fn(request_body, request_content_type)``),
    while pluggy passes arguments by the implementation's parameter names,
    which it reads from the function's code object. The adapter is therefore
    compiled with the spec's own names (taken from :mod:`smchainer.hookspecs`,
    never copied by hand) and passes them on by position.
    """
    names = ", ".join(sagemaker_arguments(hook_name))
    namespace: dict[str, Any] = {"function": function}
    source = f"def {hook_name}({names}):\n    return function({names})\n"
    exec(compile(source, f"<smchainer adapter for {hook_name}>", "exec"), namespace)
    return namespace[hook_name]


def plugin_from_module(module: types.ModuleType) -> object:
    """Turn a user module into a plugin.

    A module whose functions carry ``@smchainer.hookimpl`` is the plugin as it
    is. Otherwise its functions named after the hooks (SageMaker style, no
    marker) become the plugin. Either way, a function that looks like a hook
    but is not one (``predit_fn``) is an error, and so is defining
    ``transform_fn`` beside ``input_fn``, ``predict_fn`` or ``output_fn``.
    """
    functions = {
        name: value
        for name, value in vars(module).items()
        if callable(value) and not isinstance(value, type) and not name.startswith("_")
    }
    hooklike = [name for name in functions if name.endswith("_fn") or name == "train"]
    unknown = [name for name in hooklike if name not in hookspecs.HOOK_NAMES]
    where = getattr(module, "__file__", module.__name__)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, hookspecs.HOOK_NAMES, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PluginError(
            f"{where} defines functions that are not smchainer hooks: {', '.join(hints)}; "
            f"hooks are {', '.join(hookspecs.HOOK_NAMES)}"
        )
    defined = {name for name in hooklike if name in hookspecs.HOOK_NAMES}
    if "transform_fn" in defined and defined & {"input_fn", "predict_fn", "output_fn"}:
        both = ", ".join(sorted(defined & {"input_fn", "predict_fn", "output_fn"}))
        raise PluginError(
            f"{where} defines transform_fn and also {both}: transform_fn replaces them, "
            "so define one or the other"
        )
    if any(_marked(value) for value in functions.values()):
        return module
    plugin = types.SimpleNamespace(__name__=module.__name__, __file__=where)
    for name in sorted(defined):
        setattr(plugin, name, hookspecs.hookimpl(positional_adapter(name, functions[name])))
    return plugin


def get_plugin_manager(
    *,
    user_module: types.ModuleType | str | os.PathLike[str] | None = None,
    load_entrypoints: bool | None = None,
    only: Iterable[str] | None = None,
    extra_plugins: Iterable[tuple[str, object]] = (),
) -> PluginManager:
    """Build a plugin manager with every hook implementation in place.

    Registration order: the built-in defaults (``trylast``), installed
    plugins from the ``smchainer`` entry-point group, ``extra_plugins``, then
    the user's module. ``check_pending()`` runs last, so a misspelled hook in
    a plugin is an error rather than silence.

    :param user_module: a module, or the path of a script, to register as the
        user's plugin.
    :param load_entrypoints: load installed plugins; default from
        ``SMCHAINER_DISABLE_PLUGIN_AUTOLOAD``.
    :param only: restrict installed plugins to these entry-point names;
        default from ``SMCHAINER_LOAD_PLUGINS``.
    :param extra_plugins: ``(name, plugin)`` pairs registered after the
        installed ones (used by the commands and by tests).
    """
    pm = PluginManager()
    for module_name in DEFAULT_PLUGINS:
        pm.register_from(
            importlib.import_module(module_name), module_name, PluginSource("default")
        )
    autoload, restriction = _selected_names(load_entrypoints, only)
    _load_entry_points(pm, autoload, restriction)
    for name, plugin in extra_plugins:
        pm.register_from(plugin, name, PluginSource("extra"))
    if user_module is not None:
        module = (
            user_module
            if isinstance(user_module, types.ModuleType)
            else import_user_module(user_module)
        )
        path = getattr(module, "__file__", None)
        pm.register_from(
            plugin_from_module(module), f"user:{module.__name__}", PluginSource("user", path=path)
        )
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(f"plugin {error.plugin!r} implements an unknown hook: {error}") from None
    return pm


def describe_plugins(pm: PluginManager) -> list[dict[str, Any]]:
    """The registered plugins and the hooks each implements, for display as JSON."""
    hooks_of: dict[str, list[str]] = {}
    for hook_name in hookspecs.PLUGIN_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            hooks_of.setdefault(impl.plugin_name, []).append(hook_name)
    described = []
    for name, _plugin in pm.list_name_plugin():
        source = pm.sources.get(name, PluginSource("unknown"))
        entry: dict[str, Any] = {"name": name, "kind": source.kind, "hooks": hooks_of.get(name, [])}
        if source.distribution:
            entry["distribution"] = source.distribution
            entry["version"] = source.version
        if source.path:
            entry["path"] = source.path
        described.append(entry)
    return described
