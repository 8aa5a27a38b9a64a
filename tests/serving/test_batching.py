"""Dynamic batching: queued requests share one predict_fn call, and each gets its own answer.

In process: a worker's app (:class:`InferenceApp`) with a user module whose
``predict_fn`` records every call and can hold the inference thread, so the
requests queue behind it exactly as they would under load. Over HTTP: the
real server merges concurrent clients' requests for the built-in VGG and for
a user's opted-in ``predict_fn``, and says so in ``/metrics``.
"""
from __future__ import annotations

import concurrent.futures
import json
import queue
import re
import threading
import time
import types
from http.client import HTTPConnection

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smchainer import content
from smchainer.errors import BadRequest
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager
from smchainer.serving.app import InferenceApp
from smchainer.serving.batching import split_rows
from smchainer.serving.settings import ServerSettings
from tests.serving.conftest import npy_bytes

POISON = 99.0


class Recorder:
    """A user module's hooks: y = 2x, every predict_fn call's rows recorded."""

    def __init__(self, opt_in: bool = True) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.inputs: list[np.ndarray] = []
        self.hold = threading.Event()
        self.held = threading.Event()
        self.hold.set()
        self.module = types.ModuleType("user_batching")
        self.module.model_fn = lambda model_dir: "doubler"
        self.module.predict_fn = self.predict_fn
        if opt_in:
            self.module.batch_fn = self.batch_fn

    def batch_fn(self, input_data, model):
        if np.any(input_data < 0):
            raise BadRequest("negative input")
        return input_data

    def predict_fn(self, input_data, model):
        self.calls.append(input_data.shape)
        self.inputs.append(np.array(input_data))
        self.held.set()
        self.hold.wait(10)
        requests = set(np.abs(input_data[input_data != POISON]).tolist())
        if np.any(input_data == POISON) and len(requests) > 1:
            raise ValueError("a poisoned batch")  # alone (one request's rows), it is fine
        return input_data * 2


def make_app(tmp_path, recorder: Recorder, max_batch_size: int = 8,
             delay_ms: float = 0.0) -> InferenceApp:
    pm = get_plugin_manager(user_module=recorder.module, load_entrypoints=False)
    settings = ServerSettings(model_dir=tmp_path, max_batch_size=max_batch_size,
                              max_batch_delay_ms=delay_ms)
    app = InferenceApp(Hooks(pm), settings)
    app.holder.load("cpu")
    assert app.holder.state == "ready"
    return app


def submit(app: InferenceApp, array: np.ndarray, timeout: float = 30):
    return app.submit_inference(app.holder.model, npy_bytes(array), content.NPY, [content.NPY],
                                time.monotonic() + timeout)


def answer(future) -> np.ndarray:
    body, media_type = future.result(timeout=30)
    assert media_type == content.NPY
    return content.decode_npy(body)


def held_then_queued(app: InferenceApp, recorder: Recorder, arrays: list[np.ndarray]):
    """One request holds the inference thread while ``arrays`` queue; then all run."""
    recorder.hold.clear()
    first = submit(app, np.full((1, 4), 0.5, np.float32))
    assert recorder.held.wait(10)
    futures = [submit(app, array) for array in arrays]
    recorder.hold.set()
    assert answer(first).tolist() == [[1.0] * 4]
    return futures


def rows(count: int, width: int = 4, start: int = 0) -> list[np.ndarray]:
    return [np.full((1, width), start + i, np.float32) for i in range(count)]


def test_queued_requests_share_one_call_and_each_gets_its_own_rows(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder)
    arrays = rows(6, start=1)
    futures = held_then_queued(app, recorder, arrays)
    for array, future in zip(arrays, futures, strict=True):
        np.testing.assert_array_equal(answer(future), array * 2)
    assert recorder.calls == [(1, 4), (6, 4)]
    text = app.metrics.render()
    assert "smchainer_batch_size_sum 7.0" in text and "smchainer_batch_size_count 2.0" in text
    assert 'smchainer_batch_requests_bucket{le="4.0"} 1.0' in text  # the lone first
    assert "smchainer_queue_depth 0.0" in text
    assert "smchainer_inference_seconds_count 2.0" in text  # the inference thread's two calls


