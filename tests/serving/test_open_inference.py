"""The Open Inference Protocol (KServe v2 REST), spoken to by a real client.

tritonclient's HTTP client (KServe's and Triton's protocol) against a real
``smchainer-serve``: metadata, readiness, JSON and binary tensors, and the
same hooks as /invocations, so a SageMaker script's model answers both alike.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.serving.conftest import inputs, make_model_dir, predict_directly

httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("model") / "model")
    server = start_server(["--model-dir", str(model_dir), "--workers", "1",
                           "--model-name", "linear"])
    server.model_dir = model_dir
    return server


@pytest.fixture
def client(server):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def test_a_kserve_client_sees_the_server_and_the_model(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("linear")
    assert not client.is_model_ready("other")
    metadata = client.get_model_metadata("linear")
    assert metadata["name"] == "linear"
    assert metadata["inputs"][0]["datatype"] == "FP32"
    assert client.get_server_metadata()["name"] == "smchainer"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_answers_what_invocations_answers(client, server, binary):
    x = inputs(5)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("output", binary_data=binary)
    result = client.infer("linear", [tensor], outputs=[wanted], request_id="r-1")
    answer = result.as_numpy("output")
    want = predict_directly(server.model_dir / "model.npz", x)
    np.testing.assert_allclose(answer, want, rtol=1e-6)
    assert answer.dtype == np.float32 and answer.shape == (5, 3)
    assert result.get_response()["id"] == "r-1"
    # /invocations, the SageMaker route, gives the same numbers for the same input.
    reply = server.post(json.dumps(x.tolist()).encode(), "application/json", "application/json")
    np.testing.assert_allclose(np.asarray(reply.json(), dtype=np.float32), answer, rtol=1e-6)


def test_bad_tensors_are_400s_with_the_reason(server):
    def infer(body: dict, path: str = "/v2/models/linear/infer"):
        return server.request("POST", path, json.dumps(body).encode(),
                              {"Content-Type": "application/json"})

    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    assert infer({"inputs": [tensor]}).status == 200
    cases = [
        ({"inputs": [{**tensor, "shape": [2, 4]}]}, "4 values for shape [2, 4]"),
        ({"inputs": [{**tensor, "datatype": "BYTES"}]}, "datatype 'BYTES'"),
        ({"inputs": [tensor, tensor]}, "one input tensor, not 2"),
        ({"inputs": [{**tensor, "shape": [1, -4]}]}, "whole numbers >= 0"),
        ({"inputs": [{**tensor, "shape": [2 ** 70]}]}, "4 values for shape"),
        ({"nothing": 1}, "needs 'inputs'"),
    ]
    for body, words in cases:
        reply = infer(body)
        assert reply.status == 400, (body, reply.body)
        assert words in reply.json()["error"], reply.json()
    wrong_model = infer({"inputs": [tensor]}, "/v2/models/other/infer")
    assert wrong_model.status == 404 and "serves 'linear'" in wrong_model.json()["error"]
    assert server.request("GET", "/v2/models/linear/infer").status == 405


def test_metadata_reads_the_models_contract():
    from smchainer.model_contract import ModelContract
    from smchainer.serving import v2

    contract = ModelContract({"input": {"shape": [3, 32, 32], "dtype": "float32"}},
                             "smchainer-model.json")
    assert v2.model_metadata("vgg", contract)["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    absent = ModelContract({}, "", present=False)
    assert v2.model_metadata("m", absent)["inputs"][0]["shape"] == [-1]
