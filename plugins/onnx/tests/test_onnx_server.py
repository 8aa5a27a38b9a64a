"""A real smchainer-serve with the image and ONNX plugins answers a CIFAR-10 JPEG."""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import chainer_logits, randomize_batch_norm
from PIL import Image

from smchainer.models import VGG
from smchainer.testing import free_port

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def wait_ready(process: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.1)
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()}")


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

    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "SMCHAINER_LOAD_PLUGINS": "image,onnx", "SMCHAINER_DEVICE": "cpu"}
    env.pop("SMCHAINER_ONNX", None)
    serve = Path(sys.executable).parent / "smchainer-serve"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(serve), "--model-dir", str(model_dir), "--bind", f"127.0.0.1:{port}",
             "--workers", "1", "--log-level", "info"],
            stdout=output, stderr=subprocess.STDOUT, env=env,
        )
    try:
        wait_ready(process, port, log)
        status, content_type, body = post(
            port, jpeg, {"Content-Type": "image/jpeg", "Accept": "application/x-npy"})
        assert status == 200, body
        assert content_type == "application/x-npy"
        got = np.load(io.BytesIO(body))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        status, content_type, body = post(
            port, jpeg, {"Content-Type": "image/jpeg", "Accept": "application/json"})
        assert status == 200 and content_type == "application/json", body
        json.loads(body)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    text = log.read_text()
    assert "through ONNX Runtime" in text, text
