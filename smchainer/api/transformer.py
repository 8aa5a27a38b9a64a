"""``Transformer``: the SageMaker SDK's batch transform, run on this machine.

::

    transformer = model.transformer(instance_count=1, instance_type="local",
                                    strategy="MultiRecord", assemble_with="Line",
                                    output_path="s3://bucket/out")
    transformer.transform("s3://bucket/in", content_type="text/csv", split_type="Line")
    transformer.latest_transform_job.output_files

``transform()`` starts ``smchainer-serve`` for the model on a free loopback
port (``instance_count`` x ``model_server_workers`` workers, on the CPU for
``local`` and the GPUs for ``local_gpu``), sends every record through it as
SageMaker's batch transform does (:mod:`smchainer.transform.job`), writes
``<output_path>/<name>.out`` for each input and stops the server, also when
the job fails or is interrupted. A transformer of a running endpoint (an
endpoint name that this process deployed, or an ``http://`` URL) uses that
server and leaves it running.

A job with a failed record raises :class:`TransformJobError` from
``transform()`` (or ``wait()``): ``N of M records failed (first: ...); see
<output_path>/_failures.json``. Without an ``output_path`` the results go to
``s3://<default bucket>/<job name>`` when the session has a bucket, as the
SDK does, else to ``./transforms/<job name>``.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any, Protocol

from smchainer.api.endpoint import find_endpoint
from smchainer.api.local_mode import (
    LOCAL_GPU,
    positive_int,
    require_gpu,
    resolve_instance_type,
    warn_ignored,
)
from smchainer.api.session import Session
from smchainer.errors import SmchainerError
from smchainer.transform import records
from smchainer.transform.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, parse_url
from smchainer.transform.job import (
    ServerSpec,
    TransformJob,
    TransformJobError,
    TransformSpec,
    new_job_name,
)
from smchainer.transform.progress import Reporter

__all__ = ["LocalTransformJob", "TransformJobError", "Transformer"]

logger = logging.getLogger(__name__)

class ServableModel(Protocol):
    """What a transformer needs of its model (an :class:`~smchainer.api.model.Model`)."""

    name: str
    model_data: str
    entry_point: Path | None
    sagemaker_session: Session

    def server_environment(self, instance_type: str) -> dict[str, str]: ...


#: ``data_type`` values of the SDK that are refused here.
UNSUPPORTED_DATA_TYPES = ("ManifestFile", "AugmentedManifestFile")


class _Lines:
    """A text stream that keeps the lines a job writes from its thread, for ``wait(logs)``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def since(self, start: int) -> list[str]:
        with self._lock:
            return self.lines[start:]


