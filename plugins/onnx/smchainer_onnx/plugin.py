"""The hook: convert the model that ``model_fn`` loaded to ONNX Runtime.

There is deliberately no ``predict_fn``: the converted model
(:class:`smchainer_onnx.runtime.OnnxModel`) stands in for the Chainer link,
so whichever ``predict_fn`` would have run the link (a user's, the built-in
VGG one that returns class names, or the generic default) runs it through
ONNX Runtime instead. A ``predict_fn`` here would answer first and hide the
built-in VGG's class names.

Environment:

``SMCHAINER_ONNX=0``
    Switch the plugin off: models are served by Chainer as they are.
``SMCHAINER_ONNX_INPUT_SHAPE=3,32,32``
    One input's shape, for models whose directory has no
    ``smchainer-model.json`` with an ``input_shape``.
``SMCHAINER_ONNX_THREADS``, ``SAGEMAKER_MODEL_SERVER_WORKERS``
    Threads per worker (see :mod:`smchainer_onnx.runtime`).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from smchainer import hookimpl
from smchainer.device import worker_gpu
from smchainer.errors import SmchainerError
from smchainer.model_contract import METADATA_FILE, parse_shape, read_contract
from smchainer_onnx.runtime import convert, intra_op_threads

logger = logging.getLogger(__name__)

ENABLE_ENV = "SMCHAINER_ONNX"
INPUT_SHAPE_ENV = "SMCHAINER_ONNX_INPUT_SHAPE"


def enabled(environ: Any = None) -> bool:
    """False when ``SMCHAINER_ONNX`` is ``0``, ``false``, ``no`` or ``off``."""
    environ = os.environ if environ is None else environ
    return environ.get(ENABLE_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def input_shape(model_dir: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """One input's shape, without the batch axis, or None when unknown.

    From the model's contract (``input_shape`` or ``input.shape`` in its
    ``smchainer-model.json``), else from ``SMCHAINER_ONNX_INPUT_SHAPE``. A
    contract that cannot be read or a malformed shape in it is a warning,
    not an error: the model is then served by Chainer, slower, never wrong.

    :raises SmchainerError: when ``SMCHAINER_ONNX_INPUT_SHAPE`` is malformed.
    """
    try:
        shape = read_contract(model_dir).input_shape
    except SmchainerError as error:
        logger.warning("%s", error)
        shape = None
    if shape is not None:
        return shape
    raw = os.environ.get(INPUT_SHAPE_ENV, "").strip()
    if not raw:
        return None
    shape = parse_shape(raw)
    if shape is None:
        raise SmchainerError(
            f"{INPUT_SHAPE_ENV} must be positive integers separated by commas, like "
            f"3,32,32, not {raw!r}"
        )
    return shape


def serve_with_onnx(model: Any, model_dir: str) -> Any:
    """``model`` as an :class:`OnnxModel` when it can be, else ``model`` itself.

    Only Chainer links that will run on the CPU are converted: not one on a
    GPU, nor any when the server will put it on a GPU (GPUs visible and
    ``SMCHAINER_DEVICE`` not ``cpu``). A model that cannot be exported, or
    whose ONNX Runtime output differs from Chainer's, is returned unchanged
    with a warning: served slower, never wrong.
    """
    import chainer

    if not isinstance(model, chainer.Link):
        logger.debug("%s is no chainer.Link: not converted", type(model).__name__)
        return model
    name = type(model).__name__
    if model.xp is not np:
        logger.info("%s is on %s: served by Chainer, not ONNX Runtime", name, model.device)
        return model
    if worker_gpu(0) != "cpu":
        # The server moves the model to this worker's GPU after model_fn.
        logger.info("GPUs are visible: %s is served by Chainer on a GPU, not ONNX Runtime", name)
        return model
    threads = intra_op_threads()
    shape = input_shape(model_dir)
    if shape is None:
        logger.warning(
            "serving %s with plain Chainer: its input shape is unknown (set input_shape in "
            "%s or %s=3,32,32)", name, METADATA_FILE, INPUT_SHAPE_ENV,
        )
        return model
    cache_dir = model_dir if os.access(model_dir, os.W_OK) else None
    try:
        converted = convert(model, shape, cache_dir=cache_dir, threads=threads)
    except Exception as error:
        logger.warning("serving %s with plain Chainer, not ONNX Runtime: %s", name, error,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return model
    logger.info("serving %s through ONNX Runtime (%d intra-op threads)", name, threads)
    return converted


@hookimpl(wrapper=True)
def model_fn(model_dir: str) -> Any:
    """Wrap whichever ``model_fn`` answered: convert the Chainer link it loaded."""
    model = yield
    if model is None or not enabled():
        return model
    return serve_with_onnx(model, model_dir)
