"""A failing job raises with its reason; a failing server start with the server's last lines."""
from __future__ import annotations

import textwrap

import pytest

from smchainer.api import Chainer, EndpointError, Model, TrainingJobError
from smchainer.api.endpoint import group_members
from smchainer.device import DeviceError, gpu_count
from tests.api.conftest import alive

FAILING_SCRIPT = """\
import argparse
import os

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args()
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "model.txt"), "w") as f:
        f.write("half done")
    raise RuntimeError(f"loss diverged at epoch {args.epochs}")
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_failing_script_raises_with_the_first_line_of_the_failure_file(tmp_path, capsys):
    write(tmp_path / "src" / "train.py", FAILING_SCRIPT)
    estimator = Chainer(entry_point="train.py", source_dir=str(tmp_path / "src"),
                        hyperparameters={"epochs": 3}, instance_type="local",
                        jobs_dir=tmp_path / "jobs")
    with pytest.raises(TrainingJobError) as raised:
        estimator.fit()
    error = raised.value
    assert error.reason.startswith("RuntimeError: loss diverged at epoch 3 (rank 0 of 1")
    assert str(error).startswith(f"training job {error.job_name} failed: RuntimeError: loss")
    assert error.job_dir == tmp_path / "jobs" / error.job_name
    assert error.failure_file.read_text().splitlines()[0] == error.reason
    assert str(error.failure_file) in str(error)
    assert any("loss diverged" in line for line in error.log_tail)
    assert "Traceback" in capsys.readouterr().out  # the job's own output was streamed
    job = estimator.latest_training_job
    assert job.status == "Failed" and job.failure_reason == error.reason
    with pytest.raises(TrainingJobError, match="loss diverged"):
        job.wait(logs=False)  # asking again says the same
    assert job.describe()["FailureReason"] == error.reason
    assert estimator.model_data is None
    with pytest.raises(Exception, match="did not complete"):
        estimator.deploy()


def test_bad_job_options_raise_with_the_launcher_error(tmp_path):
    write(tmp_path / "train.py", "print('never runs')\n")
    estimator = Chainer(entry_point=str(tmp_path / "train.py"), jobs_dir=tmp_path / "jobs")
    with pytest.raises(TrainingJobError, match="channel 'train': .*missing does not exist"):
        estimator.fit({"train": str(tmp_path / "missing")}, logs=False)


def test_fit_without_waiting_then_wait(tmp_path, capsys):
    write(tmp_path / "train.py", """\
        import os
        print("training", os.environ["SM_CHANNEL_TRAINING"])
        open(os.path.join(os.environ["SM_MODEL_DIR"], "model.txt"), "w").write("ok")
    """)
    (tmp_path / "data").mkdir()
    estimator = Chainer(entry_point=str(tmp_path / "train.py"), jobs_dir=tmp_path / "jobs")
    estimator.fit(str(tmp_path / "data"), wait=False)
    job = estimator.latest_training_job
    assert job.status == "InProgress" and estimator.model_data is None
    job.wait(logs=True)
    assert job.status == "Completed"
    assert "training " in capsys.readouterr().out
    assert estimator.model_data == str(job.job_dir / "model.tar.gz")


def test_server_that_cannot_start_raises_with_its_last_log_lines(tmp_path):
    not_an_archive = write(tmp_path / "model.tar.gz", "plain text\n")
    model = Model(model_data=str(not_an_archive))
    with pytest.raises(EndpointError) as raised:
        model.deploy(initial_instance_count=1, instance_type="local",
                     container_startup_health_check_timeout=60)
    error = raised.value
    assert "exited with status 1" in error.reason
    assert "neither a directory nor a tar archive" in error.reason
    assert error.log_tail and error.log_tail[-1].startswith("Error:")
    assert "last lines of the server log:" in str(error)


def test_failing_model_fn_stops_the_server_and_says_why(tmp_path):
    (tmp_path / "model").mkdir()
    script = write(tmp_path / "code" / "inference.py", """\
        def model_fn(model_dir):
            raise FileNotFoundError("model.npz is not in " + model_dir)
    """)
    model = Model(model_data=str(tmp_path / "model"), entry_point=str(script))
    with pytest.raises(EndpointError) as raised:
        model.deploy(initial_instance_count=1, instance_type="local",
                     container_startup_health_check_timeout=60)
    assert "could not be loaded" in raised.value.reason
    assert "FileNotFoundError: model.npz is not in" in raised.value.reason
    assert any("Traceback" in line or "model_fn failed" in line
               for line in raised.value.log_tail)


def test_no_server_process_survives_a_failed_start(tmp_path, monkeypatch):
    started = []
    import smchainer.api.endpoint as endpoint_module

    original = endpoint_module.LocalEndpoint.wait_until_ready

    def remember(self, timeout):
        started.append(self.process.pid)
        return original(self, timeout)

    monkeypatch.setattr(endpoint_module.LocalEndpoint, "wait_until_ready", remember)
    (tmp_path / "model").mkdir()
    script = write(tmp_path / "inference.py", """\
        import time

        def model_fn(model_dir):
            time.sleep(60)
    """)
    with pytest.raises(EndpointError, match="not ready after 3 s"):
        Model(model_data=str(tmp_path / "model"), entry_point=str(script)).deploy(
            container_startup_health_check_timeout=3)
    (master,) = started
    assert not alive(master) and group_members(master) == []


@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is present")
def test_local_gpu_without_a_gpu_is_a_clear_error(tmp_path):
    write(tmp_path / "train.py", "print('never runs')\n")
    estimator = Chainer(entry_point=str(tmp_path / "train.py"), instance_type="local_gpu",
                        jobs_dir=tmp_path / "jobs")
    with pytest.raises(DeviceError, match="local_gpu.*asks for a GPU but .*instance_type='local'"):
        estimator.fit()
    assert not (tmp_path / "jobs").exists()


FLAKY_SCRIPT = """\
import os
marks = os.environ["SMCHAINER_CHECKPOINT_DIR"]
runs = len(os.listdir(marks))
open(os.path.join(marks, f"run-{runs}"), "w").close()
if runs == 0:
    raise RuntimeError("the first attempt fails")
"""


def test_max_retry_attempts_reruns_a_failed_job(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FLAKY_SCRIPT)
    estimator = Chainer(entry_point=str(script), jobs_dir=tmp_path / "jobs",
                        max_retry_attempts=1)
    assert "--max-restarts" in estimator.training_command({}, "j", tmp_path / "j")
    estimator.fit(logs=False)
    job = estimator.latest_training_job
    assert job.status == "Completed"
    first = (job.job_dir / "output" / "failure.attempt1").read_text()
    assert first.startswith("RuntimeError: the first attempt fails")

    never = Chainer(entry_point=str(script), jobs_dir=tmp_path / "jobs")
    with pytest.raises(TrainingJobError, match="the first attempt fails"):
        never.fit(logs=False, job_name="no-retries")
    with pytest.raises(ValueError, match="max_retry_attempts must be a whole number"):
        Chainer(entry_point=str(script), max_retry_attempts=-1)
