"""Decoding one image: real CIFAR-10 JPEGs, every mode, resizing, clear 400s."""
from __future__ import annotations

import io
import logging
import zipfile

import numpy as np
import pytest
from image_helpers import encode, forged_png, png
from PIL import Image
from smchainer_image import InputSpec, decode_image

from smchainer.errors import BadRequest, SmchainerError
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager


@pytest.fixture
def hooks() -> Hooks:
    return Hooks(get_plugin_manager(only=["image"]))


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


def test_sagemakers_image_type_is_an_image_too(hooks) -> None:
    decoded = hooks.input_fn(png(np.zeros((4, 6, 3), np.uint8)), "application/x-image")
    assert decoded.shape == (1, 3, 4, 6)


def palette_png() -> bytes:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    return encode(image, transparency=0)  # palette entry 0 (red) is transparent


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)


WHITE, RED, BLUE = [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # grey: every channel the same value
        (png(np.array([[0, 51]], np.uint8)), [[0.0, 0.2]] * 3),
        # 16-bit grey is scaled to 8 bits, not clipped at 255
        (png(np.array([[65535, 32896]], np.uint16)), [[1.0, 128 / 255]] * 3),
        # alpha: a transparent red pixel becomes white, an opaque one stays red
        (png(np.array([[[255, 0, 0, 0], [255, 0, 0, 255]]], np.uint8)),
         np.array([WHITE, RED]).T.tolist()),
        # grey + alpha
        (png(np.array([[[100, 255], [100, 0]]], np.uint8)),
         np.array([[100 / 255] * 3, WHITE]).T.tolist()),
        # palette with a transparent entry
        (palette_png(), np.array([WHITE, BLUE]).T.tolist()),
        # 1-bit
        (encode(Image.new("1", (2, 1), 1)), [[1.0, 1.0]] * 3),
    ],
    ids=["L", "I;16", "RGBA", "LA", "P+transparency", "1-bit"],
)
def test_modes_become_rgb(body, expected) -> None:
    decoded = decode_image(body)
    assert decoded.shape == (1, 3, 1, 2)
    np.testing.assert_allclose(decoded[0, :, 0, :], expected, atol=1e-6)


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(cmyk_jpeg())
    assert decoded.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(decoded[0, :, 4, 4], RED, atol=0.02)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (4, 2), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.shape == (1, 3, 4, 2)


def test_resized_bilinear_to_the_spec_like_pillow() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)  # 48 wide, 64 high
    decoded = decode_image(png(array), InputSpec((3, 32, 32)))
    assert decoded.shape == (1, 3, 32, 32)
    expected = np.asarray(Image.fromarray(array).resize((32, 32), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(decoded[0], expected.transpose(2, 0, 1) / 255)


def test_grey_model_range_and_standardisation_from_the_spec() -> None:
    spec = InputSpec((1, 4, 4), value_range=(0.0, 255.0), mean=(100.0,), std=(2.0,))
    decoded = decode_image(png(np.full((8, 8, 3), 90, np.uint8)), spec)
    assert decoded.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(decoded, -5.0, atol=1e-5)  # (90 - 100) / 2


def test_spec_from_the_trainers_metadata(caplog) -> None:
    vgg = {"input": {"shape": [3, 32, 32], "dtype": "float32", "range": [0.0, 1.0]},
           "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}
    # The model normalises itself: the top-level normalization is not applied twice.
    assert InputSpec.from_metadata(vgg) == InputSpec((3, 32, 32))
    assert InputSpec.from_metadata({"input_shape": [1, 28, 28]}).shape == (1, 28, 28)
    described = InputSpec.from_metadata(
        {"input": {"shape": [3, 8, 8], "range": [-1, 1], "mean": 0.5, "std": [1, 2, 4]}})
    assert described == InputSpec((3, 8, 8), (-1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 2.0, 4.0))
    with caplog.at_level(logging.WARNING):
        assert InputSpec.from_metadata({"input_shape": [3072]}).shape is None
    assert "own size" in caplog.text


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"input": {"range": [1, 0]}}, "input.range"),
        ({"input": {"range": "wide"}}, "input.range"),
        ({"input": {"shape": [3, 8, 8], "std": [1, 0, 1]}}, "positive"),
        ({"input": {"shape": [3, 8, 8], "mean": [1, 2]}}, "1 or 3 values"),
    ],
)
def test_unusable_metadata_is_an_error(metadata, message) -> None:
    with pytest.raises(SmchainerError, match=message):
        InputSpec.from_metadata(metadata)


def test_other_types_pass_through_to_the_defaults(hooks) -> None:
    assert hooks.input_fn(b"[[1.0]]", "application/json").tolist() == [[1.0]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"this is not an image", r"not a readable PNG or JPEG image: it starts with b'this is "),
        (png(np.zeros((8, 8, 3), dtype=np.uint8))[:40], "not a readable"),
        (png(np.zeros((64, 64, 3), dtype=np.uint8))[:-30], "not a readable"),
        (encode(Image.new("RGB", (8, 8)), "JPEG")[:-100], "not a readable"),
        (encode(Image.new("RGB", (8, 8)), "GIF"), "not a readable PNG or JPEG"),
        (encode(Image.new("RGB", (8, 8)), "BMP"), "not a readable PNG or JPEG"),
    ],
    ids=["empty", "text", "png-header-only", "png-truncated", "jpeg-truncated", "gif", "bmp"],
)
def test_bad_images_are_400s(hooks, body, message) -> None:
    with pytest.raises(BadRequest, match=message):
        hooks.input_fn(body, "image/png")


@pytest.mark.parametrize("side", [5000, 12000, 20000])
def test_huge_dimensions_are_refused_before_decoding(side) -> None:
    with pytest.raises(BadRequest, match=r"too large: .* at most 16777216 pixels"):
        decode_image(forged_png(side))