def test_open_inference_tensors_join_the_batch_and_a_bad_one_fails_alone(tmp_path):
    from smchainer.serving import v2

    recorder = Recorder()
    app = make_app(tmp_path, recorder)
    recorder.hold.clear()
    first = submit(app, np.full((1, 4), 0.5, np.float32))
    assert recorder.held.wait(10)
    x = np.full((2, 4), 3, np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}
    good = v2.PendingInfer(json.dumps({"inputs": [tensor]}).encode(), None)
    bad = v2.PendingInfer(b'{"inputs": 7}', None)
    deadline = time.monotonic() + 30
    futures = [submit(app, np.full((1, 4), 1, np.float32)),
               app.submit_inference(app.holder.model, b"", content.NPY, [content.NPY], deadline,
                                    unwrap=good.unwrap),
               app.submit_inference(app.holder.model, b"", content.NPY, [content.NPY], deadline,
                                    unwrap=bad.unwrap),
               submit(app, np.full((1, 4), 2, np.float32))]
    recorder.hold.set()
    assert answer(first).tolist() == [[1.0] * 4]
    np.testing.assert_array_equal(answer(futures[1]), x * 2)
    with pytest.raises(BadRequest, match="needs 'inputs'"):
        futures[2].result(timeout=30)
    assert answer(futures[0]).tolist() == [[2.0] * 4]
    assert answer(futures[3]).tolist() == [[4.0] * 4]
    assert recorder.calls == [(1, 4), (4, 4)]  # the tensor's two rows merged with the others
    assert good.request is not None and good.request.array.shape == (2, 4)


def test_a_batch_holds_at_most_max_batch_size_items(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder, max_batch_size=8)
    arrays = [np.full((3, 4), i, np.float32) for i in range(5)]
    futures = held_then_queued(app, recorder, arrays)
    for array, future in zip(arrays, futures, strict=True):
        np.testing.assert_array_equal(answer(future), array * 2)
    assert recorder.calls[1:] == [(6, 4), (6, 4), (3, 4)]


def test_requests_of_other_shapes_are_not_merged(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder)
    arrays = [np.ones((1, 4), np.float32), np.ones((1, 5), np.float32),
              np.ones((1, 5), np.float32), np.ones((2, 4), np.float32)]
    futures = held_then_queued(app, recorder, arrays)
    for array, future in zip(arrays, futures, strict=True):
        np.testing.assert_array_equal(answer(future), array * 2)
    assert recorder.calls[1:] == [(1, 4), (2, 5), (2, 4)]


def test_a_request_batch_fn_declines_runs_alone_and_is_not_counted(tmp_path):
    recorder = Recorder()
    recorder.module.batch_fn = lambda data, model: None if data.shape[1] == 5 else data
    app = make_app(tmp_path, recorder)
    arrays = [np.ones((1, 4), np.float32), np.ones((3, 5), np.float32),
              np.ones((1, 4), np.float32)]
    futures = held_then_queued(app, recorder, arrays)
    for array, future in zip(arrays, futures, strict=True):
        np.testing.assert_array_equal(answer(future), array * 2)
    assert recorder.calls[1:] == [(1, 4), (3, 5), (1, 4)]
    text = app.metrics.render()  # the first and the two width-4 calls; not the declined one
    assert "smchainer_batch_size_count 3.0" in text and "smchainer_batch_size_sum 3.0" in text


def test_a_bad_request_fails_alone_and_the_others_still_merge(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder)
    arrays = rows(5, start=1)
    arrays[2] = -arrays[2]
    futures = held_then_queued(app, recorder, arrays)
    with pytest.raises(BadRequest, match="negative input"):
        futures[2].result(timeout=30)
    for index in (0, 1, 3, 4):
        np.testing.assert_array_equal(answer(futures[index]), arrays[index] * 2)
    assert recorder.calls[1:] == [(4, 4)]


def test_a_failed_merged_call_is_run_again_one_request_at_a_time(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder)
    arrays = rows(4, start=1)
    arrays[1] = np.full((1, 4), POISON, np.float32)
    futures = held_then_queued(app, recorder, arrays)
    for array, future in zip(arrays, futures, strict=True):
        np.testing.assert_array_equal(answer(future), array * 2)
    assert recorder.calls[1:] == [(4, 4), (1, 4), (1, 4), (1, 4), (1, 4)]


