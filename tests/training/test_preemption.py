"""Preemption and restarts with real processes and real signals.

SIGTERM mid-epoch makes the built-in trainer write a snapshot of the
iteration it is in and exit 143, on every rank at the same iteration;
``--max-restarts`` reruns the job from it; ``--checkpoint-s3-uri`` has the
snapshot in the bucket before the job ends, and a fresh job dir resumes from it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import command
from tests.training.helpers import (
    environment,
    interrupt_when,
    start_until,
    tiny_dataset,
    train,
)

#: A VGG small enough that an epoch of 40 iterations takes about a second here.
TINY = {"train-samples": 640, "test-samples": 64, "width": 0.0625, "depth": 8,
        "batch-size": 16, "progress-bar": "false", "checkpoint-every": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One decode cache for the module: the zips are decoded once."""
    return tmp_path_factory.mktemp("cifar-cache")


def vgg_argv(cifar10: Path, job: Path, cache: Path, *extra: str, epochs: int = 3,
             **hyperparameters) -> list[str]:
    values = {**TINY, "cache-dir": str(cache), "epochs": epochs, **hyperparameters}
    argv = [command("smchainer-train"), "--job-dir", str(job),
            "--channel", f"train={cifar10 / 'train.zip'}",
            "--channel", f"test={cifar10 / 'test.zip'}"]
    for key, value in values.items():
        argv += ["--hp", f"{key}={value}"]
    return [*argv, *extra]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(proc.name))
    return found


def saved_arrays(job: Path) -> dict[str, np.ndarray]:
    with np.load(job / "model" / "model.npz") as saved:
        return {key: saved[key] for key in saved.files}


def metrics(job: Path) -> dict:
    return json.loads((job / "output" / "data" / "metrics.json").read_text())


def stopped_at(failure_text: str) -> int:
    match = re.search(r"stopped at iteration (\d+), after writing its snapshot", failure_text)
    assert match, failure_text
    return int(match[1])


