"""pytest fixtures and helpers for testing smchainer plugins (loaded through ``pytest11``).

Every project that installs smchainer gets this plugin, so it holds only what
a plugin's own tests need:

``plugin_manager`` (fixture)
    A fresh manager with only the built-in defaults (installed plugins off).
:func:`registered`
    Registers a test plugin for the length of a ``with`` block.
``gpus`` (fixture) and :func:`require_gpu`
    The number of usable GPUs; the test is skipped without one, or fails
    when ``SMCHAINER_REQUIRE_GPU=1``.
:func:`free_port`
    A loopback TCP port that nothing listens on (the one
    :mod:`smchainer.api.endpoint` uses).

smchainer's own data, S3 and shared-folder fixtures are not here: they live
in the project's root ``conftest.py``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from smchainer.api.endpoint import free_port

__all__ = ["free_port", "gpus", "plugin_manager", "registered", "require_gpu"]

@pytest.fixture
def plugin_manager():
    from smchainer.plugins import get_plugin_manager

    return get_plugin_manager(load_entrypoints=False, only=())


@contextmanager
def registered(pm, plugin: object, name: str) -> Iterator[object]:
    """Register a test plugin for the duration of a ``with`` block."""
    pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        pm.unregister(name=name)


def require_gpu() -> int:
    """The number of usable GPUs; skip the test when there is none.

    ``SMCHAINER_REQUIRE_GPU=1`` (set on GPU machines) turns the skip into a
    failure, so a broken CuPy cannot pass as "no GPU here".
    """
    from smchainer.device import DeviceError, cuda_unavailable_reason, gpu_count

    try:
        reason = cuda_unavailable_reason()
    except DeviceError as exc:
        reason = str(exc)
    if reason is not None:
        if os.environ.get("SMCHAINER_REQUIRE_GPU") == "1":
            pytest.fail(f"SMCHAINER_REQUIRE_GPU=1 but no usable GPU: {reason}")
        pytest.skip(f"no usable GPU: {reason}")
    return gpu_count()


@pytest.fixture
def gpus() -> int:
    """The number of usable GPUs (the test is skipped without one: :func:`require_gpu`)."""
    return require_gpu()
