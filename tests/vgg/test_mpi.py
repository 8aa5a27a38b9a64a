"""The built-in trainer under a real mpirun: ChainerMN data parallelism on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import VENV_BIN

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

DRIVER = Path(__file__).with_name("mpi_driver.py")


def parameters(snapshot: Path) -> dict[str, np.ndarray]:
    """The trained parameters in a trainer snapshot (batch-norm statistics are per rank)."""
    prefix = "updater/model:main/predictor/"
    with np.load(snapshot) as saved:
        return {
            key[len(prefix):]: saved[key] for key in saved.files
            if key.startswith(prefix) and key.rsplit("/", 1)[-1] in ("W", "gamma", "beta")
        }


def test_two_ranks_train_one_model_and_only_rank0_writes_it(tmp_path, cifar_npz_channels) -> None:
    hyperparameters = {
        "depth": 8, "width": 0.0625, "epochs": 2, "batch-size": 16, "train-samples": 256,
        "test-samples": 128, "communicator": "naive", "progress-bar": False,
        "cache-dir": str(tmp_path / "cache"),
    }
    channels = {name: str(path) for name, path in cifar_npz_channels.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM", "PMIX"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")  # two ranks on two cores: one BLAS thread each
    result = subprocess.run(
        [str(VENV_BIN / "mpirun"), "-n", "2", "--oversubscribe", sys.executable, "-m", "mpi4py",
         str(DRIVER), str(tmp_path), json.dumps(channels), json.dumps(hyperparameters)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    # 256 images scattered over 2 ranks, 16 per batch: 8 updates per epoch on each.
    assert [m["iteration"] for m in metrics] == [16, 16]
    assert metrics[0]["ranks"] == 2
    # The multi-node evaluator averages over both ranks' shards: one figure for both.
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]

    rank0, rank1 = tmp_path / "host0", tmp_path / "host1"
    assert (rank0 / "model" / "model.npz").is_file()
    assert (rank0 / "model" / "smchainer-model.json").is_file()
    for name in ("metrics.json", "log", "loss.png", "accuracy.png"):
        assert (rank0 / "output" / "data" / name).is_file(), name
    assert not (rank1 / "model").exists()
    assert not (rank1 / "output").exists()
    assert "epoch" in result.stdout and result.stdout.count("validation/main/accuracy") == 1

    # Every rank snapshots its own state; the weights are the same on both.
    snapshot0 = rank0 / "checkpoints" / "snapshot_iter_16.rank0of2.npz"
    snapshot1 = rank1 / "checkpoints" / "snapshot_iter_16.rank1of2.npz"
    weights0, weights1 = parameters(snapshot0), parameters(snapshot1)
    # 5 conv blocks (W, gamma, beta), fc1 W + its batch norm, fc2 W.
    assert len(weights0) == 5 * 3 + 3 + 1 and weights0.keys() == weights1.keys()
    for key in weights0:
        np.testing.assert_array_equal(weights0[key], weights1[key], err_msg=key)
    with np.load(rank0 / "model" / "model.npz") as saved:
        np.testing.assert_array_equal(saved["fc2/W"], weights0["fc2/W"])
    earlier = parameters(snapshot0.with_name("snapshot_iter_8.rank0of2.npz"))
    assert not np.array_equal(earlier["fc2/W"], weights0["fc2/W"])  # it did train
