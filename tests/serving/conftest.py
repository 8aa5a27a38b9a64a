"""A real ``smchainer-serve`` process on a loopback port, and small Chainer models for it."""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smchainer.testing import free_port
from tests.conftest import command

IN_SIZE, OUT_SIZE = 4, 3

#: model_fn of every test model: a Linear(4, 3) saved with save_npz.
MODEL_FN = '''
import os

import smchainer  # noqa: F401
import chainer
import chainer.links as L


def model_fn(model_dir):
    model = L.Linear(4, 3)
    chainer.serializers.load_npz(os.path.join(model_dir, "model.npz"), model)
    return model
'''


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def array(self) -> np.ndarray:
        """The body decoded by its Content-Type."""
        kind = self.headers.get("content-type", "")
        if kind == "application/x-npy":
            return np.load(io.BytesIO(self.body), allow_pickle=False)
        if kind == "text/csv":
            return np.loadtxt(io.StringIO(self.body.decode()), delimiter=",", ndmin=2)
        if kind == "application/json":
            return np.asarray(self.json())
        raise AssertionError(f"unexpected Content-Type {kind!r}: {self.body[:200]!r}")


class Server:
    """``smchainer-serve`` started as a real process; output goes to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.setdefault("SMCHAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
        # Bit-for-bit comparisons with the CPU need the CPU; test_gpu.py asks for GPUs.
        full_env.setdefault("SMCHAINER_DEVICE", "cpu")
        full_env.update(env or {})
        self.args = [command("smchainer-serve"), "--bind", f"127.0.0.1:{self.port}", *args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=full_env
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
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
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if accept is not None:
            headers["Accept"] = accept
        return self.request("POST", "/invocations", body, headers, **kwargs)

    def wait_listening(self, timeout: float = 60) -> None:
        """Until the server answers HTTP at all (maybe 503 while loading)."""
        self._wait(lambda reply: True, timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until ``/ping`` answers 200."""
        self._wait(lambda reply: reply.status == 200, timeout)

    def _wait(self, done: Any, timeout: float) -> None:
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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory):
    """Start servers for a module; every one is stopped at the module's end."""
    servers: list[Server] = []

    def start(args: list[str], env: dict[str, str] | None = None, ready: bool = True) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(args, log, env)
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def save_linear(path: Path, seed: int = 0) -> Path:
    """Save a Linear(4, 3) with seeded weights as ``path`` (an ``.npz``)."""
    import chainer
    import chainer.links as L

    rng = np.random.RandomState(seed)
    model = L.Linear(
        IN_SIZE, OUT_SIZE,
        initialW=rng.normal(size=(OUT_SIZE, IN_SIZE)).astype(np.float32),
        initial_bias=rng.normal(size=OUT_SIZE).astype(np.float32),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    chainer.serializers.save_npz(str(path), model)
    return path


def predict_directly(model_npz: Path, x: np.ndarray) -> np.ndarray:
    """What the saved model answers when called in-process, in evaluation mode."""
    import chainer
    import chainer.links as L

    model = L.Linear(IN_SIZE, OUT_SIZE)
    chainer.serializers.load_npz(str(model_npz), model)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(np.asarray(x, dtype=np.float32)).array


def make_model_dir(root: Path, code: str | None = MODEL_FN, program: str = "inference.py",
                   seed: int = 0) -> Path:
    """A model directory: ``model.npz`` and, unless ``code`` is None, ``code/<program>``."""
    save_linear(root / "model.npz", seed)
    if code is not None:
        (root / "code").mkdir(parents=True, exist_ok=True)
        (root / "code" / program).write_text(textwrap.dedent(code))
    return root


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def inputs(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, size=(rows, IN_SIZE)).astype(np.float32)
