"""CIFAR-10 npz channels as the SageMaker example makes them, from the shared JPEG zips."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def read_images(archive: Path, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each class: float32 N x 3 x 32 x 32 in [0, 1], labels."""
    from PIL import Image

    images, labels = [], []
    with zipfile.ZipFile(archive) as zipped:
        names = sorted(n for n in zipped.namelist() if n.endswith(".jpg"))
        for label, name in enumerate(CLASSES):
            members = [n for n in names if n.startswith(f"{split}/{name}/")][:per_class]
            for member in members:
                with Image.open(io.BytesIO(zipped.read(member))) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
                labels.append(label)
    data = np.stack(images).transpose(0, 3, 1, 2).copy()
    return data, np.asarray(labels, dtype=np.int32)


def make_channels(cifar10: Path, target: Path, train_per_class: int,
                  test_per_class: int) -> dict[str, Path]:
    """``target/train/train.npz`` and ``target/test/test.npz`` (keys ``data``, ``labels``)."""
    channels = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        data, labels = read_images(cifar10 / f"{split}.zip", split, per_class)
        folder = target / split
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / f"{split}.npz", data=data, labels=labels)
        channels[split] = folder
    return channels
