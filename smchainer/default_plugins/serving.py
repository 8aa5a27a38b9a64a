"""The NumPy serving defaults: npy / JSON / CSV in and out, eval-mode predict."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from smchainer import content
from smchainer.errors import BadRequest, SmchainerError
from smchainer.hookspecs import hookimpl

if TYPE_CHECKING:
    from smchainer.context import ServingContext


@hookimpl
def media_types() -> content.MediaTypes:
    return content.NUMPY_MEDIA_TYPES


@hookimpl(trylast=True)
def model_fn(model_dir: str) -> Any:
    raise SmchainerError(
        f"no model_fn could load {model_dir!r}: put an inference.py defining "
        "model_fn(model_dir) in the model's code/ folder, pass --entry-point, "
        "or install a plugin that loads this kind of model"
        + ("" if os.path.isdir(model_dir) else " (the directory does not exist)")
    )


@hookimpl(trylast=True)
def input_fn(input_data: bytes, content_type: str, context: ServingContext) -> Any:
    # A 415 names every type the registered plugins decode, not only NumPy's.
    return content.decode(input_data, content_type, context.media_types.decodes)


@hookimpl(trylast=True)
def predict_fn(input_data: Any, model: Any) -> Any:
    import chainer
    from chainer.utils.type_check import InvalidType

    device = getattr(model, "device", None)
    if device is not None:
        input_data = device.send(input_data)
    try:
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            prediction = model(input_data)
    except InvalidType as error:
        raise BadRequest(f"input does not fit the model: {error}") from None
    if isinstance(prediction, chainer.Variable) or hasattr(prediction, "get"):
        return content.to_numpy(prediction)
    return prediction


@hookimpl(trylast=True)
def output_fn(prediction: Any, accept: str, context: ServingContext) -> Any:
    return content.encode(prediction, accept, context.media_types.encodes)
