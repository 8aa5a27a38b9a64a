"""Shared pieces of the tuner tests: a stand-in training script and a clean environment."""
from __future__ import annotations

import importlib.util
import os
import re
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

#: A training script without Chainer: its metric follows from its hyperparameters, one
#: line per epoch (``--sleep`` seconds apart, so that a job can be stopped early).
SCRIPT = '''\
"""A stand-in for a training script: its accuracy follows from its hyperparameters."""
import argparse
import math
import os
import time


def score(lr, layers, activation, quality=None):
    """The final validation accuracy of these hyperparameters."""
    if quality is not None:
        return quality
    value = 0.9 - 0.1 * abs(math.log10(lr) + 2.0) - 0.05 * abs(layers - 2)
    return round(value + (0.04 if activation == "tanh" else 0.0), 6)


def model_fn(model_dir):
    with open(os.path.join(model_dir, "score.txt")) as f:
        return float(f.read())


def predict_fn(data, model):
    return data * model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--quality", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--mode", default="ok")
    args, _ = parser.parse_known_args()
    if args.mode == "crash":
        raise RuntimeError("asked to crash")
    final = score(args.lr, args.layers, args.activation, args.quality)
    print("threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
    for epoch in range(1, args.epochs + 1):
        if args.mode == "silent":
            break
        accuracy = final * epoch / args.epochs
        print(f"epoch {epoch} validation-accuracy={accuracy:.6f} "
              f"validation-loss={1 - accuracy:.6f}", flush=True)
        time.sleep(args.sleep)
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "score.txt"), "w") as f:
        f.write(repr(final))
'''

METRICS = [
    {"Name": "validation-accuracy", "Regex": r"validation-accuracy=([0-9.]+)"},
    {"Name": "validation-loss", "Regex": r"validation-loss=([0-9.]+)"},
]


@pytest.fixture(scope="module", autouse=True)
def _clean_environment():
    """Jobs here see neither SageMaker nor smchainer settings, nor the caller's thread count."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("SM_", "SAGEMAKER_", "SMCHAINER_", "OMPI_COMM", "PMIX")):
                patch.delenv(name)
        patch.delenv("OMP_NUM_THREADS", raising=False)
        patch.setenv("SMCHAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
        yield


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source dir holding the stand-in script ``train.py``."""
    folder = tmp_path_factory.mktemp("src")
    (folder / "train.py").write_text(textwrap.dedent(SCRIPT))
    return folder


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tuning_script_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logged_values(job_dir: Path, metric: str) -> list[float]:
    """Every value of ``metric`` in a job's ``train.log``, read here, not by the tuner."""
    text = (job_dir / "train.log").read_text()
    return [float(v) for v in re.findall(rf"{re.escape(metric)}=([0-9.]+)", text)]

