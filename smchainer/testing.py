"""pytest fixtures for smchainer and its plugins (loaded through ``pytest11``).

``cifar10``
    The folder holding the shared CIFAR-10 zips (``SMCHAINER_SHARED``, else
    ``../shared`` beside the project); the test is skipped when it is absent.
``plugin_manager``
    A fresh manager with only the built-in defaults (installed plugins off).

:func:`registered` registers a test plugin for the length of a ``with``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def shared_folder(rootpath: Path) -> Path:
    """The shared data folder: ``SMCHAINER_SHARED``, else ``../shared``."""
    return Path(os.environ.get("SMCHAINER_SHARED", rootpath.parent / "shared"))


@pytest.fixture
def cifar10(pytestconfig: pytest.Config) -> Path:
    folder = shared_folder(pytestconfig.rootpath) / "data" / "cifar10"
    if not (folder / "test.zip").exists():
        pytest.skip(f"CIFAR-10 not found at {folder} (set SMCHAINER_SHARED)")
    return folder


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
