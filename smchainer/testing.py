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
:class:`ServerProcess` and :func:`serving`
    A real ``smchainer-serve`` process on a loopback port, with the
    plugins the test names, and its answers as :class:`Reply` objects: the
    way to test a plugin through the server a user runs.

smchainer's own data, S3 and shared-folder fixtures are not here: they live
in the project's root ``conftest.py``.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from smchainer.api.endpoint import free_port

__all__ = ["Reply", "ServerProcess", "free_port", "gpus", "plugin_manager", "registered",
           "require_gpu", "send_slowly", "serving"]

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


@dataclass
class Reply:
    """One HTTP answer: status, headers (lower-case names) and body.

    It unpacks as ``status, content_type, body``.
    """

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def __iter__(self) -> Iterator[Any]:
        return iter((self.status, self.content_type, self.body))

    def json(self) -> Any:
        return json.loads(self.body)

    def array(self) -> Any:
        """The body decoded by its Content-Type (npy, CSV or JSON) as a NumPy array."""
        import numpy as np

        kind = self.content_type
        if kind == "application/x-npy":
            return np.load(io.BytesIO(self.body), allow_pickle=False)
        if kind == "text/csv":
            return np.loadtxt(io.StringIO(self.body.decode()), delimiter=",", ndmin=2)
        if kind == "application/json":
            return np.asarray(self.json())
        raise AssertionError(f"unexpected Content-Type {kind!r}: {self.body[:200]!r}")


class ServerProcess:
    """``smchainer-serve`` started as a real process on a free loopback port.

    ``args`` are the command's options (``--model-dir DIR`` and so on; the
    bind address is added, or only the port with ``bind=False``); its output
    goes to ``log_path``. The environment
    is this process's, with :attr:`defaults` for variables it does not set,
    then ``env`` on top (a None value removes the variable). Stop it with
    :meth:`stop` (SIGTERM, then SIGKILL).
    """

    #: Environment variables set unless the environment already has them.
    defaults: ClassVar[Mapping[str, str]] = {}
    #: Seconds a request may take unless it says otherwise.
    timeout: ClassVar[float] = 30

    def __init__(self, args: Sequence[str], log_path: Path,
                 env: Mapping[str, str | None] | None = None, bind: bool = True) -> None:
        self.port = free_port()
        self.log_path = Path(log_path)
        full_env = dict(os.environ)
        for key, value in self.defaults.items():
            full_env.setdefault(key, value)
        for key, given in (env or {}).items():
            if given is None:
                full_env.pop(key, None)
            else:
                full_env[key] = given
        command = Path(sys.executable).parent / "smchainer-serve"
        # Without ``bind`` the server takes its default address, on this port.
        where = ["--bind", f"127.0.0.1:{self.port}"] if bind else ["--port", str(self.port)]
        self.args = [str(command), *where, *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=full_env
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Reply:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=self.timeout if timeout is None else timeout)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return Reply(
                response.status,
                {key.lower(): value for key, value in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    def post(self, body: bytes, content_type: str | None = None, accept: str | None = None,
             **kwargs: Any) -> Reply:
        """``POST /invocations`` with these Content-Type and Accept headers."""
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if accept is not None:
            headers["Accept"] = accept
        return self.request("POST", "/invocations", body, headers, **kwargs)

    def ping(self, timeout: float = 5) -> int:
        """``GET /ping``'s status; 0 when nothing answers."""
        try:
            return self.request("GET", "/ping", timeout=timeout).status
        except OSError:
            return 0

    def wait_loaded(self, timeout: float = 60) -> Reply:
        """Until ``/ping`` stops saying "still loading": its last answer.

        200 once the model is loaded, or the 503 that says why loading failed.
        """
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while "still loading" in (reply := self.request("GET", "/ping")).body.decode():
            if time.monotonic() > deadline:
                raise AssertionError(f"the model was still loading after {timeout} s:\n"
                                     f"{self.log()}")
            time.sleep(0.05)
        return reply

    def wait_listening(self, timeout: float = 60) -> None:
        """Until the server answers HTTP at all (maybe 503 while loading)."""
        self._wait(lambda reply: True, timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until ``/ping`` answers 200; an exit or the timeout fails with the log."""
        self._wait(lambda reply: reply.status == 200, timeout)

    def _wait(self, done: Callable[[Reply], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if done(self.request("GET", "/ping", timeout=2)):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def send_slowly(port: int, data: bytes, stop: Any, every: float = 0.5) -> bool:
    """Connect to ``port`` and send ``data`` a byte every ``every`` seconds, as a slow client.

    Stops early when the ``threading.Event`` ``stop`` is set; False when the
    connection failed or the server dropped it before the last byte.
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return False
    with sock:
        for byte in data:
            if stop.wait(every):
                return True
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return False
    return True


@contextmanager
def serving(args: Sequence[str], log_path: Path, env: Mapping[str, str | None] | None = None,
            timeout: float = 120) -> Iterator[ServerProcess]:
    """A :class:`ServerProcess`, ready (``/ping`` 200) inside the block, stopped after it."""
    server = ServerProcess(args, log_path, env)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()
