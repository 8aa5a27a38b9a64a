"""Liveness and readiness (KServe v2's /v2/health routes) across a server's workers.

Real servers: readiness waits for every worker's model, not only the one that
answers; liveness turns false when an inference runs past its timeout, on
whichever worker answers the probe, and true again when it ends.
"""
from __future__ import annotations

import time

from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes

STAGGERED_LOAD = MODEL_FN.replace("def model_fn(model_dir):\n",
                                  "def model_fn_now(model_dir):\n") + '''
import time


def model_fn(model_dir):
    # The first worker to get here loads at once, the other one 4 s later.
    try:
        os.close(os.open(os.environ["FIRST_MARKER"], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(4)
    return model_fn_now(model_dir)
'''

STUCK_PREDICT = MODEL_FN + '''
import time


def predict_fn(input_data, model):
    if input_data.flat[0] == 7:
        time.sleep(float(os.environ["STUCK_SECONDS"]))  # never looks at its deadline
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(input_data).array
'''


def probe(server, path: str):
    started = time.monotonic()
    reply = server.request("GET", path, timeout=2)
    assert time.monotonic() - started < 1, f"{path} waited"
    return reply


def until(server, path: str, status: int, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while True:
        reply = probe(server, path)
        if reply.status == status:
            return reply
        assert time.monotonic() < deadline, (path, reply.status, reply.body)
        time.sleep(0.1)


def test_ready_waits_for_every_worker_while_ping_does_not(start_server, tmp_path):
    model_dir = make_model_dir(tmp_path / "model", code=STAGGERED_LOAD)
    server = start_server(["--model-dir", str(model_dir), "--workers", "2"],
                          env={"FIRST_MARKER": str(tmp_path / "first")}, ready=False)
    server.wait_listening()
    until(server, "/ping", 200)  # one worker has its model: SageMaker's ping is content
    early = probe(server, "/v2/health/ready")
    assert early.status == 503, early.body
    assert early.json() == {"ready": False, "status": 503,
                            "error": "1 of 2 worker(s) have loaded the model"}
    assert probe(server, "/v2/health/live").json() == {"live": True}
    assert until(server, "/v2/health/ready", 200).json() == {"ready": True}


def test_live_turns_false_while_an_inference_runs_past_its_timeout(start_server, tmp_path):
    model_dir = make_model_dir(tmp_path / "model", code=STUCK_PREDICT)
    server = start_server(["--model-dir", str(model_dir), "--workers", "2", "--timeout", "1"],
                          env={"STUCK_SECONDS": "6"})
    until(server, "/v2/health/ready", 200)
    x = inputs(2)
    x[0, 0] = 7
    began = time.monotonic()
    reply = server.post(npy_bytes(x), "application/x-npy", "application/x-npy")
    assert reply.status == 504 and time.monotonic() - began < 3
    dead = until(server, "/v2/health/live", 503, seconds=4)
    assert dead.json()["live"] is False and "past the 1" in dead.json()["error"]
    # Every worker says so, the stuck one and its sibling (fresh connections reach both),
    # once the stuck worker's watch (every 0.5 s) has left its marker.
    time.sleep(1.0)
    assert all(probe(server, "/v2/health/live").status == 503 for _ in range(6))
    assert probe(server, "/v2/health/ready").status == 503
    # The other worker still serves, and the stuck one comes back when it is done.
    ok = server.post(npy_bytes(inputs(1)), "application/x-npy", "application/x-npy")
    assert ok.status in (200, 504)
    assert until(server, "/v2/health/live", 200, seconds=10).json() == {"live": True}
    assert until(server, "/v2/health/ready", 200).status == 200
