"""The hosting contract over real HTTP: content types, negotiation, status codes, metrics.

One server for the module: a Linear(4, 3) loaded by a user ``inference.py``
that defines only ``model_fn``, the built-in defaults doing the rest, a 1 MB
payload limit and ``text/csv`` as the default response type.
"""
from __future__ import annotations

import http.client
import json
import re
import time

import numpy as np
import pytest

from tests.serving.conftest import (
    OUT_SIZE,
    inputs,
    make_model_dir,
    npy_bytes,
    predict_directly,
)

NPY, JSON, CSV = "application/x-npy", "application/json", "text/csv"


def encode(array: np.ndarray, content_type: str) -> bytes:
    if content_type == NPY:
        return npy_bytes(array)
    if content_type == JSON:
        return json.dumps(array.tolist()).encode()
    return "\n".join(",".join(repr(float(v)) for v in row) for row in array).encode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(start_server, model_dir):
    return start_server(
        ["--model-dir", str(model_dir), "--workers", "1", "--max-payload-mb", "1"],
        env={"SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": CSV},
    )


def expected(model_dir, x):
    return predict_directly(model_dir / "model.npz", x)


def test_ping_answers_200_with_an_empty_body(server):
    reply = server.request("GET", "/ping")
    assert (reply.status, reply.body) == (200, b"")


def test_execution_parameters(server):
    reply = server.request("GET", "/execution-parameters")
    assert reply.status == 200
    assert reply.json() == {
        "MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1,
    }


@pytest.mark.parametrize("rows", [1, 5], ids=["single", "batch"])
@pytest.mark.parametrize("accept", [NPY, JSON, CSV])
@pytest.mark.parametrize("content_type", [NPY, JSON, CSV])
def test_every_content_type_in_and_out(server, model_dir, content_type, accept, rows):
    x = inputs(rows)
    reply = server.post(encode(x, content_type), content_type, accept)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == accept
    answer = reply.array()
    assert answer.shape == (rows, OUT_SIZE)
    np.testing.assert_allclose(answer, expected(model_dir, x), rtol=1e-6, atol=1e-6)


def test_npy_answer_is_bit_for_bit_the_direct_prediction(server, model_dir):
    x = inputs(64, seed=7)
    reply = server.post(npy_bytes(x), NPY, NPY)
    answer = reply.array()
    assert answer.dtype == np.float32
    assert np.array_equal(answer, expected(model_dir, x))


def test_a_single_csv_row_keeps_its_batch_dimension(server, model_dir):
    reply = server.post(b"0.5,-0.25,1,2\n", CSV, JSON)
    assert reply.status == 200
    answer = reply.json()
    assert len(answer) == 1 and len(answer[0]) == OUT_SIZE
    np.testing.assert_allclose(answer, expected(model_dir, [[0.5, -0.25, 1, 2]]), rtol=1e-6)


def test_media_type_parameters_are_ignored(server):
    reply = server.post(b"1,2,3,4", "Text/CSV; charset=utf-8", "application/json; charset=utf-8")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == JSON


def test_contenttype_alias_header(server, model_dir):
    x = inputs(2)
    reply = server.request("POST", "/invocations", npy_bytes(x),
                           {"ContentType": NPY, "Accept": NPY})
    assert reply.status == 200, reply.body
    assert np.array_equal(reply.array(), expected(model_dir, x))


def test_missing_content_type_means_json(server, model_dir):
    reply = server.request("POST", "/invocations", b"[[1, 2, 3, 4]]", {"Accept": JSON})
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(reply.json(), expected(model_dir, [[1, 2, 3, 4]]), rtol=1e-6)


@pytest.mark.parametrize("accept, chosen", [
    ("text/csv;q=0.5, application/x-npy;q=0.9", NPY),
    ("application/x-npy;q=0, text/csv", CSV),
    ("application/json;q=0.2, text/csv;q=0.3", CSV),
    ("text/html, image/png;q=0.9, application/json;q=0.1", JSON),
    ("application/*", JSON),
    # A quoted comma stays inside its parameter; charset and other parameters are ignored.
    ('application/json;a="x,y";q=0.9, text/csv;q=0.5', JSON),
    ("text/csv; charset=utf-8", CSV),
    ("*/*", CSV),
    (None, CSV),
    ("", CSV),
])
def test_accept_negotiation(server, accept, chosen):
    reply = server.post(b"[[1, 2, 3, 4]]", JSON, accept)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == chosen


def assert_error(reply, status, *words):
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["status"] == status
    for word in words:
        assert word in body["error"], body
    assert "Traceback" not in reply.body.decode() and "traceback" not in body
    return body


