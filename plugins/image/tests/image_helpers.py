"""Images, zips and models shared by the image plugin's tests."""
from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    return encode(image)


def forged_png(side: int) -> bytes:
    """A valid PNG header that claims ``side x side`` pixels, with a 1-pixel body."""
    original = png(np.zeros((1, 1), dtype=np.uint8))
    data = side.to_bytes(4, "big") * 2 + original[24:29]
    crc = zlib.crc32(b"IHDR" + data).to_bytes(4, "big")
    return original[:16] + data + crc + original[33:]


def make_zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip with ``members`` written in the order given (not sorted)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members:
            if name.endswith("/"):
                archive.writestr(zipfile.ZipInfo(name), b"")
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


def cifar_jpegs(folder: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of these members of the shared CIFAR-10 ``test.zip``."""
    with zipfile.ZipFile(folder / "test.zip") as archive:
        return {name: archive.read(name) for name in names}


def pixels(body: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """The test's own decoding: RGB, optionally bilinear-resized, 3 x H x W in [0, 1]."""
    with Image.open(io.BytesIO(body)) as image:
        rgb = image.convert("RGB")
    if size is not None:
        rgb = rgb.resize(size, Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255


def save_vgg(model_dir: Path, seed: int = 6):
    """A small VGG saved exactly as the built-in trainer saves it; returns the model."""
    from smchainer.default_plugins.vgg.modelfile import save_model
    from smchainer.models import VGG

    np.random.seed(seed)
    model = VGG(width=0.125, depth=8)
    model.fc2.W.array *= 20  # spread the logits, so the top classes are far apart
    save_model(model, model_dir, CLASSES, {})
    return model


def model_scores(model, batch: np.ndarray) -> np.ndarray:
    """What the Chainer model itself answers for a batch, in evaluation mode."""
    import chainer

    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return np.asarray(model(np.ascontiguousarray(batch, dtype=np.float32)).array)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.asarray(scores, np.float64) - scores.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
