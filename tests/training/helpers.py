"""Running smchainer-train (and mpirun) for real in the training tests."""
from __future__ import annotations

import os
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.conftest import VENV_BIN, command

SCRIPT = Path(__file__).parent / "scripts" / "sagemaker_train.py"
ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def environment(**extra: str) -> dict[str, str]:
    """This environment without SageMaker or smchainer settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SM_", "SMCHAINER_", "SAGEMAKER_", "OMPI_COMM", "PMIX"))}
    env.update(ROOT_OK)
    env.update(extra)
    return env


def train(*args: str, cwd: Path | None = None, timeout: float = 120,
          **extra: str) -> subprocess.CompletedProcess[str]:
    """``smchainer-train ARGS`` in a fresh process."""
    return subprocess.run([command("smchainer-train"), *args], capture_output=True, text=True,
                          cwd=cwd, env=environment(**extra), timeout=timeout)


def mpirun_train(n: int, *args: str, timeout: float = 120,
                 **extra: str) -> subprocess.CompletedProcess[str]:
    """``mpirun -n N smchainer-train ARGS``, with the mpirun of this environment."""
    return subprocess.run([str(VENV_BIN / "mpirun"), "-n", str(n), command("smchainer-train"),
                           *args], capture_output=True, text=True, env=environment(**extra),
                          timeout=timeout)


def tiny_dataset(folder: Path, name: str = "train.npz", n: int = 32) -> Path:
    """A tiny 3-class problem on 4 features, saved as ``x`` / ``y``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32))
    path = folder / name
    np.savez(path, x=x, y=y)
    return path


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as archive:
        return sorted(archive.getnames())


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, what: str,
               seconds: float = 120, every: float = 0.05) -> None:
    """Poll ``ready()`` until it holds; fail if ``process`` ends or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(every)


def start_until(argv: list[str], ready: Callable[[], bool], what: str, *,
                new_session: bool = False, **env: str) -> subprocess.Popen:
    """Start ``argv`` (text pipes, :func:`environment`) and return it once ``ready()`` holds.

    ``new_session``: in a process group of its own, so that a test can signal
    the whole group as a terminal's Ctrl-C does.
    """
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment(**env), start_new_session=new_session)
    wait_until(ready, process, what)
    return process


def interrupt_when(argv: list[str], ready: Callable[[], bool],
                   interrupt: Callable[[subprocess.Popen], None], what: str,
                   timeout: float = 120, **env: str) -> tuple[int, str, str]:
    """Run ``argv``, ``interrupt(process)`` once ``ready()`` holds; its code, stdout, stderr.

    The process is killed if it is still running when the test leaves.
    """
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment(**env))
    try:
        wait_until(ready, process, what)
        interrupt(process)
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout, stderr
