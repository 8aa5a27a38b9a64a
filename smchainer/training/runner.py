"""One rank's part of a training job, from the job spec to success or failure.

::

    spec + world --> TrainingEnv --> job tree (config files, code, channels,
                                               checkpoints restored from S3)
                 --> SM_* environment --> user script or train(env) hook
                     (checkpoints uploaded as they are written)
                 --> [rank 0] model.tar.gz, output.tar.gz (+ upload) --> success
    any error on any rank --> failure file (first line: class, message, rank)
                          --> MPI_Abort, so that no rank waits forever
    SIGTERM / SIGUSR1     --> the built-in trainer snapshots, every rank stops
                              at the same iteration --> failure file, 143

The job tree is prepared once per host: rank 0 first, then the first rank of
every other host unless it finds rank 0's marker (same paths on shared
storage). S3 channels are therefore downloaded once per host, and
``requirements.txt`` installed once per host.

Python entry points run in this process (``runpy``, as ``python -m mpi4py
script.py`` does), after :mod:`smchainer` has installed its Chainer compat
hook, so that unchanged SageMaker scripts that ``import chainer`` work and so
that the rank's MPI connection is the one ChainerMN uses. Other entry points
run as executables.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import runpy
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from smchainer import storage
from smchainer.device import check_rank_device, cpu_count, gpu_count, rank_device
from smchainer.errors import SmchainerError
from smchainer.training import sm_env
from smchainer.training.checkpoint_sync import CheckpointSync
from smchainer.training.config import JOB_RECORD, JobSpec, new_job_name, resolve_job
from smchainer.training.env import TrainingEnv
from smchainer.training.mpi import World
from smchainer.training.preemption import SIGINT_EXIT, SIGTERM_EXIT, Preemption, Terminated

logger = logging.getLogger(__name__)

TAIL_LINES = 25
FIRST_LINE_LIMIT = 600
MARKER = ".smchainer-prepared"
ABORT_ENV = "CHAINERMN_FORCE_ABORT_ON_EXCEPTION"
CHECKPOINT_ENV = "SMCHAINER_CHECKPOINT_DIR"
_COPY_IGNORED = {"__pycache__", ".git", ".venv", ".pytest_cache"}


class UserCodeFailed(Exception):
    """The user's script (or ``train`` hook) failed: what the failure file says."""

    def __init__(self, error_class: str, message: str, exit_code: int,
                 tail: list[str], command: str) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message
        self.exit_code = exit_code
        self.tail = tail
        self.command = command


def network_interface_name() -> str:
    """``NCCL_SOCKET_IFNAME`` when set, else the default route's interface, else eth0."""
    named = os.environ.get("NCCL_SOCKET_IFNAME", "").split(",")[0].lstrip("^=").strip()
    if named:
        return named
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return "eth0"


def build_env(spec: JobSpec, world: World, log_level: int) -> TrainingEnv:
    """This rank's :class:`TrainingEnv` (``spec`` already resolved).

    The device is :func:`smchainer.device.rank_device`'s choice, so that ranks
    and serving workers are placed by one module; the World's communicator
    travels along as ``mpi_comm`` so that the rank's code need not open its own.
    """
    assert spec.job_dir is not None
    num_gpus = gpu_count()
    level = spec.hyperparameters.get("sagemaker_container_log_level", log_level)
    return TrainingEnv(
        job_dir=spec.job_dir,
        channels={name: spec.job_dir / "input" / "data" / name for name in spec.channels},
        hyperparameters=dict(spec.hyperparameters),
        hosts=list(world.hosts),
        current_host=world.current_host,
        rank=world.rank,
        size=world.size,
        local_rank=world.local_rank,
        local_size=world.local_size,
        num_gpus=num_gpus,
        num_cpus=cpu_count(),
        device=rank_device(world.local_rank, num_gpus),
        checkpoint_dir=spec.checkpoint_dir,
        network_interface_name=network_interface_name(),
        user_entry_point=entry_point_in_code(spec),
        log_level=int(level) if str(level).lstrip("-").isdigit() else log_level,
        job_name=spec.job_name,
        mpi_comm=world.comm,
    )


