"""pytest fixtures for smchainer and its plugins (loaded through ``pytest11``).

``cifar10``
    The folder holding the shared CIFAR-10 zips (``SMCHAINER_SHARED``, else
    ``../shared`` beside the project); the test is skipped when it is absent.
``plugin_manager``
    A fresh manager with only the built-in defaults (installed plugins off).
``gpus``
    The number of usable GPUs; skips (or fails, with ``SMCHAINER_REQUIRE_GPU=1``)
    without one.

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


def require_gpu() -> int:
    """The number of usable GPUs; skip the test when there is none.

    ``SMCHAINER_REQUIRE_GPU=1`` (set on GPU machines) turns the skip into a
    failure, so a broken CuPy cannot pass as "no GPU here".
    """
    from smchainer.device import cuda_unavailable_reason, gpu_count

    reason = cuda_unavailable_reason()
    if reason is not None:
        if os.environ.get("SMCHAINER_REQUIRE_GPU") == "1":
            pytest.fail(f"SMCHAINER_REQUIRE_GPU=1 but no usable GPU: {reason}")
        pytest.skip(f"no usable GPU: {reason}")
    return gpu_count()


@pytest.fixture
def gpus() -> int:
    """The number of usable GPUs (the test is skipped without one: :func:`require_gpu`)."""
    return require_gpu()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's) on loopback, for the whole session.

    Yields the environment that points boto3 at it (``AWS_ENDPOINT_URL`` and
    dummy credentials); the fixture also sets it in ``os.environ`` so that
    code under test and child processes both use it.
    """
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: dict[str, str]) -> str:
    """A new, empty bucket on the loopback S3 server; yields its name."""
    import uuid

    from smchainer.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name
