"""Prometheus metrics, aggregated over all of the server's workers.

A scrape of ``/metrics`` reaches one worker chosen by the kernel, so metrics
kept per worker would jump between scrapes and look like counter resets.
Instead each worker writes a snapshot of its own figures to a file in a
directory the master made (``worker-<pid>.json``, replaced atomically after
every request) and whichever worker answers ``/metrics`` sums them all.
Snapshots of workers that died stay, so counters never go backwards; gauges
(model load time, loaded or not) are per worker index, from its newest
process.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Upper bounds of the latency histogram, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
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


class WorkerMetrics:
    """One worker's figures; thread-safe, flushed to ``directory`` when given."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, worker: int = 0) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.worker = worker
        self.pid = os.getpid()
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: dict[str, dict[str, int]] = {}
        self.histograms: dict[str, dict[str, Any]] = {}
        self.model_load_seconds: float | None = None
        self.model_loaded = 0
        self.device = ""

    def bind_worker(self, worker: int) -> None:
        """Take the identity of the current process as worker ``worker`` (after fork)."""
        with self._lock:
            self.worker = worker
            self.pid = os.getpid()
            self.started = time.time()
        self.flush()

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = endpoint_label(path)
        with self._lock:
            by_status = self.requests.setdefault(endpoint, {})
            by_status[str(status)] = by_status.get(str(status), 0) + 1
            histogram = self.histograms.setdefault(
                endpoint, {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0}
            )
            index = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
            histogram["buckets"][index] += 1
            histogram["sum"] += seconds
            histogram["count"] += 1
        self.flush()

    def observe_device(self, device: str) -> None:
        with self._lock:
            self.device = device
        self.flush()

    def observe_model_load(self, seconds: float, loaded: bool) -> None:
        with self._lock:
            self.model_load_seconds = seconds
            self.model_loaded = int(loaded)
        self.flush()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps({
                "worker": self.worker,
                "pid": self.pid,
                "started": self.started,
                "requests": self.requests,
                "histograms": self.histograms,
                "model_load_seconds": self.model_load_seconds,
                "model_loaded": self.model_loaded,
                "device": self.device,
            }))

    def flush(self) -> None:
        """Write the snapshot for the other workers; failures are logged, never raised."""
        if self.directory is None:
            return
        snapshot = self.snapshot()
        target = self.directory / f"worker-{snapshot['pid']}.json"
        temporary = target.with_suffix(f".tmp{threading.get_ident()}")
        try:
            temporary.write_text(json.dumps(snapshot))
            os.replace(temporary, target)
        except OSError as error:
            logger.warning("cannot write metrics to %s: %s", target, error)

    def collect(self) -> list[dict[str, Any]]:
        """Every worker's snapshot, this one's fresh from memory."""
        mine = self.snapshot()
        snapshots = [mine]
        if self.directory is not None:
            for file in sorted(self.directory.glob("worker-*.json")):
                if file.name == f"worker-{mine['pid']}.json":
                    continue
                try:
                    snapshots.append(json.loads(file.read_text()))
                except (OSError, ValueError) as error:
                    logger.debug("skipping metrics file %s: %s", file, error)
        return snapshots

    def render(self) -> str:
        """All workers' metrics in the Prometheus text exposition format."""
        return render(self.collect())


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(snapshots: list[dict[str, Any]]) -> str:
    """Sum worker snapshots into Prometheus text."""
    requests: dict[tuple[str, str], int] = {}
    histograms: dict[str, dict[str, Any]] = {}
    newest: dict[int, dict[str, Any]] = {}
    for snap in snapshots:
        for endpoint, by_status in snap.get("requests", {}).items():
            for status, count in by_status.items():
                requests[(endpoint, status)] = requests.get((endpoint, status), 0) + count
        for endpoint, hist in snap.get("histograms", {}).items():
            total = histograms.setdefault(
                endpoint, {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0}
            )
            pairs = zip(total["buckets"], hist["buckets"], strict=True)
            total["buckets"] = [a + b for a, b in pairs]
            total["sum"] += hist["sum"]
            total["count"] += hist["count"]
        worker = snap.get("worker", 0)
        if worker not in newest or snap.get("started", 0) > newest[worker].get("started", 0):
            newest[worker] = snap

    lines = [
        "# HELP smchainer_requests_total HTTP requests answered by all workers, "
        "by endpoint and status.",
        "# TYPE smchainer_requests_total counter",
    ]
    for (endpoint, status), count in sorted(requests.items()):
        lines.append(
            f'smchainer_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
        )
    lines += [
        "# HELP smchainer_request_duration_seconds Time to answer a request, all workers.",
        "# TYPE smchainer_request_duration_seconds histogram",
    ]
    for endpoint, hist in sorted(histograms.items()):
        cumulative = 0
        for bound, count in zip((*BUCKETS, math.inf), hist["buckets"], strict=True):
            cumulative += count
            lines.append(
                f'smchainer_request_duration_seconds_bucket{{endpoint="{endpoint}",'
                f'le="{_number(bound)}"}} {cumulative}'
            )
        lines.append(
            f'smchainer_request_duration_seconds_sum{{endpoint="{endpoint}"}} {hist["sum"]!r}'
        )
        lines.append(
            f'smchainer_request_duration_seconds_count{{endpoint="{endpoint}"}} {hist["count"]}'
        )
    lines += [
        "# HELP smchainer_model_load_seconds Time model_fn took, per worker.",
        "# TYPE smchainer_model_load_seconds gauge",
    ]
    for worker, snap in sorted(newest.items()):
        if snap.get("model_load_seconds") is not None:
            lines.append(
                f'smchainer_model_load_seconds{{worker="{worker}"}} {snap["model_load_seconds"]!r}'
            )
    lines += [
        "# HELP smchainer_model_loaded 1 when the worker's model is loaded, else 0.",
        "# TYPE smchainer_model_loaded gauge",
    ]
    for worker, snap in sorted(newest.items()):
        lines.append(f'smchainer_model_loaded{{worker="{worker}"}} {snap.get("model_loaded", 0)}')
    lines += [
        "# HELP smchainer_worker_info The process and device of each worker.",
        "# TYPE smchainer_worker_info gauge",
    ]
    for worker, snap in sorted(newest.items()):
        lines.append(
            f'smchainer_worker_info{{worker="{worker}",pid="{snap.get("pid", "")}",'
            f'device="{snap.get("device", "")}"}} 1'
        )
    return "\n".join(lines) + "\n"
