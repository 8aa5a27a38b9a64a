"""Serving on GPUs: worker i on GPU i mod n, the default predict_fn on the worker's device."""
from __future__ import annotations

import re

import numpy as np
import pytest

from smchainer.testing import require_gpu
from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes, predict_directly

# A Linear that notes, per worker process, which device it computed on.
PROBE_CODE = MODEL_FN.replace("model = L.Linear(4, 3)", "model = Probe(4, 3)") + '''

class Probe(L.Linear):
    def forward(self, x):
        marker = os.path.join(os.environ["MARKERS"], str(os.getpid()))
        with open(marker, "w") as file:
            file.write(f"{self.device} {type(x).__module__}")
        return super().forward(x)
'''


@pytest.mark.gpu
def test_each_worker_predicts_on_gpu_i_mod_n(start_server, tmp_path):
    count = require_gpu()
    markers = tmp_path / "markers"
    markers.mkdir()
    model_dir = make_model_dir(tmp_path / "model", code=PROBE_CODE)
    server = start_server(["--model-dir", str(model_dir), "--workers", "2"],
                          env={"MARKERS": str(markers), "SMCHAINER_DEVICE": ""})
    x = inputs(16)
    expected = predict_directly(model_dir / "model.npz", x)
    for _ in range(20):
        reply = server.post(npy_bytes(x), "application/x-npy", "application/x-npy")
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(reply.array(), expected, rtol=1e-5, atol=1e-5)
    metrics = server.request("GET", "/metrics").body.decode()
    infos = [dict(re.findall(r'(\w+)="([^"]*)"', labels))
             for labels in re.findall(r"^smchainer_worker_info\{(.*)\} 1", metrics, re.M)]
    devices = {info["worker"]: info["device"] for info in infos}
    assert devices == {"0": "gpu:0", "1": f"gpu:{1 % count}"}, metrics
    records = {file.read_text() for file in markers.iterdir()}
    assert records and records <= {"@cupy:0 cupy", f"@cupy:{1 % count} cupy"}, records
