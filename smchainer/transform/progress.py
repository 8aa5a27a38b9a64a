"""What a transform job tells its user while it runs.

:class:`Reporter` writes plain lines: how the job runs (server, strategy,
payload limit, requests in flight), one line per finished file (its records
and requests and its ``.out``, or its first failure) and a summary.
:class:`BarReporter`, for a terminal, adds a progress bar (the share of the
input bytes done, files, requests, failures) redrawn in place at most ten
times a second; the lines print above it. :func:`reporter_for` picks the bar
only when the stream is a terminal, so logs and pipes get plain lines.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import IO, Any, Protocol


class TextStream(Protocol):
    """Where lines go: a text file, ``sys.stderr``, a buffer."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class FileResult(Protocol):
    """What a report reads of a finished file (:class:`smchainer.transform.job.FileResult`)."""

    name: str
    output: str | None
    records: int
    requests: int

    @property
    def failures(self) -> Sequence[Any]: ...

    @property
    def failed_records(self) -> int: ...

    @property
    def readable(self) -> bool: ...


class TransformJob(Protocol):
    """What a report reads of the job (:class:`smchainer.transform.job.TransformJob`)."""

    name: str
    spec: Any
    status: str
    url: str | None
    output_path: str
    strategy: str
    max_payload: int | None
    in_flight: int
    records: int
    requests: int
    done_weight: float
    total_weight: float
    started: float
    ended: float

    @property
    def inputs(self) -> Sequence[Any]: ...

    @property
    def files(self) -> Sequence[Any]: ...

    @property
    def output_files(self) -> list[str]: ...

    @property
    def failed_records(self) -> int: ...


BAR_WIDTH = 30
REDRAW_SECONDS = 0.1


def size_text(size: float) -> str:
    """``512 B``, ``1.5 KB``, ``12.0 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def plural(count: int, word: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


class Reporter:
    """Plain progress lines on ``stream`` (None: silent)."""

    def __init__(self, stream: TextStream | None) -> None:
        self.stream = stream

    def line(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (a warning, the server starting)."""
        self.line(text)

    def started(self, job: TransformJob) -> None:
        self.line(f"transform job {job.name}: {plural(len(job.inputs), 'file')} "
                  f"({size_text(job.total_weight)}) from {job.spec.data} -> {job.output_path}")
        payload = "no limit" if job.max_payload == 0 else f"{job.max_payload} MB"
        split = job.spec.split_type or "None"
        how = f"split {split}" + (f", {job.strategy}" if split != "None" else "")
        self.line(f"server {job.url}: {how}, max payload {payload}, "
                  f"{plural(job.in_flight, 'request')} in flight")

    def progress(self, job: TransformJob) -> None:
        """Called after every answer."""

    def file_done(self, job: TransformJob, result: FileResult) -> None:
        if result.output is not None:
            self.line(f"{result.name}: {plural(result.records, 'record')}, "
                      f"{plural(result.requests, 'request')} -> {result.output}")
            return
        first = result.failures[0]
        more = len(result.failures) - 1
        failed = (f"{result.failed_records} of {result.records} records failed"
                  if result.readable else "failed")
        self.line(f"{result.name}: {failed} ({first.describe(with_file=False)}"
                  f"{f'; {more} more' if more else ''}): no .out written")

    def finished(self, job: TransformJob) -> None:
        seconds = job.ended - job.started
        if job.status == "Completed":
            self.line(f"transform job {job.name} completed: {plural(len(job.files), 'file')}, "
                      f"{plural(job.records, 'record')}, {plural(job.requests, 'request')} "
                      f"in {seconds:.1f} s")
        else:
            # the reason follows in the error (the command's Error: line)
            done = len(job.output_files)
            self.line(f"transform job {job.name} {job.status.lower()} after {seconds:.1f} s: "
                      f"{done} of {plural(len(job.inputs), 'file')} transformed")


class BarReporter(Reporter):
    """:class:`Reporter` with a progress bar redrawn in place (for a terminal)."""

    def __init__(self, stream: TextStream) -> None:
        super().__init__(stream)
        self._drawn = False
        self._last = 0.0

    def _clear(self) -> None:
        if self._drawn and self.stream is not None:
            self.stream.write("\r\x1b[2K")
            self._drawn = False

    def line(self, text: str) -> None:
        self._clear()
        super().line(text)

    def progress(self, job: TransformJob, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < REDRAW_SECONDS:
            return
        self._last = now
        assert self.stream is not None
        share = job.done_weight / job.total_weight if job.total_weight else 1.0
        share = min(max(share, 0.0), 1.0)
        filled = int(share * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        failed = job.failed_records
        self.stream.write(f"\r\x1b[2K[{bar}] {share:4.0%}  {len(job.files)}/{len(job.inputs)} "
                          f"files  {job.requests} requests"
                          + (f"  {failed} records failed" if failed else ""))
        self.stream.flush()
        self._drawn = True

    def file_done(self, job: TransformJob, result: FileResult) -> None:
        super().file_done(job, result)
        self.progress(job, force=True)

    def finished(self, job: TransformJob) -> None:
        self._clear()
        super().finished(job)


def reporter_for(stream: IO[str] | None) -> Reporter:
    """A :class:`BarReporter` when ``stream`` is a terminal, else plain lines."""
    if stream is None:
        return Reporter(None)
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    return BarReporter(stream) if interactive else Reporter(stream)
