"""The main job end to end: smchainer-train on the shared CIFAR-10, then smchainer-serve.

No user code on either side: the built-in VGG trainer writes model.tar.gz and
the server loads it by itself. Answers over HTTP must equal the model's own.
"""
from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import VENV_BIN
from tests.serving.conftest import npy_bytes
from tests.training.helpers import environment, train

pytestmark = pytest.mark.slow

SMALL = ["--hp", "epochs=1", "--hp", "train-samples=640", "--hp", "test-samples=200",
         "--hp", "width=0.125", "--hp", "depth=8", "--hp", "batch-size=32",
         "--hp", "progress-bar=false"]


def cifar_test_images(cifar10, count: int = 40) -> tuple[np.ndarray, list[str]]:
    with zipfile.ZipFile(cifar10 / "test.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))[::250][:count]
        images = [np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"))
                  for n in names]
    batch = (np.stack(images).astype(np.float32) / 255).transpose(0, 3, 1, 2).copy()
    return batch, [n.split("/")[1] for n in names]


def model_scores(model_tar, batch: np.ndarray, tmp_path) -> np.ndarray:
    """The saved model called directly, in eval mode, on ``batch``."""
    import chainer

    from smchainer.default_plugins.vgg import model_fn

    folder = tmp_path / "direct"
    with tarfile.open(model_tar) as archive:
        archive.extractall(folder, filter="data")
    model = model_fn(str(folder))
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(batch).array


def serve_and_compare(start_server, job, cifar10, tmp_path, env=None):
    batch, classes = cifar_test_images(cifar10)
    expected = model_scores(job / "model.tar.gz", batch, tmp_path)
    # One worker: /ping answers for whichever worker gets it, and a request
    # must not reach a second one still loading.
    server = start_server(["--model-dir", str(job / "model.tar.gz"), "--workers", "1"], env=env)
    scores = server.post(npy_bytes(batch), "application/x-npy", "application/x-npy")
    assert scores.status == 200, scores.body[:500]
    served = scores.array()
    assert served.shape == (len(batch), 10)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
    assert (served.argmax(1) == expected.argmax(1)).all()

    named = server.post(npy_bytes(batch), "application/x-npy", "application/json")
    predictions = named.json()["predictions"]
    assert [p["label"] for p in predictions] == expected.argmax(1).tolist()
    names = json.loads((job / "model" / "smchainer-model.json").read_text())["class_names"]
    assert names == sorted(set(classes))
    assert [p["class"] for p in predictions] == [names[i] for i in expected.argmax(1)]
    return server


@pytest.mark.parametrize("plugins", [True, False], ids=["installed-plugins", "defaults-only"])
def test_a_model_trained_by_smchainer_train_is_served_with_no_user_code(
        cifar10, tmp_path, start_server, plugins) -> None:
    job = tmp_path / "job"
    result = train("--job-dir", str(job), "--channel", f"train={cifar10 / 'train.zip'}",
                   "--channel", f"test={cifar10 / 'test.zip'}", *SMALL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (job / "output" / "success").exists()
    env = {"SMCHAINER_DISABLE_PLUGIN_AUTOLOAD": "0" if plugins else "1"}
    server = serve_and_compare(start_server, job, cifar10, tmp_path, env=env)
    # With the installed plugins the ONNX Runtime plugin serves the same answers.
    assert ("through ONNX Runtime" in server.log()) == plugins


@pytest.mark.mpi
def test_two_ranks_train_with_chainermn_and_the_model_serves(cifar10, tmp_path,
                                                              start_server) -> None:
    import subprocess

    job = tmp_path / "job"
    result = subprocess.run(
        [str(VENV_BIN / "mpirun"), "-n", "2", "--oversubscribe", str(VENV_BIN / "smchainer-train"),
         "--job-dir", str(job), "--channel", f"train={cifar10 / 'train.zip'}",
         "--channel", f"test={cifar10 / 'test.zip'}", *SMALL, "--hp", "communicator=naive"],
        capture_output=True, text=True, env=environment(OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = json.loads((job / "output" / "data" / "metrics.json").read_text())
    assert metrics["ranks"] == 2
    serve_and_compare(start_server, job, cifar10, tmp_path)
