"""Worker life: /ping while loading, a failed model_fn, /ping during inference, SIGTERM."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes, predict_directly

SLOW_CODE = MODEL_FN.replace("def model_fn(model_dir):\n", "def model_fn_fast(model_dir):\n") + '''
import time


def model_fn(model_dir):
    time.sleep(float(os.environ.get("LOAD_SECONDS", "0")))
    return model_fn_fast(model_dir)


def predict_fn(input_data, model):
    if input_data.flat[0] == 7:
        open(os.environ["STARTED_MARKER"], "w").close()
        time.sleep(2)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(input_data).array
'''

FAILING_CODE = '''
def model_fn(model_dir):
    raise FileNotFoundError("weights.npz is missing from " + model_dir)
'''


def slow_input() -> np.ndarray:
    x = inputs(2)
    x[0, 0] = 7
    return x


@pytest.fixture
def slow_model(tmp_path):
    return make_model_dir(tmp_path / "model", code=SLOW_CODE)


def start(start_server, model_dir, tmp_path, load_seconds, ready):
    marker = tmp_path / "started"
    server = start_server(
        ["--model-dir", str(model_dir), "--workers", "1"],
        env={"LOAD_SECONDS": str(load_seconds), "STARTED_MARKER": str(marker)},
        ready=ready,
    )
    return server, marker


def test_ping_is_503_until_the_model_is_loaded_and_never_blocks(start_server, slow_model,
                                                                tmp_path):
    server, _ = start(start_server, slow_model, tmp_path, load_seconds=3, ready=False)
    server.wait_listening()
    started = time.monotonic()
    reply = server.request("GET", "/ping", timeout=2)
    assert time.monotonic() - started < 1
    assert reply.status == 503
    assert reply.json() == {"error": "the model is still loading", "status": 503}
    assert server.post(b"[[1, 2, 3, 4]]", "application/json").status == 503
    server.wait_ready(timeout=30)
    assert server.request("GET", "/ping").body == b""
    assert server.post(b"[[1, 2, 3, 4]]", "application/json").status == 200


def test_a_failed_model_fn_keeps_ping_at_503_with_the_reason(start_server, tmp_path):
    model_dir = make_model_dir(tmp_path / "model", code=FAILING_CODE)
    server = start_server(["--model-dir", str(model_dir), "--workers", "1"], ready=False)
    reply = server.wait_loaded(30)
    assert reply.status == 503
    assert "FileNotFoundError: weights.npz is missing" in reply.json()["error"]
    invocation = server.post(b"[[1, 2, 3, 4]]", "application/json")
    assert invocation.status == 503 and "weights.npz" in invocation.json()["error"]
    assert server.process.poll() is None  # the server stays up to say why
    assert "model_fn failed" in server.log() and "Traceback" in server.log()


def in_flight(server, body: bytes, replies: list) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: replies.append(server.post(body, "application/x-npy", "application/x-npy"))
    )
    thread.start()
    return thread


def wait_for(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_ping_answers_while_an_inference_runs(start_server, slow_model, tmp_path):
    server, marker = start(start_server, slow_model, tmp_path, load_seconds=0, ready=True)
    replies: list = []
    thread = in_flight(server, npy_bytes(slow_input()), replies)
    wait_for(marker)
    started = time.monotonic()
    assert server.request("GET", "/ping", timeout=2).status == 200
    assert time.monotonic() - started < 0.5
    thread.join(10)
    assert replies and replies[0].status == 200


def test_sigterm_finishes_the_request_in_flight_then_exits_0(start_server, slow_model,
                                                             tmp_path):
    server, marker = start(start_server, slow_model, tmp_path, load_seconds=0, ready=True)
    x = slow_input()
    replies: list = []
    thread = in_flight(server, npy_bytes(x), replies)
    wait_for(marker)
    server.process.send_signal(signal.SIGTERM)
    thread.join(15)
    assert replies, "the request in flight got no answer"
    assert replies[0].status == 200
    assert np.array_equal(replies[0].array(), predict_directly(slow_model / "model.npz", x))
    assert server.process.wait(timeout=30) == 0, server.log()
    assert "Handling signal: term" in server.log()


PAYLOAD = '''
import os, pickle, sys

class Payload:
    def __reduce__(self):
        return (os.makedirs, (sys.argv[2],))

with open(sys.argv[1], "wb") as f:
    pickle.dump(Payload(), f)
'''


@pytest.mark.parametrize("code", [None, "example"], ids=["built-in-vgg", "aws-style-model_fn"])
def test_a_pickled_model_npz_is_refused_and_its_payload_never_runs(start_server, tmp_path,
                                                                      code):
    """A pickle saved as model.npz: the worker says why on /ping, and nothing of it runs."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    marker = tmp_path / "payload-ran"
    if code is None:  # the built-in VGG's model directory
        (model_dir / "smchainer-model.json").write_text(json.dumps({
            "architecture": "smchainer.models.VGG", "n_classes": 10, "width": 0.125,
            "depth": 8, "weights": "model.npz"}))
    else:  # the SageMaker example's own model_fn, net.json beside model.npz
        examples = Path(__file__).resolve().parents[2] / "examples" / "cifar10"
        (model_dir / "code").mkdir()
        for name in ("train.py", "net.py"):
            shutil.copy(examples / name, model_dir / "code" / name)
        (model_dir / "net.json").write_text(json.dumps({"class_labels": 10}))
    subprocess.run([sys.executable, "-c", PAYLOAD, str(model_dir / "model.npz"), str(marker)],
                   check=True)
    env = {"SAGEMAKER_PROGRAM": "train.py"} if code else {}
    server = start_server(["--model-dir", str(model_dir), "--workers", "1"], env=env,
                          ready=False)
    reply = server.wait_loaded(60)
    assert reply.status == 503
    message = reply.json()["error"]
    assert "model.npz is not an .npz archive" in message, message
    assert not marker.exists()
    assert server.process.poll() is None
