"""User code: a training script as ``--entry-point`` overriding ``predict_fn``; errors it raises."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, predict_directly

# A SageMaker training script: training behind the main guard, serving hooks beside it.
TRAIN_SCRIPT = MODEL_FN + '''
import time

import numpy as np

from smchainer.errors import HTTPError


class TooManyRequests(Exception):
    """Another framework's error class: only its status_code matters."""

    status_code = 429


def predict_fn(input_data, model):
    first = float(input_data.flat[0]) if input_data.size else 0.0
    if first == 422:
        raise HTTPError("the first value may not be 422", 422)
    if first == 429:
        raise TooManyRequests("slow down")
    if first == 500:
        raise ValueError("boom in predict_fn")
    if first == 504:
        time.sleep(3)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(input_data).array * 2


if __name__ == "__main__":
    open(os.environ["TRAINING_MARKER"], "w").write("training ran")
    raise SystemExit("the main block must not run when serving")
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), code=None)


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("marker") / "trained"


@pytest.fixture(scope="module")
def server(start_server, model_dir, marker, tmp_path_factory):
    script = tmp_path_factory.mktemp("src") / "train.py"
    script.write_text(TRAIN_SCRIPT)
    return start_server(
        ["--model-dir", str(model_dir), "--entry-point", str(script), "--workers", "1",
         "--timeout", "2"],
        env={"TRAINING_MARKER": str(marker)},
    )


def test_the_training_scripts_main_block_does_not_run(server, marker):
    assert server.request("GET", "/ping").status == 200
    assert not marker.exists()


def test_user_predict_fn_overrides_the_default_and_the_defaults_do_the_rest(server, model_dir):
    x = inputs(3)
    reply = server.post(b"\n".join(b",".join(b"%r" % float(v) for v in row) for row in x),
                        "text/csv", "application/x-npy")
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(
        reply.array(), 2 * predict_directly(model_dir / "model.npz", x), rtol=1e-6
    )


def test_missing_accept_defaults_to_json(server):
    reply = server.post(b"[[1, 2, 3, 4]]", "application/json")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert np.asarray(reply.json()).shape == (1, 3)


@pytest.mark.parametrize("first, status, message", [
    (422, 422, "the first value may not be 422"),
    (429, 429, "slow down"),
])
def test_a_hook_chooses_its_own_status(server, first, status, message):
    reply = server.post(json.dumps([[first, 0, 0, 0]]).encode(), "application/json")
    assert reply.status == status
    assert reply.json() == {"error": message, "status": status}


def test_500_carries_the_message_but_no_traceback(server):
    reply = server.post(b"[[500, 0, 0, 0]]", "application/json")
    assert reply.status == 500
    assert reply.json() == {"error": "ValueError: boom in predict_fn", "status": 500}
    assert server.request("GET", "/ping").status == 200
    # The operator still gets the traceback, in the server's log only.
    deadline = time.monotonic() + 5
    while "boom in predict_fn" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" in server.log() and "ValueError: boom in predict_fn" in server.log()


def test_504_when_an_inference_outlives_the_timeout(server):
    started = time.monotonic()
    reply = server.post(b"[[504, 0, 0, 0]]", "application/json")
    elapsed = time.monotonic() - started
    assert reply.status == 504, reply.body
    assert "2 s" in reply.json()["error"]
    assert 1.5 < elapsed < 3
    # The worker survives and serves the next request once the slow one is done.
    assert server.post(b"[[1, 2, 3, 4]]", "application/json").status == 200
