"""The built-in VGG's model directory: ``model.npz`` and its contract, written and read here.

:func:`save_model` and :func:`load_model` are the two halves of one format,
kept together: the weights as Chainer's npz, and ``smchainer-model.json``
(:mod:`smchainer.model_contract`) with the architecture's own keys
(``n_classes``, ``width``, ``depth``, ``normalization``) beside the shared
ones (``input``, ``class_names``, ``weights``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import chainer
from chainer import serializers

import smchainer
from smchainer.errors import SmchainerError
from smchainer.model_contract import METADATA_FILE, read_contract, write_contract
from smchainer.models.vgg import INPUT_SHAPE, VGG
from smchainer.serializers import load_npz

logger = logging.getLogger(__name__)

MODEL_FILE = "model.npz"
#: ``architecture`` in the contract of the models this trainer saves.
ARCHITECTURE = "smchainer.models.VGG"


def save_model(model: VGG, model_dir: Path, class_names: list[str],
               hp: dict[str, Any]) -> None:
    """Write ``model.npz`` and ``smchainer-model.json`` into ``model_dir``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    serializers.save_npz(str(model_dir / MODEL_FILE), model)
    write_contract(model_dir, {
        "architecture": ARCHITECTURE,
        "n_classes": model.n_classes,
        "width": model.width,
        "depth": model.depth,
        "class_names": list(class_names),
        "normalization": {"mean": _floats(model.mean), "std": _floats(model.std)},
        "input": {"shape": list(INPUT_SHAPE), "dtype": "float32", "range": [0.0, 1.0]},
        "weights": MODEL_FILE,
        "hyperparameters": dict(hp),
        "smchainer_version": smchainer.__version__,
    })


def _floats(array) -> list[float]:
    """A persistent channel vector as plain floats, wherever the model lives."""
    return [float(v) for v in chainer.backend.CpuDevice().send(array)]


def load_model(model_dir: str | os.PathLike) -> VGG:
    """The VGG saved by :func:`save_model` in ``model_dir``, on the CPU."""
    folder = Path(model_dir)
    contract = read_contract(folder)
    if not contract.present:
        raise SmchainerError(f"cannot read {folder / METADATA_FILE}: the file does not exist")
    if contract.architecture != ARCHITECTURE:
        raise SmchainerError(
            f"{contract.path} describes {contract.architecture!r}, not {ARCHITECTURE}"
        )
    metadata = contract.metadata
    weights = contract.weights_path(MODEL_FILE)
    if not weights.exists():
        raise SmchainerError(f"{folder} has {METADATA_FILE} but no {weights.name}")
    normalization = metadata.get("normalization", {})
    model = VGG(
        n_classes=metadata["n_classes"], width=metadata["width"], depth=metadata["depth"],
        mean=normalization.get("mean"), std=normalization.get("std"),
    )
    try:
        load_npz(str(weights), model)  # pickles refused: model files come from anywhere
    except (KeyError, ValueError, OSError) as error:
        raise SmchainerError(f"{weights} does not fit the network its metadata describes: "
                             f"{error}") from None
    model.class_names = list(contract.class_names)
    logger.info(
        "loaded VGG-%d (width %g, %d classes) from %s",
        model.depth, model.width, model.n_classes, folder,
    )
    return model
