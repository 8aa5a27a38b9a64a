"""The serving benchmark's TorchServe peer answers as smchainer does, and leaves nothing running.

A tiny VGG (depth 8, width 0.125) is converted to PyTorch eager, archived
with ``torch-model-archiver`` and served by a real TorchServe (Java
frontend, one Python worker) on loopback; one npy and one JSON request must
match PyTorch's own output of the same weights. The handler's batching (several
requests in one forward pass, a bad one answered 400 alone) is checked
in process, without Java. Skipped when PyTorch, TorchServe, the archiver or
Java 11+ are missing (the ``bench`` extra and a JDK).
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import sys
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"
NPY = "application/x-npy"
JSON = "application/json"
CLASS_NAMES = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def with_torch() -> None:
    """benchmarks/ on ``sys.path`` and PyTorch importable, or a skip."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    pytest.importorskip("torch", reason="PyTorch is not installed (the bench extra)")


@pytest.fixture(scope="module")
def peer(with_torch: None) -> Any:
    """The :mod:`torchserve_peer` module, or a skip saying what TorchServe lacks here."""
    import torchserve_peer

    reason = torchserve_peer.missing_reason()
    if reason is not None:
        pytest.skip(f"TorchServe cannot run here: {reason}")
    return torchserve_peer


@pytest.fixture(scope="module")
def tiny_vgg(with_torch: None) -> Any:
    from inference_throughput import build_chainer_vgg

    return build_chainer_vgg(depth=8, width=0.125, seed=0)


def torch_logits(model: Any, images: np.ndarray) -> np.ndarray:
    """PyTorch eager's own output for the Chainer model's weights."""
    import torch
    from inference_throughput import build_torch_vgg

    with torch.inference_mode():
        return build_torch_vgg(model)(torch.from_numpy(images)).numpy()


def post(port: int, path: str, body: bytes, content_type: str,
         accept: str) -> tuple[int, str | None, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type, "Accept": accept})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


@pytest.mark.slow
def test_torchserve_serves_the_same_network_and_stops_cleanly(peer, tiny_vgg, tmp_path):
    import torchserve_handler as handler

    rng = np.random.default_rng(1)
    images = rng.random((5, 3, 32, 32), dtype=np.float32)
    archived = peer.archive_vgg(tiny_vgg, CLASS_NAMES, tmp_path / "archive",
                                check_images=images)
    assert archived["mar"].is_file() and archived["max_abs_difference_vs_chainer"] < 1e-4
    expected = torch_logits(tiny_vgg, images)
    np.testing.assert_allclose(archived["reference_logits"], expected, rtol=0, atol=1e-6)

    server = peer.TorchServe(archived["mar"], peer.TorchServeSettings(
        workers=1, threads=1, batch_size=4, max_batch_delay_ms=5, response_timeout_s=60))
    server.start(timeout=180)
    try:
        assert server.path == "/predictions/vgg"
        described = server.describe()
        assert described["batchSize"] == 4 and described["maxBatchDelay"] == 5
        assert server.ready_workers() == 1
        [report] = server.worker_reports()
        assert report["torch_threads"] == 1
        pids = server.process_ids()
        assert len(pids) >= 3, pids  # the launcher, the Java frontend, the worker
        assert report["pid"] in pids

        status, kind, data = post(server.port, server.path, npy_bytes(images), NPY, NPY)
        assert (status, kind) == (200, NPY), data[:300]
        scores = np.load(io.BytesIO(data), allow_pickle=False)
        assert scores.dtype == np.float32 and scores.shape == (5, 10)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)

        status, kind, data = post(server.port, server.path,
                                  json.dumps(images[:2].tolist()).encode(), JSON, JSON)
        assert status == 200 and kind.startswith(JSON), data[:300]
        predictions = json.loads(data)["predictions"]
        assert [p["label"] for p in predictions] == expected[:2].argmax(axis=1).tolist()
        assert [p["class"] for p in predictions] == [CLASS_NAMES[p["label"]]
                                                     for p in predictions]
        np.testing.assert_allclose([p["scores"] for p in predictions], expected[:2],
                                   rtol=0, atol=1e-5)
        probabilities = handler.softmax(expected[:2])
        for row, p in enumerate(predictions):
            assert p["probability"] == pytest.approx(probabilities[row, p["label"]], abs=1e-5)

        status, _, data = post(server.port, server.path, b"[1, 2]", JSON, JSON)
        assert status == 400 and b"shape" in data
    finally:
        work_dir = server.work_dir
        group = server.process.pid
        stopped = server.stop()
    assert stopped["exit_status"] == 0 and stopped["left"] == 0, stopped
    assert not [pid for pid in pids if alive(pid)]
    from smchainer.api.endpoint import group_members

    assert group_members(group) == []
    assert not work_dir.exists()