def entry_point_in_code(spec: JobSpec) -> str | None:
    """The entry point as a path inside ``code/``: relative to the source dir, else its name.

    ``--source-dir src --entry-point scripts/train.py`` runs
    ``code/scripts/train.py`` (``SM_USER_ENTRY_POINT=scripts/train.py``), as
    SageMaker runs an entry point given relative to its source dir.
    """
    if spec.entry_point is None:
        return None
    if spec.source_dir is None:
        return spec.entry_point.name
    return spec.entry_point.resolve().relative_to(spec.source_dir.resolve()).as_posix()


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def copy_code(spec: JobSpec, code_dir: Path) -> None:
    """Copy the source dir (or the lone entry point) into the job's ``code/``."""
    assert spec.entry_point is not None and spec.job_dir is not None
    job_dir = spec.job_dir.resolve()
    code_dir.mkdir(parents=True, exist_ok=True)
    if spec.source_dir is None:
        if spec.entry_point.parent.resolve() != code_dir.resolve():
            shutil.copy2(spec.entry_point, code_dir / spec.entry_point.name)
        return
    if spec.source_dir.resolve() == code_dir.resolve():
        return

    def ignored(folder: str, names: list[str]) -> list[str]:
        # A job dir inside the source dir would otherwise be copied into itself.
        return [n for n in names
                if n in _COPY_IGNORED or Path(folder, n).resolve() == job_dir]

    shutil.copytree(spec.source_dir, code_dir, ignore=ignored, dirs_exist_ok=True)


def place_channel(name: str, location: str, target: Path) -> None:
    """Put one channel at ``input/data/<name>``: a link to a local path, or S3 objects."""
    _remove(target)
    if storage.is_s3_uri(location):
        logger.info("channel %s: downloading %s", name, location)
        storage.download(location, target)
        return
    source = Path(location)
    if not source.exists():
        raise SmchainerError(f"channel {name!r}: {location} does not exist")
    if source.is_dir():
        target.symlink_to(source, target_is_directory=True)
    else:
        target.mkdir(parents=True)
        (target / source.name).symlink_to(source)
    logger.info("channel %s: %s", name, location)


def install_requirements(code_dir: Path) -> None:
    """``pip install -r requirements.txt`` when the source dir has one."""
    requirements = code_dir / "requirements.txt"
    if not requirements.is_file():
        return
    print(f"smchainer-train: installing {requirements} with pip", file=sys.stderr, flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r",
         str(requirements)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise SmchainerError(
            f"installing {requirements} failed: {reason.strip()} (without network access, "
            "install the requirements into this environment first and remove the file)"
        )


def write_config_files(spec: JobSpec, env: TrainingEnv) -> None:
    """``hyperparameters.json`` (every value JSON-encoded, as the SDK writes it),
    ``inputdataconfig.json``, ``resourceconfig.json`` and the job's own record."""
    config = env.input_config_dir
    config.mkdir(parents=True, exist_ok=True)
    hyperparameters = {k: json.dumps(v) for k, v in sorted(env.hyperparameters.items())}
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))
    (config / "inputdataconfig.json").write_text(
        json.dumps(sm_env.input_data_config(env.channels), indent=2))
    (config / "resourceconfig.json").write_text(
        json.dumps(sm_env.resource_config(env), indent=2))
    # The ranks' spec has no --num-processes: the record says how many there were.
    recorded = replace(spec, num_processes=env.size if env.size > 1 else None)
    (config / JOB_RECORD).write_text(json.dumps(recorded.to_record(), indent=2))


