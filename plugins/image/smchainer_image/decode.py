"""One PNG or JPEG into the array a model takes: limits, modes, size and scale.

:class:`InputSpec` says what the model takes, read from its
``smchainer-model.json``; :func:`decode_image` turns one image body into a
``C x H x W`` float32 array that fits it. Every failure is a
:class:`~smchainer.errors.BadRequest` whose message starts with the name of
the image (``image`` for a single body, the member's name in a zip), so a
client can tell which image of a batch was refused.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smchainer.errors import BadRequest, SmchainerError
from smchainer.model_contract import ModelContract

logger = logging.getLogger(__name__)

#: The formats Pillow may open: only what the plugin accepts, whatever the body claims.
IMAGE_FORMATS = ("PNG", "JPEG")
#: Larger images are refused from their header, before they are decoded.
MAX_PIXELS = 4096 * 4096
#: Pillow modes of 16-bit greyscale PNGs, whose values run to 65535.
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: Transparent pixels are laid on this colour, as a viewer shows them on a page.
BACKGROUND = (255, 255, 255, 255)
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class InputSpec:
    """What one input of the model is: its shape and how its values are scaled.

    ``shape`` is ``(channels, height, width)`` with 1 (grey) or 3 (RGB)
    channels, or None to pass images at their own size in RGB. Pixels are
    mapped linearly from 0-255 onto ``value_range``, then, when given,
    standardised per channel by ``mean`` and ``std``.
    """

    shape: tuple[int, int, int] | None = None
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def channels(self) -> int:
        return 3 if self.shape is None else self.shape[0]

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "metadata") -> InputSpec:
        """The spec that a ``smchainer-model.json`` object describes (see :meth:`from_contract`)."""
        return cls.from_contract(ModelContract(metadata, source))

    @classmethod
    def from_contract(cls, contract: ModelContract) -> InputSpec:
        """The spec that a model's contract (its ``smchainer-model.json``) describes.

        The shape is ``input_shape`` or ``input.shape`` (as smchainer's
        trainer writes it); the range ``input.range`` (default [0, 1]);
        ``input.mean`` / ``input.std`` are optional. A shape that is not
        ``[1 or 3, H, W]`` (a model that does not take images) is ignored with
        a warning. The top-level ``normalization`` is not applied: it is the
        built-in VGG's own configuration, which normalises inside the model.

        :raises SmchainerError: for a range, mean or std that cannot be used.
        """
        source = str(contract.path)
        described = contract.input
        shape = _image_shape(contract.declared_input_shape, source)
        channels = 3 if shape is None else shape[0]
        value_range = _numbers(described.get("range", (0.0, 1.0)), f"{source}: input.range")
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise SmchainerError(f"{source}: input.range must be [low, high] with low < high, "
                                 f"not {described.get('range')!r}")
        mean = std = None
        if described.get("mean") is not None:
            mean = _per_channel(described["mean"], channels, f"{source}: input.mean")
        if described.get("std") is not None:
            std = _per_channel(described["std"], channels, f"{source}: input.std")
            if min(std) <= 0:
                raise SmchainerError(f"{source}: input.std must be positive, not {std}")
        return cls(shape, (value_range[0], value_range[1]), mean, std)


def _numbers(value: Any, what: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise SmchainerError(f"{what} must be a list of numbers, not {value!r}") from None
    if not all(np.isfinite(numbers)):
        raise SmchainerError(f"{what} must be finite numbers, not {value!r}")
    return numbers


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...]:
    numbers = _numbers(value if isinstance(value, (list, tuple)) else [value], what)
    if len(numbers) == 1:
        numbers = numbers * channels
    if len(numbers) != channels:
        raise SmchainerError(f"{what} needs 1 or {channels} values, not {len(numbers)}")
    return numbers


def _image_shape(value: Any, source: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape) > 0:
        return shape
    logger.warning("%s: input shape %r is not [1 or 3, height, width]; images will be passed "
                   "at their own size", source, value)
    return None


def open_image(body: bytes, name: str = "image") -> Image.Image:
    """Open a PNG or JPEG lazily (only its header is read) and check its size.

    :raises BadRequest: for an empty body, anything but a PNG or JPEG, or an
        image of more than :data:`MAX_PIXELS` pixels.
    """
    if not body:
        raise BadRequest(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadRequest(f"{name} is too large: {error}; at most {MAX_PIXELS} pixels "
                         "(4096 x 4096)") from None
    except UnidentifiedImageError:
        raise BadRequest(f"{name} is not a readable PNG or JPEG image: it starts with "
                         f"{body[:8]!r}, which is neither a PNG nor a JPEG signature") from None
    except _READ_ERRORS as error:
        raise BadRequest(f"{name} is not a readable PNG or JPEG image: {error}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise BadRequest(f"{name} is too large: {width}x{height} pixels; at most {MAX_PIXELS} "
                         "pixels (4096 x 4096)")
    if width == 0 or height == 0:
        image.close()
        raise BadRequest(f"{name} has no pixels ({width}x{height})")
    return image


def to_mode(image: Image.Image, mode: str, name: str = "image") -> Image.Image:
    """A loaded image as 8-bit ``RGB`` or ``L``.

    16-bit grey is scaled to 8 bits (not clipped), transparency (alpha
    channels, palette or ``tRNS`` transparency) is laid on white, and
    palette, 1-bit and CMYK images are converted by Pillow.

    :raises BadRequest: for a mode that has no such conversion.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(eight_bit)
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in image.info and image.mode in ("P", "L", "RGB", "1")
    )
    try:
        if transparent:
            image = Image.alpha_composite(
                Image.new("RGBA", image.size, BACKGROUND), image.convert("RGBA")
            )
        return image if image.mode == mode else image.convert(mode)
    except ValueError as error:
        raise BadRequest(f"{name} has mode {image.mode}, which cannot be converted to "
                         f"{mode}: {error}") from None


