"""A real smchainer-serve with the image and ONNX plugins answers a CIFAR-10 JPEG."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from onnx_helpers import chainer_logits, randomize_batch_norm
from PIL import Image

from smchainer.models import VGG
from smchainer.testing import serving

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


@pytest.mark.slow
def test_a_jpeg_through_image_and_onnx_plugins_gets_chainers_answer(cifar10, tmp_path) -> None:
    from smchainer.default_plugins.vgg.modelfile import save_model

    np.random.seed(6)
    model = randomize_batch_norm(VGG(width=0.25, depth=11), seed=6)
    model_dir = tmp_path / "model"
    save_model(model, model_dir, CLASSES, {})
    (model_dir / "code").mkdir()
    (model_dir / "code" / "inference.py").write_text(
        "from smchainer.default_plugins.vgg import load_model as model_fn\n"
    )
    with zipfile.ZipFile(cifar10 / "test.zip") as archive:
        jpeg = archive.read("test/cat/0000.jpg")
    with Image.open(io.BytesIO(jpeg)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    expected = chainer_logits(model, np.ascontiguousarray(pixels.transpose(2, 0, 1)[None]))

    env = {"SMCHAINER_LOAD_PLUGINS": "image,onnx", "SMCHAINER_DEVICE": "cpu",
           "SMCHAINER_ONNX": None}
    args = ["--model-dir", str(model_dir), "--workers", "1", "--log-level", "info"]
    with serving(args, tmp_path / "server.log", env) as server:
        status, content_type, body = server.post(jpeg, "image/jpeg", "application/x-npy",
                                                 timeout=60)
        assert status == 200, body
        assert content_type == "application/x-npy"
        got = np.load(io.BytesIO(body))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        status, content_type, body = server.post(jpeg, "image/jpeg", "application/json",
                                                 timeout=60)
        assert status == 200 and content_type == "application/json", body
        json.loads(body)
    text = server.log()
    assert "through ONNX Runtime" in text, text