class FakeContext:
    """What the handler uses of TorchServe's ``Context``: headers in, status and types out."""

    def __init__(self, headers: list[dict[str, str]], model_dir: str = "") -> None:
        self.headers = headers
        self.system_properties = {"model_dir": model_dir, "batch_size": len(headers)}
        self.status: dict[int, int] = {}
        self.types: dict[int, str] = {}

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers[idx]

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.types[idx] = value


def test_a_batch_of_requests_is_one_forward_pass_and_a_bad_one_fails_alone(
        tiny_vgg, tmp_path, monkeypatch):
    """The handler alone (no Java, no archive): the model folder as the archive holds it."""
    import torch
    import torchserve_handler as handler
    from inference_throughput import build_torch_vgg

    rng = np.random.default_rng(2)
    images = rng.random((4, 3, 32, 32), dtype=np.float32)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    network = build_torch_vgg(tiny_vgg)
    torch.save(network.state_dict(), model_dir / handler.WEIGHTS_FILE)
    (model_dir / handler.SPEC_FILE).write_text(
        json.dumps(handler.network_spec(network, CLASS_NAMES)))
    monkeypatch.setenv(handler.REPORT_ENV, str(tmp_path))
    monkeypatch.setenv(handler.THREADS_ENV, "1")

    threads, level = torch.get_num_threads(), logging.getLogger().level
    service = handler.VGGHandler()
    context = FakeContext([
        {"Content-Type": NPY, "Accept": NPY},
        {"content-type": JSON, "accept": JSON},
        {"Content-Type": NPY, "Accept": NPY},
        {"Content-Type": NPY, "Accept": "*/*"},
    ], model_dir=str(model_dir))
    calls = []
    try:
        service.initialize(context)
        forward = service.predict
        monkeypatch.setattr(service, "predict", lambda x: calls.append(len(x)) or forward(x))
        answers = service.handle([
            {"body": npy_bytes(images[:3])},
            {"body": json.dumps(images[3].tolist()).encode()},  # one image: a batch of one
            {"body": npy_bytes(images[:1, :2])},  # wrong shape
            {"body": bytearray(npy_bytes(images[:1]))},
        ], context)
    finally:  # what initialize changes for the whole (worker) process
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(level)
    assert calls == [5]  # 3 + 1 + 1 images, the bad request left out
    expected = torch_logits(tiny_vgg, images)
    np.testing.assert_allclose(np.load(io.BytesIO(answers[0])), expected[:3], atol=1e-5)
    [prediction] = json.loads(answers[1])["predictions"]
    assert prediction["label"] == int(expected[3].argmax())
    assert context.status == {2: 400} and b"shape" in answers[2]
    assert json.loads(answers[3])["predictions"][0]["label"] == int(expected[0].argmax())
    assert context.types == {0: NPY, 1: JSON, 2: JSON, 3: JSON}
    [report] = [json.loads(p.read_text()) for p in tmp_path.glob("worker-*.json")]
    assert report["pid"] == os.getpid() and report["torch_threads"] == 1
