"""The same flow with train_instance_count=2: two ChainerMN processes under a real mpirun."""
from __future__ import annotations

import json

import numpy as np
import pytest

from smchainer.api import Chainer
from tests.api.conftest import EXAMPLE, TINY_VGG, alive

pytestmark = pytest.mark.mpi


def test_two_instances_train_data_parallel_then_serve(cifar_channels, tmp_path, capsys):
    estimator = Chainer(entry_point="train.py", source_dir=str(EXAMPLE),
                        hyperparameters=TINY_VGG, train_instance_count=2,
                        train_instance_type="local", jobs_dir=tmp_path / "jobs",
                        output_path=str(tmp_path / "results"))
    assert estimator.processes() == 2
    estimator.fit({"train": str(cifar_channels["train"]), "test": str(cifar_channels["test"])})
    job = estimator.latest_training_job

    streamed = capsys.readouterr().out
    assert "mpirun -n 2" in streamed  # the launch line, streamed to the notebook
    assert "ChainerMN: 2 processes" in streamed
    assert f"job {job.name} succeeded" in streamed
    assert streamed == job.log_path.read_text()

    # Each rank trained on its half of the 250 images: 125 in batches of 32 is 4 iterations.
    (entry,) = json.loads((job.job_dir / "output" / "data" / "log").read_text())
    assert entry["iteration"] == 4
    hps = json.loads((job.job_dir / "input" / "config" / "hyperparameters.json").read_text())
    assert json.loads(hps["sagemaker_use_mpi"]) is True
    assert json.loads(hps["sagemaker_num_processes"]) == 2

    results = tmp_path / "results" / job.name / "output"
    assert estimator.model_data == str(results / "model.tar.gz")
    assert (results / "model.tar.gz").is_file() and (results / "output.tar.gz").is_file()

    images = np.load(cifar_channels["test"] / "test.npz")["data"][:16]
    with estimator.deploy(initial_instance_count=1, instance_type="local") as predictor:
        pids = predictor.endpoint.process_ids()
        logits = predictor.predict(images)
        assert logits.shape == (16, 10) and np.isfinite(logits).all()
    assert pids and not any(alive(pid) for pid in pids)


def test_the_environment_reaches_both_ranks_and_each_keeps_its_output(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import os\n"
        "rank = os.environ['SMCHAINER_RANK']\n"
        "out = os.path.join(os.environ['SM_OUTPUT_DATA_DIR'], 'seen.txt')\n"
        "open(out, 'w').write(rank + ':' + os.environ.get('MY_SETTING', '-'))\n")
    estimator = Chainer(entry_point=str(script), instance_count=2, jobs_dir=tmp_path / "jobs",
                        environment={"MY_SETTING": "from the notebook"})
    estimator.fit(logs=False)
    job_dir = estimator.latest_training_job.job_dir
    assert (job_dir / "output" / "data" / "seen.txt").read_text() == "0:from the notebook"
    assert (job_dir / "ranks" / "1" / "output" / "data" / "seen.txt").read_text() == \
        "1:from the notebook"
    command = " ".join(estimator.latest_training_job.command)
    assert "--env MY_SETTING" in command and "from the notebook" not in command
