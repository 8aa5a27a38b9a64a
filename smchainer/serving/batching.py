"""Dynamic batching: requests that wait for the model together share one ``predict_fn`` call.

Each worker runs its hooks on one inference thread
(:class:`smchainer.serving.app.InferenceRunner`). With ``--max-batch-size N``
(N > 1) that thread, once it takes a request, also takes the requests queued
behind it, and waits up to ``--max-batch-delay-ms`` for those still arriving
(being read on a pool thread of the same worker), until their items reach N:

1. each request is decoded by ``input_fn`` and offered to ``batch_fn``
   (:func:`smchainer.hookspecs.batch_fn`); an error there is that request's
   answer alone, and a request ``batch_fn`` declines runs by itself;
2. the batches that fit together (same dtype, same shape past the first
   axis) are concatenated into one ``predict_fn`` call, with a context of its
   own whose deadline is the latest of theirs;
3. the prediction is cut back into each request's rows and each request gets
   its own ``output_fn`` call, with its own context and Accept types.

One request's failure stays its own: when the merged ``predict_fn`` raises,
or returns something that cannot be cut into the requests' rows, the
requests are run again one by one, as without batching. Nothing waits when
nothing else is on its way: a lone client pays no delay. Requests whose
caller has given up (504) are dropped before they are decoded.

Whether merging may happen at all is the plugins' word
(:meth:`smchainer.manager.Hooks.batching_refusal`).
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from smchainer.context import ServingContext
    from smchainer.manager import Hooks

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request on its way through the hooks: what it sent and what it has become."""

    body: bytes
    content_type: str
    accepts: list[str]
    deadline: float
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    context: ServingContext | None = None
    decoded: Any = None
    #: ``batch_fn``'s answer: the request's rows, or None to run alone
    batch: np.ndarray | None = None
    prepared: bool = False
    #: what turns a body of another protocol into ``body`` for ``input_fn`` (the Open
    #: Inference Protocol's tensors), run on the inference thread first; its error is
    #: the request's answer
    unwrap: Callable[[], bytes] | None = None

    @property
    def items(self) -> int:
        return 0 if self.batch is None else len(self.batch)

    def fits(self, other: Job) -> bool:
        """Whether ``other``'s rows can be concatenated to this job's."""
        a, b = self.batch, other.batch
        return (a is not None and b is not None and a.dtype == b.dtype
                and a.shape[1:] == b.shape[1:])


class JobSource(Protocol):
    """Where the batcher takes its next jobs from (the inference runner's queue)."""

    def take(self, timeout: float) -> tuple[concurrent.futures.Future[Any], Any] | None: ...

    def put_back(self, item: tuple[concurrent.futures.Future[Any], Any]) -> None: ...

    def arriving(self) -> int: ...


def split_rows(prediction: Any, counts: list[int]) -> list[Any]:
    """``prediction`` cut into consecutive parts of ``counts`` rows along its first axis.

    :raises ValueError: when it has no length, a length other than the
        total, or does not slice.
    """
    total = sum(counts)
    try:
        length = len(prediction)
    except TypeError:
        raise ValueError(f"a {type(prediction).__name__} has no rows to split") from None
    if length != total or isinstance(prediction, (str, bytes, dict)):
        raise ValueError(f"a {type(prediction).__name__} of {length} rows for {total} items")
    parts, start = [], 0
    for count in counts:
        parts.append(prediction[start:start + count])
        start += count
    return parts