def test_a_lone_request_never_waits_for_the_batch_delay(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder, delay_ms=5000)
    started = time.monotonic()
    np.testing.assert_array_equal(answer(submit(app, np.ones((1, 4), np.float32))),
                                  np.full((1, 4), 2.0))
    assert time.monotonic() - started < 2.5  # well under the 5 s delay
    assert recorder.calls == [(1, 4)]


def test_a_request_stops_arriving_before_it_is_queued(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder, delay_ms=5000)
    seen = []

    class Watched(queue.SimpleQueue):
        def put(self, item, block=True, timeout=None):
            seen.append(app.runner.arriving())  # what the batcher sees once it is queued
            super().put(item, block, timeout)

    app.runner._queue = Watched()
    with app.runner.arriving_request():
        assert app.runner.arriving() == 1
        future = submit(app, np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(answer(future), np.full((1, 4), 2.0))
    assert seen == [0] and app.runner.arriving() == 0


def test_a_batch_waits_for_a_request_still_arriving(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder, delay_ms=5000)
    second: list = []
    reading = threading.Event()

    def arrive_late():
        with app.runner.arriving_request():  # being read, as on a pool thread
            reading.set()
            time.sleep(0.3)
            second.append(submit(app, np.full((1, 4), 3.0, np.float32)))

    thread = threading.Thread(target=arrive_late)
    thread.start()
    assert reading.wait(10)
    with app.runner.arriving_request():
        first = submit(app, np.full((1, 4), 1.0, np.float32))
    thread.join()
    np.testing.assert_array_equal(answer(first), np.full((1, 4), 2.0))
    np.testing.assert_array_equal(answer(second[0]), np.full((1, 4), 6.0))
    assert recorder.calls == [(2, 4)]


def test_a_connection_just_answered_counts_as_on_its_way_for_the_batch_delay(tmp_path):
    app = make_app(tmp_path, Recorder(), delay_ms=200)
    runner = app.runner
    assert runner.return_window == pytest.approx(0.2)
    app.answered(1)
    app.answered(2)
    assert runner.arriving() == 2
    app.came_back(1)  # its next head is here
    assert runner.arriving() == 1
    time.sleep(0.25)  # past the window: not expected any more
    assert runner.arriving() == 0
    app.came_back(2)  # late, or closed: nothing to take back
    assert runner.arriving() == 0


def test_without_batching_answers_are_not_tracked(tmp_path):
    app = make_app(tmp_path, Recorder(), max_batch_size=1, delay_ms=200)
    app.answered(1)
    assert app.runner.arriving() == 0


def test_a_batch_waits_for_a_kept_alive_client_it_has_just_answered(tmp_path):
    """A client that sends again as soon as it has its answer joins the next batch."""
    recorder = Recorder()
    app = make_app(tmp_path, recorder, delay_ms=5000)
    recorder.hold.clear()
    first = submit(app, np.full((1, 4), 1.0, np.float32))
    assert recorder.held.wait(10)
    second = submit(app, np.full((1, 4), 2.0, np.float32))  # queued behind the first
    app.answered(7)  # as the worker does once the first's answer is sent

    def come_back():
        time.sleep(0.3)
        app.came_back(7)
        third.append(submit(app, np.full((1, 4), 3.0, np.float32)))

    third: list = []
    thread = threading.Thread(target=come_back)
    thread.start()
    recorder.hold.set()
    thread.join()
    np.testing.assert_array_equal(answer(first), np.full((1, 4), 2.0))
    np.testing.assert_array_equal(answer(second), np.full((1, 4), 4.0))
    np.testing.assert_array_equal(answer(third[0]), np.full((1, 4), 6.0))
    assert recorder.calls == [(1, 4), (2, 4)]


def test_requests_whose_caller_gave_up_are_dropped_before_decoding(tmp_path):
    recorder = Recorder()
    app = make_app(tmp_path, recorder)
    recorder.hold.clear()
    first = submit(app, np.ones((1, 4), np.float32))
    assert recorder.held.wait(10)
    abandoned = submit(app, np.full((1, 4), 5.0, np.float32))
    assert abandoned.cancel()
    kept = submit(app, np.full((1, 4), 7.0, np.float32))
    recorder.hold.set()
    answer(first)
    np.testing.assert_array_equal(answer(kept), np.full((1, 4), 14.0))
    assert recorder.calls == [(1, 4), (1, 4)]


REQUEST = st.tuples(st.integers(1, 4), st.sampled_from([3, 4]),
                    st.sampled_from(["good", "good", "negative", "poison"]))


@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(REQUEST, min_size=1, max_size=12), st.integers(2, 9))
def test_any_mix_of_requests_gets_the_answers_they_would_get_alone(tmp_path, requests,
                                                                   max_items):
    recorder = Recorder()
    app = make_app(tmp_path, recorder, max_batch_size=max_items)
    arrays = []
    for index, (rows, width, kind) in enumerate(requests):
        array = np.full((rows, width), index + 1, np.float32)
        if kind == "negative":
            array = -array
        elif kind == "poison":
            array[-1, 0] = POISON
        arrays.append(array)
    futures = held_then_queued(app, recorder, arrays)
    for (_, _, kind), array, future in zip(requests, arrays, futures, strict=True):
        if kind == "negative":
            with pytest.raises(BadRequest):
                future.result(timeout=30)
        else:
            np.testing.assert_array_equal(answer(future), array * 2)
    answered = [a for (_, _, kind), a in zip(requests, arrays, strict=True)
                if kind != "negative"]
    calls = recorder.inputs[1:]
    assert sum(len(batch) for batch in calls) >= sum(len(a) for a in answered)
    for batch in calls:
        owners = set(np.abs(batch[batch != POISON]).tolist())
        if len(owners) > 1:  # a merged call: never more than max_items rows
            assert len(batch) <= max_items, (len(batch), max_items)


