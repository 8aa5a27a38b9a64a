"""One batch-transform job: inputs -> records -> requests -> ``.out`` files, and its report.

The job lists its inputs first (a missing input fails before any server
starts), then starts ``smchainer-serve`` for the model (or checks the
server at ``endpoint_url``, which it never stops), asks it for
``/execution-parameters``, and sends every file's mini-batches with up to
``max_concurrent_transforms`` requests in flight, across files. Each file's
answers are put back in record order, whatever order they arrive in, and
written as ``<output path>/<name>.out`` once the whole file has succeeded.

Failures never stop the job and are never silent. A mini-batch whose request
fails (after retries, see :mod:`smchainer.transform.client`), a record over
``max_payload``, a file that cannot be read or written: each is a
:class:`Failure` naming the file, the records (1-based line numbers for Line
split), the HTTP status and the server's message. As on SageMaker, a file
with a failure gets no ``.out`` (never a partial one) and the job fails: the
other files' outputs are complete, ``<output path>/_failures.json`` lists
every failure, and :meth:`TransformJob.run` raises :class:`TransformJobError`
(``N of M records failed (first: ...); see <report>``). A job that succeeds
removes a report left by an earlier run in the same place.

Defaults, as SageMaker takes them: ``strategy``, ``max_payload`` and
``max_concurrent_transforms`` not given come from the server's
``/execution-parameters`` (``smchainer-serve`` says MultiRecord, its own
``--max-payload-mb`` and its worker count), else SingleRecord, 6 MB and 1.
With a server the job starts, ``max_concurrent_transforms`` counts per
instance (as on SageMaker): ``instance_count`` x it requests are in flight.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from smchainer.errors import SmchainerError
from smchainer.storage import is_s3_uri
from smchainer.training.config import new_job_name as training_job_name
from smchainer.transform import records as rec
from smchainer.transform.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, Answer, Client
from smchainer.transform.locations import OUT_SUFFIX, REPORT_NAME, InputFile, Store, local
from smchainer.transform.progress import Reporter

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT = 120.0
#: The base of a job's name when none is given.
DEFAULT_BASE_NAME = "smchainer-transform"


def new_job_name(base: str | None = None) -> str:
    """``<base>-YYYY-mm-dd-HH-MM-SS-mmm``, as the SageMaker SDK names transform jobs."""
    return training_job_name(base or DEFAULT_BASE_NAME)


@dataclass
class ServerSpec:
    """The ``smchainer-serve`` a job starts: model, script, workers, environment."""

    model_data: str
    entry_point: str | None = None
    workers: int = 1
    env: dict[str, str] | None = None
    #: the S3-compatible endpoint for an ``s3://`` model (``AWS_ENDPOINT_URL`` otherwise)
    s3_endpoint_url: str | None = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT


@dataclass
class TransformSpec:
    """What to transform and how (SageMaker's names; :meth:`checked` validates them)."""

    data: str
    output_path: str
    job_name: str = ""
    content_type: str | None = None
    accept: str | None = None
    split_type: str | None = None
    compression_type: str | None = None
    strategy: str | None = None
    assemble_with: str | None = None
    #: MB; 0 = no limit; None = the server's, else 6
    max_payload: int | None = None
    #: requests in flight per instance; None = the server's, else 1
    max_concurrent_transforms: int | None = None
    instance_count: int = 1
    invocations_timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    #: the S3-compatible endpoint for ``s3://`` data and output
    s3_endpoint_url: str | None = None
    auth_token: str | None = field(default=None, repr=False)

    def checked(self) -> TransformSpec:
        """The spec with every option normalized; a :class:`TransformOptionError` if one is bad."""
        self.split_type = rec.split_type(self.split_type)
        self.compression_type = rec.compression_type(self.compression_type)
        self.strategy = rec.strategy(self.strategy)
        self.assemble_with = rec.assemble_with(self.assemble_with)
        self.max_payload = rec.whole_number(self.max_payload, "max_payload", 0)
        self.max_concurrent_transforms = rec.whole_number(
            self.max_concurrent_transforms or None, "max_concurrent_transforms", 1)
        self.instance_count = rec.whole_number(self.instance_count, "instance_count", 1) or 1
        self.max_retries = rec.whole_number(self.max_retries, "max_retries", 0) or 0
        try:
            timeout = float(self.invocations_timeout)
        except (TypeError, ValueError):
            timeout = 0.0
        if not timeout > 0:
            raise rec.TransformOptionError(
                f"invocations_timeout must be a number of seconds > 0, "
                f"not {self.invocations_timeout!r}")
        self.invocations_timeout = timeout
        if not str(self.data or "").strip():
            raise rec.TransformOptionError("no input data given")
        if not str(self.output_path or "").strip():
            raise rec.TransformOptionError("no output path given")
        self.data, self.output_path = str(self.data), str(self.output_path)
        if not is_s3_uri(self.data):
            self.data = str(local(self.data))
        if not is_s3_uri(self.output_path):
            self.output_path = str(local(self.output_path))
        self.job_name = self.job_name or new_job_name()
        return self


@dataclass
class Failure:
    """Records of one file that got no answer, or a file that could not be read or written."""

    file: str
    error: str
    #: the HTTP status; None when no request was answered or made
    status: int | None = None
    first: int | None = None
    last: int | None = None
    count: int | None = None
    attempts: int = 0

    def where(self) -> str:
        if self.first is None:
            return self.file
        span = (f"record {self.first}" if self.first == self.last
                else f"records {self.first}-{self.last}")
        return f"{self.file} {span}"

    def describe(self, with_file: bool = True) -> str:
        """``train.csv records 3-4: 400 <server message>`` (``records 3-4: ...`` without file)."""
        status = f"{self.status} " if self.status else ""
        where = self.where() if with_file else self.where()[len(self.file):].strip()
        return f"{where + ': ' if where else ''}{status}{self.error}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "records": None if self.first is None
                else [self.first, self.last], "record_count": self.count,
                "status": self.status, "error": self.error, "attempts": self.attempts}


