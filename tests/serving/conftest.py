"""A real ``smchainer-serve`` process on a loopback port, and small Chainer models for it."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pytest

from smchainer.testing import ServerProcess

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


class Server(ServerProcess):
    """The suite's server: no installed plugin unless a test asks, and the CPU.

    Bit-for-bit comparisons with the CPU need the CPU; test_gpu.py asks for GPUs.
    """

    defaults = {"SMCHAINER_DISABLE_PLUGIN_AUTOLOAD": "1", "SMCHAINER_DEVICE": "cpu"}


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