def prepare_host(spec: JobSpec, env: TrainingEnv, token: str) -> CheckpointSync | None:
    """Lay out this host's job tree; stale success/failure files are removed.

    With ``checkpoint_s3_uri`` the checkpoint folder is restored from it, and
    the :class:`CheckpointSync` that keeps uploading it is returned.
    """
    for folder in (env.model_dir, env.output_data_dir, env.output_intermediate_dir,
                   env.input_dir / "data", env.checkpoints):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in ("success", "failure"):
        _remove(env.output_dir / stale)
    if spec.entry_point is not None:
        copy_code(spec, env.code_dir)
    for name, location in sorted(spec.channels.items()):
        place_channel(name, location, env.channels[name])
    sync = None
    if spec.checkpoint_s3_uri is not None:
        sync = CheckpointSync(env.checkpoints, spec.checkpoint_s3_uri)
        restored = sync.restore()
        if restored:
            logger.info("checkpoints: %d file(s) from %s in %s", restored,
                        spec.checkpoint_s3_uri, env.checkpoints)
    write_config_files(spec, env)
    if spec.entry_point is not None:
        install_requirements(env.code_dir)
    (env.job_dir / MARKER).write_text(token)
    return sync


def prepare(spec: JobSpec, env: TrainingEnv, world: World) -> CheckpointSync | None:
    """Prepare the job tree once per host (once in all on shared storage).

    Returns the checkpoint sync of the rank that prepared its host's tree
    (None elsewhere): one uploader per checkpoint folder.
    """
    token = world.bcast(secrets.token_hex(8))
    sync = None
    if world.rank == 0:
        logger.info("job %s in %s (%d process(es) on %s)", env.job_name, env.job_dir,
                    world.size, ", ".join(world.hosts))
        sync = prepare_host(spec, env, token)
    world.barrier()
    if world.local_rank == 0 and world.rank != 0:
        marker = env.job_dir / MARKER
        if not (marker.is_file() and marker.read_text() == token):
            sync = prepare_host(spec, env, token)
    world.barrier()
    return sync


def export_environment(spec: JobSpec, env: TrainingEnv, world: World) -> dict[str, str]:
    """Set the job's ``--env`` variables, the SM_* contract (and the abort switch under
    MPI) in ``os.environ``; the contract's names win."""
    variables = dict(spec.environment)
    variables.update(sm_env.sm_variables(env))
    variables[CHECKPOINT_ENV] = str(env.checkpoints)
    # Where this process stands in the job, for scripts that do not ask MPI.
    variables.update(SMCHAINER_RANK=str(env.rank), SMCHAINER_SIZE=str(env.size),
                     SMCHAINER_LOCAL_RANK=str(env.local_rank))
    if world.distributed:
        variables[ABORT_ENV] = "1"
    os.environ.update(variables)
    return variables


def _user_frames(tb: TracebackType | None, script: Path) -> TracebackType | None:
    """The traceback from the first frame in the user's script on."""
    current = tb
    while current is not None:
        if Path(current.tb_frame.f_code.co_filename) == script:
            return current
        current = current.tb_next
    return tb


class StderrTail:
    """``sys.stderr`` as it is, keeping the last lines written through it.

    A script that exits through argparse (``--epochs 1.5`` for an int) says
    why only on stderr; the failure's reason needs those lines, since with
    ``fit(logs=False)`` nobody sees the log.
    """

    def __init__(self, stream: Any, lines: int = TAIL_LINES) -> None:
        self.stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._partial = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        pieces = (self._partial + text).split("\n")
        self._partial = pieces.pop()
        self.lines.extend(piece for piece in pieces if piece.strip())
        return len(text)

    def tail(self) -> list[str]:
        return [*self.lines, *([self._partial] if self._partial.strip() else [])]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def run_python_script(script: Path, args: list[str], cwd: Path) -> None:
    """Run ``script`` as ``__main__`` in this process; raise :class:`UserCodeFailed`.

    A non-zero exit's reason ends with the last line the script wrote to
    stderr (argparse's message, for a bad argument) and keeps its last lines.
    """
    command = shlex.join(["python", script.name, *args])
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    saved_stderr = sys.stderr
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    os.chdir(cwd)
    stderr = sys.stderr = StderrTail(saved_stderr)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if code is None or code == 0:
            return
        tail = stderr.tail()
        if isinstance(code, int):
            said = f": {tail[-1].strip()}" if tail else ""
            raise UserCodeFailed("SystemExit", f"the script exited with status {code}{said}",
                                 code, tail, command) from None
        print(code, file=sys.stderr)
        raise UserCodeFailed("SystemExit", str(code), 1, tail, command) from None
    except (KeyboardInterrupt, Terminated):
        raise  # the job was interrupted, not failed by the script: run_job names the signal
    except BaseException as error:
        lines = traceback.format_exception(type(error), error,
                                           _user_frames(error.__traceback__, script))
        sys.stderr.write("".join(lines))
        tail = "".join(lines).splitlines()[-TAIL_LINES:]
        raise UserCodeFailed(type(error).__name__, str(error), 1, tail, command) from None
    finally:
        sys.stderr = saved_stderr
        sys.argv = saved_argv
        sys.path[:] = saved_path
        os.chdir(saved_cwd)


