"""smchainer-train under a real mpirun: ChainerMN on CPU, failing ranks, --num-processes."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import numpy as np
import pytest

from smchainer.training.config import JobSpec
from smchainer.training.launch import mpirun_command
from tests.training.helpers import SCRIPT, mpirun_train, tar_names, tiny_dataset, train

pytestmark = pytest.mark.mpi


def weights(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def rank_data(job, rank: int):
    """A rank's ``SM_OUTPUT_DATA_DIR``: ``output/data`` for rank 0, ``ranks/<r>/...`` else."""
    return job / "output" / "data" if rank == 0 else job / "ranks" / str(rank) / "output" / "data"


def test_two_ranks_train_with_chainermn_and_agree_on_the_weights(tmp_path) -> None:
    data = tmp_path / "data"
    tiny_dataset(data)
    job = tmp_path / "job"
    result = mpirun_train(2, "--entry-point", str(SCRIPT), "--channel", f"train={data}",
                          "--hp", "communicator=naive", "--hp", "epochs=2",
                          "--job-dir", str(job))
    assert result.returncode == 0, result.stdout + result.stderr
    first = weights(rank_data(job, 0) / "weights-0.npz")
    second = weights(rank_data(job, 1) / "weights-1.npz")
    assert sorted(first) == ["/predictor/l1/W", "/predictor/l1/b", "/predictor/l2/W",
                             "/predictor/l2/b"]
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    # 16 examples per rank, batch 4, 2 epochs: only rank 0 prints its 8 steps.
    assert result.stdout.count("loss") == 8
    assert result.stderr.count("running sagemaker_train.py") == 1

    host = socket.gethostname()
    for rank in (0, 1):
        env = json.loads((rank_data(job, rank) / f"received-{rank}.json").read_text())["env"]
        assert env["SM_HOSTS"] == json.dumps([host])
        assert env["SM_CURRENT_HOST"] == host
        assert env["SM_NUM_GPUS"] == "0"
        assert env["SM_CHANNEL_TRAIN"] == f"{job}/input/data/train"
        assert env["CHAINERMN_FORCE_ABORT_ON_EXCEPTION"] == "1"
        assert "CHAINERMN_FORCE_ABORT_ON_EXCEPTIONS" not in env
    assert (job / "output" / "success").exists()
    assert tar_names(job / "model.tar.gz") == ["model.npz"]
    # Rank 0's folder is what is packed; rank 1 kept its own (ranks/1/...).
    packed = tar_names(job / "output.tar.gz")
    assert "weights-0.npz" in packed and "weights-1.npz" not in packed


def test_one_failing_rank_ends_the_whole_job_quickly(tmp_path) -> None:
    data = tmp_path / "data"
    tiny_dataset(data)
    job = tmp_path / "job"
    started = time.monotonic()
    # Without the abort, rank 0 would wait forever in its next allreduce.
    result = mpirun_train(2, "--entry-point", str(SCRIPT), "--channel", f"train={data}",
                          "--hp", "communicator=naive", "--hp", "epochs=100000",
                          "--hp", "fail-rank=1", "--job-dir", str(job), timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 30
    failure = (job / "output" / "failure").read_text()
    assert failure.splitlines()[0] == (
        f"RuntimeError: rank 1 failed on purpose at step 2 (rank 1 of 2, host "
        f"{socket.gethostname()})")
    assert "raise RuntimeError" in failure
    assert not (job / "output" / "success").exists()
    assert not (job / "model.tar.gz").exists()


def test_num_processes_starts_mpirun_and_prints_it(tmp_path) -> None:
    tiny_dataset(tmp_path / "data")
    result = train("--num-processes", "2", "--entry-point", str(SCRIPT),
                   "--channel", "train=data", "--hp", "communicator=naive", "--hp", "epochs=1",
                   cwd=tmp_path, NCCL_DEBUG="INFO")
    assert result.returncode == 0, result.stdout + result.stderr
    printed = [line for line in result.stderr.splitlines()
               if line.startswith("smchainer-train: running ")]
    assert len(printed) == 1
    command = printed[0].split()
    assert command[2:5] == [os.path.join(os.path.dirname(sys.executable), "mpirun"), "-n", "2"]
    for flag in ("state_base_error_non_zero_exit", "NCCL_DEBUG", "PATH",
                 f"train={tmp_path / 'data'}", "--job-dir"):
        assert flag in command
    (job,) = (tmp_path / "jobs").iterdir()
    assert command[command.index("--job-dir") + 1] == str(job)
    assert (job / "output" / "success").exists()
    assert tar_names(job / "model.tar.gz") == ["model.npz"]
    assert [p.name for p in rank_data(job, 0).glob("received-*")] == ["received-0.json"]
    assert [p.name for p in rank_data(job, 1).glob("received-*")] == ["received-1.json"]


def test_the_built_in_trainer_on_two_ranks_uses_the_runners_mpi_world(tmp_path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "train.npz",
             x=rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8), y=rng.integers(0, 10, 64))
    result = train("--num-processes", "2", "--channel", "train=data", "--job-dir", "job",
                   "--hp", "epochs=1", "--hp", "width=0.0625", "--hp", "depth=8",
                   "--hp", "batch-size=8", "--hp", "progress-bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job = tmp_path / "job"
    assert (job / "output" / "success").exists()
    metrics = json.loads((job / "output" / "data" / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["iteration"] > 0
    assert "rank 0 of 2, communicator naive" in result.stderr  # ranks other than 0 log no info
    assert sorted(tar_names(job / "model.tar.gz")) == ["model.npz", "smchainer-model.json"]


def test_num_processes_reports_a_failed_rank(tmp_path) -> None:
    tiny_dataset(tmp_path / "data")
    job = tmp_path / "job"
    result = train("--num-processes", "2", "--entry-point", str(SCRIPT),
                   "--channel", f"train={tmp_path / 'data'}", "--hp", "communicator=naive",
                   "--hp", "epochs=100000", "--hp", "fail-rank=1", "--job-dir", str(job),
                   timeout=60)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith(f"see {job}/output/failure")
    assert "mpirun exited with status" in result.stderr
    # The failing rank's own account is kept, not replaced by mpirun's status.
    assert (job / "output" / "failure").read_text().startswith(
        "RuntimeError: rank 1 failed on purpose")


def test_oversubscribe_only_when_asked_or_beyond_this_machines_cpus(tmp_path) -> None:
    cpus = os.cpu_count() or 1
    spec = JobSpec(entry_point=SCRIPT, job_dir=tmp_path, job_name="j", num_processes=cpus)
    assert "--oversubscribe" not in mpirun_command(spec, {})
    spec.num_processes = cpus + 1
    assert "--oversubscribe" in mpirun_command(spec, {})
    spec.hostfile = tmp_path / "hosts"  # the hostfile's slots decide then
    assert "--oversubscribe" not in mpirun_command(spec, {})
    spec.oversubscribe = True
    assert "--oversubscribe" in mpirun_command(spec, {})
    forwarded = mpirun_command(spec, {"SM_X": "1", "NCCL_SOCKET_IFNAME": "eth1",
                                      "AWS_SECRET_ACCESS_KEY": "s3cret", "HOME": "/root"})
    assert "s3cret" not in " ".join(forwarded)
    pairs = {forwarded[i + 1] for i, arg in enumerate(forwarded) if arg == "-x"}
    assert pairs == {"SM_X", "NCCL_SOCKET_IFNAME", "AWS_SECRET_ACCESS_KEY"}
