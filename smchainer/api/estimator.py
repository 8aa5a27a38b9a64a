"""``Estimator`` / ``Chainer``: the SageMaker SDK's training calls, run by ``smchainer-train``.

``fit()`` starts ``smchainer-train`` in a child process (``--num-processes N``
through mpirun when MPI is on), writes its output to ``<job dir>/train.log``
and, while waiting, prints it line by line in the notebook. A failed job
raises :class:`TrainingJobError` with the first line of ``output/failure``.
Arguments that only matter on AWS are accepted and ignored with a warning.

Processes, as with the SageMaker Chainer container: MPI is on when
``use_mpi`` is true, or when it is not given and ``instance_count`` > 1; the
number of processes is then ``num_processes``, else ``instance_count`` x
``process_slots_per_host`` (default: the GPUs for ``local_gpu``, else 1).
All run on this machine unless a ``hostfile`` names others.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from smchainer import storage
from smchainer.api.endpoint import find_endpoint
from smchainer.api.local_mode import (
    LOCAL_GPU,
    device_environment,
    pick_count,
    pick_type,
    positive_int,
    require_gpu,
    resolve_instance_type,
    warn_ignored,
)
from smchainer.api.metrics import check_definitions, final_metrics, metric_values
from smchainer.api.model import Model
from smchainer.api.session import Session, local_path
from smchainer.errors import SmchainerError
from smchainer.training.config import DEFAULT_GRACE_PERIOD, JOB_RECORD, JobSpec, new_job_name

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"
DEFAULT_CHANNEL = "training"
#: Seconds past the grace period before ``stop()`` kills a job that is still running.
STOP_MARGIN = 15.0
#: The base of a job's name when no ``base_job_name`` is given.
DEFAULT_BASE_JOB_NAME = "smchainer-chainer"


class TrainingJobError(SmchainerError):
    """A training job failed; ``reason`` is the first line of its failure file."""

    def __init__(self, job_name: str, reason: str, job_dir: Path, returncode: int | None,
                 log_tail: list[str]) -> None:
        self.job_name = job_name
        self.reason = reason
        self.job_dir = job_dir
        #: smchainer-train's exit status (``exit_code`` is the CLI's, as for every error)
        self.returncode = returncode
        self.log_tail = log_tail
        self.failure_file = job_dir / "output" / "failure"
        where = self.failure_file if self.failure_file.exists() else job_dir / LOG_FILE
        super().__init__(f"training job {job_name} failed: {reason} (see {where})")


class TrainingJob:
    """One run of ``smchainer-train``: its process, its job dir and, once done, its artifacts."""

    def __init__(self, name: str, job_dir: Path, command: list[str], env: dict[str, str],
                 model_data: str, output_data: str,
                 grace_period: float = DEFAULT_GRACE_PERIOD) -> None:
        self.name = name
        self.job_name = name
        self.job_dir = job_dir
        self.command = command
        self._model_data = model_data
        self._output_data = output_data
        self.grace_period = grace_period
        #: The estimator's ``metric_definitions`` (``describe()``'s ``FinalMetricDataList``).
        self.metric_definitions: list[dict[str, str]] = []
        self.status = "InProgress"
        self.failure_reason: str | None = None
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = job_dir / LOG_FILE
        #: the running ``smchainer-train``; None for a job attached after it finished
        self.process: subprocess.Popen[bytes] | None
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self._printed = 0

    @classmethod
    def finished(cls, name: str, job_dir: Path, model_data: str,
                 output_data: str) -> TrainingJob:
        """A job that completed before this process (:meth:`Estimator.attach`)."""
        job = cls.__new__(cls)
        job.name = job.job_name = name
        job.job_dir = job_dir
        job.command = []
        job._model_data, job._output_data = model_data, output_data
        job.grace_period = DEFAULT_GRACE_PERIOD
        job.metric_definitions = []
        job.status = "Completed"
        job.failure_reason = None
        job.log_path = job_dir / LOG_FILE
        job.process = None
        job._printed = 0
        return job

    @property
    def model_data(self) -> str | None:
        """``model.tar.gz`` (path or ``s3://`` URI) once the job completed."""
        return self._model_data if self.status == "Completed" else None

    @property
    def output_data(self) -> str | None:
        """``output.tar.gz`` (plots, logs: ``SM_OUTPUT_DATA_DIR``) once the job completed."""
        return self._output_data if self.status == "Completed" else None

    def _print_new_output(self, stream: IO[str]) -> None:
        with open(self.log_path, "rb") as log:
            log.seek(self._printed)
            chunk = log.read()
        # Only whole lines, so that a line being written is not cut in two.
        running = self.process is not None and self.process.poll() is None
        end = chunk.rfind(b"\n") + 1 if running else len(chunk)
        if end:
            stream.write(chunk[:end].decode(errors="replace"))
            stream.flush()
            self._printed += end

    def wait(self, logs: bool | str = True) -> TrainingJob:
        """Wait for the job, printing its output when ``logs``; raise if it failed."""
        show = logs not in (False, None, "None")
        if self.process is None:  # attached: it finished before this process
            return self
        try:
            while self.process.poll() is None:
                if show:
                    self._print_new_output(sys.stdout)
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.stop()
            raise
        if show:
            self._print_new_output(sys.stdout)
        self._finish()
        if self.status == "Failed":
            assert self.failure_reason is not None
            raise TrainingJobError(self.name, self.failure_reason, self.job_dir,
                                   self.process.returncode, self.log_tail())
        return self

    def _finish(self) -> None:
        """Settle the status of a job whose process ended."""
        if self.status != "InProgress" or self.process is None:
            return
        code = self.process.returncode
        completed = code == 0 and (self.job_dir / "output" / "success").exists()
        self.status = "Completed" if completed else "Failed"
        if not completed:
            self.failure_reason = self._reason(code)
        if completed:
            logger.info("job %s completed: %s", self.name, self._model_data)

    def _reason(self, code: int | None) -> str:
        failure = self.job_dir / "output" / "failure"
        if failure.is_file():
            for line in failure.read_text(errors="replace").splitlines():
                if line.strip():
                    return line.strip()
        for line in reversed(self.log_tail(200)):
            if line.startswith("Error:"):
                return line[len("Error:"):].strip()
        return f"smchainer-train exited with status {code}"

    def log_text(self) -> str:
        """The job's whole output so far (empty when there is none yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> list[str]:
        """The last ``lines`` lines of the job's output."""
        return self.log_text().splitlines()[-lines:]

    def stop(self, timeout: float | None = None) -> None:
        """Stop the job as SageMaker's ``StopTrainingJob`` does: SIGTERM, then kill.

        The job has its grace period (``timeout``, default that plus a margin)
        to stop; the built-in trainer writes a snapshot in it, which a later
        ``fit()`` on the same checkpoints resumes from.
        """
        if timeout is None:
            timeout = self.grace_period + STOP_MARGIN
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.status == "InProgress":
            self.status = "Stopped"
            self.failure_reason = self._reason(self.process.returncode
                                               if self.process is not None else None)

    def describe(self) -> dict[str, Any]:
        """A ``DescribeTrainingJob``-like summary."""
        if (self.status == "InProgress" and self.process is not None
                and self.process.poll() is not None):
            self._finish()
        summary: dict[str, Any] = {
            "TrainingJobName": self.name,
            "TrainingJobStatus": self.status,
            "JobDir": str(self.job_dir),
            "ModelArtifacts": {"S3ModelArtifacts": self.model_data},
            "OutputData": self.output_data,
        }
        if self.failure_reason:
            summary["FailureReason"] = self.failure_reason
        if self.metric_definitions:
            summary["FinalMetricDataList"] = final_metrics(self.log_text(),
                                                           self.metric_definitions)
        return summary

    def metrics(self) -> dict[str, list[float]]:
        """Every value of each of the estimator's ``metric_definitions`` in the job's log."""
        return metric_values(self.log_text(), self.metric_definitions)


class Estimator:
    """Train with a SageMaker-style script on this machine (see the module docstring).

    :param entry_point: the training script, relative to ``source_dir`` when given.
    :param source_dir: copied to the job's ``code/`` (it is on the script's import path).
    :param hyperparameters: passed to the script as ``--key value`` arguments.
    :param instance_count: processes (or hosts, with a ``hostfile``); ``train_instance_count``
        is its SDK v1 name.
    :param instance_type: ``local`` (CPU) or ``local_gpu``; ``train_instance_type`` too.
    :param output_path: a folder or ``s3://`` prefix that also receives
        ``<job name>/output/model.tar.gz`` and ``output.tar.gz``.
    :param checkpoint_local_path: the checkpoint folder (default ``<job dir>/checkpoints``).
    :param checkpoint_s3_uri: restored into the checkpoint folder before the job,
        and each new checkpoint uploaded while it runs, as SageMaker syncs it.
    :param max_retry_attempts: run a failed job again up to this many times,
        resuming from its newest snapshot (``smchainer-train --max-restarts``).
        SageMaker retries only its own internal errors; here any failure is retried
        but a usage error and a stopped job.
    :param metric_definitions: ``[{"Name": ..., "Regex": ...}]``: metrics read from the
        job's log (``latest_training_job.describe()["FinalMetricDataList"]``,
        ``metrics()``), as SageMaker reads them from its logs.
    :param environment: extra environment variables of the job, on every rank and
        host (``smchainer-train --env``).
    :param sagemaker_session: a :class:`~smchainer.api.session.Session` (S3 endpoint).
    :param hostfile: an Open MPI hostfile, to run the processes on several hosts.
    :param jobs_dir: the folder of job trees (default ``./jobs``, as ``smchainer-train``).
    """

    def __init__(self, entry_point: str | os.PathLike[str], *,
                 source_dir: str | os.PathLike[str] | None = None,
                 hyperparameters: dict[str, Any] | None = None,
                 instance_count: int | None = None, instance_type: str | None = None,
                 train_instance_count: int | None = None,
                 train_instance_type: str | None = None,
                 use_mpi: bool | None = None, num_processes: int | None = None,
                 process_slots_per_host: int | None = None,
                 additional_mpi_options: str | None = None,
                 output_path: str | os.PathLike[str] | None = None,
                 checkpoint_s3_uri: str | None = None,
                 checkpoint_local_path: str | os.PathLike[str] | None = None,
                 max_retry_attempts: int | None = None,
                 base_job_name: str | None = None,
                 metric_definitions: list[dict[str, str]] | None = None,
                 environment: dict[str, str] | None = None,
                 container_log_level: int | None = None,
                 sagemaker_session: Session | None = None,
                 hostfile: str | os.PathLike[str] | None = None,
                 jobs_dir: str | os.PathLike[str] | None = None,
                 **aws_only: Any) -> None:
        if sagemaker_session is not None and not isinstance(sagemaker_session, Session):
            aws_only["sagemaker_session"] = sagemaker_session
            sagemaker_session = None
        warn_ignored(aws_only, type(self).__name__)
        self.entry_point = str(entry_point)
        self.source_dir = local_path(source_dir).resolve() if source_dir is not None else None
        self.hyperparameters_dict = dict(hyperparameters or {})
        self.instance_count = pick_count("instance_count", instance_count,
                                         "train_instance_count", train_instance_count)
        self.instance_type = resolve_instance_type(
            pick_type(instance_type, train_instance_type, "instance_type",
                      "train_instance_type"))
        self.use_mpi = use_mpi
        self.num_processes = positive_int("num_processes", num_processes)
        self.process_slots_per_host = positive_int("process_slots_per_host",
                                                   process_slots_per_host)
        self.additional_mpi_options = additional_mpi_options
        self.output_path = str(output_path) if output_path is not None else None
        self.checkpoint_s3_uri = checkpoint_s3_uri
        self.checkpoint_local_path = checkpoint_local_path
        if max_retry_attempts is not None and (
                isinstance(max_retry_attempts, bool) or not isinstance(max_retry_attempts, int)
                or max_retry_attempts < 0):
            raise ValueError(f"max_retry_attempts must be a whole number >= 0, "
                             f"not {max_retry_attempts!r}")
        self.max_retry_attempts = max_retry_attempts or 0
        self.base_job_name = base_job_name
        self.metric_definitions = check_definitions(metric_definitions)
        self.environment = dict(environment or {})
        self.container_log_level = container_log_level
        self.sagemaker_session = sagemaker_session or Session()
        self.hostfile = local_path(hostfile).resolve() if hostfile is not None else None
        self.jobs_dir = (local_path(jobs_dir) if jobs_dir is not None
                         else Path.cwd() / "jobs").resolve()
        self.latest_training_job: TrainingJob | None = None
        self._endpoint_name: str | None = None
        if checkpoint_s3_uri is not None and not storage.is_s3_uri(checkpoint_s3_uri):
            raise ValueError(f"checkpoint_s3_uri {checkpoint_s3_uri!r} is not an s3:// URI")
        if additional_mpi_options:
            # Split as smchainer-train splits --mpi-options, so that a bad quote
            # is reported here rather than by the job.
            try:
                shlex.split(additional_mpi_options)
            except ValueError as error:
                raise ValueError(f"additional_mpi_options {additional_mpi_options!r}: "
                                 f"{error}") from None

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters the job gets, ``sagemaker_*`` launcher keys included."""
        values = dict(self.hyperparameters_dict)
        processes = self.processes()
        if processes is not None:
            values["sagemaker_use_mpi"] = True
            values["sagemaker_num_processes"] = processes
            values["sagemaker_process_slots_per_host"] = self._slots_per_host()
            if self.additional_mpi_options:
                values["sagemaker_additional_mpi_options"] = self.additional_mpi_options
        if self.container_log_level is not None:
            values["sagemaker_container_log_level"] = self.container_log_level
        return values

    def _slots_per_host(self) -> int:
        if self.process_slots_per_host is not None:
            return self.process_slots_per_host
        return require_gpu() if self.instance_type == LOCAL_GPU else 1

    def processes(self) -> int | None:
        """The number of MPI processes, or None for one plain process."""
        use_mpi = self.use_mpi if self.use_mpi is not None else self.instance_count > 1
        if not use_mpi:
            return None
        if self.num_processes is not None:
            return self.num_processes
        return self.instance_count * self._slots_per_host()

    def _channels(self, inputs: Any) -> dict[str, str]:
        if inputs is None:
            return {}
        if not isinstance(inputs, dict):
            inputs = {DEFAULT_CHANNEL: inputs}
        channels = {}
        for name, location in inputs.items():
            config = getattr(location, "config", None)  # the SDK's TrainingInput
            if isinstance(config, dict):
                location = config["DataSource"]["S3DataSource"]["S3Uri"]
            text = str(location)
            channels[str(name)] = (text if storage.is_s3_uri(text)
                                   else str(local_path(text).resolve()))
        return channels

    def _artifact_places(self, job_name: str, job_dir: Path) -> tuple[str, str]:
        if self.output_path is None:
            return str(job_dir / "model.tar.gz"), str(job_dir / "output.tar.gz")
        if storage.is_s3_uri(self.output_path):
            prefix = f"{self.output_path.rstrip('/')}/{job_name}/output"
        else:
            prefix = str(local_path(self.output_path).resolve() / job_name / "output")
        return f"{prefix}/model.tar.gz", f"{prefix}/output.tar.gz"

    def training_command(self, channels: dict[str, str], job_name: str,
                         job_dir: Path) -> list[str]:
        """The ``smchainer-train`` command line of a job.

        The job is described as a :class:`~smchainer.training.config.JobSpec`
        and passed on by its :meth:`~smchainer.training.config.JobSpec.command`,
        so that the API and the launcher's ranks cannot disagree on options.
        """
        processes = self.processes()
        output_path = self.output_path
        if output_path is not None and not storage.is_s3_uri(output_path):
            output_path = str(local_path(output_path).resolve())
        spec = JobSpec(
            entry_point=Path(self.entry_point),
            source_dir=self.source_dir,
            channels=dict(channels),
            hyperparameters=self.hyperparameters(),
            job_dir=job_dir,
            job_name=job_name,
            output_path=output_path,
            environment=dict(self.environment),
            checkpoint_dir=(local_path(self.checkpoint_local_path).resolve()
                            if self.checkpoint_local_path is not None else None),
            checkpoint_s3_uri=self.checkpoint_s3_uri,
            max_restarts=self.max_retry_attempts,
            num_processes=processes,
        )
        if processes is not None:
            spec.hostfile = self.hostfile
            spec.mpi_options = shlex.split(self.additional_mpi_options or "")
        return spec.command(launch=True)

    def fit(self, inputs: Any = None, wait: bool = True, logs: bool | str = True,
            job_name: str | None = None, **aws_only: Any) -> None:
        """Run a training job.

        :param inputs: channel name -> local path or ``s3://`` URI, or one
            location (channel ``training``).
        :param wait: wait for the job (else see ``latest_training_job.wait()``).
        :param logs: print the job's output while waiting.
        :param job_name: default ``<base_job_name>-<date-time>``.
        """
        warn_ignored(aws_only, "fit")
        channels = self._channels(inputs)
        if self.instance_type == LOCAL_GPU:
            require_gpu()
        name = job_name or new_job_name(self.base_job_name or DEFAULT_BASE_JOB_NAME)
        job_dir = self.jobs_dir / name
        env = device_environment(self.instance_type)
        # A notebook kernel's inline plotting backend cannot draw in another process.
        if env.get("MPLBACKEND", "").startswith("module://"):
            del env["MPLBACKEND"]
        env.update(self.sagemaker_session.environment())
        env.update(self.environment)
        model_data, output_data = self._artifact_places(name, job_dir)
        self.latest_training_job = TrainingJob(
            name, job_dir, self.training_command(channels, name, job_dir), env,
            model_data, output_data)
        self.latest_training_job.metric_definitions = self.metric_definitions
        if wait:
            self.latest_training_job.wait(logs=logs)

    def _completed_job(self) -> TrainingJob:
        job = self.latest_training_job
        if job is None:
            raise SmchainerError("no training job yet: call fit() first")
        if job.status == "InProgress":
            job.wait(logs=False)
        if job.status != "Completed":
            raise SmchainerError(f"training job {job.name} did not complete ({job.status})")
        return job

    @property
    def model_data(self) -> str | None:
        """The latest job's ``model.tar.gz`` (a path or ``s3://`` URI), once it completed."""
        job = self.latest_training_job
        return job.model_data if job is not None else None

    @property
    def output_data(self) -> str | None:
        """The latest job's ``output.tar.gz``: what the script wrote to ``SM_OUTPUT_DATA_DIR``."""
        job = self.latest_training_job
        return job.output_data if job is not None else None

    @property
    def job_dir(self) -> Path | None:
        """The latest job's tree (``code/``, ``model/``, ``output/``, ``train.log``...)."""
        job = self.latest_training_job
        return job.job_dir if job is not None else None

    def create_model(self, entry_point: str | None = None,
                     source_dir: str | os.PathLike[str] | None = None,
                     env: dict[str, str] | None = None, **kwargs: Any) -> Model:
        """A :class:`~smchainer.api.model.Model` of the latest job, served by its own script.

        The script is the copy in the job's ``code/`` (so later edits of the
        source dir do not change what was trained), unless ``entry_point`` is given.
        """
        job = self._completed_job()
        code_dir = job.job_dir / "code"
        if entry_point is None:
            relative = (Path(self.entry_point) if self.source_dir is not None
                        else Path(Path(self.entry_point).name))
            entry_point, source_dir = str(relative), code_dir
        assert job.model_data is not None
        return Model(job.model_data, entry_point=entry_point, source_dir=source_dir,
                     env=env, name=job.name, sagemaker_session=self.sagemaker_session,
                     **kwargs)

    def deploy(self, initial_instance_count: int = 1, instance_type: str = "local",
               serializer: Any = None, deserializer: Any = None,
               endpoint_name: str | None = None, wait: bool = True,
               model_server_workers: int | None = None, env: dict[str, str] | None = None,
               **kwargs: Any) -> Any:
        """Serve the latest job's model locally; see :meth:`Model.deploy`."""
        model = self.create_model(env=env)
        predictor = model.deploy(initial_instance_count=initial_instance_count,
                                 instance_type=instance_type, serializer=serializer,
                                 deserializer=deserializer, endpoint_name=endpoint_name,
                                 wait=wait, model_server_workers=model_server_workers,
                                 **kwargs)
        self._endpoint_name = getattr(predictor, "endpoint_name", None)
        return predictor

    def transformer(self, instance_count: int = 1, instance_type: str = "local",
                    strategy: str | None = None, assemble_with: str | None = None,
                    output_path: str | os.PathLike[str] | None = None,
                    accept: str | None = None, env: dict[str, str] | None = None,
                    max_concurrent_transforms: int | None = None,
                    max_payload: int | None = None, model_server_workers: int | None = None,
                    entry_point: str | None = None, **kwargs: Any) -> Any:
        """A batch transformer of the latest job's model; see :meth:`Model.transformer`."""
        model = self.create_model(entry_point=entry_point)
        return model.transformer(instance_count=instance_count, instance_type=instance_type,
                                 strategy=strategy, assemble_with=assemble_with,
                                 output_path=output_path, accept=accept,
                                 max_concurrent_transforms=max_concurrent_transforms,
                                 max_payload=max_payload, env=env,
                                 model_server_workers=model_server_workers, **kwargs)

    def delete_endpoint(self) -> None:
        """Stop the endpoint :meth:`deploy` started (SDK v1's call that notebooks end with)."""
        if self._endpoint_name is None:
            raise SmchainerError("no endpoint to delete: deploy() starts one")
        endpoint = find_endpoint(self._endpoint_name)
        if endpoint is None:
            logger.warning("endpoint %s is not running", self._endpoint_name)
        else:
            endpoint.stop()
        self._endpoint_name = None

    @classmethod
    def attach(cls, training_job_name: str, sagemaker_session: Session | None = None,
               jobs_dir: str | os.PathLike[str] | None = None, **aws_only: Any) -> Estimator:
        """An estimator of the finished job ``training_job_name`` in ``jobs_dir`` (``./jobs``).

        As the SDK's ``attach``: its entry point, source dir, hyperparameters,
        processes and output path are the job's (``input/config/smchainer-job.json``,
        written by every job), and ``model_data``, ``deploy()`` and
        ``create_model()`` work as after its ``fit()``. A job still running,
        or one that failed, raises :class:`~smchainer.errors.SmchainerError`.
        """
        warn_ignored(aws_only, "attach")
        folder = (local_path(jobs_dir) if jobs_dir is not None else Path.cwd() / "jobs").resolve()
        job_dir = folder / training_job_name
        recorded = job_dir / "input" / "config" / JOB_RECORD
        try:
            spec = JobSpec.from_record(json.loads(recorded.read_text()))
        except FileNotFoundError:
            raise SmchainerError(f"no training job {training_job_name!r} in {folder} "
                                 f"({recorded} does not exist)") from None
        except (ValueError, TypeError, KeyError) as error:
            raise SmchainerError(f"{recorded} cannot be read: {error}") from None
        output = job_dir / "output"
        if not (output / "success").exists():
            state = "failed" if (output / "failure").exists() else "not finished"
            raise SmchainerError(f"training job {training_job_name} {state}: only a completed "
                                 "job can be attached")
        assert spec.entry_point is not None
        hyperparameters = {k: v for k, v in spec.hyperparameters.items()
                           if not k.startswith("sagemaker_")}
        # The job's own copy of the code, as create_model() after fit() uses it.
        code_dir = job_dir / "code"
        entry_point = (spec.entry_point.relative_to(spec.source_dir)
                       if spec.source_dir is not None else Path(spec.entry_point.name))
        estimator = cls(str(entry_point), source_dir=str(code_dir),
                        hyperparameters=hyperparameters,
                        num_processes=spec.num_processes,
                        use_mpi=spec.num_processes is not None or None,
                        output_path=spec.output_path,
                        checkpoint_s3_uri=spec.checkpoint_s3_uri,
                        sagemaker_session=sagemaker_session, jobs_dir=folder)
        model_data, output_data = estimator._artifact_places(training_job_name, job_dir)
        estimator.latest_training_job = TrainingJob.finished(
            training_job_name, job_dir, model_data, output_data)
        return estimator


class Chainer(Estimator):
    """The SageMaker SDK's Chainer estimator, by its name (same arguments as :class:`Estimator`)."""