def run_executable(script: Path, args: list[str], cwd: Path) -> None:
    """Run a non-Python entry point; its stderr is shown and its tail kept."""
    command = [str(script), *args]
    if not os.access(script, os.X_OK):
        command = ["/bin/sh", *command]
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(command, cwd=cwd, stderr=subprocess.PIPE, text=True,
                               errors="replace")

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = process.wait()
    reader.join(timeout=5)
    if code != 0:
        raise UserCodeFailed("ExecuteUserScriptError", f"{script.name} exited with status {code}",
                             1, list(tail), shlex.join(command))


def run_script(env: TrainingEnv) -> None:
    """Run the entry point from the job's ``code/`` with the hyperparameters as arguments."""
    assert env.user_entry_point is not None
    script = env.code_dir / env.user_entry_point
    args = sm_env.to_cmd_args(env.hyperparameters)
    logger.info("running %s", shlex.join([env.user_entry_point, *args]))
    if script.suffix == ".py":
        run_python_script(script, args, env.code_dir)
    else:
        run_executable(script, args, env.code_dir)


def run_hook(env: TrainingEnv) -> Any:
    """Hook mode: the ``train(env)`` hook answers (the default trains VGG on CIFAR-10)."""
    from smchainer.manager import Hooks
    from smchainer.plugins import get_plugin_manager

    check_rank_device(env.device, env.local_rank, env.num_gpus, env.current_host)
    hooks = Hooks(get_plugin_manager())
    logger.info("no entry point: running the train hook")
    try:
        return hooks.train(env)
    except (SmchainerError, KeyboardInterrupt, Terminated):
        raise  # a framework error (NoImplementation included), or the job was stopped
    except BaseException as error:
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        sys.stderr.write("".join(lines))
        raise UserCodeFailed(type(error).__name__, str(error), 1,
                             "".join(lines).splitlines()[-TAIL_LINES:],
                             "train(env) hook") from None


def save_artifacts(spec: JobSpec, env: TrainingEnv) -> list[str]:
    """Pack ``model/`` and ``output/data/`` into the job dir, then copy or upload them."""
    model = storage.pack(env.model_dir, env.job_dir / "model.tar.gz")
    output = storage.pack(env.output_data_dir, env.job_dir / "output.tar.gz")
    places = [str(model), str(output)]
    if spec.output_path:
        if storage.is_s3_uri(spec.output_path):
            prefix = f"{spec.output_path.rstrip('/')}/{env.job_name}/output/"
            places = [storage.upload(model, prefix), storage.upload(output, prefix)]
        else:
            target = Path(spec.output_path) / env.job_name / "output"
            target.mkdir(parents=True, exist_ok=True)
            places = [str(shutil.copy2(model, target)), str(shutil.copy2(output, target))]
    for place in places:
        logger.info("wrote %s", place)
    return places


def where(world: World) -> str:
    """``rank R of N, host H``: how a failure names the process that failed."""
    return f"rank {world.rank} of {world.size}, host {world.current_host}"