class Batcher:
    """Merges queued requests into ``predict_fn`` calls (see the module docstring).

    :param max_items: the most items (rows) one merged call may hold.
    :param max_delay: seconds to wait for requests still arriving, counted
        from when the first request of the batch was taken.
    :param observe: called with the items and the requests of every
        ``predict_fn`` call of a batchable request, merged or alone (the
        batch-size metrics); a request ``batch_fn`` declined is not counted.
    """

    def __init__(self, hooks: Hooks, max_items: int, max_delay: float,
                 observe: Callable[[int, int], None] | None = None) -> None:
        self.hooks = hooks
        self.max_items = max_items
        self.max_delay = max_delay
        self.observe = observe or (lambda items, requests: None)

    # -- one request's steps --------------------------------------------------

    def prepare(self, job: Job, model: Any) -> bool:
        """Decode ``job`` and ask ``batch_fn``; False when it failed (and has its answer)."""
        job.prepared = True
        try:
            job.context = context = self.hooks.request_context(model)
            context.deadline = job.deadline
            context.check_deadline("waiting for the model")
            if job.unwrap is not None:
                job.body, job.unwrap = job.unwrap(), None
            job.decoded = self.hooks.input_fn(job.body, job.content_type, context)
            context.check_deadline("decoding the request")
            batch = self.hooks.batch_fn(job.decoded, model, context)
        except BaseException as error:
            job.future.set_exception(error)
            return False
        if isinstance(batch, np.ndarray) and batch.ndim >= 1 and len(batch) > 0:
            job.batch = batch
        return True

    def finish(self, job: Job, prediction: Any) -> None:
        """``output_fn`` for one request, its answer or error into its future."""
        assert job.context is not None
        try:
            job.context.check_deadline("predicting")
            job.future.set_result(self.hooks.encode(prediction, job.accepts, job.context))
        except BaseException as error:
            job.future.set_exception(error)

    def run_alone(self, job: Job, model: Any) -> None:
        """``predict_fn`` on this request's own input, as without batching."""
        assert job.context is not None
        try:
            prediction = self.hooks.predict_fn(job.decoded, model, job.context)
        except BaseException as error:
            job.future.set_exception(error)
            return
        if job.batch is not None:  # batch_fn said how many items it holds
            self.observe(job.items, 1)
        self.finish(job, prediction)

    # -- a batch ------------------------------------------------------------------

    def gather(self, first: Job, source: JobSource, model: Any) -> list[Job]:
        """``first`` and the jobs that join it, taken from ``source`` (prepared)."""
        jobs = [first]
        items = first.items
        started = time.monotonic()
        while items < self.max_items:
            left = started + self.max_delay - time.monotonic()
            item = source.take(left if left > 0 and source.arriving() > 0 else 0)
            if item is None:
                break
            future, work = item
            if not isinstance(work, Job):  # a plain task: it runs after this batch
                source.put_back(item)
                break
            if not work.prepared:
                if not future.set_running_or_notify_cancel():
                    continue  # its caller gave up while it waited
                if not self.prepare(work, model):
                    continue
            if not first.fits(work) or items + work.items > self.max_items:
                source.put_back(item)  # the first of the next batch
                break
            jobs.append(work)
            items += work.items
        return jobs

    def serve(self, first: Job, source: JobSource, model: Any) -> None:
        """Answer ``first`` (running, not yet prepared) and whatever joins it."""
        if not first.prepared and not self.prepare(first, model):
            return
        if first.batch is None:
            self.run_alone(first, model)
            return
        jobs = self.gather(first, source, model)
        if len(jobs) == 1:
            self.run_alone(first, model)
            return
        self.run_merged(jobs, model)

    def run_merged(self, jobs: list[Job], model: Any) -> None:
        counts = [job.items for job in jobs]
        context = self.hooks.request_context(model)
        context.deadline = max(job.deadline for job in jobs)
        try:
            merged = np.concatenate([job.batch for job in jobs])
            prediction = self.hooks.predict_fn(merged, model, context)
            parts = split_rows(prediction, counts)
        except Exception as error:
            logger.info("a merged predict_fn of %d requests (%d items) failed (%s: %s): "
                        "running them one by one", len(jobs), sum(counts),
                        type(error).__name__, error)
            for job in jobs:
                self.run_alone(job, model)
            return
        self.observe(sum(counts), len(jobs))
        for job, part in zip(jobs, parts, strict=True):
            self.finish(job, part)
