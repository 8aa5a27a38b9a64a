"""smchainer plugin: decode ``image/png`` and ``image/jpeg`` request bodies.

One image per request becomes a ``1 x 3 x H x W`` float32 array in [0, 1], the
layout the SageMaker Chainer CIFAR-10 client sends; any normalisation belongs
to the model. Other content types are passed on to the next plugin.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from smchainer import hookimpl
from smchainer.errors import BadRequest

IMAGE_TYPES = ("image/png", "image/jpeg")
#: Larger images are refused before they are decoded (a decompression bomb guard).
MAX_PIXELS = 4096 * 4096


def decode_image(body: bytes) -> np.ndarray:
    """One PNG or JPEG as a ``1 x 3 x H x W`` float32 array scaled to [0, 1]."""
    if not body:
        raise BadRequest("image body is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadRequest(f"image is too large: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadRequest(f"body is not a readable PNG or JPEG image: {error}") from None
    try:
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadRequest(
                    f"image is too large: {width}x{height}; at most {MAX_PIXELS} pixels"
                )
            image.load()
            rgb = image.convert("RGB")
    except BadRequest:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRequest(f"body is not a readable PNG or JPEG image: {error}") from None
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1)[np.newaxis]


@hookimpl
def input_fn(input_data: bytes, content_type: str) -> Any:
    if content_type not in IMAGE_TYPES:
        return None
    return decode_image(input_data)