@dataclass
class FileResult:
    """How one input went: its output (None when it failed), records, requests, failures."""

    name: str
    source: str
    output: str | None
    records: int
    requests: int
    failures: list[Failure]

    @property
    def failed_records(self) -> int:
        return sum(failure.count or 0 for failure in self.failures)

    @property
    def readable(self) -> bool:
        return not any(failure.first is None and failure.count is None
                       for failure in self.failures)


class TransformJobError(SmchainerError):
    """A transform job had failures (or was stopped); the report says which records."""

    def __init__(self, job_name: str, reason: str, failures: list[Failure] | None = None,
                 report: str | None = None) -> None:
        self.job_name = job_name
        self.reason = reason
        self.failures = list(failures or [])
        self.report = report
        super().__init__(reason)


class _Open:
    """A file being transformed: its batches and the answers so far."""

    def __init__(self, index: int, item: InputFile, records: int,
                 batches: list[rec.Batch]) -> None:
        self.index = index
        self.item = item
        self.records = records
        self.batches = batches
        self.answers: list[bytes | None] = [None] * len(batches)
        self.failures: list[Failure] = []
        self.remaining = len(batches)
        self.requests = 0
        self.closed = False
        self.weight = item.size / len(batches) if batches else 0.0


class TransformJob:
    """A batch-transform job (see the module docstring); :meth:`run` runs it here and now.

    :param spec: the inputs, output and options.
    :param server: the server to start for the job; without it, ``endpoint_url``.
    :param endpoint_url: a running server (``http://host:port``), used and left running.
    :param reporter: progress lines and the summary (default: silent).
    """

    def __init__(self, spec: TransformSpec, server: ServerSpec | None = None,
                 endpoint_url: str | None = None, reporter: Reporter | None = None) -> None:
        if (server is None) == (endpoint_url is None):
            raise rec.TransformOptionError("a transform needs a model to serve or the URL of "
                                           "a running server (one of them)")
        self.spec = spec.checked()
        self.server = server
        self.endpoint_url = endpoint_url
        self.reporter = reporter or Reporter(None)
        self.name = self.job_name = self.spec.job_name
        self.output_path = self.spec.output_path
        self.status = "InProgress"
        self.failure_reason: str | None = None
        self.inputs: list[InputFile] = []
        self.files: list[FileResult] = []
        self.failures: list[Failure] = []
        self.report: str | None = None
        self.url: str | None = endpoint_url
        self.strategy = self.spec.strategy or rec.SINGLE_RECORD
        self.max_payload = self.spec.max_payload
        self.in_flight = 1
        self.requests = 0
        self.records = 0
        self.done_weight = 0.0
        self.total_weight = 0.0
        self.started = self.ended = 0.0
        self._cancelled = threading.Event()
        self._store = Store(self.spec.s3_endpoint_url)

    # -- what the job did -----------------------------------------------------

    @property
    def output_files(self) -> list[str]:
        """The ``.out`` files written, in input order."""
        return [result.output for result in self.files if result.output is not None]

    @property
    def failed_records(self) -> int:
        return sum(result.failed_records for result in self.files)

    def describe(self) -> dict[str, Any]:
        """A ``DescribeTransformJob``-like summary."""
        summary: dict[str, Any] = {
            "TransformJobName": self.name,
            "TransformJobStatus": self.status,
            "TransformInput": {"DataSource": {"S3DataSource": {"S3Uri": self.spec.data}},
                               "ContentType": self.spec.content_type,
                               "SplitType": self.spec.split_type or "None",
                               "CompressionType": self.spec.compression_type or "None"},
            "TransformOutput": {"S3OutputPath": self.output_path, "Accept": self.spec.accept,
                                "AssembleWith": self.spec.assemble_with or "None"},
            "BatchStrategy": self.strategy,
            "MaxPayloadInMB": self.max_payload,
            "MaxConcurrentTransforms": self.in_flight,
            "OutputFiles": self.output_files,
        }
        if self.failure_reason:
            summary["FailureReason"] = self.failure_reason
        if self.report:
            summary["FailureReport"] = self.report
        return summary

    def stop(self) -> None:
        """Stop sending requests; the job ends after the ones in flight (status ``Stopped``)."""
        self._cancelled.set()

    # -- running --------------------------------------------------------------

    def run(self) -> TransformJob:
        """Run the job to its end; raise :class:`TransformJobError` if anything failed."""
        if self.started:
            raise SmchainerError(f"transform job {self.name} has run already")
        self.started = time.monotonic()
        try:
            self.inputs = self._store.list_inputs(self.spec.data, self.output_path)
            self._store.prepare_output(self.output_path)
            self.total_weight = float(sum(item.size for item in self.inputs))
            endpoint = self._start_server() if self.server is not None else None
            try:
                client = self._client()
                self._resolve_parameters(client)
                self.reporter.started(self)
                self._transform(client)
            finally:
                if endpoint is not None:
                    endpoint.stop()
        except BaseException as error:
            self.ended = time.monotonic()
            if self.status == "InProgress":
                self.status = "Stopped" if isinstance(error, KeyboardInterrupt) else "Failed"
                self.failure_reason = self.failure_reason or str(error) or type(error).__name__
            raise
        self.ended = time.monotonic()
        return self._finish()

    def _start_server(self) -> Any:
        from smchainer.api.endpoint import LocalEndpoint

        assert self.server is not None
        server = self.server
        endpoint = LocalEndpoint(
            f"{self.name[:40]}-{secrets.token_hex(3)}", server.model_data,
            entry_point=server.entry_point, workers=server.workers, env=server.env,
            endpoint_url=server.s3_endpoint_url)
        self.reporter.note(f"starting smchainer-serve for {server.model_data} "
                           f"({server.workers} worker(s))")
        endpoint.start(wait=True, timeout=server.startup_timeout)
        self.url = endpoint.url
        return endpoint

    def _client(self) -> Client:
        assert self.url is not None
        client = Client(self.url, timeout=self.spec.invocations_timeout,
                        max_retries=self.spec.max_retries, token=self.spec.auth_token,
                        cancelled=self._cancelled)
        if self.server is not None:
            return client
        timeout = DEFAULT_STARTUP_TIMEOUT
        deadline = time.monotonic() + timeout
        while True:
            status = client.ping()
            if status == 200:
                return client
            if status == 0:
                raise SmchainerError(f"no server answers at {self.url}")
            if status != 503 or time.monotonic() > deadline:
                raise SmchainerError(f"the server at {self.url} answered /ping with {status}"
                                     + (f" for {timeout:g} s" if status == 503 else ""))
            if self._cancelled.wait(0.2):
                raise TransformJobError(self.name, "stopped before the server was ready")

    def _resolve_parameters(self, client: Client) -> None:
        """Strategy, payload limit and requests in flight: the job's, else the server's."""
        params = client.get_json("/execution-parameters") or {}
        server_payload = _int_or_none(params.get("MaxPayloadInMB"), minimum=0)
        if self.spec.strategy is None:
            said = str(params.get("BatchStrategy", "")).replace("_", "").lower()
            self.strategy = {"multirecord": rec.MULTI_RECORD,
                             "singlerecord": rec.SINGLE_RECORD}.get(said, rec.SINGLE_RECORD)
        if self.spec.max_payload is not None:
            self.max_payload = self.spec.max_payload
            if server_payload and (self.max_payload == 0 or self.max_payload > server_payload):
                self.reporter.note(f"warning: max_payload {self.max_payload} MB is over the "
                                   f"server's limit of {server_payload} MB: larger requests "
                                   "will be refused (413)")
        else:
            self.max_payload = (server_payload if server_payload is not None
                                else rec.DEFAULT_MAX_PAYLOAD_MB)
        if self.spec.max_concurrent_transforms is not None:
            per_instance = self.spec.max_concurrent_transforms
            self.in_flight = per_instance * (self.spec.instance_count
                                             if self.server is not None else 1)
        else:
            self.in_flight = _int_or_none(params.get("MaxConcurrentTransforms"), minimum=1) or 1

    def _transform(self, client: Client) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(self.in_flight,
                                                     thread_name_prefix="smchainer-transform")
        pending: dict[concurrent.futures.Future[Answer], tuple[_Open, int]] = {}
        try:
            for index, item in enumerate(self.inputs):
                if self._cancelled.is_set():
                    break
                state = self._open(index, item)
                if state is None:
                    continue
                for number, batch in enumerate(state.batches):
                    if batch.error is not None:
                        self._settle(state, number, Answer(0, error=batch.error, attempts=0))
                        continue
                    while len(pending) >= self.in_flight:
                        self._collect(pending)
                    if self._cancelled.is_set():
                        break
                    future = pool.submit(client.invoke, batch.body, self.spec.content_type,
                                         self.spec.accept)
                    pending[future] = (state, number)
                    state.requests += 1
                if state.remaining == 0:
                    self._close(state)
            while pending:
                self._collect(pending)
        except BaseException:
            self._cancelled.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        client.close()

    def _open(self, index: int, item: InputFile) -> _Open | None:
        """Read and split one input; a file that cannot be read is a failure, None."""
        try:
            data = self._store.read(item, self.spec.compression_type)
        except SmchainerError as error:
            self._file_failed(item, [Failure(item.name, str(error))], records=0)
            self.done_weight += item.size
            return None
        records = rec.split(data, self.spec.split_type)
        del data
        assert self.max_payload is not None
        batches = rec.batches(records, self.spec.split_type, self.strategy, self.max_payload)
        self.records += len(records)
        state = _Open(index, item, len(records), batches)
        if not batches:
            self.done_weight += item.size
        return state

    def _collect(self, pending: dict[concurrent.futures.Future[Answer], tuple[_Open, int]]
                 ) -> None:
        done, _ = concurrent.futures.wait(pending, timeout=0.5,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            state, number = pending.pop(future)
            answer = future.result()
            self.requests += 1
            self._settle(state, number, answer)
            if state.remaining == 0:
                self._close(state)
        self.reporter.progress(self)

    def _settle(self, state: _Open, number: int, answer: Answer) -> None:
        batch = state.batches[number]
        if answer.ok:
            state.answers[number] = answer.body
        else:
            state.failures.append(Failure(
                state.item.name, answer.error or f"HTTP {answer.status}",
                status=answer.status or None, first=batch.first, last=batch.last,
                count=batch.count, attempts=answer.attempts))
            state.answers[number] = None
        state.remaining -= 1
        self.done_weight += state.weight

    def _close(self, state: _Open) -> None:
        """All of a file's batches are settled: write its ``.out``, or record its failure."""
        if state.remaining != 0 or state.closed:
            return
        state.closed = True
        item = state.item
        if state.failures:
            state.failures.sort(key=lambda failure: failure.first or 0)
            self._file_failed(item, state.failures, state.records, state.requests)
            return
        location = self._store.output_location(self.output_path, item.name + OUT_SUFFIX)
        try:
            data = rec.assemble((answer or b"" for answer in state.answers),
                                self.spec.assemble_with)
            self._store.write(location, data)
        except SmchainerError as error:
            failure = Failure(item.name, f"the output {error}", count=state.records)
            self._file_failed(item, [failure], state.records, state.requests)
            return
        result = FileResult(item.name, item.location, location, state.records,
                            state.requests, [])
        self.files.append(result)
        self.reporter.file_done(self, result)

    def _file_failed(self, item: InputFile, failures: list[Failure], records: int,
                     requests: int = 0) -> None:
        result = FileResult(item.name, item.location, None, records, requests, failures)
        self.files.append(result)
        self.failures.extend(failures)
        self.reporter.file_done(self, result)

    def _finish(self) -> TransformJob:
        """Write or clear the report, settle the status; raise on failures."""
        order = {item.name: index for index, item in enumerate(self.inputs)}
        self.files.sort(key=lambda result: order.get(result.name, 0))
        self.failures = [failure for result in self.files for failure in result.failures]
        report_location = self._store.output_location(self.output_path, REPORT_NAME)
        stopped = self._cancelled.is_set()
        if not self.failures and not stopped:
            self._store.remove(report_location)
            self.status = "Completed"
            self.reporter.finished(self)
            return self
        self.report = report_location
        reason = self.summary()
        self.status = "Stopped" if stopped else "Failed"
        self.failure_reason = reason
        try:
            text = json.dumps(self.report_json(), indent=2) + "\n"
            self._store.write(report_location, text.encode())
        except SmchainerError as error:
            logger.error("the failure report could not be written: %s", error)
            self.report = None
            self.failure_reason = reason = self.summary()
        self.reporter.finished(self)
        raise TransformJobError(self.name, reason, self.failures, self.report)

    def summary(self) -> str:
        """``N of M records failed (first: ...); see <report>``, or why the job stopped."""
        parts = []
        if self._cancelled.is_set():
            done = sum(1 for result in self.files if result.output is not None)
            parts.append(f"stopped after {done} of {len(self.inputs)} files")
        if self.failed_records:
            parts.append(f"{self.failed_records} of {self.records} records failed")
        unread = [result for result in self.files if not result.readable]
        if unread:
            parts.append(f"{len(unread)} of {len(self.inputs)} files could not be read")
        text = ", ".join(parts) or "the job failed"
        if self.failures:
            text += f" (first: {self.failures[0].describe()})"
        if self.report:
            text += f"; see {self.report}"
        return text

    def report_json(self) -> dict[str, Any]:
        """The content of ``_failures.json``."""
        return {
            "job_name": self.name,
            "status": self.status,
            "input": self.spec.data,
            "output_path": self.output_path,
            "records": self.records,
            "failed_records": self.failed_records,
            "files": len(self.inputs),
            "failed_files": [result.name for result in self.files if result.output is None],
            "outputs": self.output_files,
            "failures": [failure.to_json() for failure in self.failures],
        }


def _int_or_none(value: object, minimum: int) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number >= minimum else None
