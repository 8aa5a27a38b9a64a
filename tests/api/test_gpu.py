"""``local_gpu``: the job and the endpoint on the GPU (skipped where there is none)."""
from __future__ import annotations

import numpy as np
import pytest

from smchainer.api import Chainer
from tests.api.conftest import EXAMPLE, TINY_VGG, alive
from tests.api.test_flow import reference_logits

pytestmark = pytest.mark.gpu


def test_local_gpu_trains_and_serves_on_the_gpu(gpus, cifar_channels, tmp_path):
    estimator = Chainer(entry_point="train.py", source_dir=str(EXAMPLE),
                        hyperparameters=TINY_VGG, instance_type="local_gpu",
                        jobs_dir=tmp_path / "jobs")
    estimator.fit({"train": str(cifar_channels["train"]), "test": str(cifar_channels["test"])},
                  logs=False)
    job = estimator.latest_training_job
    assert "training on @cupy:0" in job.log_path.read_text()
    images = np.load(cifar_channels["test"] / "test.npz")["data"][:16]
    expected = reference_logits(job.job_dir / "model", images)  # on the CPU
    with estimator.deploy(initial_instance_count=1, instance_type="local_gpu") as predictor:
        pids = predictor.endpoint.process_ids()
        _, metrics = predictor.endpoint.get("/metrics")
        assert 'device="gpu:0"' in metrics
        answer = predictor.predict(images)
    np.testing.assert_allclose(answer, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert not any(alive(pid) for pid in pids)
