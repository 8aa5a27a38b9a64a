"""Models, data and model directories shared by the ONNX plugin's tests."""
from __future__ import annotations

import io
import json
import textwrap
import zipfile
from pathlib import Path

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from PIL import Image


def cifar10_images(folder: Path, count: int) -> np.ndarray:
    """``count`` real CIFAR-10 test images, as float32 N x 3 x 32 x 32 in [0, 1].

    Taken round-robin from the class folders, so every class is there.
    """
    with zipfile.ZipFile(folder / "test.zip") as archive:
        by_class: dict[str, list[str]] = {}
        for name in sorted(archive.namelist()):
            if name.endswith(".jpg"):
                by_class.setdefault(name.split("/")[-2], []).append(name)
        columns = list(zip(*by_class.values(), strict=False))
        names = [name for row in columns for name in row][:count]
        images = []
        for name in names:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def randomize_batch_norm(model: chainer.Link, seed: int = 0) -> chainer.Link:
    """Give every batch norm statistics and affine terms far from 0 and 1."""
    rng = np.random.default_rng(seed)
    for link in model.links():
        if isinstance(link, L.BatchNormalization):
            size = link.avg_mean.shape
            link.avg_mean[...] = rng.normal(0.0, 0.5, size)
            link.avg_var[...] = rng.uniform(0.3, 3.0, size)
            link.gamma.array[...] = rng.uniform(0.5, 1.5, size)
            link.beta.array[...] = rng.normal(0.0, 0.3, size)
    return model


class SmallNet(chainer.Chain):
    """Every layer type the exporter translates, in a few kilobytes.

    Normalisation by plain broadcasting arithmetic, convolutions with and
    without bias, stride and ``cover_all``, batch norm that folds (after a
    convolution or a linear layer) and one that cannot (after ReLU), max
    pooling with Chainer's ``cover_all`` default, a linear layer that
    flattens its input, and dropout.
    """

    def __init__(self, channels: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.add_persistent("mean", np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1))
        with self.init_scope():
            self.conv1 = L.Convolution2D(channels, 6, 3, pad=1)
            self.bn1 = L.BatchNormalization(6)
            self.conv2 = L.Convolution2D(6, 8, 3, stride=2, nobias=True)
            self.bn2 = L.BatchNormalization(8)
            self.conv3 = L.Convolution2D(8, 8, 2, stride=2, nobias=True)
            self.bn3 = L.BatchNormalization(8)
            self.fc1 = L.Linear(None, 16)
            self.bn_fc1 = L.BatchNormalization(16)
            self.fc2 = L.Linear(16, classes)

    def forward(self, x):
        h = (x - self.mean) / np.float32(0.25)
        h = 1.5 - (-h) * 2
        h = h + 1.0 / (2.0 + F.relu(h))
        h = F.relu(self.bn1(self.conv1(h)))
        h = F.dropout(h, 0.3)
        h = F.max_pooling_2d(h, 2)
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(F.relu(F.convolution_2d(h, self.conv3.W, stride=2, cover_all=True)))
        h = F.dropout(h, 0.5)
        h = F.relu(self.bn_fc1(self.fc1(h)))
        return self.fc2(h) / (h.shape[1] * np.ones((1, 1), np.float32))


class TanhNet(chainer.Chain):
    """A small net with a function the exporter does not translate."""

    def __init__(self) -> None:
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, pad=1)
            self.fc = L.Linear(4 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(F.tanh(F.max_pooling_2d(self.conv(x), 2)))


INFERENCE_PY = textwrap.dedent('''
    """A user's model_fn: rebuild the VGG from the metadata, load its weights."""
    import json
    import os

    import chainer
    from smchainer.models import VGG


    def model_fn(model_dir):
        with open(os.path.join(model_dir, "smchainer-model.json")) as f:
            config = json.load(f)["config"]
        model = VGG(**config)
        chainer.serializers.load_npz(os.path.join(model_dir, "model.npz"), model)
        return model
''')


def write_vgg_dir(folder: Path, model, input_shape=(3, 32, 32)) -> Path:
    """A model directory as the trainer leaves it, and a user ``inference.py`` for it.

    :return: the path of ``inference.py`` (beside, not inside, the model dir).
    """
    folder.mkdir(parents=True, exist_ok=True)
    chainer.serializers.save_npz(str(folder / "model.npz"), model)
    config = {"n_classes": model.n_classes, "width": model.width, "depth": model.depth,
              "mean": [float(v) for v in model.mean], "std": [float(v) for v in model.std]}
    metadata = {"config": config}
    if input_shape is not None:
        metadata["input_shape"] = list(input_shape)
    (folder / "smchainer-model.json").write_text(json.dumps(metadata))
    script = folder.parent / "inference.py"
    script.write_text(INFERENCE_PY)
    return script


def chainer_logits(model: chainer.Link, batch: np.ndarray) -> np.ndarray:
    """What the Chainer model itself answers, in evaluation mode."""
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return np.asarray(model(batch).array)
