"""The WSGI application one server worker runs: routing, limits, negotiation, errors.

Requests flow one way: body -> ``input_fn`` -> ``predict_fn`` -> ``output_fn``
(or ``transform_fn`` alone), all through :class:`smchainer.manager.Hooks`.
Each worker holds one model, loaded by ``model_fn`` in a background thread
when the worker starts (:meth:`InferenceApp.start`), so ``/ping`` answers 503
at once while loading and 200 after. Inferences run one at a time per worker
on a dedicated thread (user models need not be thread-safe) while the
server's other threads keep answering ``/ping`` and ``/metrics``; with dynamic
batching that thread merges queued requests into one ``predict_fn`` call
(:mod:`smchainer.serving.batching`).

Every error becomes a JSON body ``{"error": ..., "status": N}``; the status
comes from :func:`smchainer.errors.http_status_of` alone. Tracebacks reach a
client only when debug logging is on.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import heapq
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import smchainer
from smchainer import content
from smchainer.errors import (
    BadRequest,
    HTTPError,
    ModelNotLoaded,
    NotAcceptable,
    PayloadTooLarge,
    SmchainerError,
    http_status_of,
)
from smchainer.manager import Hooks
from smchainer.model_contract import read_contract
from smchainer.serving import v2
from smchainer.serving.batching import Batcher, Job
from smchainer.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from smchainer.serving.metrics import WorkerMetrics
from smchainer.serving.settings import MODEL_NAME, ServerSettings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("smchainer.serving.access")

_READ_CHUNK = 64 * 1024
#: Answered without a token when the server requires one: health checks must work.
OPEN_PATHS = frozenset({"/ping", "/v2/health/live", "/v2/health/ready"})


@functools.lru_cache(maxsize=64)
def status_line(status: int) -> str:
    """``"200 OK"``: a WSGI status line (an enum lookup, once per status)."""
    return f"{status} {HTTPStatus(status).phrase}"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, body: dict[str, Any]) -> Response:
    return Response(status, json.dumps(body).encode(), "application/json")


def error_response(message: str, status: int, detail: str | None = None) -> Response:
    """A JSON error body: ``{"error": message, "status": status}`` (+ ``traceback``)."""
    payload: dict[str, Any] = {"error": message, "status": status}
    if detail:
        payload["traceback"] = detail
    return Response(status, json.dumps(payload).encode(), "application/json")


class ModelHolder:
    """This worker's model: loaded once, in the background, then shared by requests."""

    def __init__(self, hooks: Hooks, model_dir: Path, metrics: WorkerMetrics) -> None:
        self.hooks = hooks
        self.model_dir = model_dir
        self.metrics = metrics
        self.state = "waiting"  # -> loading -> ready | failed
        self.model: Any = None
        self.device: Any = None
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._thread: threading.Thread | None = None
        #: called once the model is ready (the worker's "ready" marker)
        self.on_ready: Callable[[], None] | None = None

    def start(self, device_spec: str) -> threading.Thread:
        """Run ``model_fn`` on a daemon thread for ``device_spec`` ("cpu" or "gpu:N")."""
        self.state = "loading"
        self._thread = threading.Thread(
            target=self.load, args=(device_spec,), name="smchainer-model-loader", daemon=True
        )
        self._thread.start()
        return self._thread

    def load(self, device_spec: str) -> None:
        """Load the model now (in the calling thread); never raises."""
        from smchainer.device import get_device

        self.state = "loading"
        started = time.perf_counter()
        try:
            device = get_device(device_spec)
            model = move_to_device(self.hooks.model_fn(str(self.model_dir)), device)
        except BaseException as error:  # a failed load must not take the worker down
            self.load_seconds = time.perf_counter() - started
            self.error = describe(error)
            self.state = "failed"
            logger.error("model_fn failed for %s; /ping will answer 503: %s",
                         self.model_dir, self.error, exc_info=True)
            self.metrics.observe_model_load(self.load_seconds, loaded=False)
            return
        self.model, self.device = model, device
        self.load_seconds = time.perf_counter() - started
        self.state = "ready"
        if self.on_ready is not None:
            self.on_ready()
        logger.info("model loaded from %s on %s in %.2f s",
                    self.model_dir, device_spec, self.load_seconds)
        self.metrics.observe_model_load(self.load_seconds, loaded=True)

    def require(self) -> Any:
        """The model, or :class:`ModelNotLoaded` (503) saying why there is none."""
        if self.state == "ready":
            return self.model
        if self.state == "failed":
            raise ModelNotLoaded(f"the model could not be loaded: {self.error}")
        raise ModelNotLoaded("the model is still loading")