def test_415_unsupported_content_type_names_the_supported_ones(server):
    reply = server.post(b"<x/>", "application/xml", JSON)
    assert_error(reply, 415, "application/xml", NPY, JSON, CSV)


@pytest.mark.parametrize("accept", ["text/html", "application/json;q=0, text/csv;q=0",
                                    # text/csv excluded by its own range, whatever text/* says
                                    "text/*;q=0.3, text/csv;q=0"])
def test_406_nothing_acceptable_names_the_supported_types(server, accept):
    reply = server.post(b"[[1, 2, 3, 4]]", JSON, accept)
    assert_error(reply, 406, NPY, JSON, CSV)


@pytest.mark.parametrize("body, content_type, words", [
    (b"[[1, 2,", JSON, ["JSON"]),
    (b"[[1, 2], [3]]", JSON, ["rectangular"]),
    (b"1,2,x,4", CSV, ["CSV"]),
    (b"not an npy file", NPY, ["npy"]),
    (npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True), NPY, ["pickle"]),
    (b"", JSON, ["empty"]),
    (npy_bytes(np.ones((2, 5), np.float32)), NPY, ["does not fit", "shape"]),
    (npy_bytes(np.ones((2, 4), np.float64)), NPY, ["does not fit", "dtype"]),
], ids=["bad-json", "ragged-json", "bad-csv", "bad-npy", "pickled-npy", "empty",
        "wrong-shape", "wrong-dtype"])
def test_400_bodies_that_cannot_be_used(server, body, content_type, words):
    reply = server.post(body, content_type, JSON)
    assert_error(reply, 400, *words)


def test_413_decided_from_content_length_before_reading(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", NPY)
        connection.putheader("Content-Length", str(5 * 1024 * 1024 * 1024))
        connection.endheaders()  # the 5 GB body is never sent
        started = time.monotonic()
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413
    assert time.monotonic() - started < 5
    assert body["status"] == 413 and "1 MB" in body["error"], body


def test_413_for_a_chunked_body_over_the_limit(server):
    chunks = (b"1," * 100_000 for _ in range(6))  # 1.2 MB, no Content-Length
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", "/invocations", body=chunks,
                           headers={"Content-Type": CSV}, encode_chunked=True)
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413 and body["status"] == 413


def test_a_body_just_under_the_limit_is_served(server, model_dir):
    x = inputs(65_000)  # 1_040_128 bytes of npy, the limit is 1_048_576
    payload = npy_bytes(x)
    assert len(payload) < 1024 * 1024
    reply = server.post(payload, NPY, NPY)
    assert reply.status == 200, reply.body[:300]
    assert np.array_equal(reply.array(), expected(model_dir, x))


def test_404_unknown_path(server):
    assert_error(server.request("GET", "/predict"), 404, "/predict")


def test_405_wrong_method(server):
    reply = server.request("GET", "/invocations")
    assert_error(reply, 405, "POST")
    assert reply.headers["allow"] == "POST"


def test_metrics_in_prometheus_text_format(server):
    server.post(b"<x/>", "application/xml", JSON)
    server.post(b"[[1, 2, 3, 4]]", JSON, JSON)
    reply = server.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) smchainer_\w+ ", line), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['smchainer_requests_total{endpoint="/invocations",status="415"}'] >= 1
    assert samples['smchainer_requests_total{endpoint="/invocations",status="200"}'] >= 1
    invocations = sum(value for key, value in samples.items()
                      if key.startswith('smchainer_requests_total{endpoint="/invocations"'))
    count = samples['smchainer_request_duration_seconds_count{endpoint="/invocations"}']
    assert count == invocations
    assert samples['smchainer_request_duration_seconds_bucket'
                   '{endpoint="/invocations",le="+Inf"}'] == count
    assert samples['smchainer_model_loaded{worker="0"}'] == 1
    assert 0 < samples['smchainer_model_load_seconds{worker="0"}'] < 60


def test_bad_requests_never_kill_the_worker_and_each_is_logged(server):
    for _ in range(3):
        server.post(b"garbage", NPY, JSON)
        server.post(npy_bytes(np.ones((1, 9), np.float32)), NPY, JSON)
    assert server.request("GET", "/ping").status == 200
    log = server.log()
    assert log.count("Booting worker") == 1, log
    assert re.search(r"POST /invocations 400 \d+\.\dms", log), log
    assert re.search(r"GET /ping 200 \d+\.\dms", log), log
    assert "Traceback" not in log
