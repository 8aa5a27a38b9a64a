"""The built-in VGG CIFAR-10 trainer (``train``) and the serving defaults for its models.

``train(env)`` trains :class:`smchainer.models.VGG` on the ``train`` channel
(evaluating on ``test``, else on a held-out part of train) and saves
``model.npz`` with ``smchainer-model.json`` beside it. ``model_fn`` loads such
a model directory and returns None for any other, so that a user's
``model_fn`` or the default's clear error takes over. ``predict_fn`` and
``output_fn`` answer only for these models: predictions are
:class:`~smchainer.classification.Classification` objects, encoded as class
scores (npy, CSV) or as labels, class names and scores (JSON).

The package, one idea a module: :mod:`.hyperparameters`, :mod:`.data`
(channels, shares, iterators), :mod:`.sampling` (batch order and crops as
functions of the position), :mod:`.distributed` (the communicator),
:mod:`.model` (network and loss), :mod:`.updater`, :mod:`.extensions`
(schedule, evaluation, snapshots), :mod:`.modelfile` (the saved format,
both ways) and :mod:`.trainer` (the job, as a recipe). This module imports
none of them until a hook needs it, so that loading the default plugins
does not import Chainer.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smchainer import content
from smchainer.classification import Classification
from smchainer.errors import BadRequest, SmchainerError
from smchainer.functions.augment import SCALE
from smchainer.hookspecs import hookimpl
from smchainer.model_contract import METADATA_FILE

if TYPE_CHECKING:
    from smchainer.context import ServingContext
    from smchainer.training.env import TrainingEnv

logger = logging.getLogger(__name__)

__all__ = ["Classification", "as_image_batch", "batch_fn", "load_model", "model_fn",
           "output_fn", "predict_fn", "train"]


@hookimpl(trylast=True)
def train(env: TrainingEnv) -> dict[str, Any]:
    """Train the CIFAR VGG on ``env``'s channels (see the module docstring)."""
    from smchainer.default_plugins.vgg.hyperparameters import parse_hyperparameters
    from smchainer.default_plugins.vgg.trainer import run_training

    hp = parse_hyperparameters(env.hyperparameters)
    if env.is_rank_zero:
        logger.info("built-in VGG trainer, hyperparameters %s", json.dumps(hp, sort_keys=True))
    return run_training(env, hp)


# --- serving -------------------------------------------------------------------------


def load_model(model_dir: str) -> Any:
    """The VGG saved in ``model_dir``, on the CPU (:func:`.modelfile.load_model`).

    Usable as a user's ``model_fn``: ``from smchainer.default_plugins.vgg
    import load_model as model_fn``.
    """
    from smchainer.default_plugins.vgg.modelfile import load_model as load

    return load(model_dir)


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
        return array.astype(np.float32) * SCALE
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise BadRequest(f"expected {expected}, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    # Two passes, not three: a NaN anywhere makes min and max NaN, and an
    # infinity shows in one of them.
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise BadRequest("input holds NaN or infinite values")
    if low < -1e-3 or high > 1 + 1e-3:
        raise BadRequest(
            f"expected {expected}, got values from {low:g} to {high:g} "
            "(scale 0-255 pixels by 1/255)"
        )
    return array


def serves_vgg(model: Any, context: ServingContext | None) -> bool:
    """Whether ``model`` is this trainer's VGG, or stands for one.

    A VGG object is one; so is any model loaded from a directory whose
    contract names this architecture (the ONNX plugin's session, say),
    since what answers for it is then the network the contract describes.
    """
    from smchainer.default_plugins.vgg.modelfile import ARCHITECTURE
    from smchainer.models.vgg import VGG

    if isinstance(model, VGG):
        return True
    if context is None or context.model_dir is None:
        return False
    try:
        contract = context.contract
    except SmchainerError:  # a metadata file the model's own loader did without
        return False
    return contract.present and contract.architecture == ARCHITECTURE


#: ``context.request`` key: (the input :func:`batch_fn` checked, its images as checked).
CHECKED_KEY = "smchainer.vgg.checked"


@hookimpl(trylast=True)
def batch_fn(input_data: Any, model: Any, context: ServingContext) -> Any:
    """A VGG's requests may share a call: their images, checked, as rows; None for others.

    Each request's images are checked here (a 400 is that request's own),
    and the VGG's layers treat every image of a batch on its own (batch
    normalization in evaluation mode uses its running statistics). The
    checked images are kept in the request's state, so that
    :func:`predict_fn` given this same input (a request that runs alone)
    does not check it again.
    """
    if not serves_vgg(model, context):
        return None
    images = as_image_batch(input_data)
    context.request[CHECKED_KEY] = (input_data, images)
    return images


@hookimpl(trylast=True)
def predict_fn(input_data: Any, model: Any, context: ServingContext) -> Any:
    """Class scores of a VGG model as a :class:`Classification`; None for other models."""
    import chainer

    if not serves_vgg(model, context):
        return None
    checked = context.request.get(CHECKED_KEY) if context is not None else None
    x = checked[1] if checked is not None and checked[0] is input_data else as_image_batch(
        input_data)
    x = model.device.send(x)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        scores = content.to_numpy(model(x))
    names = getattr(model, "class_names", None)
    if names is None and context is not None and context.model_dir is not None:
        names = context.contract.class_names
    return Classification(scores.astype(np.float32), list(names or []))


@hookimpl(trylast=True)
def output_fn(prediction: Any, accept: str, context: ServingContext) -> Any:
    """Encode a :class:`Classification`; None for other predictions.

    ``application/json``: ``{"predictions": [{"label": 3, "class": "cat",
    "probability": 0.91, "scores": [...]}]}``; ``application/x-npy`` and
    ``text/csv``: the N x n_classes scores (logits), as the reference serves.
    """
    if not isinstance(prediction, Classification):
        return None
    if content.match_media_range(accept, (content.JSON,)) is not None:
        return json.dumps(prediction.as_json()).encode(), content.JSON
    return content.encode(prediction.scores, accept, context.media_types.encodes)
