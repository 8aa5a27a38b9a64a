"""Prometheus metrics, summed over all of the server's workers, at microseconds a request.

A scrape of ``/metrics`` reaches one worker chosen by the kernel, so metrics
kept per worker would jump between scrapes and look like counter resets.
The server therefore runs ``prometheus_client`` in its multiprocess mode:
``smchainer-serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a folder of its own
before anything imports the library, each worker's updates go to
memory-mapped files there (a few microseconds each, no file rewritten per
request), and whichever worker answers ``/metrics`` merges every file.

- Counters and histograms are summed over every process that ever wrote
  them, dead workers included, so they never go backwards when a worker is
  replaced.
- Per-worker gauges (model load time, loaded or not, the worker's process
  and device) are labelled by worker index and come from its newest
  process; the master drops a dead worker's gauges (:func:`process_exited`).
- Server-wide gauges (requests in flight, requests queued for the model) are
  the sum over the live workers.

Without a folder (an app built in process, as in tests) the same metrics
live in this process's own registry. A user's code that uses
``prometheus_client`` in the server gets the same folder, so its metrics
are served beside these.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Upper bounds of the latency histogram, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upper bounds of the batch histograms: items, and requests, per predict_fn call.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ENDPOINTS = ("/ping", "/invocations", "/execution-parameters", "/metrics", "/v2",
             "/v2/health/live", "/v2/health/ready")
#: The Open Inference Protocol's model routes, labelled without the model's name.
MODEL_ROUTES = {"": "/v2/models/{name}", "ready": "/v2/models/{name}/ready",
                "infer": "/v2/models/{name}/infer"}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a path: a known endpoint or ``other`` (bounded cardinality)."""
    if path in ENDPOINTS:
        return path
    parts = path.split("/")
    if parts[1:3] == ["v2", "models"] and len(parts) >= 4:
        rest = parts[4:]
        if rest[:1] == ["versions"]:
            rest = rest[2:]
        return MODEL_ROUTES.get("/".join(rest), "other")
    return "other"


def use_directory(directory: str | os.PathLike[str]) -> None:
    """Make ``directory`` the multiprocess folder; call before ``prometheus_client`` loads.

    :raises SmchainerError: when ``prometheus_client`` was imported already
        without it, so its values would stay in one process.
    """
    import sys

    from smchainer.errors import SmchainerError

    os.environ[MULTIPROC_ENV] = str(directory)
    values = sys.modules.get("prometheus_client.values")
    if values is not None and "MultiProcess" not in values.ValueClass.__qualname__:
        raise SmchainerError("prometheus_client was imported before the server set its "
                             "multiprocess folder: the workers' metrics could not be summed; "
                             "start the server in a process of its own")


def process_exited(pid: int) -> None:
    """In the master, when a worker has exited: drop its live gauges (its counters stay)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class WorkerMetrics:
    """One worker's figures, written where :meth:`render` (in any worker) sums them.

    :param directory: the multiprocess folder, which must be
        ``PROMETHEUS_MULTIPROC_DIR`` (see :func:`use_directory`); None keeps
        the figures in this process.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, worker: int = 0) -> None:
        if directory is not None:
            use_directory(directory)
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.directory = Path(directory) if directory is not None else None
        self.worker = worker
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("smchainer_requests", "HTTP requests answered by all workers, "
                                "by endpoint and status.", ["endpoint", "status"], registry=r)
        self.duration = Histogram("smchainer_request_duration_seconds",
                                  "Time to answer a request, all workers.", ["endpoint"],
                                  buckets=BUCKETS, registry=r)
        self.inference = Histogram("smchainer_inference_seconds", "Time the inference "
                                   "threads spent on each request or merged batch (hooks "
                                   "only: no HTTP, no queue), all workers.", buckets=BUCKETS,
                                   registry=r)
        self.batch_size = Histogram("smchainer_batch_size", "Items (rows) per predict_fn call, "
                                    "all workers (dynamic batching merges requests).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("smchainer_batch_requests", "Requests per predict_fn "
                                        "call, all workers.", buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("smchainer_requests_in_flight", "Inference requests being "
                               "read, queued or answered, all workers.", registry=r,
                               multiprocess_mode="livesum")
        self.queued = Gauge("smchainer_queue_depth", "Inference requests waiting for their "
                            "worker's inference thread, all workers.", registry=r,
                            multiprocess_mode="livesum")
        self.load_seconds = Gauge("smchainer_model_load_seconds", "Time model_fn took, per "
                                  "worker.", ["worker"], registry=r,
                                  multiprocess_mode="livemostrecent")
        self.loaded = Gauge("smchainer_model_loaded", "1 when the worker's model is loaded, "
                            "else 0.", ["worker"], registry=r, multiprocess_mode="livemostrecent")
        # "liveall": the multiprocess collector adds each process's pid as a label itself.
        self.info = Gauge("smchainer_worker_info", "The process (pid) and device of each "
                          "worker.", ["worker", "device"] if directory is not None
                          else ["worker", "pid", "device"], registry=r,
                          multiprocess_mode="liveall")
        self.device = ""
        #: (endpoint, status) -> its counter and its endpoint's histogram, looked up once
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def bind_worker(self, worker: int) -> None:
        """Take the identity of the current process as worker ``worker`` (after fork)."""
        self.worker = worker
        self.loaded.labels(str(worker)).set(0)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = endpoint_label(path)
        key = (endpoint, str(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(endpoint, str(status)),
                                               self.duration.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, items: int, requests: int) -> None:
        """One ``predict_fn`` call of ``items`` rows for ``requests`` requests."""
        self.batch_size.observe(items)
        self.batch_requests.observe(requests)

    def observe_device(self, device: str) -> None:
        self.device = device
        labels = {"worker": str(self.worker), "device": device}
        if self.directory is None:
            labels["pid"] = str(os.getpid())
        self.info.labels(**labels).set(1)

    def observe_model_load(self, seconds: float, loaded: bool) -> None:
        self.load_seconds.labels(str(self.worker)).set(seconds)
        self.loaded.labels(str(self.worker)).set(int(loaded))

    def render(self) -> str:
        """All workers' metrics in the Prometheus text exposition format."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self.directory is None:
            return generate_latest(self.registry).decode()
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        return generate_latest(registry).decode()
