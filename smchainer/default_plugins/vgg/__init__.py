"""The built-in VGG CIFAR-10 trainer (``train``) and the serving defaults for its models.

``train(env)`` trains :class:`smchainer.models.VGG` on the ``train`` channel
(evaluating on ``test``, else on a held-out part of train) and saves
``model.npz`` with ``smchainer-model.json`` beside it. ``model_fn`` loads such
a model directory and returns None for any other, so that a user's
``model_fn`` or the default's clear error takes over. ``predict_fn`` and
``output_fn`` answer only for these models: predictions are
:class:`Classification` objects, encoded as class scores (npy, CSV) or as
labels, class names and scores (JSON).

The training loop and its hyperparameters live in
:mod:`smchainer.default_plugins.vgg_training`, imported only when ``train``
runs, so that loading the default plugins does not import Chainer.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smchainer import content
from smchainer.errors import BadRequest, NotAcceptable, SmchainerError
from smchainer.hookspecs import hookimpl

if TYPE_CHECKING:
    from smchainer.training.env import TrainingEnv

logger = logging.getLogger(__name__)

#: Written beside ``model.npz`` by the trainer; its presence marks a model of ours.
METADATA_FILE = "smchainer-model.json"
MODEL_FILE = "model.npz"
ARCHITECTURE = "smchainer.models.VGG"


@hookimpl(trylast=True)
def train(env: TrainingEnv) -> dict[str, Any]:
    """Train the CIFAR VGG on ``env``'s channels (see the module docstring)."""
    from smchainer.default_plugins import vgg_training

    hp = vgg_training.parse_hyperparameters(env.hyperparameters)
    if env.rank == 0:
        logger.info("built-in VGG trainer, hyperparameters %s", json.dumps(hp, sort_keys=True))
    return vgg_training.run_training(env, hp)


# --- serving -------------------------------------------------------------------------


@dataclass
class Classification:
    """What ``predict_fn`` returns for a VGG model: scores (logits) and class names."""

    scores: np.ndarray
    class_names: list[str]

    @property
    def labels(self) -> np.ndarray:
        return self.scores.argmax(axis=1)

    def as_json(self) -> dict[str, Any]:
        """``{"predictions": [{"label", "class", "probability", "scores"}, ...]}``."""
        shifted = self.scores - self.scores.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        predictions = []
        for row, label in enumerate(self.labels.tolist()):
            predictions.append({
                "label": label,
                "class": self.class_names[label] if label < len(self.class_names) else str(label),
                "probability": float(probabilities[row, label]),
                "scores": [float(v) for v in self.scores[row]],
            })
        return {"predictions": predictions}


def load_model(model_dir: str | os.PathLike):
    """The VGG saved by :func:`save_model` in ``model_dir``, on the CPU."""
    from chainer import serializers

    from smchainer.models.vgg import VGG

    folder = Path(model_dir)
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError) as error:
        raise SmchainerError(f"cannot read {folder / METADATA_FILE}: {error}") from None
    if metadata.get("architecture") != ARCHITECTURE:
        raise SmchainerError(
            f"{folder / METADATA_FILE} describes {metadata.get('architecture')!r}, "
            f"not {ARCHITECTURE}"
        )
    weights = folder / metadata.get("weights", MODEL_FILE)
    if not weights.exists():
        raise SmchainerError(f"{folder} has {METADATA_FILE} but no {weights.name}")
    normalization = metadata.get("normalization", {})
    model = VGG(
        n_classes=metadata["n_classes"], width=metadata["width"], depth=metadata["depth"],
        mean=normalization.get("mean"), std=normalization.get("std"),
    )
    try:
        serializers.load_npz(str(weights), model)
    except (KeyError, ValueError, OSError) as error:
        raise SmchainerError(f"{weights} does not fit the network its metadata describes: "
                             f"{error}") from None
    model.class_names = list(metadata.get("class_names") or [])
    logger.info(
        "loaded VGG-%d (width %g, %d classes) from %s",
        model.depth, model.width, model.n_classes, folder,
    )
    return model


@hookimpl(trylast=True)
def model_fn(model_dir: str) -> Any:
    """A model this trainer saved (it has ``smchainer-model.json``), else None."""
    if not (Path(model_dir) / METADATA_FILE).is_file():
        return None
    return load_model(model_dir)


def as_image_batch(data: Any) -> np.ndarray:
    """Check and shape a request as float32 N x 3 x 32 x 32 in [0, 1].

    One image (3 x 32 x 32) gets a batch axis; CSV rows of 3072 values are
    reshaped. Anything else is a 400.
    """
    from smchainer.models.vgg import INPUT_SHAPE

    array = content.to_numpy(data)
    expected = "float32 N x 3 x 32 x 32 in [0, 1]"
    if array.ndim == 2 and array.shape[1] == int(np.prod(INPUT_SHAPE)):
        array = array.reshape(-1, *INPUT_SHAPE)
    elif array.shape == INPUT_SHAPE:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != INPUT_SHAPE or len(array) == 0:
        raise BadRequest(f"expected {expected}, got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1 / 255)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise BadRequest(f"expected {expected}, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise BadRequest("input holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise BadRequest(
            f"expected {expected}, got values from {low:g} to {high:g} "
            "(scale 0-255 pixels by 1/255)"
        )
    return array


@hookimpl(trylast=True)
def predict_fn(input_data: Any, model: Any) -> Any:
    """Class scores of a VGG model as a :class:`Classification`; None for other models."""
    import chainer

    from smchainer.models.vgg import VGG

    if not isinstance(model, VGG):
        return None
    x = as_image_batch(input_data)
    x = model.device.send(x)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        scores = content.to_numpy(model(x))
    return Classification(scores.astype(np.float32), list(getattr(model, "class_names", [])))


@hookimpl(trylast=True)
def output_fn(prediction: Any, accept: str) -> Any:
    """Encode a :class:`Classification`; None for other predictions.

    ``application/json``: ``{"predictions": [{"label": 3, "class": "cat",
    "probability": 0.91, "scores": [...]}]}``; ``application/x-npy`` and
    ``text/csv``: the N x n_classes scores (logits), as the reference serves.
    """
    if not isinstance(prediction, Classification):
        return None
    concrete = content.match_media_range(accept, content.NUMPY_TYPES)
    if concrete is None:
        raise NotAcceptable(
            f"cannot answer as {accept!r}; supported: {', '.join(content.NUMPY_TYPES)}"
        )
    if concrete == content.JSON:
        return json.dumps(prediction.as_json()).encode(), concrete
    return content.encode(prediction.scores, concrete)