class LocalTransformJob:
    """A transform job of a :class:`Transformer`: its name, status, outputs and failures.

    It runs in the caller's thread with ``transform(wait=True)``, else in a
    thread of its own that :meth:`wait` waits for.
    """

    def __init__(self, job: TransformJob) -> None:
        self.job = job
        self.name = self.job_name = job.name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lines = _Lines()
        self._printed = 0

    @property
    def status(self) -> str:
        """``InProgress``, ``Completed``, ``Failed`` or ``Stopped``."""
        return self.job.status

    @property
    def output_path(self) -> str:
        return self.job.output_path

    @property
    def output_files(self) -> list[str]:
        """The ``.out`` files written so far, in input order."""
        return self.job.output_files

    @property
    def failures(self) -> list[Any]:
        """Every :class:`~smchainer.transform.job.Failure` (file, records, status, error)."""
        return self.job.failures

    @property
    def report(self) -> str | None:
        """The ``_failures.json`` of a failed job."""
        return self.job.report

    @property
    def failure_reason(self) -> str | None:
        return self.job.failure_reason

    def describe(self) -> dict[str, Any]:
        """A ``DescribeTransformJob``-like summary."""
        return self.job.describe()

    def run(self, stream: IO[str] | None) -> None:
        self.job.reporter = Reporter(stream)
        self.job.run()

    def start(self) -> None:
        self.job.reporter = Reporter(self._lines)
        self._thread = threading.Thread(target=self._run_in_thread,
                                        name=f"smchainer-transform-{self.name}")
        self._thread.start()

    def _run_in_thread(self) -> None:
        try:
            self.job.run()
        except BaseException as error:  # handed to wait()
            self._error = error

    def _print_new(self, stream: IO[str]) -> None:
        lines = self._lines.since(self._printed)
        self._printed += len(lines)
        if lines:
            stream.write("".join(lines))
            stream.flush()

    def wait(self, logs: bool | str = True) -> LocalTransformJob:
        """Wait for the job, printing its progress lines when ``logs``; raise if it failed."""
        show = logs not in (False, None, "None")
        if self._thread is not None:
            try:
                while self._thread.is_alive():
                    if show:
                        self._print_new(sys.stdout)
                    self._thread.join(0.1)
            except KeyboardInterrupt:
                self.stop()
                raise
            if show:
                self._print_new(sys.stdout)
        if self._error is not None:
            raise self._error
        if self.status == "Failed":
            raise TransformJobError(self.name, self.failure_reason or "the job failed",
                                    self.failures, self.report)
        return self

    def stop(self) -> None:
        """Stop sending requests; the job ends after those in flight (status ``Stopped``)."""
        self.job.stop()
        if self._thread is not None:
            self._thread.join()

    def __repr__(self) -> str:
        return f"LocalTransformJob({self.name!r}, status={self.status!r})"