def test_a_predict_fn_without_batch_fn_turns_batching_off(tmp_path):
    recorder = Recorder(opt_in=False)
    app = make_app(tmp_path, recorder)
    assert app.batcher is None
    refusal = app.hooks.batching_refusal()
    assert "defines predict_fn but not batch_fn" in refusal and "user_batching" in refusal
    futures = held_then_queued(app, recorder, rows(3, start=1))
    for index, future in enumerate(futures):
        np.testing.assert_array_equal(answer(future), np.full((1, 4), 2.0 * (index + 1)))
    assert recorder.calls[1:] == [(1, 4)] * 3


def test_transform_fn_turns_batching_off(tmp_path):
    module = types.ModuleType("user_transform")
    module.model_fn = lambda model_dir: "m"
    module.transform_fn = lambda model, data, content_type, accept: (data, accept)
    hooks = Hooks(get_plugin_manager(user_module=module, load_entrypoints=False))
    assert "defines transform_fn" in hooks.batching_refusal()


def test_the_built_in_defaults_allow_batching_and_answer_for_vgg_only(tmp_path):
    from smchainer.models.vgg import VGG

    hooks = Hooks(get_plugin_manager(load_entrypoints=False))
    assert hooks.batching_refusal() is None
    context = hooks.new_context(None)
    image = np.random.RandomState(0).uniform(0, 1, (3, 32, 32)).astype(np.float32)
    batch = hooks.batch_fn(image, VGG(n_classes=10, depth=11, width=0.125), context)
    assert batch.shape == (1, 3, 32, 32)
    assert hooks.batch_fn(image, object(), context) is None
    with pytest.raises(BadRequest, match="expected float32 N x 3 x 32 x 32"):
        hooks.batch_fn(np.ones((2, 5), np.float32), VGG(n_classes=10, depth=11, width=0.125),
                       context)


def test_split_rows_cuts_arrays_and_classifications_and_refuses_the_rest():
    from smchainer.classification import Classification

    parts = split_rows(np.arange(12).reshape(6, 2), [1, 3, 2])
    assert [p.tolist() for p in parts] == [[[0, 1]], [[2, 3], [4, 5], [6, 7]], [[8, 9], [10, 11]]]
    classified = split_rows(Classification(np.eye(3, dtype=np.float32), ["a", "b", "c"]), [2, 1])
    assert [c.labels.tolist() for c in classified] == [[0, 1], [2]]
    assert classified[1].class_names == ["a", "b", "c"]
    for bad in (np.arange(5), {"a": 1, "b": 2, "c": 3, "d": 4, "e": 6, "f": 7}, 3.0, "abcdef"):
        with pytest.raises(ValueError):
            split_rows(bad, [2, 4])


# -- over HTTP ----------------------------------------------------------------------------