def move_to_device(model: Any, device: Any) -> Any:
    """Put a Chainer link on this worker's device; other models are left alone."""
    import chainer

    if isinstance(model, chainer.Link):
        model.to_device(device)
    return model


def describe(error: BaseException) -> str:
    """An error as one line for a client: our own errors by message, others by type too."""
    if isinstance(error, SmchainerError) or getattr(error, "status_code", None):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class InferenceRunner:
    """One thread per worker that runs inferences in turn; callers wait with a deadline.

    Work is a callable, or a :class:`~smchainer.serving.batching.Job` that the
    runner's :class:`~smchainer.serving.batching.Batcher` answers, together
    with the jobs queued behind it when batching is on.
    """

    def __init__(self, batcher: Batcher | None = None,
                 model: Callable[[], Any] | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Any]]
        self._queue = queue.SimpleQueue()
        self._pending: collections.deque[tuple[concurrent.futures.Future[Any], Any]]
        self._pending = collections.deque()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batcher = batcher
        self._model = model
        #: where the queue's depth and each inference's time go, or None
        self._metrics = metrics
        #: requests of this worker on their way to :meth:`submit` (bodies being read)
        self._arriving = 0
        #: kept-alive connections answered lately, by key: when (see :meth:`answered`)
        self._returning: dict[int, float] = {}
        #: how long an answered connection is expected back (the batch delay)
        self.return_window = 0.0
        self._local = threading.local()
        #: :func:`time.monotonic` when the running inference began; None when idle.
        self.busy_since: float | None = None

    def submit(self, work: Any) -> concurrent.futures.Future[Any]:
        """Queue a callable or a :class:`Job`; its future has the answer."""
        with self._lock:
            if self._thread is None:  # started lazily: the worker is forked by then
                self._thread = threading.Thread(
                    target=self._run, name="smchainer-inference", daemon=True
                )
                self._thread.start()
        future = work.future if isinstance(work, Job) else concurrent.futures.Future()
        if self._metrics is not None:
            self._metrics.queued.inc()
        self._arrived()  # before the put: the batcher must never wait for this one
        self._queue.put((future, work))
        return future

    def _taken(self, item: tuple[concurrent.futures.Future[Any], Any]
               ) -> tuple[concurrent.futures.Future[Any], Any]:
        if self._metrics is not None:
            self._metrics.queued.dec()
        return item

    # -- requests on their way, for the batcher ------------------------------

    @contextlib.contextmanager
    def arriving_request(self) -> Iterator[None]:
        """Count this thread's request as on its way until it is submitted (or fails)."""
        with self._lock:
            self._arriving += 1
        self._local.arriving = True
        try:
            yield
        finally:
            self._arrived()

    def expect(self, change: int) -> None:
        """Requests on their way counted up or down by a caller other than their thread."""
        with self._lock:
            self._arriving += change

    def _arrived(self) -> None:
        """This thread's request is no longer on its way (once; nothing if it was not)."""
        if getattr(self._local, "arriving", False):
            self._local.arriving = False
            with self._lock:
                self._arriving -= 1

    def answered(self, key: int) -> None:
        """A kept-alive connection has its answer: expect its next request for a while.

        A client that waits for each answer before it sends again (most do)
        sends its next request a fraction of a millisecond later; counted as
        on its way for :attr:`return_window`, it joins the batch that the
        requests queued meanwhile start, rather than waiting for the whole
        next one.
        """
        with self._lock:
            self._returning[key] = time.monotonic()

    def came_back(self, key: int) -> None:
        """The connection answered as ``key`` has its next request's head (or is gone)."""
        if key in self._returning:
            with self._lock:
                self._returning.pop(key, None)

    def arriving(self) -> int:
        """Requests on their way: bodies being read and connections expected back."""
        if not self._returning:
            return self._arriving
        with self._lock:
            since = time.monotonic() - self.return_window
            for key in [key for key, when in self._returning.items() if when < since]:
                del self._returning[key]
            return self._arriving + len(self._returning)

    def take(self, timeout: float) -> tuple[concurrent.futures.Future[Any], Any] | None:
        """The next queued work, waiting up to ``timeout`` seconds (0: only what is there)."""
        if self._pending:
            return self._pending.popleft()
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        return self._taken(item)

    def put_back(self, item: tuple[concurrent.futures.Future[Any], Any]) -> None:
        """Work taken too early: it is the next to run."""
        self._pending.appendleft(item)

    def running_for(self) -> float:
        """Seconds the running inference has taken so far (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    def _run(self) -> None:
        while True:
            item = self._pending.popleft() if self._pending else self._taken(self._queue.get())
            future, work = item
            if not future.running() and not future.set_running_or_notify_cancel():
                continue  # its caller timed out while it waited
            started = self.busy_since = time.monotonic()
            try:
                if isinstance(work, Job):
                    assert self.batcher is not None and self._model is not None
                    self.batcher.serve(work, self, self._model())
                else:
                    future.set_result(work())
            except BaseException as error:
                if not future.done():
                    future.set_exception(error)
            finally:
                if self._metrics is not None:
                    self._metrics.inference.observe(time.monotonic() - started)
                self.busy_since = None


class WorkerMarkers:
    """Files ``<kind>-<pid>`` in the server's shared folder: which workers are in a state.

    ``ready``: the worker has its model (a loading worker leaves connections to
    a ready sibling; readiness counts them). ``stuck``: its inference has run
    past its timeout (liveness). A worker killed with SIGKILL cannot remove its
    file, so a marker counts only while its process lives.
    """

    def __init__(self, folder: Path | None, kind: str = "ready") -> None:
        self.folder = folder
        self.kind = kind

    @property
    def _mine(self) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.kind}-{os.getpid()}"

    def mark(self) -> None:
        if self._mine is not None:
            self._mine.touch()

    def clear(self) -> None:
        if self._mine is not None:
            self._mine.unlink(missing_ok=True)

    def live_pids(self) -> list[int]:
        """The processes with a marker that still run (stale markers are removed)."""
        if self.folder is None:
            return []
        pids = []
        for path in self.folder.glob(f"{self.kind}-*"):
            try:
                pid = int(path.name.removeprefix(f"{self.kind}-"))
            except ValueError:
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass
            pids.append(pid)
        return pids

    def another_ready(self) -> bool:
        return any(pid != os.getpid() for pid in self.live_pids())


class BodyDeadlines:
    """Ends the reading of request bodies that take longer than their deadline.

    A pool thread reading a body blocks in the socket until the client's
    bytes arrive; a client sending one byte a second would hold it for ever.
    :meth:`watch` registers the socket with a deadline; one thread per
    worker shuts the socket's reading side at the deadline, which ends the
    blocked read at once (the server can still answer on the socket).

    The thread wakes for deadlines, not for requests: :meth:`watch` wakes it
    only when the new deadline comes before the time it would wake by itself
    (at most :data:`IDLE_WAKE_SECONDS` from when it last looked), and bodies
    read in time are dropped when the thread next looks. Waking a thread
    per request would have it take the GIL from the request's own threads.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._lock = threading.Condition()
        self._next = 0
        self._thread: threading.Thread | None = None
        #: when the thread wakes by itself (:func:`time.monotonic`)
        self._wakes_at = -float("inf")

    def watch(self, sock: socket.socket, deadline: float) -> int:
        """Shut ``sock``'s reading side at ``deadline`` unless :meth:`release` comes first."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="smchainer-deadlines",
                                                daemon=True)
                self._thread.start()
            self._next += 1
            heapq.heappush(self._heap, (deadline, self._next, sock))
            self._live.add(self._next)
            if deadline < self._wakes_at:
                self._lock.notify()
            return self._next

    def release(self, token: int) -> bool:
        """Forget ``token``; False when its deadline has already passed (the read was ended)."""
        with self._lock:
            if token in self._live:
                self._live.discard(token)
                return True
            return False

    def _run(self) -> None:
        while True:
            with self._lock:
                heap = self._heap
                while heap and heap[0][1] not in self._live:  # read in time: forget
                    heapq.heappop(heap)
                now = time.monotonic()
                if not heap or heap[0][0] > now:
                    self._wakes_at = min(heap[0][0] if heap else float("inf"),
                                         now + IDLE_WAKE_SECONDS)
                    self._lock.wait(self._wakes_at - now)
                    self._wakes_at = -float("inf")  # awake: any watch may notify
                    continue
                _, token, sock = heapq.heappop(heap)
                self._live.discard(token)
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass


#: The longest :class:`BodyDeadlines`' thread sleeps without looking at its deadlines.
IDLE_WAKE_SECONDS = 1.0

#: Seconds past a request's timeout before a still-running inference counts as stuck.
STUCK_GRACE_SECONDS = 1.0
#: How often each worker looks at its own inference thread for liveness.
LIVENESS_CHECK_SECONDS = 0.5


class Answer:
    """A response body for the WSGI server, which logs its access line once it is sent.

    The server calls ``close()`` after the last byte is written (PEP 3333), so
    the line (formatted and written by :mod:`logging`, tens of microseconds) is
    off the client's wait; it is logged even when the client went away first.
    The request's metrics are counted before the answer, so that a scrape
    that follows an answer always counts it.
    """

    __slots__ = ("body", "line")

    def __init__(self, body: bytes, line: tuple[str, str, int, float, int]) -> None:
        self.body = body
        self.line = line

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        access_logger.info("%s %s %d %.1fms worker=%d", *self.line)


@dataclass(slots=True)
class DirectRequest:
    """A request of the worker's direct path (:meth:`InferenceApp.start_direct`)."""

    method: str
    path: str
    #: :func:`time.perf_counter` at its start, for its time in the metrics and the access line
    started: float
    #: the inference's future, while it runs
    future: concurrent.futures.Future[Any] | None = None
    #: :func:`time.monotonic` past which it is answered 504
    deadline: float = 0.0
    #: status line, headers and body, once known without an inference (a refusal)
    answer: tuple[str, list[tuple[str, str]], Answer] | None = None
    #: an Open Inference Protocol ``infer`` request's tensors (None: ``/invocations``)
    infer: v2.PendingInfer | None = None
    _claimed: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True for the first caller only: who answers (the inference's end, or its 504)."""
        return self._claimed.acquire(blocking=False)


class InferenceApp:
    """The WSGI callable of one worker."""

    def __init__(self, hooks: Hooks, settings: ServerSettings,
                 metrics: WorkerMetrics | None = None) -> None:
        self.hooks = hooks
        self.settings = settings
        #: the Open Inference Protocol's infer route of this model, as its request line has it
        self.infer_route = f"/v2/models/{settings.model_name}/infer"
        #: Paths the worker may serve on its event loop (:mod:`smchainer.serving.direct`):
        #: ``/invocations``, and the infer route for a name the command line accepts (one
        #: that needs no escaping in a URL; any other takes gunicorn's path, which decodes it).
        self.direct_routes = frozenset({b"/invocations"} | (
            {self.infer_route.encode("ascii")} if MODEL_NAME.match(settings.model_name)
            else set()))
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.holder = ModelHolder(hooks, settings.model_dir, self.metrics)
        self.batcher = self.make_batcher()
        self.runner = InferenceRunner(self.batcher, self.model_on_this_thread, self.metrics)
        if self.batcher is not None:
            self.runner.return_window = self.batcher.max_delay
        #: which workers of the server have their model (see the worker's accept rule)
        self.ready_markers = WorkerMarkers(settings.metrics_dir, "ready")
        #: which workers have an inference past its timeout (liveness)
        self.stuck_markers = WorkerMarkers(settings.metrics_dir, "stuck")
        self.holder.on_ready = self.ready_markers.mark
        self.body_deadlines = BodyDeadlines()
        self.worker = 0
        self.default_accept = content.media_type(settings.default_accept, content.JSON)
        self.routes: dict[str, dict[str, Callable[[dict[str, Any]], Response]]] = {
            "/ping": {"GET": self.ping, "HEAD": self.ping},
            "/invocations": {"POST": self.invocations},
            "/execution-parameters": {"GET": self.execution_parameters},
            "/metrics": {"GET": self.prometheus_metrics},
            "/v2/health/live": {"GET": self.live},
            "/v2/health/ready": {"GET": self.ready},
        }

    def model_on_this_thread(self) -> Any:
        """The loaded model, its device current on the calling thread (CuPy keeps one a thread)."""
        model = self.holder.require()
        if self.holder.device is not None:
            self.holder.device.use()
        return model

    def make_batcher(self) -> Batcher | None:
        """The dynamic batcher, when ``--max-batch-size`` > 1 and the plugins allow it."""
        if self.settings.max_batch_size <= 1:
            return None
        refusal = self.hooks.batching_refusal()
        if refusal is not None:  # the master has said so at info level
            logger.debug("dynamic batching is off: %s", refusal)
            return None
        return Batcher(self.hooks, self.settings.max_batch_size,
                       self.settings.max_batch_delay_ms / 1000, self.metrics.observe_batch)

    def start(self, worker: int = 0) -> threading.Thread:
        """Begin loading the model for worker number ``worker`` (GPU ``worker mod n``)."""
        from smchainer.device import worker_gpu

        self.worker = worker
        self.metrics.bind_worker(worker)
        device_spec = worker_gpu(worker, self.settings.device)
        self.metrics.observe_device(device_spec)
        logger.info("worker %d: loading the model on %s", worker, device_spec)
        threading.Thread(target=self._watch_liveness, name="smchainer-liveness",
                         daemon=True).start()
        return self.holder.start(device_spec)

    def stuck_for(self) -> float | None:
        """Seconds this worker's inference has run past its timeout and the grace; else None."""
        over = self.runner.running_for() - self.settings.timeout - STUCK_GRACE_SECONDS
        return over if over > 0 else None

    def _watch_liveness(self) -> None:
        """Keep this worker's ``stuck`` marker true to its inference thread."""
        marked = False
        while True:
            stuck = self.stuck_for() is not None
            if stuck != marked:
                (self.stuck_markers.mark if stuck else self.stuck_markers.clear)()
                marked = stuck
                if stuck:
                    logger.error("worker %d: an inference has run %.0f s, past the %s s "
                                 "timeout: /v2/health/live answers 503", self.worker,
                                 self.runner.running_for(), self.settings.timeout)
            time.sleep(LIVENESS_CHECK_SECONDS)

    # -- WSGI ---------------------------------------------------------------

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO", "") or "/"
        try:
            response = self.dispatch(method, path, environ)
        except Exception as error:
            response = self.handle_error(error, method, path)
        status, headers, answer = self.respond(method, path, started, response)
        start_response(status, headers)
        return answer

    def respond(self, method: str, path: str, started: float,
                response: Response) -> tuple[str, list[tuple[str, str]], Answer]:
        """A request's status line, headers and body, its metrics counted."""
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(path, response.status, elapsed)
        body = b"" if method == "HEAD" else response.body
        headers = list(response.headers)
        if response.content_type is not None:
            headers.append(("Content-Type", response.content_type))
        headers.append(("Content-Length", str(len(body))))
        return (status_line(response.status), headers,
                Answer(body, (method, path, response.status, elapsed * 1000, self.worker)))

    # -- the direct path (the worker's event loop, :mod:`.direct`) ------------

    def start_direct(self, environ: dict[str, Any], body: bytes,
                     arrived: float | None = None) -> DirectRequest:
        """Begin an ``/invocations`` request whose body the worker has read, without waiting.

        The same checks, in the same order, as :meth:`invocations`; the
        request comes back answered (a refusal) or with its inference's
        future, for :meth:`finish_direct` once that is done or past its
        deadline: ``--timeout`` from ``arrived`` (:func:`time.monotonic` when
        its head was complete, so that the body's reading counts, as on the
        pool's path), else from now.
        """
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        now = time.monotonic()
        arrived = now if arrived is None else arrived
        # Its time (metrics, access line) counts from the head too, as on the pool's path.
        request = DirectRequest(method, path, time.perf_counter() - (now - arrived))
        try:
            refused = self.refusal(path, environ)
            if refused is not None:
                request.answer = self.respond(method, path, request.started, refused)
                return request
            deadline = arrived + self.settings.timeout
            self.metrics.in_flight.inc()
            try:
                self.check_length(environ)
                model = self.holder.require()
                if path == self.infer_route:
                    request.infer = v2.PendingInfer(
                        body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"))
                    request.future = self.submit_inference(
                        model, b"", content.NPY, [content.NPY], deadline,
                        unwrap=request.infer.unwrap)
                else:
                    content_type, accepts = self.negotiate(environ)
                    request.future = self.submit_inference(model, body, content_type, accepts,
                                                           deadline)
            except BaseException:
                self.metrics.in_flight.dec()
                raise
            request.deadline = deadline
        except Exception as error:
            request.answer = self.respond(method, path, request.started,
                                          self.handle_error(error, method, path))
        return request

    def finish_direct(self, request: DirectRequest) -> tuple[str, list[tuple[str, str]], Answer]:
        """The answer of a started direct request: its inference's, or 504 when not done yet."""
        assert request.future is not None
        self.metrics.in_flight.dec()
        try:
            payload, response_type = self.wait_for(request.future, deadline=0.0)
            if request.infer is not None:
                response = self.infer_answer(request.infer, payload, response_type)
            else:
                response = Response(200, payload, response_type)
        except Exception as error:
            response = self.handle_error(error, request.method, request.path)
        return self.respond(request.method, request.path, request.started, response)

    def answered(self, key: int) -> None:
        """A kept-alive connection (``key``) has its answer; for the batcher
        (:meth:`InferenceRunner.answered`), nothing without batching."""
        if self.batcher is not None:
            self.runner.answered(key)

    def came_back(self, key: int) -> None:
        """The connection ``key`` has its next head (:meth:`InferenceRunner.came_back`)."""
        self.runner.came_back(key)

    def body_on_its_way(self, coming: bool) -> None:
        """A direct request's body is being read (True) or no longer (False).

        For the batcher, which waits for requests on their way, and for the
        in-flight gauge, which counts requests being read too.
        """
        change = 1 if coming else -1
        self.runner.expect(change)
        self.metrics.in_flight.inc(change)

    def dispatch(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        refused = self.refusal(path, environ)
        if refused is not None:
            return refused
        if path == "/v2" or path.startswith("/v2/models/"):
            return self.open_inference(method, path, environ)
        methods = self.routes.get(path)
        if methods is None:
            return error_response(
                f"no such path {path!r}; endpoints: {', '.join(self.routes)}", 404
            )
        handler = methods.get(method)
        if handler is None:
            return self.not_allowed(path, method, ", ".join(methods))
        return handler(environ)

    def refusal(self, path: str, environ: dict[str, Any]) -> Response | None:
        """The 401 when the server wants a token for ``path`` and the request lacks it."""
        if self.settings.auth_token is None or path in OPEN_PATHS:
            return None
        return self.check_token(environ.get("HTTP_AUTHORIZATION"))

    def check_token(self, header: str | None) -> Response | None:
        """None when ``Authorization`` carries the server's bearer token; else the 401."""
        scheme, _, given = (header or "").strip().partition(" ")
        expected = self.settings.auth_token or ""
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              expected.encode()):
            return None
        reason = ("a wrong bearer token" if scheme.lower() == "bearer"
                  else "no bearer token" if not header else "no bearer token (Authorization "
                  "must be 'Bearer <token>')")
        response = error_response(f"this server requires authentication: the request has "
                                  f"{reason}", 401)
        response.headers.append(("WWW-Authenticate", 'Bearer realm="smchainer"'))
        return response

    def handle_error(self, error: Exception, method: str, path: str) -> Response:
        status = http_status_of(error)
        message = describe(error)
        if status >= 500 and status != 503:
            logger.error("%s %s failed: %s", method, path, message, exc_info=error)
        else:
            logger.info("%s %s: %d %s", method, path, status, message)
        detail = None
        if self.settings.debug:
            detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return error_response(message, status, detail)

    # -- endpoints ----------------------------------------------------------

    def ping(self, environ: dict[str, Any]) -> Response:
        self.holder.require()
        return Response(200)

    def live(self, environ: dict[str, Any]) -> Response:
        """Liveness (KServe v2): 503 once any worker's inference runs past its timeout.

        Answered on the worker's event loop, so a stuck inference thread cannot
        keep it from answering; other workers are seen through their ``stuck``
        markers. A dead worker is gunicorn's to replace, not a liveness failure.
        """
        stuck = self.stuck_for()
        others = [pid for pid in self.stuck_markers.live_pids() if pid != os.getpid()]
        if stuck is None and not others:
            return json_response(200, {"live": True})
        reason = (f"worker {self.worker}'s inference has run {self.runner.running_for():.0f} s, "
                  f"past the {self.settings.timeout} s timeout" if stuck is not None
                  else f"{len(others)} worker(s) have an inference past the "
                  f"{self.settings.timeout} s timeout")
        return json_response(503, {"live": False, "error": reason, "status": 503})

    def ready(self, environ: dict[str, Any]) -> Response:
        """Readiness (KServe v2): every worker of the server has its model, and all are live."""
        loaded = len(self.ready_markers.live_pids()) if self.settings.metrics_dir else (
            1 if self.holder.state == "ready" else 0)
        workers = self.settings.workers
        if loaded < workers:
            return json_response(503, {"ready": False, "status": 503,
                                       "error": f"{loaded} of {workers} worker(s) have "
                                       "loaded the model"})
        live = self.live(environ)
        if live.status != 200:
            return json_response(503, {"ready": False, "status": 503,
                                       "error": json.loads(live.body)["error"]})
        return json_response(200, {"ready": True})

    def execution_parameters(self, environ: dict[str, Any]) -> Response:
        body = {
            "MaxConcurrentTransforms": self.settings.workers,
            "BatchStrategy": "MULTI_RECORD",
            "MaxPayloadInMB": self.settings.max_payload_mb,
        }
        return Response(200, json.dumps(body).encode(), "application/json")

    def prometheus_metrics(self, environ: dict[str, Any]) -> Response:
        return Response(200, self.metrics.render().encode(), METRICS_CONTENT_TYPE)

    @contextlib.contextmanager
    def inference_request(self, environ: dict[str, Any]) -> Iterator[Any]:
        """An inference route's model, once the length and the model allow one.

        Counted in flight and, until it is submitted, as arriving (for the
        batcher); 413 from ``Content-Length`` first, then 503 without a model.
        """
        with self.metrics.in_flight.track_inprogress(), self.runner.arriving_request():
            self.check_length(environ)
            yield self.holder.require()

    def invocations(self, environ: dict[str, Any]) -> Response:
        deadline = time.monotonic() + self.settings.timeout
        with self.inference_request(environ) as model:
            content_type, accepts = self.negotiate(environ)
            body = self.read_body(environ)
            future = self.submit_inference(model, body, content_type, accepts, deadline)
            payload, response_type = self.wait_for(future, deadline)
        return Response(200, payload, response_type)

    def negotiate(self, environ: dict[str, Any]) -> tuple[str, list[str]]:
        """The body's media type and the answer's acceptable ones, best first (406 if none)."""
        content_type = content.media_type(
            environ.get("CONTENT_TYPE") or environ.get("HTTP_CONTENTTYPE")
        )
        accepts = content.acceptable_types(environ.get("HTTP_ACCEPT"), self.default_accept,
                                           self.hooks.media_types().encodes)
        return content_type, accepts

    def submit_inference(self, model: Any, body: bytes, content_type: str, accepts: list[str],
                         deadline: float, unwrap: Callable[[], bytes] | None = None
                         ) -> concurrent.futures.Future[Any]:
        """Queue one request for the inference thread: a batching job, else :meth:`infer`.

        With ``unwrap`` the body is what it returns, called on that thread first
        (:class:`~smchainer.serving.v2.PendingInfer`).
        """
        if self.batcher is not None:
            return self.runner.submit(Job(body, content_type, accepts, deadline, unwrap=unwrap))
        return self.runner.submit(
            lambda: self.infer(model, body if unwrap is None else unwrap(), content_type,
                               accepts, deadline))

    def wait_for(self, future: concurrent.futures.Future[Any],
                 deadline: float) -> tuple[bytes, str]:
        """An inference's answer, waited for until ``deadline`` (then 504)."""
        try:
            return future.result(timeout=max(deadline - time.monotonic(), 0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise HTTPError(
                f"inference did not finish within the {self.settings.timeout} s timeout "
                "(--timeout, SAGEMAKER_MODEL_SERVER_TIMEOUT)", 504
            ) from None

    # -- the Open Inference Protocol (KServe v2) -------------------------------

    def open_inference(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        """``/v2`` and ``/v2/models/{name}[/versions/{v}][/ready|/infer]`` (:mod:`.v2`)."""
        if path == "/v2":
            if method != "GET":
                return self.not_allowed(path, method, "GET")
            return json_response(200, {"name": "smchainer", "version": smchainer.__version__,
                                       "extensions": v2.EXTENSIONS})
        parts = path.split("/")[3:]
        name, rest = parts[0], parts[1:]
        if rest[:1] == ["versions"] and len(rest) >= 2:
            rest = rest[2:]
        if name != self.settings.model_name:
            return error_response(f"no model named {name!r}: this server serves "
                                  f"{self.settings.model_name!r} (--model-name)", 404)
        route = "/".join(rest)
        if route not in ("", "ready", "infer"):
            return error_response(f"no such path {path!r}; the model's routes: "
                                  f"/v2/models/{name}, /ready, /infer", 404)
        wanted = "POST" if route == "infer" else "GET"
        if method != wanted:
            return self.not_allowed(path, method, wanted)
        if route == "":
            return json_response(200, v2.model_metadata(name, read_contract(self.holder.model_dir)))
        if route == "ready":
            if self.holder.state != "ready":
                return json_response(503, {"ready": False, "status": 503,
                                           "error": "the model is not loaded"})
            return json_response(200, {"name": name, "ready": True})
        return self.open_inference_infer(environ)

    def open_inference_infer(self, environ: dict[str, Any]) -> Response:
        deadline = time.monotonic() + self.settings.timeout
        with self.inference_request(environ) as model:
            infer = v2.PendingInfer(self.read_body(environ),
                                    environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"))
            future = self.submit_inference(model, b"", content.NPY, [content.NPY], deadline,
                                           unwrap=infer.unwrap)
            payload, response_type = self.wait_for(future, deadline)
        return self.infer_answer(infer, payload, response_type)

    def infer_answer(self, infer: v2.PendingInfer, payload: bytes,
                     response_type: str) -> Response:
        """An ``infer`` request's answer from its ``output_fn``'s npy bytes."""
        if response_type != content.NPY:
            raise NotAcceptable(f"the model's output_fn answered {response_type}, not a "
                                "tensor (application/x-npy)")
        answer, headers = infer.answer(self.settings.model_name, content.decode_npy(payload))
        response = Response(200, answer,
                            "application/octet-stream" if headers else "application/json")
        response.headers.extend(headers)
        return response

    def not_allowed(self, path: str, method: str, allowed: str) -> Response:
        response = error_response(f"{path} does not allow {method}; use {allowed}", 405)
        response.headers.append(("Allow", allowed))
        return response

    # -- the request path ---------------------------------------------------

    def check_length(self, environ: dict[str, Any]) -> None:
        """413 from the Content-Length header, before any of the body is read."""
        header = environ.get("CONTENT_LENGTH")
        if not header:
            return
        try:
            length = int(header)
        except ValueError:
            raise BadRequest(f"Content-Length {header!r} is not a number") from None
        if length > self.settings.max_payload_bytes:
            raise self.too_large(f"{length} bytes")

    def too_large(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body of {size} is over the limit of {self.settings.max_payload_mb} MB "
            f"({self.settings.max_payload_bytes} bytes; SAGEMAKER_MAX_PAYLOAD_IN_MB)"
        )

    def read_body(self, environ: dict[str, Any]) -> bytes:
        """The body; a chunked one is read only up to the limit + 1 byte.

        A body whose framing is broken (a bad chunk size, a missing chunk
        terminator, a client gone mid-body) is a 400; gunicorn then closes the
        connection, as it cannot find where the next request would start.
        """
        from gunicorn.http.errors import NoMoreData, ParseException

        sock = environ.get("gunicorn.socket")
        token = (self.body_deadlines.watch(sock, time.monotonic() + self.settings.client_timeout)
                 if sock is not None else None)
        try:
            body = self._read_body(environ)
        except (ParseException, NoMoreData, OSError) as error:
            if token is not None and not self.body_deadlines.release(token):
                raise self.body_too_late() from None
            raise BadRequest(
                f"the request body could not be read: {type(error).__name__}: {error}"
            ) from None
        if token is not None and not self.body_deadlines.release(token):
            raise self.body_too_late()
        return body

    def body_too_late(self) -> HTTPError:
        return HTTPError(f"the request body did not arrive within {self.settings.client_timeout} "
                         "s (--client-timeout)", 408)

    def late_body(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], Answer]:
        """The 408 of a direct request whose body the worker waited for in vain."""
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        return self.respond(method, path, time.perf_counter(),
                            self.handle_error(self.body_too_late(), method, path))

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        stream = environ["wsgi.input"]
        header = environ.get("CONTENT_LENGTH")
        if header:
            return stream.read(int(header))
        limit = self.settings.max_payload_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = stream.read(min(_READ_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise self.too_large("more than that")

    def infer(self, model: Any, body: bytes, content_type: str, accepts: list[str],
              deadline: float | None = None) -> tuple[bytes, str]:
        """One request through the hooks (:meth:`Hooks.transform`), on this thread's device.

        Past ``deadline`` the caller has answered 504 already: the hooks stop
        at their next check (between hooks, between images) and the thread
        takes the next request.
        """
        if self.holder.device is not None:
            self.holder.device.use()  # CuPy's current device is per thread
        return self.hooks.transform(model, body, content_type, accepts, deadline=deadline)