class Transformer:
    """A batch-transform of one model (the SDK's ``Transformer``; see the module docstring).

    :param model_name: a :class:`~smchainer.api.model.Model`, the name of an
        endpoint this process deployed, or the ``http://`` URL of a running server.
    :param instance_count: server workers (x ``model_server_workers``), as instances.
    :param instance_type: ``local`` (CPU) or ``local_gpu``; ``ml.*`` types are mapped.
    :param strategy: ``SingleRecord`` or ``MultiRecord`` (default: the server's, else
        SingleRecord).
    :param assemble_with: ``Line`` or ``None``.
    :param output_path: a folder or ``s3://`` prefix (default: see the module docstring).
    :param accept: the requests' Accept.
    :param max_concurrent_transforms: requests in flight per instance (default: the
        server's, else 1).
    :param max_payload: the largest request body in MB, 0 for no limit (default: the
        server's, else 6).
    :param env: extra environment variables of the server.
    """

    def __init__(self, model_name: ServableModel | str, instance_count: int = 1,
                 instance_type: str = "local", strategy: str | None = None,
                 assemble_with: str | None = None,
                 output_path: str | os.PathLike[str] | None = None,
                 output_kms_key: Any = None, accept: str | None = None,
                 max_concurrent_transforms: int | None = None, max_payload: int | None = None,
                 tags: Any = None, env: dict[str, str] | None = None,
                 base_transform_job_name: str | None = None,
                 sagemaker_session: Session | None = None, volume_kms_key: Any = None,
                 model_server_workers: int | None = None, **aws_only: Any) -> None:
        ignored = dict(aws_only)
        for name, value in (("output_kms_key", output_kms_key), ("tags", tags),
                            ("volume_kms_key", volume_kms_key)):
            if value is not None:
                ignored[name] = value
        if sagemaker_session is not None and not isinstance(sagemaker_session, Session):
            ignored["sagemaker_session"] = sagemaker_session
            sagemaker_session = None
        warn_ignored(ignored, type(self).__name__)
        served = not isinstance(model_name, str) and hasattr(model_name, "server_environment")
        self.model: ServableModel | None = model_name if served else None  # type: ignore[assignment]
        self.endpoint_url: str | None = None
        if self.model is None:
            self.endpoint_url = _server_url(model_name)
        self.model_name = self.model.name if self.model is not None else str(model_name)
        self.instance_count = positive_int("instance_count", instance_count) or 1
        self.instance_type = resolve_instance_type(instance_type)
        self.model_server_workers = positive_int("model_server_workers", model_server_workers)
        if self.model is None:
            for name, value in (("instance_count", instance_count if instance_count != 1
                                 else None), ("model_server_workers", model_server_workers),
                                ("env", env)):
                if value is not None:
                    raise ValueError(f"{name}= is for a server the transformer starts (a "
                                     f"Model); {self.endpoint_url} is running already")
        self.strategy = strategy
        self.assemble_with = assemble_with
        self._given_output_path = str(output_path) if output_path is not None else None
        self.output_path: str | None = self._given_output_path
        self.accept = accept
        self.max_concurrent_transforms = max_concurrent_transforms
        self.max_payload = max_payload
        self.env = dict(env or {})
        self.base_transform_job_name = base_transform_job_name
        self.sagemaker_session = (sagemaker_session
                                  or (self.model.sagemaker_session if self.model is not None
                                      else None)
                                  or Session())
        self.latest_transform_job: LocalTransformJob | None = None
        # Bad options fail here, not when the first job runs.
        records.strategy(strategy)
        records.assemble_with(assemble_with)
        records.whole_number(max_payload, "max_payload", 0)
        records.whole_number(max_concurrent_transforms or None, "max_concurrent_transforms", 1)

    @property
    def workers(self) -> int:
        """The server's workers: ``instance_count`` x ``model_server_workers`` (default 1)."""
        return self.instance_count * (self.model_server_workers or 1)

    def _default_output_path(self, job_name: str) -> str:
        bucket = self.sagemaker_session.default_bucket()
        if bucket:
            return f"s3://{bucket}/{job_name}"
        return str(Path.cwd() / "transforms" / job_name)

    def transform(self, data: str | os.PathLike[str], data_type: str = "S3Prefix",
                  content_type: str | None = None, compression_type: str | None = None,
                  split_type: str | None = None, job_name: str | None = None,
                  input_filter: str | None = None, output_filter: str | None = None,
                  join_source: str | None = None, experiment_config: Any = None,
                  model_client_config: dict[str, Any] | None = None,
                  batch_data_capture_config: Any = None, wait: bool = True,
                  logs: bool | str = True, **aws_only: Any) -> None:
        """Run a transform job of ``data`` (a file, folder or ``s3://`` prefix or object).

        :param content_type: the requests' Content-Type.
        :param compression_type: ``Gzip`` for gzipped inputs, or None.
        :param split_type: ``Line`` (a record per line) or None (a record per file).
        :param job_name: default ``<base_transform_job_name or model name>-<date-time>``.
        :param model_client_config: ``InvocationsTimeoutInSeconds`` (default 600) and
            ``InvocationsMaxRetries`` (default 3), as on SageMaker.
        :param wait: wait for the job (else see ``latest_transform_job.wait()``).
        :param logs: print a line per file and a summary while waiting.
        """
        ignored = dict(aws_only)
        for name, value in (("experiment_config", experiment_config),
                            ("batch_data_capture_config", batch_data_capture_config)):
            if value is not None:
                ignored[name] = value
        warn_ignored(ignored, "transform")
        if data_type in UNSUPPORTED_DATA_TYPES:
            raise ValueError(f"data_type {data_type!r} is not supported here: give the data "
                             "as an S3Prefix (a file, folder or s3:// prefix)")
        if data_type != "S3Prefix":
            raise ValueError(f"data_type must be 'S3Prefix', not {data_type!r}")
        for name, value in (("input_filter", input_filter), ("output_filter", output_filter)):
            if value not in (None, "$"):
                raise ValueError(f"{name} {value!r} is not supported here (JSONPath filters "
                                 "run only on SageMaker): leave it out")
        if join_source not in (None, "None"):
            raise ValueError(f"join_source {join_source!r} is not supported here: leave it out")
        timeout, retries = _client_config(model_client_config)
        if self.latest_transform_job is not None and self.latest_transform_job.status == \
                "InProgress":
            raise SmchainerError(f"transform job {self.latest_transform_job.name} is still "
                                 "running: wait() for it first")
        name = job_name or new_job_name(self.base_transform_job_name or self.model_name)
        self.output_path = self._given_output_path or self._default_output_path(name)
        s3_endpoint = self.sagemaker_session.endpoint_url
        spec = TransformSpec(
            data=str(data), output_path=self.output_path, job_name=name,
            content_type=content_type, accept=self.accept, split_type=split_type,
            compression_type=compression_type, strategy=self.strategy,
            assemble_with=self.assemble_with, max_payload=self.max_payload,
            max_concurrent_transforms=self.max_concurrent_transforms,
            instance_count=self.instance_count if self.model is not None else 1,
            invocations_timeout=timeout, max_retries=retries, s3_endpoint_url=s3_endpoint,
        )
        server = None
        if self.model is not None:
            if self.instance_type == LOCAL_GPU:
                require_gpu()
            env = self.model.server_environment(self.instance_type)
            env.update(self.env)
            spec.auth_token = env.get("SMCHAINER_AUTH_TOKEN", "").strip() or _auth_token()
            server = ServerSpec(
                self.model.model_data,
                entry_point=(str(self.model.entry_point)
                             if self.model.entry_point is not None else None),
                workers=self.workers, env=env, s3_endpoint_url=s3_endpoint)
            job = TransformJob(spec, server=server)
        else:
            spec.auth_token = _auth_token()
            job = TransformJob(spec, endpoint_url=self.endpoint_url)
        self.output_path = job.output_path
        handle = LocalTransformJob(job)
        self.latest_transform_job = handle
        show = logs not in (False, None, "None")
        if wait:
            handle.run(sys.stdout if show else None)
        else:
            handle.start()

    def wait(self, logs: bool | str = True) -> None:
        """Wait for the latest job (started with ``wait=False``); raise if it failed."""
        if self.latest_transform_job is None:
            raise SmchainerError("no transform job yet: call transform() first")
        self.latest_transform_job.wait(logs=logs)

    def stop_transform_job(self, wait: bool = True) -> None:
        """Stop the latest job: no more requests; it ends after those in flight."""
        if self.latest_transform_job is None:
            raise SmchainerError("no transform job yet: call transform() first")
        self.latest_transform_job.stop()

    def __repr__(self) -> str:
        return f"Transformer({self.model_name!r}, output_path={self.output_path!r})"


def _server_url(model_name: object) -> str:
    """The URL of a running server named by an endpoint name or an ``http(s)://`` URL."""
    text = str(model_name)
    if text.startswith(("http://", "https://")):
        parse_url(text)
        return text.rstrip("/")
    endpoint = find_endpoint(text)
    if endpoint is None or not endpoint.running:
        raise ValueError(f"Transformer({text!r}): give a Model (model.transformer()), the name "
                         "of an endpoint this process deployed, or the http:// URL of a "
                         "running server")
    return endpoint.url


def _client_config(config: dict[str, Any] | None) -> tuple[float, int]:
    """``(timeout, retries)`` from the SDK's ``model_client_config``."""
    config = dict(config or {})
    timeout = config.pop("InvocationsTimeoutInSeconds", DEFAULT_TIMEOUT)
    retries = config.pop("InvocationsMaxRetries", DEFAULT_MAX_RETRIES)
    if config:
        raise ValueError(f"model_client_config: unknown keys {sorted(config)}; use "
                         "InvocationsTimeoutInSeconds and InvocationsMaxRetries")
    return timeout, retries


def _auth_token() -> str | None:
    from smchainer.serving.cli import read_auth_token

    return read_auth_token(None)

