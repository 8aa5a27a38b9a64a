"""Fixtures of this project's own tests (``tests/`` and ``plugins/*/tests/``).

They are not part of the :mod:`smchainer.testing` plugin, which every project
that installs smchainer loads: they read this checkout's shared data folder or
start a local S3 server.

``shared_dir`` (session)
    The shared data folder: ``SMCHAINER_SHARED``, else ``../shared`` beside
    the project (read when the session first asks for it).
``cifar10``
    The folder holding the shared CIFAR-10 zips; the test is skipped when it
    is absent.
``s3_server`` (session) and ``s3_bucket``
    moto's S3 server on loopback, and a new empty bucket on it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from smchainer.testing import free_port


def shared_folder(rootpath: Path) -> Path:
    """The shared data folder: ``SMCHAINER_SHARED``, else ``../shared``."""
    return Path(os.environ.get("SMCHAINER_SHARED", rootpath.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir(pytestconfig: pytest.Config) -> Path:
    """The shared data folder (:func:`shared_folder`), for session-wide fixtures too."""
    return shared_folder(pytestconfig.rootpath)


@pytest.fixture
def cifar10(pytestconfig: pytest.Config) -> Path:
    folder = shared_folder(pytestconfig.rootpath) / "data" / "cifar10"
    if not (folder / "test.zip").exists():
        pytest.skip(f"CIFAR-10 not found at {folder} (set SMCHAINER_SHARED)")
    return folder


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
