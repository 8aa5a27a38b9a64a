"""The image plugin: real CIFAR-10 JPEGs in, clear 400s for bad images."""
from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image
from smchainer_image import decode_image

from smchainer.errors import BadRequest
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(get_plugin_manager(only=["image"]))


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_cifar10_jpeg_decodes_to_a_chw_batch(cifar10, hooks) -> None:
    with zipfile.ZipFile(cifar10 / "test.zip") as archive:
        body = archive.read("test/cat/0000.jpg")
    decoded = hooks.input_fn(body, "image/jpeg")
    assert decoded.shape == (1, 3, 32, 32)
    assert decoded.dtype == np.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 1.0
    with Image.open(io.BytesIO(body)) as image:
        expected = np.asarray(image.convert("RGB"), dtype=np.float32)[5, 7] / 255
    np.testing.assert_allclose(decoded[0, :, 5, 7], expected)


def test_png_grey_and_alpha_become_rgb() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    decoded = decode_image(png(grey))
    assert decoded.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(decoded[0, 0], decoded[0, 2])
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert decode_image(png(rgba)).shape == (1, 3, 4, 4)


def test_other_types_pass_through_to_the_defaults(hooks) -> None:
    assert hooks.input_fn(b"[[1.0]]", "application/json").tolist() == [[1.0]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"this is not an image", "not a readable"),
        (png(np.zeros((8, 8, 3), dtype=np.uint8))[:40], "not a readable"),
    ],
)
def test_bad_images_are_400s(hooks, body, message) -> None:
    with pytest.raises(BadRequest, match=message):
        hooks.input_fn(body, "image/png")


@pytest.mark.parametrize("side", [5000, 12000, 20000])
def test_huge_dimensions_are_refused_before_decoding(side) -> None:
    # A valid PNG header that claims side x side pixels, with a 1-pixel body.
    original = png(np.zeros((1, 1), dtype=np.uint8))
    data = side.to_bytes(4, "big") * 2 + original[24:29]
    crc = zlib.crc32(b"IHDR" + data).to_bytes(4, "big")
    forged = original[:16] + data + crc + original[33:]
    with pytest.raises(BadRequest, match="too large"):
        decode_image(forged)
