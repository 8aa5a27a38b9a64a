"""The job description: options and job file -> a checked :class:`JobSpec`.

Everything is checked here, before any rank is started: the entry point and
source dir exist, every local channel exists, S3 URIs name a bucket,
hyperparameters parse. Problems are :class:`~smchainer.errors.UsageError`
(exit 2) naming the option at fault.

A job file is a JSON object with the options' long names (dashes or
underscores): ``entry_point``, ``source_dir``, ``channels`` (object),
``hyperparameters`` (object), ``job_dir``, ``job_name``, ``output_path``,
``environment`` (object),
``checkpoint_dir``, ``checkpoint_s3_uri``, ``max_restarts``, ``grace_period``,
``num_processes``, ``hostfile``, ``mpi_options``, ``oversubscribe``. Relative
paths in it are relative to the file. Options on the command line win;
channels and hyperparameters are merged.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smchainer.errors import UsageError
from smchainer.storage import StorageError, is_s3_uri, parse_s3_uri

_CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_BASE_NAME_CHARS = re.compile(r"[^A-Za-z0-9-]+")
JOB_NAME_LIMIT = 63
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
#: The module that runs a job and each of its ranks (``python -m`` it; the
#: ``smchainer-train`` console script is its ``main``).
TRAIN_MODULE = "smchainer.training.cli"

JOB_FILE_KEYS = (
    "entry_point", "source_dir", "channels", "hyperparameters", "job_dir", "job_name",
    "output_path", "environment", "checkpoint_dir", "checkpoint_s3_uri", "max_restarts",
    "grace_period", "num_processes", "hostfile", "mpi_options", "oversubscribe",
)
#: The job's own description in ``input/config/`` (read back by ``Estimator.attach``).
JOB_RECORD = "smchainer-job.json"
#: Seconds a job has between SIGTERM and its hard stop (Kubernetes gives a pod 30 s).
DEFAULT_GRACE_PERIOD = 25.0


@dataclass
class JobSpec:
    """A checked job: absolute paths, decoded hyperparameters."""

    entry_point: Path | None = None
    source_dir: Path | None = None
    channels: dict[str, str] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    job_dir: Path | None = None
    job_name: str = ""
    output_path: str | None = None
    #: Variables set for the job's script on every rank and host (``--env``).
    environment: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    checkpoint_s3_uri: str | None = None
    max_restarts: int = 0
    grace_period: float = DEFAULT_GRACE_PERIOD
    num_processes: int | None = None
    hostfile: Path | None = None
    mpi_options: list[str] = field(default_factory=list)
    oversubscribe: bool = False
    debug: bool = False

    @property
    def script_mode(self) -> bool:
        return self.entry_point is not None

    def to_argv(self, *, launch: bool = False) -> list[str]:
        """This job as ``smchainer-train`` options, the one way a job is passed on.

        Without ``launch`` the options that start mpirun or rerun the job are
        left out: that is what every rank (and every attempt) gets, since a
        rank runs the job and must not start mpirun again. With ``launch``
        they are kept, for a process that is to start the ranks itself (the
        Python API's child process).
        """
        argv: list[str] = []
        if self.entry_point is not None:
            argv += ["--entry-point", str(self.entry_point)]
        if self.source_dir is not None:
            argv += ["--source-dir", str(self.source_dir)]
        for name, location in sorted(self.channels.items()):
            argv += ["--channel", f"{name}={location}"]
        for key, value in sorted(self.hyperparameters.items()):
            argv += ["--hp", f"{key}={json.dumps(value)}"]
        if self.job_dir is not None:
            argv += ["--job-dir", str(self.job_dir)]
        if self.job_name:
            argv += ["--job-name", self.job_name]
        if self.output_path is not None:
            argv += ["--output-path", self.output_path]
        if self.checkpoint_dir is not None:
            argv += ["--checkpoint-dir", str(self.checkpoint_dir)]
        if launch:
            # By name: the child gets the values in its environment (run_attempt and
            # the API set them), so that no secret is on a command line.
            for name in sorted(self.environment):
                argv += ["--env", name]
        if self.checkpoint_s3_uri is not None:
            argv += ["--checkpoint-s3-uri", self.checkpoint_s3_uri]
        if self.grace_period != DEFAULT_GRACE_PERIOD:
            argv += ["--grace-period", repr(self.grace_period)]
        if launch and self.max_restarts:
            argv += ["--max-restarts", str(self.max_restarts)]
        if launch and self.num_processes is not None:
            argv += ["--num-processes", str(self.num_processes)]
            if self.hostfile is not None:
                argv += ["--hostfile", str(self.hostfile)]
            if self.mpi_options:
                argv += ["--mpi-options", shlex.join(self.mpi_options)]
            if self.oversubscribe:
                argv.append("--oversubscribe")
        if self.debug:
            argv.append("--debug")
        return argv

    def to_record(self) -> dict[str, Any]:
        """This job as JSON (paths as strings), for :data:`JOB_RECORD`."""
        record: dict[str, Any] = {}
        for name, value in vars(self).items():
            if isinstance(value, Path):
                value = str(value)
            record[name] = value
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobSpec:
        """The job :meth:`to_record` described (unknown keys are an error)."""
        paths = {"entry_point", "source_dir", "job_dir", "checkpoint_dir", "hostfile"}
        values: dict[str, Any] = {
            name: Path(value) if name in paths and value is not None else value
            for name, value in record.items()}
        return cls(**values)

    def command(self, *, launch: bool = False) -> list[str]:
        """``python -m smchainer.training.cli`` with :meth:`to_argv`, this Python's.

        A child started with it runs in the same environment (Chainer,
        mpi4py, plugins) whether or not the console script is on ``PATH``.
        """
        return [sys.executable, "-m", TRAIN_MODULE, *self.to_argv(launch=launch)]


def decode_value(value: Any) -> Any:
    """A hyperparameter value: a string is JSON-decoded when it parses, else kept."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_hyperparameter(text: str) -> tuple[str, Any]:
    """``"lr=0.1"`` -> ``("lr", 0.1)``; ``"name=vgg"`` -> ``("name", "vgg")``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--hp {text!r}: expected KEY=VALUE, for example --hp epochs=10")
    return key, decode_value(value)


def load_hyperparameters_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A hyperparameters JSON file (SageMaker's, or plain values), decoded."""
    data = _read_json(path, "--hyperparameters")
    if not isinstance(data, dict):
        raise UsageError(f"--hyperparameters {str(path)!r}: expected a JSON object")
    return {str(k): decode_value(v) for k, v in data.items()}


_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_variable(text: str) -> tuple[str, str]:
    """``"NAME=VALUE"`` -> its pair; ``"NAME"`` -> NAME and its value in this environment."""
    name, sep, value = text.partition("=")
    if not _VARIABLE_NAME.match(name):
        raise UsageError(f"--env {text!r}: expected NAME=VALUE or NAME, NAME made of letters, "
                         "digits and '_'")
    if not sep:
        if name not in os.environ:
            raise UsageError(f"--env {name}: {name} is not set in this environment "
                             "(give NAME=VALUE)")
        value = os.environ[name]
    return name, value


def parse_channel(text: str) -> tuple[str, str]:
    """``"train=data/train"`` -> ``("train", "data/train")``."""
    name, sep, location = text.partition("=")
    if not sep or not location:
        raise UsageError(
            f"--channel {text!r}: expected NAME=PATH or NAME=s3://bucket/prefix"
        )
    return name.strip(), location.strip()


def check_channel(name: str, location: str, base: Path) -> str:
    """The channel's location, checked: an absolute local path or an S3 URI."""
    if not _CHANNEL_NAME.match(name):
        raise UsageError(
            f"channel name {name!r}: use letters, digits, '.', '-' and '_' (64 at most)"
        )
    if is_s3_uri(location):
        try:
            parse_s3_uri(location)
        except StorageError as error:
            raise UsageError(f"channel {name!r}: {error}") from None
        return location
    path = (base / location).resolve()
    if not path.exists():
        raise UsageError(f"channel {name!r}: {location} does not exist")
    return str(path)


def new_job_name(base: str | None = None) -> str:
    """A fresh job name, for ``smchainer-train`` and the Python API alike.

    Without ``base`` it is ``smchainer-YYYYmmdd-HHMMSS-xxxx``, smchainer-train's
    documented default: the random part keeps apart two jobs started in the
    same second in one jobs folder. With ``base`` (an estimator's
    ``base_job_name``) it is ``<base>-YYYY-mm-dd-HH-MM-SS-mmm``, as the
    SageMaker SDK names jobs, so that names read as they would on SageMaker:
    characters SageMaker refuses become ``-`` and the base is cut so that the
    name keeps within SageMaker's 63 characters.
    """
    now = datetime.datetime.now()
    if base is None:
        return f"smchainer-{now.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    stamp = now.strftime("%Y-%m-%d-%H-%M-%S-") + f"{now.microsecond // 1000:03d}"
    base = _BASE_NAME_CHARS.sub("-", base).strip("-") or "smchainer"
    return f"{base[:JOB_NAME_LIMIT - len(stamp) - 1]}-{stamp}"


def default_job_dir(job_name: str) -> Path:
    """``$SAGEMAKER_BASE_DIR`` when set, else ``./jobs/<job name>``."""
    base = os.environ.get(BASE_DIR_ENV)
    if base:
        return Path(base).resolve()
    return (Path.cwd() / "jobs" / job_name).resolve()


def load_job_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A job file's options, with relative paths made relative to the file."""
    data = _read_json(path, "--job-file")
    if not isinstance(data, dict):
        raise UsageError(f"--job-file {str(path)!r}: expected a JSON object")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(options) - set(JOB_FILE_KEYS))
    if unknown:
        raise UsageError(
            f"--job-file {str(path)!r}: unknown keys {', '.join(unknown)}; "
            f"known: {', '.join(JOB_FILE_KEYS)}"
        )
    for key in ("channels", "hyperparameters", "environment"):
        if key in options and not isinstance(options[key], dict):
            raise UsageError(f"--job-file {str(path)!r}: {key!r} must be a JSON object")
    options["base"] = Path(path).resolve().parent
    return options


def build_spec(args: Any) -> JobSpec:
    """Merge the job file (if any) and the command-line options into a checked spec."""
    cwd = Path.cwd()
    job = load_job_file(args.job_file) if args.job_file else {}
    base = job.get("base", cwd)

    def option(name: str) -> tuple[Any, Path]:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            return value, cwd
        return job.get(name), base

    hyperparameters = {str(k): decode_value(v) for k, v in job.get("hyperparameters", {}).items()}
    if args.hyperparameters:
        hyperparameters.update(load_hyperparameters_file(args.hyperparameters))
    for text in args.hp or ():
        key, value = parse_hyperparameter(text)
        hyperparameters[key] = value

    source_dir, source_base = option("source_dir")
    entry_point, entry_base = option("entry_point")
    if entry_point is None and "sagemaker_program" in hyperparameters:
        entry_point, entry_base = str(hyperparameters["sagemaker_program"]), cwd
        submit = hyperparameters.get("sagemaker_submit_directory")
        if source_dir is None and submit and not is_s3_uri(str(submit)):
            source_dir, source_base = str(submit), cwd
    spec = JobSpec(hyperparameters=hyperparameters, debug=bool(args.debug))
    if source_dir is not None:
        spec.source_dir = (source_base / source_dir).resolve()
        if not spec.source_dir.is_dir():
            raise UsageError(f"--source-dir {source_dir}: no such folder")
    if entry_point is not None:
        where = spec.source_dir if spec.source_dir is not None else entry_base
        spec.entry_point = (where / entry_point).resolve()
        if not spec.entry_point.is_file():
            raise UsageError(f"--entry-point {entry_point}: no such file"
                             + (f" in {spec.source_dir}" if spec.source_dir else ""))
        if spec.source_dir is not None and spec.source_dir not in spec.entry_point.parents:
            raise UsageError(f"--entry-point {entry_point} is not inside --source-dir")
    elif spec.source_dir is not None:
        raise UsageError("--source-dir needs --entry-point (the script to run)")

    channels = {name: (loc, base) for name, loc in job.get("channels", {}).items()}
    seen: set[str] = set()
    for text in args.channel or ():
        name, location = parse_channel(text)
        if name in seen:
            raise UsageError(f"channel {name!r} is given twice")
        seen.add(name)
        channels[name] = (location, cwd)
    spec.channels = {
        name: check_channel(name, str(loc), where) for name, (loc, where) in channels.items()
    }

    job_name, _ = option("job_name")
    if job_name is not None and not _JOB_NAME.match(str(job_name)):
        raise UsageError(f"--job-name {job_name!r}: use letters, digits, '.', '-', '_'")
    spec.job_name = str(job_name) if job_name else ""
    job_dir, job_base = option("job_dir")
    if job_dir is not None:
        spec.job_dir = (job_base / job_dir).resolve()
        if spec.job_dir.exists() and not spec.job_dir.is_dir():
            raise UsageError(f"--job-dir {job_dir}: exists and is not a folder")
    output_path, output_base = option("output_path")
    if output_path is not None:
        output_path = str(output_path)
        if is_s3_uri(output_path):
            try:
                parse_s3_uri(output_path)
            except StorageError as error:
                raise UsageError(f"--output-path: {error}") from None
            spec.output_path = output_path
        else:
            spec.output_path = str((output_base / output_path).resolve())
    environment = {str(k): str(v) for k, v in job.get("environment", {}).items()}
    for text in args.env or ():
        name, value = parse_variable(text)
        environment[name] = value
    spec.environment = environment
    checkpoint_dir, checkpoint_base = option("checkpoint_dir")
    if checkpoint_dir is not None:
        spec.checkpoint_dir = (checkpoint_base / checkpoint_dir).resolve()
    checkpoint_s3_uri, _ = option("checkpoint_s3_uri")
    if checkpoint_s3_uri is not None:
        try:
            parse_s3_uri(str(checkpoint_s3_uri))
        except StorageError as error:
            raise UsageError(f"--checkpoint-s3-uri: {error}") from None
        spec.checkpoint_s3_uri = str(checkpoint_s3_uri)
    max_restarts, _ = option("max_restarts")
    if max_restarts is not None:
        if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) \
                or max_restarts < 0:
            raise UsageError(f"--max-restarts {max_restarts!r}: expected a whole number >= 0")
        spec.max_restarts = max_restarts
    grace_period, _ = option("grace_period")
    if grace_period is not None:
        if isinstance(grace_period, bool) or not isinstance(grace_period, int | float) \
                or not 0 < grace_period < float("inf"):
            raise UsageError(f"--grace-period {grace_period!r}: expected seconds > 0")
        spec.grace_period = float(grace_period)

    num_processes, _ = option("num_processes")
    hostfile, hostfile_base = option("hostfile")
    mpi_options, _ = option("mpi_options")
    oversubscribe, _ = option("oversubscribe")
    if num_processes is None:
        for name, value in (("--hostfile", hostfile), ("--mpi-options", mpi_options),
                            ("--oversubscribe", oversubscribe)):
            if value:
                raise UsageError(f"{name} only goes with --num-processes")
    else:
        if not isinstance(num_processes, int) or isinstance(num_processes, bool) \
                or num_processes < 1:
            raise UsageError(f"--num-processes {num_processes!r}: expected a whole number >= 1")
        spec.num_processes = num_processes
        if hostfile is not None:
            spec.hostfile = (hostfile_base / hostfile).resolve()
            if not spec.hostfile.is_file():
                raise UsageError(f"--hostfile {hostfile}: no such file")
        if mpi_options:
            try:
                spec.mpi_options = shlex.split(str(mpi_options))
            except ValueError as error:
                raise UsageError(f"--mpi-options {mpi_options!r}: {error}") from None
        spec.oversubscribe = bool(oversubscribe)
    return spec


def resolve_job(spec: JobSpec, job_name: str | None = None) -> JobSpec:
    """Fill in the job name and job dir when they were not given."""
    if not spec.job_name:
        spec.job_name = job_name or new_job_name()
    if spec.job_dir is None:
        spec.job_dir = default_job_dir(spec.job_name)
    return spec


def _read_json(path: str | os.PathLike[str], option: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UsageError(f"{option} {str(path)!r}: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise UsageError(f"{option} {str(path)!r} is not valid JSON: {error}") from None
