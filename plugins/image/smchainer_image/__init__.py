"""smchainer-image: PNG and JPEG requests, one image or a zip of them.

The entry point ``image`` names this package; its hooks live in
:mod:`smchainer_image.plugin` (read its docstring for how they compose with
the built-in VGG defaults and the ONNX plugin), decoding in
:mod:`smchainer_image.decode` and zip batches in
:mod:`smchainer_image.archive`. Nothing here imports Chainer.
"""
from smchainer_image.archive import decode_zip
from smchainer_image.decode import MAX_PIXELS, InputSpec, decode_image
from smchainer_image.plugin import (
    batch_fn,
    input_fn,
    media_types,
    model_fn,
    output_fn,
    predict_fn,
)

__all__ = [
    "MAX_PIXELS", "InputSpec", "decode_image", "decode_zip",
    "batch_fn", "input_fn", "media_types", "model_fn", "output_fn", "predict_fn",
]
