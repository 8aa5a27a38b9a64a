"""The Slurm recipe's stop notice, run for real with everything but Slurm itself.

``launch/slurm/train.sbatch`` runs under bash with Slurm's variables set and
a stand-in ``scontrol`` on ``PATH`` (it names this machine for ``show
hostnames`` and records ``requeue``). USR1, what ``--signal=B:USR1@120``
sends before the time limit, must end in a snapshot on both ranks, exit 143
and a requeue; the requeued run resumes from the snapshot.
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.training.helpers import environment, interrupt_when

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "launch" / "slurm" / "train.sbatch"
SCONTROL = """#!/bin/sh
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""
HYPERPARAMETERS = {"train-samples": 640, "test-samples": 64, "width": 0.0625, "depth": 8,
                   "batch-size": 16, "progress-bar": "false", "checkpoint-every": 4,
                   "communicator": "naive"}


def test_usr1_before_the_time_limit_snapshots_and_requeues(tmp_path, cifar10) -> None:
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(SCONTROL)
    scontrol.chmod(0o755)
    job = tmp_path / "job"
    env = dict(
        PATH=f"{tmp_path / 'bin'}:{environment()['PATH']}", SCONTROL_LOG=str(tmp_path / "log"),
        SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NAME="vgg", SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="node1", SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="2",
        JOB_DIR=str(job), DATA=str(cifar10 / "train.zip"), NCCL_SOCKET_IFNAME="lo",
        EPOCHS="3",
    )
    argv = ["bash", str(RECIPE)]
    for key, value in {**HYPERPARAMETERS, "cache-dir": str(tmp_path / "cache")}.items():
        argv += ["--hp", f"{key}={value}"]
    snapshot = job / "checkpoints" / "snapshot_iter_4.rank1of2.npz"
    # USR1 to the batch script, as Slurm's --signal=B:USR1@120 sends it.
    code, output, errors = interrupt_when(argv, snapshot.exists,
                                          lambda process: process.send_signal(signal.SIGUSR1),
                                          "rank 1's snapshot", **env)
    assert code == 143, (output + errors)[-3000:]
    assert (tmp_path / "log").read_text() == "requeue 7\n"
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("Interrupted: SIGTERM"), failure
    iteration = int(failure.split("stopped at iteration ")[1].split(",")[0])
    for rank in (0, 1):
        assert (job / "checkpoints" / f"snapshot_iter_{iteration}.rank{rank}of2.npz").exists()

    requeued = subprocess.run(argv, env=environment(**env), capture_output=True, text=True,
                              timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    metrics = json.loads((job / "output" / "data" / "metrics.json").read_text())
    assert metrics["resumed_from_iteration"] == iteration and metrics["ranks"] == 2
    assert (tmp_path / "log").read_text() == "requeue 7\n"  # no second requeue
