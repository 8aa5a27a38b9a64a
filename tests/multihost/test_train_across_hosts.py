"""smchainer-train across two namespace hosts: ChainerMN over a real network."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import command
from tests.training.helpers import SCRIPT, tar_names, tiny_dataset

pytestmark = [pytest.mark.multihost, pytest.mark.mpi, pytest.mark.slow]


def train_across(cluster, job: Path, slots: int, *extra: str) -> list[str]:
    """smchainer-train --num-processes on host 1, ranks spread over both hosts."""
    options = " ".join(cluster.mpi_options())
    return cluster.command(
        1, command("smchainer-train"), "--num-processes", str(2 * slots),
        "--hostfile", str(cluster.hostfile(slots)), "--mpi-options", options,
        "--job-dir", str(job), "--entry-point", str(SCRIPT),
        "--channel", f"train={tiny_dataset(job.parent / 'data', n=64).parent}",
        "--hp", "communicator=naive", *extra,
    )


def assert_failure_reported(job: Path, output: str) -> None:
    """A failure file from the launcher (MPIError) or from a surviving rank."""
    failure = (job / "output" / "failure").read_text()
    first = failure.splitlines()[0]
    assert first.startswith("MPIError:") or "(rank 0 of 2" in first, failure + output[-3000:]
    assert not (job / "output" / "success").exists()


def rank_data(job: Path, rank: int) -> Path:
    """A rank's ``SM_OUTPUT_DATA_DIR``: ``output/data`` for rank 0, ``ranks/<r>/...`` else."""
    return job / "output" / "data" if rank == 0 else job / "ranks" / str(rank) / "output" / "data"


def received(job: Path, rank: int) -> dict:
    return json.loads((rank_data(job, rank) / f"received-{rank}.json").read_text())


@pytest.mark.parametrize("slots", [1, 2])
def test_ranks_on_two_hosts_train_to_the_same_weights(cluster, tmp_path, slots) -> None:
    job = tmp_path / "job"
    result = subprocess.run(train_across(cluster, job, slots, "--hp", "epochs=3"),
                            env=cluster.env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    size = 2 * slots
    envs = [received(job, rank)["env"] for rank in range(size)]
    hosts = [env["SM_CURRENT_HOST"] for env in envs]
    assert hosts == [cluster.hostnames[0]] * slots + [cluster.hostnames[1]] * slots
    assert all(json.loads(env["SM_HOSTS"]) == cluster.hostnames for env in envs)
    assert all(env["SM_NUM_GPUS"] == "0" for env in envs)
    assert [env["SMCHAINER_RANK"] for env in envs] == [str(rank) for rank in range(size)]
    assert [env["SMCHAINER_LOCAL_RANK"] for env in envs] == [str(i) for i in range(slots)] * 2
    first = np.load(job / "output" / "data" / "weights-0.npz")
    for rank in range(1, size):
        other = np.load(rank_data(job, rank) / f"weights-{rank}.npz")
        for name in first.files:
            np.testing.assert_array_equal(first[name], other[name], err_msg=f"{rank} {name}")
    assert (job / "output" / "success").exists()
    assert tar_names(job / "model.tar.gz") == ["model.npz"]
    # Artifacts once: only rank 0 packs them and reports.
    assert result.stderr.count("succeeded") == 1, result.stderr[-3000:]


def fail_mid_training(cluster, job: Path, fault) -> tuple[int, str, float]:
    """Start a long job over both hosts, apply ``fault`` once rank 1 trains.

    Returns the launcher's exit status, its output and the seconds from the
    fault to the end of the job.
    """
    with subprocess.Popen(train_across(cluster, job, 1, "--hp", "epochs=100000"),
                          env=cluster.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        try:
            deadline = time.monotonic() + 90
            while not (rank_data(job, 1) / "received-1.json").exists():
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the job never started"
                time.sleep(0.5)
            time.sleep(2)
            started = time.monotonic()
            fault()
            output, _ = process.communicate(timeout=120)
            return process.returncode, output, time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()


def test_a_host_losing_its_link_fails_the_job_in_bounded_time(cluster, tmp_path) -> None:
    job = tmp_path / "job"
    try:
        code, output, elapsed = fail_mid_training(cluster, job, lambda: cluster.link(2, "down"))
    finally:
        cluster.link(2, "up")
    # The cut-off host's rank ends too once its daemon notices it is alone.
    deadline = time.monotonic() + 30
    while job_pids(job) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = job_pids(job)
    assert code == 1, output[-3000:]
    assert elapsed < 60
    assert_failure_reported(job, output)
    assert leftover == [], f"processes of the failed job still running: {leftover}"


def job_pids(job: Path) -> list[int]:
    """Processes still running for the job in ``job`` (ranks and their daemons)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(job).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def rank_pid(job: Path, rank: int) -> int:
    """The process of ``rank`` of the job in ``job`` (all hosts share one PID space)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ
                and b"smchainer.training.cli" in cmdline and str(job).encode() in cmdline):
            return int(proc.name)
    raise LookupError(f"no process for rank {rank}")


def test_a_killed_rank_fails_the_job_in_bounded_time(cluster, tmp_path) -> None:
    job = tmp_path / "job"
    code, output, elapsed = fail_mid_training(
        cluster, job, lambda: os.kill(rank_pid(job, 1), signal.SIGKILL))
    assert code == 1, output[-3000:]
    assert elapsed < 30
    assert_failure_reported(job, output)


def test_after_a_lost_rank_the_rerun_resumes_from_the_last_checkpoint(
        cluster, tmp_path, cifar10) -> None:
    """The built-in trainer across both hosts: kill rank 1, rerun, resume."""
    job = tmp_path / "job"
    options = " ".join(cluster.mpi_options())
    argv = cluster.command(
        1, command("smchainer-train"), "--num-processes", "2",
        "--hostfile", str(cluster.hostfile(1)), "--mpi-options", options, "--job-dir", str(job),
        "--channel", f"train={cifar10 / 'train.zip'}", "--channel", f"test={cifar10 / 'test.zip'}",
        "--hp", "train-samples=512", "--hp", "test-samples=64", "--hp", "width=0.125",
        "--hp", "depth=8", "--hp", "batch-size=16", "--hp", "checkpoint-every=4",
        "--hp", "communicator=naive", "--hp", "progress-bar=false",
    )
    checkpoints = job / "checkpoints"
    with subprocess.Popen([*argv, "--hp", "epochs=40"], env=cluster.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        try:
            deadline = time.monotonic() + 120
            while not list(checkpoints.glob("snapshot_iter_8.rank1of2.npz")):
                assert process.poll() is None, process.stdout.read()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint was written"
                time.sleep(0.2)
            os.kill(rank_pid(job, 1), signal.SIGKILL)
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 1, output[-3000:]
    assert_failure_reported(job, output)

    rerun = subprocess.run([*argv, "--hp", "epochs=2"], env=cluster.env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    metrics = json.loads((job / "output" / "data" / "metrics.json").read_text())
    assert metrics["resumed_from_iteration"] >= 8
    assert metrics["ranks"] == 2
    assert (job / "output" / "success").exists()
    assert not (job / "output" / "failure").exists()