SLOW_FIRST = '''
import time

import numpy as np

calls = []


def model_fn(model_dir):
    return "doubler"


def batch_fn(input_data, model):
    return input_data


def predict_fn(input_data, model):
    calls.append(len(input_data))
    if len(calls) == 1:
        time.sleep(1.0)  # the others queue behind the first
    return np.asarray(input_data, np.float32) * 2
'''


def batch_histogram(server) -> dict[str, float]:
    text = server.request("GET", "/metrics").body.decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^smchainer_batch_(requests_sum|requests_count|size_sum|size_count)\s+(\S+)$", text,
        re.M)}


def post_concurrently(port: int, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    def post(body: bytes) -> tuple[int, bytes]:
        connection = HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("POST", "/invocations", body,
                               {"Content-Type": content.NPY, "Accept": content.NPY})
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        first = pool.submit(post, bodies[0])
        time.sleep(0.3)  # the first holds the inference thread; the others queue
        rest = [pool.submit(post, body) for body in bodies[1:]]
        return [first.result()] + [f.result() for f in rest]


def test_the_server_merges_concurrent_clients_of_an_opted_in_predict_fn(start_server,
                                                                        tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "code").mkdir(parents=True)
    (model_dir / "code" / "inference.py").write_text(SLOW_FIRST)
    server = start_server(["--model-dir", str(model_dir), "--workers", "1",
                           "--max-batch-size", "16", "--max-batch-delay-ms", "20"])
    arrays = [np.full((1, 3), i, np.float32) for i in range(9)]
    replies = post_concurrently(server.port, [npy_bytes(a) for a in arrays])
    for array, (status, body) in zip(arrays, replies, strict=True):
        assert status == 200, body
        np.testing.assert_array_equal(content.decode_npy(body), array * 2)
    figures = batch_histogram(server)
    # 9 requests in fewer predict_fn calls: the 8 that queued shared some.
    assert figures["requests_sum"] == 9 and figures["size_sum"] == 9
    assert figures["requests_count"] < 9, figures
    assert "a batch holds" not in server.log() and "batching is off" not in server.log()


STEADY = '''
import time

import numpy as np


def model_fn(model_dir):
    return "doubler"


def batch_fn(input_data, model):
    return input_data


def predict_fn(input_data, model):
    time.sleep(0.03)
    return np.asarray(input_data, np.float32) * 2
'''


def test_clients_that_send_again_at_once_stay_in_one_batch(start_server, tmp_path):
    """Four clients, each sending its next request as soon as it has its answer.

    Counting only requests already queued or being read, a batch starts with
    those that queued while the one before ran, and the clients split into
    two groups that alternate (about two requests a call); a batch that also
    waits for the connections it has just answered keeps all four together.
    """
    model_dir = tmp_path / "model"
    (model_dir / "code").mkdir(parents=True)
    (model_dir / "code" / "inference.py").write_text(STEADY)
    server = start_server(["--model-dir", str(model_dir), "--workers", "1",
                           "--max-batch-size", "16", "--max-batch-delay-ms", "20"])
    body = npy_bytes(np.ones((1, 3), np.float32))

    def client() -> list[int]:
        connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
        statuses = []
        try:
            for _ in range(12):
                connection.request("POST", "/invocations", body,
                                   {"Content-Type": content.NPY, "Accept": content.NPY})
                reply = connection.getresponse()
                reply.read()
                statuses.append(reply.status)
        finally:
            connection.close()
        return statuses

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [f.result() for f in [pool.submit(client) for _ in range(4)]]
    assert results == [[200] * 12] * 4
    figures = batch_histogram(server)
    assert figures["requests_sum"] == 48
    assert figures["requests_sum"] / figures["requests_count"] >= 3, figures


def test_max_batch_size_1_keeps_every_request_to_its_own_call(start_server, tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "code").mkdir(parents=True)
    (model_dir / "code" / "inference.py").write_text(SLOW_FIRST)
    server = start_server(["--model-dir", str(model_dir), "--workers", "1",
                           "--max-batch-size", "1"])
    arrays = [np.full((1, 3), i, np.float32) for i in range(5)]
    replies = post_concurrently(server.port, [npy_bytes(a) for a in arrays])
    assert [status for status, _ in replies] == [200] * 5
    assert batch_histogram(server)["requests_count"] == 0  # the batcher made no call