def test_sigterm_mid_epoch_then_a_restart_ends_with_the_uninterrupted_weights(
        tmp_path, cifar10, cache) -> None:
    whole = subprocess.run(vgg_argv(cifar10, tmp_path / "whole", cache), capture_output=True,
                           text=True, env=environment(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    job = tmp_path / "job"
    snapshot = job / "checkpoints" / "snapshot_iter_4.rank0of1.npz"

    def preempt_the_attempt(process: subprocess.Popen) -> None:
        [attempt] = children(process.pid)
        os.kill(attempt, signal.SIGTERM)  # this attempt's host is preempted

    code, _, stderr = interrupt_when(vgg_argv(cifar10, job, cache, "--max-restarts", "1"),
                                     snapshot.exists, preempt_the_attempt, "a snapshot",
                                     timeout=300)
    assert code == 0, stderr[-3000:]
    first = (job / "output" / "failure.attempt1").read_text()
    assert first.startswith("Interrupted: SIGTERM (rank 0 of 1"), first
    assert "Exit code: 143" in first
    iteration = stopped_at(first)
    assert 4 <= iteration < 120
    assert "restarting the job: attempt 2 of 2" in stderr
    assert metrics(job)["resumed_from_iteration"] == iteration
    assert (job / "output" / "success").exists() and not (job / "output" / "failure").exists()

    expected, got = saved_arrays(tmp_path / "whole"), saved_arrays(job)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_sigterm_to_the_launcher_stops_both_ranks_at_one_snapshot(tmp_path, cifar10,
                                                                  cache) -> None:
    job = tmp_path / "job"
    argv = vgg_argv(cifar10, job, cache, "--num-processes", "2", communicator="naive")
    snapshot = job / "checkpoints" / "snapshot_iter_4.rank1of2.npz"
    # SIGTERM, what Slurm or Kubernetes sends
    code, _, stderr = interrupt_when(argv, snapshot.exists,
                                     lambda process: process.send_signal(signal.SIGTERM),
                                     "rank 1's snapshot")
    assert code == 143, stderr[-3000:]
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("Interrupted: SIGTERM\nExit code: 143\n"), failure
    iteration = stopped_at(failure)
    for rank in (0, 1):
        assert (job / "checkpoints" / f"snapshot_iter_{iteration}.rank{rank}of2.npz").exists()
    assert not list((job / "checkpoints").glob("*.tmp"))

    rerun = subprocess.run(argv, capture_output=True, text=True, env=environment(),
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert metrics(job)["resumed_from_iteration"] == iteration
    assert metrics(job)["ranks"] == 2


HANDLER_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    rank = os.environ.get("SMCHAINER_RANK", "0")
    out = os.environ["SM_OUTPUT_DATA_DIR"]

    def stop(signum, frame):
        with open(os.path.join(out, f"signal-{rank}"), "w") as file:
            file.write(signal.Signals(signum).name)
        if os.environ.get("IGNORE_SIGTERM"):
            return
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(out, f"started-{rank}"), "w").close()
    time.sleep(60)
    open(os.path.join(out, f"slept-{rank}"), "w").close()
""")


def data_dir(job: Path, rank: int) -> Path:
    """A rank's ``SM_OUTPUT_DATA_DIR``: rank 0's in ``output/``, the others' under ``ranks/``."""
    return job / "output" / "data" if rank == 0 else job / "ranks" / str(rank) / "output" / "data"


def start_script(tmp_path: Path, *extra: str, **env: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "train.py"
    script.write_text(HANDLER_SCRIPT)
    tiny_dataset(tmp_path / "data")
    job = tmp_path / "job"
    started = [data_dir(job, rank) / f"started-{rank}" for rank in (0, 1)]
    process = start_until(
        [command("smchainer-train"), "--entry-point", str(script), "--channel",
         f"train={tmp_path / 'data'}", "--job-dir", str(job), "--num-processes", "2", *extra],
        lambda: all(path.exists() for path in started), "both ranks' start", **env)
    return process, job


def test_a_script_gets_sigterm_on_every_rank_as_sagemaker_gives_it(tmp_path) -> None:
    process, job = start_script(tmp_path)
    try:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    for rank in (0, 1):  # SIGTERM, though mpirun carried it as SIGUSR1
        assert (data_dir(job, rank) / f"signal-{rank}").read_text() == "SIGTERM"
    assert process.returncode == 143, stderr[-3000:]
    assert (job / "output" / "failure").read_text().startswith("Interrupted: SIGTERM")


def test_a_job_that_ignores_sigterm_is_stopped_after_the_grace_period(tmp_path) -> None:
    process, job = start_script(tmp_path, "--grace-period", "1", IGNORE_SIGTERM="1")
    try:
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        took = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert (job / "output" / "data" / "signal-0").read_text() == "SIGTERM"
    assert not (job / "output" / "data" / "slept-0").exists()
    assert took < 30  # the grace period and the launcher's margin, not the script's 60 s
    assert (job / "output" / "failure").read_text().startswith("Interrupted: SIGTERM")


GRACE_PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    from smchainer.training.preemption import Preemption

    def expired(grace):
        open(sys.argv[1], "w").write(f"out of time after {grace:g} s")

    preemption = Preemption(0.5, on_expiry=expired)
    preemption.install()
    preemption.accept()
    os.kill(os.getpid(), signal.SIGUSR1)  # the launcher's notice
    time.sleep(0.1)
    assert preemption.requested
    time.sleep(30)  # a trainer that never reaches its safe point
""")


def test_a_rank_that_accepted_the_notice_exits_143_when_its_grace_runs_out(tmp_path) -> None:
    marker = tmp_path / "expired"
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", GRACE_PROGRAM, str(marker)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stderr
    assert time.monotonic() - began < 20
    assert marker.read_text() == "out of time after 0.5 s"


FLAKY_SCRIPT = textwrap.dedent("""
    import os, sys
    marks = os.environ["SMCHAINER_CHECKPOINT_DIR"]
    runs = len(os.listdir(marks))
    open(os.path.join(marks, f"run-{runs}"), "w").close()
    if runs < int(os.environ.get("FAILURES", "1")):
        raise RuntimeError(f"flaky failure number {runs + 1}")
""")


def test_max_restarts_reruns_a_failed_job_and_keeps_every_reason(tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(FLAKY_SCRIPT)
    tiny_dataset(tmp_path / "data")
    base = ["--entry-point", str(script), "--channel", f"train={tmp_path / 'data'}"]

    passed = train(*base, "--job-dir", str(tmp_path / "once"), "--max-restarts", "2")
    assert passed.returncode == 0, passed.stderr[-3000:]
    once = tmp_path / "once" / "output"
    assert (once / "success").exists() and not (once / "failure").exists()
    assert (once / "failure.attempt1").read_text().startswith(
        "RuntimeError: flaky failure number 1")
    assert sorted(p.name for p in (tmp_path / "once" / "checkpoints").iterdir()) == [
        "run-0", "run-1"]

    failed = train(*base, "--job-dir", str(tmp_path / "never"), "--max-restarts", "2",
                   FAILURES="9")
    assert failed.returncode == 1, failed.stderr[-3000:]
    failure = (tmp_path / "never" / "output" / "failure").read_text()
    assert failure.startswith("RuntimeError: flaky failure number 3 (rank 0 of 1"), failure
    assert "Earlier attempts (3 run, --max-restarts 2):" in failure
    assert "Attempt 1 of 3:\nRuntimeError: flaky failure number 1" in failure
    assert "Attempt 2 of 3:\nRuntimeError: flaky failure number 2" in failure
    assert failed.stderr.strip().splitlines()[-1].startswith("Error: the job failed on 3 ")


@pytest.mark.parametrize("argv, message", [
    (["--max-restarts", "-1"], "--max-restarts -1: expected a whole number >= 0"),
    (["--grace-period", "0"], "--grace-period 0.0: expected seconds > 0"),
    (["--checkpoint-s3-uri", "s3://"], "--checkpoint-s3-uri: 's3://' names no bucket"),
])
def test_bad_restart_options_are_usage_errors(tmp_path, argv, message) -> None:
    tiny_dataset(tmp_path / "data")
    result = train("--channel", f"train={tmp_path / 'data'}", "--job-dir", str(tmp_path / "j"),
                   *argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.s3
def test_checkpoints_reach_the_bucket_while_the_job_runs_and_a_fresh_job_resumes(
        tmp_path, cifar10, cache, s3_bucket) -> None:
    from smchainer.storage import s3_client

    uri = f"s3://{s3_bucket}/runs/one/checkpoints"
    client = s3_client()

    def keys() -> list[str]:
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/one/checkpoints/")
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", []))

    job = tmp_path / "first"
    # In the bucket while the job still runs (interrupt_when fails if it ended first).
    code, _, stderr = interrupt_when(
        vgg_argv(cifar10, job, cache, "--checkpoint-s3-uri", uri, epochs=6),
        lambda: "snapshot_iter_8.rank0of1.npz" in keys(),
        lambda process: process.send_signal(signal.SIGTERM), "a snapshot in the bucket")
    assert code == 143, stderr[-3000:]
    iteration = stopped_at((job / "output" / "failure").read_text())
    assert f"snapshot_iter_{iteration}.rank0of1.npz" in keys()
    assert not [key for key in keys() if key.endswith(".tmp")]

    fresh = tmp_path / "second"  # another machine: nothing local, only the bucket
    rerun = subprocess.run(vgg_argv(cifar10, fresh, cache, "--checkpoint-s3-uri", uri,
                                    epochs=6),
                           capture_output=True, text=True, env=environment(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert metrics(fresh)["resumed_from_iteration"] == iteration
    assert metrics(fresh)["iteration"] == 240
    assert "snapshot_iter_240.rank0of1.npz" in keys()  # the last one went up before success