def decode_image(body: bytes, spec: InputSpec | None = None, name: str = "image") -> np.ndarray:
    """One image body as the ``1 x C x H x W`` float32 batch ``spec`` asks for.

    Without ``spec`` (or with no shape in it) the image keeps its size, in
    RGB scaled to [0, 1]. With a shape, it is converted to its channels and
    resized (bilinear, as the built-in trainer resizes its data) to its
    height and width. EXIF orientation is applied first.

    :raises BadRequest: naming ``name``, for anything that is not a readable
        PNG or JPEG of at most :data:`MAX_PIXELS` pixels.
    """
    return decode_pixels(open_image(body, name), spec or InputSpec(), name)[np.newaxis]


def decode_pixels(image: Image.Image, spec: InputSpec, name: str = "image") -> np.ndarray:
    """An opened image (see :func:`open_image`) as a ``C x H x W`` float32 array; closes it."""
    mode = "L" if spec.channels == 1 else "RGB"
    try:
        with image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            pixels = to_mode(image, mode, name)
            if spec.shape is not None and pixels.size != spec.shape[:0:-1]:
                pixels = pixels.resize(spec.shape[:0:-1], Image.Resampling.BILINEAR)
            array = np.asarray(pixels, dtype=np.float32)
    except BadRequest:
        raise
    except (Image.DecompressionBombError, *_READ_ERRORS) as error:
        raise BadRequest(f"{name} is not a readable PNG or JPEG image: {error}") from None
    array = array / np.float32(255)
    low, high = spec.value_range
    if (low, high) != (0.0, 1.0):
        array = array * np.float32(high - low) + np.float32(low)
    if spec.mean is not None:
        array = array - np.asarray(spec.mean, np.float32)
    if spec.std is not None:
        array = array / np.asarray(spec.std, np.float32)
    chw = array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(chw, dtype=np.float32)