def failure_text(error: BaseException, world: World) -> tuple[str, int]:
    """The failure file's text (most useful line first) and the exit code."""
    if isinstance(error, UserCodeFailed):
        first = f"{error.error_class}: {error.message}"[:FIRST_LINE_LIMIT]
        lines = [f"{first} ({where(world)})", f"Exit code: {error.exit_code}",
                 f"Command: {error.command}"]
        if error.tail:
            lines += ["", "Last lines:", *error.tail]
        return "\n".join(lines) + "\n", 1
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGINT from a scheduler
        text = f"Interrupted: SIGINT (Ctrl-C) ({where(world)})\nExit code: {SIGINT_EXIT}\n"
        return text, SIGINT_EXIT
    if isinstance(error, Terminated):
        detail = f": {error.detail}" if error.detail else ""
        text = f"Interrupted: SIGTERM ({where(world)}){detail}\nExit code: {SIGTERM_EXIT}\n"
        return text, SIGTERM_EXIT
    message = f"{type(error).__name__}: {error}"[:FIRST_LINE_LIMIT]
    trace = traceback.format_exception(type(error), error, error.__traceback__)
    # One policy: 2 for usage errors, 1 for every other failure (never an errno).
    code = error.exit_code if isinstance(error, SmchainerError) else 1
    text = f"Framework Error: {message} ({where(world)})\n\n" + "".join(trace)
    return text, code


def write_failure(output_dir: Path, text: str) -> bool:
    """Create ``output/failure``; one that exists (the script's own) is kept."""
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(output_dir / "failure", "x") as file:
            file.write(text)
    except FileExistsError:
        logger.info("keeping the existing failure file %s", output_dir / "failure")
        return False
    return True


def run_job(spec: JobSpec, world: World, log_level: int = logging.INFO) -> int:
    """Run this rank's part of the job; the exit code (an error ends every rank).

    SIGTERM and SIGUSR1 are this job's (:mod:`~smchainer.training.preemption`)
    while it runs. With ``checkpoint_s3_uri`` every checkpoint is uploaded
    before ``success`` is written, and what there is on the way out of a
    failed or stopped job.
    """
    spec.job_name = world.bcast(spec.job_name or new_job_name())
    resolve_job(spec)
    assert spec.job_dir is not None
    output = spec.job_dir / "output"

    def out_of_time(grace: float) -> None:
        write_failure(output, f"Interrupted: SIGTERM ({where(world)}): not stopped within the "
                      f"grace period of {grace:g} s\nExit code: {SIGTERM_EXIT}\n")
        print(f"Error: the job did not stop within the grace period of {grace:g} s; "
              f"see {output / 'failure'}", file=sys.stderr, flush=True)

    preemption = Preemption(spec.grace_period, on_expiry=out_of_time)
    preemption.install()
    sync: CheckpointSync | None = None
    try:
        env = build_env(spec, world, log_level)
        env.preemption = preemption
        sync = env.checkpoint_sync = prepare(spec, env, world)
        for folder in (env.model_dir, env.output_data_dir, env.output_intermediate_dir):
            folder.mkdir(parents=True, exist_ok=True)  # this rank's own (TrainingEnv.rank_dir)
        if sync is not None:
            sync.start()
        export_environment(spec, env, world)
        if spec.entry_point is not None:
            run_script(env)
        else:
            run_hook(env)
        world.barrier()
        if sync is not None:
            finishing = sync
            sync = None
            finishing.stop()  # every checkpoint is in the bucket before success is said
        world.barrier()
        if world.rank == 0:
            save_artifacts(spec, env)
            (env.output_dir / "success").touch()
            logger.info("job %s succeeded", env.job_name)
        return 0
    except BaseException as error:
        text, code = failure_text(error, world)
        write_failure(output, text)
        summary = text.splitlines()[0].removeprefix("Framework Error: ")
        print(f"Error: {summary}; see {output / 'failure'}", file=sys.stderr, flush=True)
        if spec.debug and not isinstance(error, UserCodeFailed):
            traceback.print_exception(type(error), error, error.__traceback__)
        if sync is not None:
            try:
                sync.stop()  # what the job wrote, a preemption's snapshot above all
            except SmchainerError as sync_error:
                logger.warning("checkpoints not uploaded: %s", sync_error)
        if isinstance(error, Terminated) and error.coordinated:
            # Every rank stopped at the same point: let each finish its way out.
            world.barrier()
            return code
        world.abort(code)
        return code
    finally:
        preemption.uninstall()
