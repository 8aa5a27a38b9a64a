"""The real ``smchainer-serve`` under a bounded load, against TorchServe, and what serving costs.

Builds a VGG (random weights, saved as the built-in trainer saves its models:
``model.npz`` + ``smchainer-model.json``), starts ``smchainer-serve`` on a
free ``127.0.0.1`` port (its own process group, stopped at the end), and
sends CIFAR-10 test images (real JPEGs from ``test.zip``) to
``/invocations`` from a load generator in this process: ``concurrency``
threads, each with one keep-alive connection, sending the same body until
``--max-requests`` were sent or ``--time-limit`` seconds passed (requests in
flight then finish), so a cell always stops by itself.

Cells: concurrency 1, 4 and 16 for ``application/x-npy`` batches of 1, 10 and
64 images (npy answers) and a JSON batch of 10 (JSON answers, with class
names and probabilities). Each cell reports requests/s, images/s, p50, p95
and p99 latency and the errors (a non-200 status, a broken connection or an
answer of the wrong shape). Each server variant warms every body up before
timing (every worker loads its model first; ONNX Runtime allocates per
shape), then answers one check batch, whose logits are compared with
Chainer's (``max_abs_difference_vs_chainer``: every variant serves the same
network).

Serving overhead: the median latency at concurrency 1 minus the bare
``predict_fn`` time for the same batch, measured in a separate process with
the server's environment (same plugins, same thread counts) on the same
model; ``codec_ms`` is the part spent decoding and encoding in process
(``input_fn`` + ``output_fn``), the rest is HTTP, the server and the queue.
For TorchServe the bare time is the handler's forward pass and its
decode/encode, in a process with the same torch threads.

Variants, all on the same bodies and cells in one record:

- ``onnx``: ``smchainer-serve`` with the ONNX Runtime plugin as installed;
  ``chainer``: with ``SMCHAINER_ONNX=0`` (plain Chainer);
- ``onnx-batched``, ``chainer-batched``: the same with dynamic batching,
  ``--max-batch-size`` and ``--max-batch-delay-ms`` (this script's options of
  those names, default 16 and 5);
- ``torchserve``: TorchServe (:mod:`torchserve_peer`) serving the same weights
  converted to PyTorch eager, at ``/predictions/vgg``, with the same workers
  and threads per worker and a handler that takes and gives smchainer's
  bodies; ``torchserve-batched``: with TorchServe's ``batchSize`` and
  ``maxBatchDelay`` set from the same two options.

``ratios`` in the record: per cell, smchainer / TorchServe for equal batching
(``onnx`` and ``chainer`` against ``torchserve``, the batched ones against
``torchserve-batched``): images/s (above 1: smchainer serves more) and p99
(below 1: smchainer's tail is shorter); and per batched variant, its batch-1
images/s at the highest concurrency over its unbatched twin's, beside the
``ceiling`` no batching could pass there: every worker computing full
batches back to back, timed from the bare ``predict_fn`` at the largest
batch a worker can merge in that cell. TorchServe
needs the ``bench`` extra and Java 11+. Writes one record to
``benchmarks/results/serving_load-<stamp>.json``::

    .venv/bin/python benchmarks/serving_load.py            # VGG-16, the default variants
    .venv/bin/python benchmarks/serving_load.py --quick    # smoke run
    .venv/bin/python benchmarks/serving_load.py --quick --variants onnx torchserve
"""
from __future__ import annotations

import argparse
import functools
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

import smchainer  # noqa: F401  (Chainer's NumPy 2 compat before chainer loads)
from smchainer.api.endpoint import http_get
from smchainer.cli import ArgumentParser, add_common_arguments, run
from smchainer.errors import SmchainerError
from smchainer.serving.settings import CPU_AFFINITY_ENV, DEFAULT_CPU_AFFINITY

NPY = "application/x-npy"
JSON = "application/json"
CONCURRENCY = (1, 4, 16)
NPY_BATCHES = (1, 10, 64)
JSON_BATCH = 10
N_CLASSES = 10
#: Images in the untimed check request every variant answers after its warm-up.
CHECK_BATCH = 10
#: A served answer may differ from Chainer's logits this much (relative to the largest).
CHECK_TOLERANCE = 1e-3
MAX_BATCH_SIZE = 16
MAX_BATCH_DELAY_MS = 5
SMCHAINER = "smchainer"
TORCHSERVE = "torchserve"


@dataclass(frozen=True)
class Variant:
    """One server configuration: which server, which plugin, batched or not."""

    name: str
    server: str
    onnx: str | None = None  # SMCHAINER_ONNX of a smchainer variant
    batched: bool = False

    @property
    def unbatched(self) -> str:
        """The same server without batching."""
        return self.name.removesuffix("-batched")

    @property
    def peer(self) -> str | None:
        """The TorchServe variant with the same batching (None for TorchServe itself)."""
        if self.server == TORCHSERVE:
            return None
        return "torchserve-batched" if self.batched else "torchserve"


VARIANTS = {v.name: v for v in (
    Variant("onnx", SMCHAINER, "1"), Variant("chainer", SMCHAINER, "0"),
    Variant("onnx-batched", SMCHAINER, "1", batched=True),
    Variant("chainer-batched", SMCHAINER, "0", batched=True),
    Variant("torchserve", TORCHSERVE), Variant("torchserve-batched", TORCHSERVE, batched=True),
)}
#: A full run's variants (about 6 minutes on 2 cores, inside ``run_all.py``'s 10 minutes a
#: stage); ``chainer`` and ``chainer-batched`` (2-3 minutes each) on request.
DEFAULT_VARIANTS = ["onnx", "onnx-batched", "torchserve", "torchserve-batched"]


@dataclass
class Body:
    """One kind of request: its content type, what it accepts and its bytes."""

    content_type: str
    accept: str
    batch: int
    data: bytes

    @property
    def name(self) -> str:
        return f"{'npy' if self.content_type == NPY else 'json'}-{self.batch}"


# --- the model and the images ----------------------------------------------------------------

def load_test_images(zip_path: Path, count: int) -> tuple[np.ndarray, list[str]]:
    """``count`` CIFAR-10 test images spread over the classes, float32 in [0, 1]; class names."""
    from smchainer.datasets import decode_members

    if not zip_path.is_file():
        raise SmchainerError(f"CIFAR-10 test images not found at {zip_path} "
                             "(set SMCHAINER_SHARED or --test-zip)")
    with zipfile.ZipFile(zip_path) as archive:
        members = sorted(name for name in archive.namelist()
                         if name.lower().endswith((".jpg", ".jpeg", ".png")))
    if len(members) < count:
        raise SmchainerError(f"{zip_path} holds {len(members)} images, {count} needed")
    class_names = sorted({Path(name).parent.name for name in members})
    step = len(members) // count  # sorted by class folder: a stride visits every class
    chosen = members[::step][:count]
    images = decode_members("zip", str(zip_path), chosen)
    return images.astype(np.float32) / np.float32(255), class_names


def save_vgg(model_dir: Path, depth: int, width: float, class_names: list[str],
             seed: int) -> dict[str, Any]:
    """A VGG with seeded random weights, saved as the built-in trainer saves one."""
    import chainer.links as L

    from smchainer.default_plugins.vgg.hyperparameters import parse_hyperparameters
    from smchainer.default_plugins.vgg.modelfile import save_model
    from smchainer.models.vgg import VGG, count_parameters

    np.random.seed(seed)
    model = VGG(n_classes=len(class_names), width=width, depth=depth)
    rng = np.random.default_rng(seed)
    for link in model.links():  # statistics as a trained model has them, not 0 and 1
        if isinstance(link, L.BatchNormalization):
            link.avg_mean[...] = rng.normal(0.0, 0.2, link.avg_mean.shape)
            link.avg_var[...] = rng.uniform(0.5, 2.0, link.avg_var.shape)
    hp = parse_hyperparameters({"depth": depth, "width": width, "seed": seed})
    save_model(model, model_dir, class_names, hp)
    return {"architecture": "smchainer.models.VGG", "depth": depth, "width": width,
            "parameters": int(count_parameters(model)), "weights": "random (seeded)"}


def ceiling_batch(args: argparse.Namespace) -> int | None:
    """The largest batch a worker can merge in the batched cells, or None without batching.

    At the top concurrency ``c`` with ``w`` workers each worker holds at most
    ``ceil(c / w)`` clients (connections are spread evenly), each with one
    request in flight, and merges at most ``--max-batch-size`` of them.
    """
    if not any(VARIANTS[name].batched for name in args.variants):
        return None
    clients = -(-max(args.concurrency) // args.workers)
    return max(1, min(args.max_batch_size, clients))


def predict_batches(args: argparse.Namespace) -> list[int]:
    """The npy batches the bare ``predict_fn`` is timed at: every cell's and
    :func:`ceiling_batch`'s (for the batching ceiling, see :func:`ratios`)."""
    batches = list(args.npy_batches)
    top = ceiling_batch(args)
    if top is not None and top not in batches:
        batches.append(top)
    return batches


def make_bodies(images: np.ndarray, npy_batches: Sequence[int], json_batch: int) -> list[Body]:
    """The request bodies: npy batches (npy answers) and one JSON batch (JSON answers)."""
    bodies = []
    for batch in npy_batches:
        buffer = io.BytesIO()
        np.save(buffer, images[:batch], allow_pickle=False)
        bodies.append(Body(NPY, NPY, batch, buffer.getvalue()))
    if json_batch:
        data = json.dumps(images[:json_batch].tolist()).encode()
        bodies.append(Body(JSON, JSON, json_batch, data))
    return bodies


def answer_is_valid(body: Body, status: int, data: bytes) -> bool:
    """Whether a response is a 200 with one row of class scores per image."""
    if status != 200:
        return False
    try:
        if body.accept == NPY:
            scores = np.load(io.BytesIO(data), allow_pickle=False)
            return scores.shape == (body.batch, N_CLASSES)
        predictions = json.loads(data)["predictions"]
        return len(predictions) == body.batch and "class" in predictions[0]
    except (ValueError, KeyError, TypeError, IndexError, OSError):
        return False


# --- the load generator ----------------------------------------------------------------------

class ConnectionBroke(Exception):
    """A load client's connection failed (the client reconnects on its next request)."""


class HttpClientConnection:
    """One keep-alive connection through the standard library's ``http.client``.

    Building and parsing each request in Python costs the client about
    0.2-0.3 ms a request more than :class:`CurlConnection` here, on the same
    cores as the server: the ``--client http.client`` of older records.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def post(self, path: str, body: Body, headers: dict[str, str]) -> tuple[float, int, bytes]:
        start = time.perf_counter()
        try:
            self._connection.request("POST", path, body.data, headers)
            response = self._connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()
            raise ConnectionBroke(f"{type(exc).__name__}: {exc}") from exc
        return time.perf_counter() - start, response.status, data

    def close(self) -> None:
        self._connection.close()


class CurlConnection:
    """One keep-alive connection through libcurl (``pycurl``, the bench extra).

    libcurl frames the request and parses the answer in C with the GIL
    released, so the load generator's own cost (which shares this machine's
    cores with the servers) stays small against what it measures.
    """

    def __init__(self, port: int, timeout: float) -> None:
        import pycurl

        self._pycurl = pycurl
        self._port = port
        self._buffer = io.BytesIO()
        self._curl = curl = pycurl.Curl()
        curl.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
        curl.setopt(pycurl.TCP_NODELAY, 1)
        curl.setopt(pycurl.POST, 1)
        curl.setopt(pycurl.WRITEFUNCTION, self._buffer.write)
        self._prepared: tuple[str, int, tuple[tuple[str, str], ...]] | None = None

    def post(self, path: str, body: Body, headers: dict[str, str]) -> tuple[float, int, bytes]:
        pycurl, curl = self._pycurl, self._curl
        key = (path, id(body), tuple(headers.items()))
        if key != self._prepared:
            curl.setopt(pycurl.URL, f"http://127.0.0.1:{self._port}{path}")
            # "Expect:" drops libcurl's 100-continue for large bodies: one round trip, as others
            curl.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()] + ["Expect:"])
            curl.setopt(pycurl.POSTFIELDS, body.data)
            self._prepared = key
        self._buffer.seek(0)
        self._buffer.truncate()
        start = time.perf_counter()
        try:
            curl.perform()
        except pycurl.error as exc:
            raise ConnectionBroke(f"pycurl.error: {exc}") from exc
        elapsed = time.perf_counter() - start
        return elapsed, int(curl.getinfo(pycurl.RESPONSE_CODE)), self._buffer.getvalue()

    def close(self) -> None:
        self._curl.close()


#: ``--client``: the load generator's HTTP client.
CLIENTS = {"curl": CurlConnection, "http.client": HttpClientConnection}


def default_client() -> str:
    """``curl`` where ``pycurl`` is installed (the bench extra), else ``http.client``."""
    try:
        import pycurl  # noqa: F401
    except ImportError:
        return "http.client"
    return "curl"


#: The client of this run (``--client``), set by :func:`main`.
client_kind = "http.client"


def connect(port: int, timeout: float) -> HttpClientConnection | CurlConnection:
    """A new keep-alive connection of this run's client."""
    return CLIENTS[client_kind](port, timeout)


def post_timed(connection: HttpClientConnection | CurlConnection, path: str, body: Body,
               headers: dict[str, str]) -> tuple[float, str | None]:
    """POST ``body``: seconds until the last byte of the answer, and what is wrong with the
    answer (None: a 200 of the right shape), checked after the time is taken.

    :raises ConnectionBroke: when the connection breaks.
    """
    elapsed, status, data = connection.post(path, body, headers)
    if answer_is_valid(body, status, data):
        return elapsed, None
    return elapsed, f"status {status}: {data[:200]!r}"


def run_load(port: int, body: Body, concurrency: int, max_requests: int, time_limit: float,
             request_timeout: float, path: str = "/invocations") -> dict[str, Any]:
    """POST ``body`` to ``path`` from ``concurrency`` threads until ``max_requests``/``time_limit``.

    Returns the cell's figures: requests/s and images/s over the wall time
    (first send to last answer), latency percentiles of the good answers in
    milliseconds (from sending a request to the last byte of its answer; the
    answer's check comes after), and the error count with the first few errors.
    """
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []
    headers = {"Content-Type": body.content_type, "Accept": body.accept}
    ready = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def worker() -> None:
        nonlocal issued
        connection = connect(port, request_timeout)
        ready.wait()
        try:
            while True:
                with lock:
                    if issued >= max_requests or time.perf_counter() >= deadline:
                        return
                    issued += 1
                try:
                    elapsed, problem = post_timed(connection, path, body, headers)
                except ConnectionBroke as exc:  # it reconnects on the next request
                    elapsed, problem = 0.0, str(exc)
                with lock:
                    if problem is None:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu_before = time.process_time()
    started = time.perf_counter()
    deadline = started + time_limit
    ready.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cell: dict[str, Any] = {
        "body": body.name, "content_type": body.content_type, "batch": body.batch,
        "concurrency": concurrency, "requests": issued, "ok": len(latencies),
        "errors": len(errors), "first_errors": errors[:3], "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3) if wall > 0 else None,
        "images_per_s": round(len(latencies) * body.batch / wall, 2) if wall > 0 else None,
        "client_cpu_s": round(time.process_time() - cpu_before, 3),
    }
    if latencies:
        ms = np.array(latencies) * 1000
        cell.update({f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)})
        cell["mean_ms"] = round(float(ms.mean()), 2)
        cell["max_ms"] = round(float(ms.max()), 2)
    return cell


def warm_up(port: int, body: Body, workers: int, request_timeout: float,
            path: str = "/invocations") -> int:
    """Two requests per worker, ``workers`` at a time; returns how many failed."""
    cell = run_load(port, body, workers, 2 * workers, 3600.0, request_timeout, path)
    return cell["errors"]


def check_answer(port: int, path: str, images: np.ndarray, reference: np.ndarray,
                 request_timeout: float) -> dict[str, Any]:
    """One npy request of ``images``; how far its logits are from Chainer's ``reference``."""
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=request_timeout)
    try:
        connection.request("POST", path, buffer.getvalue(), {"Content-Type": NPY, "Accept": NPY})
        response = connection.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        connection.close()
    if response.status != 200:
        return {"ok": False, "error": f"status {response.status}: {data[:200]!r}"}
    try:
        scores = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        return {"ok": False, "error": f"not npy: {exc}"}
    if scores.shape != reference.shape:
        return {"ok": False, "error": f"shape {list(scores.shape)}, not {list(reference.shape)}"}
    difference = float(np.abs(scores.astype(np.float64) - reference).max())
    scale = max(1.0, float(np.abs(reference).max()))
    return {"ok": difference <= CHECK_TOLERANCE * scale, "images": len(images),
            "max_abs_difference_vs_chainer": difference,
            "same_labels": bool((scores.argmax(axis=1) == reference.argmax(axis=1)).all())}


# --- the bare predict_fn, in a process of its own ---------------------------------------------

def measure_predict(model_dir: str, images_file: str, npy_batches: Sequence[int],
                    json_batch: int, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median ``predict_fn`` and whole in-process request (``input_fn`` .. ``output_fn``) times.

    Runs in a child process whose environment is the server's, so the same
    plugins answer with the same thread counts.
    """
    from smchainer.manager import Hooks
    from smchainer.plugins import describe_plugins, get_plugin_manager

    pm = get_plugin_manager()
    hooks = Hooks(pm)
    model = hooks.model_fn(model_dir)
    with np.load(images_file, allow_pickle=False) as stored:
        images = stored["images"]
    bodies = make_bodies(images, npy_batches, json_batch)
    out: dict[str, Any] = {"model_type": type(model).__name__,
                           "runs_onnxruntime": "Onnx" in type(model).__name__,
                           "plugins": [p.get("name") for p in describe_plugins(pm)]}
    times, calls = time_bodies(
        bodies, repeats, decode=lambda body: hooks.input_fn(body.data, body.content_type),
        predict=lambda decoded: hooks.predict_fn(decoded, model),
        request=lambda body: hooks.transform(model, body.data, body.content_type, body.accept))
    out.update(times)
    return out, calls


def time_bodies(bodies: list[Body], repeats: int, decode: Any, predict: Any,
                request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per body: the median ``predict`` of its decoded input and the median whole ``request``.

    Each body is decoded once and requested twice before timing (allocations
    per shape), then timed ``repeats`` times, the two alternating. Also
    returns, per body, a call of ``predict`` on its decoded input (for
    :func:`serve_predicts`).
    """
    out: dict[str, Any] = {}
    calls: dict[str, Any] = {}
    for body in bodies:
        decoded = decode(body)
        calls[body.name] = functools.partial(predict, decoded)
        for _ in range(2):
            request(body)
        predicts, wholes = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(decoded)
            middle = time.perf_counter()
            request(body)
            wholes.append(time.perf_counter() - middle)
            predicts.append(middle - start)
        out[body.name] = {"predict_ms": round(1000 * statistics.median(predicts), 3),
                          "in_process_request_ms": round(1000 * statistics.median(wholes), 3),
                          "repeats": repeats}
    return out, calls


def serve_predicts(calls: dict[str, Any], lines: Any, answer: Any) -> None:
    """The child's loop: per line ``NAME COUNT [GAP]`` of ``lines``, ``answer`` the seconds
    of ``COUNT`` calls of body ``NAME``'s ``predict`` (a JSON list), each after ``GAP``
    seconds asleep when given; ends with ``lines``."""
    for line in lines:
        name, count, *rest = line.split()
        gap = float(rest[0]) if rest else 0.0
        seconds = []
        for _ in range(int(count)):
            if gap:
                time.sleep(gap)
            start = time.perf_counter()
            calls[name]()
            seconds.append(time.perf_counter() - start)
        answer(json.dumps(seconds))


def measure_torch_predict(torch_dir: str, images_file: str, npy_batches: Sequence[int],
                          json_batch: int, repeats: int, threads: int
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """TorchServe's counterpart of :func:`measure_predict`: the handler's own code, in process.

    ``predict_ms`` is the forward pass of the archived network
    (``VGGHandler.predict``), ``in_process_request_ms`` the handler's decode,
    forward pass and encode, with ``threads`` torch threads, as a worker has.
    """
    import torch
    import torchserve_handler as handler

    torch.set_num_threads(threads)
    service = handler.VGGHandler()
    service.network, service.class_names = handler.load_network(torch_dir)
    with np.load(images_file, allow_pickle=False) as stored:
        images = stored["images"]
    bodies = make_bodies(images, npy_batches, json_batch)
    out: dict[str, Any] = {"model_type": type(service.network).__name__,
                           "torch_threads": torch.get_num_threads(),
                           "handler": "torchserve_handler.VGGHandler"}

    def request(body: Body) -> bytes:
        scores = service.predict(handler.decode(body.data, body.content_type))
        return handler.encode(scores, body.accept, service.class_names)[0]

    times, calls = time_bodies(bodies, repeats,
                               decode=lambda body: handler.decode(body.data, body.content_type),
                               predict=service.predict, request=request)
    out.update(times)
    return out, calls


class PredictChild:
    """:func:`measure_predict` (with ``torch_dir``: :func:`measure_torch_predict`) in a child
    process with ``env``, kept for more timed calls (:meth:`predict`) while a server runs."""

    def __init__(self, model_dir: Path, images_file: Path, args: argparse.Namespace,
                 env: dict[str, str], torch_dir: Path | None = None) -> None:
        common = [str(images_file), ",".join(map(str, predict_batches(args))),
                  str(args.json_batch), str(args.predict_repeats)]
        if torch_dir is None:
            command = [sys.executable, __file__, "--measure-predict", str(model_dir), *common]
        else:
            command = [sys.executable, __file__, "--measure-torch-predict", str(torch_dir),
                       *common, str(args.threads)]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        #: the first answer: :func:`time_bodies`' figures and what the model is
        self.first: dict[str, Any] = self._answer()

    def _answer(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            self.stderr.seek(0)
            raise SmchainerError(f"measuring predict_fn failed: {self.stderr.read()[-2000:]}")
        return json.loads(line)

    def predict(self, body: str, count: int, gap: float = 0.0) -> list[float]:
        """Seconds of ``count`` bare calls for ``body``, timed in the child, each after
        ``gap`` seconds asleep (its CPU idle, as a server's between requests)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{body} {count} {gap!r}\n" if gap else f"{body} {count}\n")
        self.process.stdin.flush()
        return list(self._answer())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


# --- one server variant ----------------------------------------------------------------------

def server_environment(variant: str, workers: int, threads: int) -> dict[str, str]:
    """The server's environment: the plugin switch and one set of thread counts per worker."""
    env = dict(os.environ)
    env.update({
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "SMCHAINER_ONNX_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "SMCHAINER_DEVICE": "cpu",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "warning",  # no access-log line per request
    })
    onnx = VARIANTS[variant].onnx
    if onnx is not None:
        env["SMCHAINER_ONNX"] = onnx
    return env


def batching_arguments(args: argparse.Namespace) -> list[str]:
    """The ``smchainer-serve`` options of a batched variant."""
    return ["--max-batch-size", str(args.max_batch_size),
            "--max-batch-delay-ms", str(args.max_batch_delay_ms)]


@functools.lru_cache(maxsize=1)
def serve_help() -> str:
    """``smchainer-serve --help`` (which options this checkout's server has)."""
    done = subprocess.run([sys.executable, "-m", "smchainer.serving.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    return done.stdout


def serve_arguments(variant: Variant, args: argparse.Namespace) -> list[str]:
    """The batching options of a smchainer variant's command line.

    Batched: ``--max-batch-size`` and ``--max-batch-delay-ms`` from this
    script's options (an error when the server has none). Unbatched:
    ``--max-batch-size 1`` where the server batches by default; nothing on a
    server without dynamic batching.
    """
    has_batching = "--max-batch-size" in serve_help()
    if variant.batched:
        missing = [o for o in ("--max-batch-size", "--max-batch-delay-ms") if o not in serve_help()]
        if missing:
            raise SmchainerError(f"smchainer-serve has no {', '.join(missing)} option "
                                 "(dynamic batching is not in this checkout)")
        return batching_arguments(args)
    return ["--max-batch-size", "1"] if has_batching else []


@dataclass
class Server:
    """A started server variant: where to send, and how to stop it."""

    port: int
    path: str
    stop: Any  # () -> what the record keeps about the stop
    log_tail: Any  # () -> list[str]


def start_smchainer(variant: Variant, args: argparse.Namespace, model_dir: Path,
                    env: dict[str, str], result: dict[str, Any]) -> Server:
    """``smchainer-serve`` on a free port (with the batching options for a batched variant)."""
    from smchainer.api.endpoint import LocalEndpoint

    extra = serve_arguments(variant, args)
    result["server_arguments"] = extra

    class Endpoint(LocalEndpoint):
        def command(self) -> list[str]:
            return [*super().command(), *extra]

    endpoint = Endpoint(f"bench-{variant.name}-{os.getpid()}", str(model_dir),
                        workers=args.workers, env=env)
    endpoint.start(timeout=args.start_timeout)
    return Server(endpoint.port, "/invocations",
                  lambda: {"exit_status": endpoint.stop()}, lambda: endpoint.log_tail(10))


def start_torchserve(variant: Variant, args: argparse.Namespace, peer: dict[str, Any],
                     env: dict[str, str], result: dict[str, Any]) -> Server:
    """TorchServe with the archived VGG, the same workers and threads (batched: TorchServe's)."""
    import torchserve_peer

    settings = torchserve_peer.TorchServeSettings(
        workers=args.workers, threads=args.threads,
        batch_size=args.max_batch_size if variant.batched else 1,
        max_batch_delay_ms=args.max_batch_delay_ms if variant.batched else 0,
        response_timeout_s=max(1, int(args.request_timeout)))
    server = torchserve_peer.TorchServe(peer["mar"], settings, env)
    server.start(timeout=args.start_timeout)
    described = server.describe() or {}
    result["torchserve"] = {
        "config": {k: v for k, v in server.config().items()
                   if k not in ("model_store", "initial_worker_port")
                   and not k.endswith("_address")},
        "registered": {k: described.get(k) for k in ("batchSize", "maxBatchDelay",
                                                     "minWorkers", "maxWorkers",
                                                     "responseTimeout")},
        "workers_ready": server.ready_workers(),
        "worker_reports": server.worker_reports(),
        "path": server.path,
    }
    return Server(server.port, server.path, server.stop, lambda: server.log_tail(10))


def run_variant(name: str, args: argparse.Namespace, model_dir: Path, images_file: Path,
                bodies: list[Body], check: tuple[np.ndarray, np.ndarray],
                peer: dict[str, Any] | None, in_process_cache: dict[str, Any]) -> dict[str, Any]:
    """Bare predict_fn times, then the server under every cell's load.

    A batched smchainer variant reuses its unbatched twin's bare times when
    this run measured them (the same model and environment, batching aside).
    """
    variant = VARIANTS[name]
    env = server_environment(name, args.workers, args.threads)
    result: dict[str, Any] = {"variant": name, "server": variant.server,
                              "batched": variant.batched}
    if variant.onnx is not None:
        result["SMCHAINER_ONNX"] = variant.onnx
    if variant.server == TORCHSERVE and (peer is None or "error" in peer):
        result["error"] = (peer or {}).get("error", "TorchServe peer not prepared")
        return result
    key = variant.server + (variant.onnx or "")
    if key in in_process_cache:
        child, result["in_process_from"] = in_process_cache[key]
    else:
        print(f"[{name}] bare predict_fn ...", file=sys.stderr, flush=True)
        torch_dir = peer["torch_dir"] if variant.server == TORCHSERVE and peer else None
        child = PredictChild(model_dir, images_file, args, env, torch_dir)
        in_process_cache[key] = (child, name)
    result["in_process"] = child.first
    started = time.perf_counter()
    try:
        if variant.server == TORCHSERVE:
            assert peer is not None
            server = start_torchserve(variant, args, peer, env, result)
        else:
            server = start_smchainer(variant, args, model_dir, env, result)
    except SmchainerError as error:  # EndpointError and TorchServeError too
        result["error"] = str(error)
        return result
    result["server_start_s"] = round(time.perf_counter() - started, 3)
    cells = []
    try:
        for body in bodies:
            failed = warm_up(server.port, body, args.workers, args.request_timeout, server.path)
            for concurrency in args.concurrency:
                smchainer = variant.server != TORCHSERVE
                before = server_sums(server.port) if smchainer else None
                cell = run_load(server.port, body, concurrency, args.max_requests,
                                args.time_limit, args.request_timeout, server.path)
                if before is not None:
                    cell["inference_threads"] = inference_threads(before,
                                                                  server_sums(server.port))
                cell["warmup_errors"] = failed
                cells.append(cell)
                print(f"[{name}] {body.name:8s} c={concurrency:<3d} "
                      f"{cell['requests_per_s'] or 0:8.2f} req/s {cell['images_per_s'] or 0:9.1f} "
                      f"img/s  p50 {cell.get('p50_ms', float('nan')):8.1f} ms  "
                      f"p99 {cell.get('p99_ms', float('nan')):8.1f} ms  errors {cell['errors']}"
                      + (f"  items/call {cell['inference_threads']['mean_items']}"
                         if "inference_threads" in cell else ""),
                      file=sys.stderr, flush=True)
        if args.overhead_rounds:
            print(f"[{name}] serving overhead, interleaved with the bare predict_fn ...",
                  file=sys.stderr, flush=True)
            result["interleaved"] = interleaved_overhead(
                server.port, server.path, child, bodies, result["in_process"], args,
                reads_metrics=variant.server != TORCHSERVE)
        result["answer_check"] = check_answer(server.port, server.path, check[0], check[1],
                                              args.request_timeout)
    finally:
        if not cells:
            result["server_log_tail"] = server.log_tail()
        stopped = server.stop()
        result["server_exit_status"] = stopped.get("exit_status")
        if variant.server == TORCHSERVE:
            result["torchserve"]["stop"] = stopped
    result["cells"] = cells
    result["overhead"] = overhead(cells, result["in_process"], result.get("interleaved"))
    return result


#: Seconds each side of a round of :func:`interleaved_overhead` aims to take.
ROUND_SECONDS = 0.3
#: Calls each side of a round at most.
ROUND_CALLS = 25
#: Calls each side of a round makes first, untimed: the other side just had the CPU.
ROUND_WARM = 2
#: Seconds the bare ``predict_fn`` sleeps before each call on the idle side of a round: about
#: what a server's CPU idles between requests at concurrency 1 (the round trip and the
#: client's turn).
IDLE_GAP_S = 0.001


def interleaved_overhead(port: int, path: str, child: PredictChild, bodies: list[Body],
                         in_process: dict[str, Any], args: argparse.Namespace,
                         reads_metrics: bool) -> dict[str, Any]:
    """Served latency and the bare ``predict_fn`` in alternating rounds, per body.

    On this kind of machine a model's own speed drifts by several per cent
    within seconds, more than the serving overhead at batch 1; timed at
    different moments, the two medians differ by that drift too. Here each
    of ``--overhead-rounds`` rounds times ``calls`` bare calls in the
    :class:`PredictChild` and ``calls`` requests at concurrency 1 to the
    server (one keep-alive connection; each answer checked after its time
    is taken), the order of the two swapped every round, so both medians
    come from the same minutes. Each side first makes :data:`ROUND_WARM`
    untimed calls, as the other side has just had the CPU and its caches.
    A third side times the bare calls each after :data:`IDLE_GAP_S` asleep
    (``predict_after_idle_ms``): a server's CPU idles between requests, and
    a model called after an idle CPU runs slower than in a tight loop (cold
    caches, a woken virtual CPU), which the served time includes too.
    ``calls`` makes a side about :data:`ROUND_SECONDS`;
    ``overhead_ms_rounds`` is each round's median difference, which shows
    the spread. With ``reads_metrics`` (smchainer-serve) the server's
    inference threads' mean time over these requests is read from its
    ``/metrics``.
    """
    out: dict[str, Any] = {}
    for body in bodies:
        first = in_process.get(body.name)
        if first is None:
            continue
        calls = max(1, min(ROUND_CALLS, round(ROUND_SECONDS * 1000 / max(first["predict_ms"],
                                                                         0.01))))
        before = server_sums(port) if reads_metrics else None
        figures = interleave(port, path, child, body, calls, args.overhead_rounds,
                             args.request_timeout)
        if before is not None:
            threads = inference_threads(before, server_sums(port))
            figures["in_server_inference_ms"] = threads["inference_ms"]
        out[body.name] = figures
    return out


def interleave(port: int, path: str, child: PredictChild, body: Body, calls: int,
               rounds: int, timeout: float) -> dict[str, Any]:
    """One body's rounds of :func:`interleaved_overhead`."""
    headers = {"Content-Type": body.content_type, "Accept": body.accept}
    connection = connect(port, timeout)
    bare: list[float] = []
    idle: list[float] = []
    served: list[float] = []
    differences: list[float] = []
    errors: list[str] = []

    def bare_side() -> list[float]:
        return child.predict(body.name, ROUND_WARM + calls)[ROUND_WARM:]

    def idle_side() -> None:
        idle.extend(child.predict(body.name, ROUND_WARM + calls, IDLE_GAP_S)[ROUND_WARM:])

    def served_side() -> list[float]:
        seconds = []
        for call in range(ROUND_WARM + calls):
            elapsed, problem = post_timed(connection, path, body, headers)
            if problem is not None:
                errors.append(problem)
            elif call >= ROUND_WARM:
                seconds.append(elapsed)
        return seconds

    try:
        for number in range(rounds):
            if number % 2 == 0:
                round_bare, round_served = bare_side(), served_side()
                idle_side()
            else:
                idle_side()
                round_served, round_bare = served_side(), bare_side()
            bare += round_bare
            served += round_served
            if round_served:
                differences.append(round(1000 * (statistics.median(round_served)
                                                 - statistics.median(round_bare)), 3))
    except ConnectionBroke as exc:
        errors.append(str(exc))
    finally:
        connection.close()
    figures: dict[str, Any] = {"rounds": rounds, "calls_per_round": calls,
                               "errors": len(errors), "first_errors": errors[:3]}
    if served and bare:
        figures.update({
            "served_p50_ms": round(1000 * statistics.median(served), 3),
            "predict_ms": round(1000 * statistics.median(bare), 3),
            "overhead_ms_rounds": differences,
        })
    if idle:
        figures["predict_after_idle_ms"] = round(1000 * statistics.median(idle), 3)
        figures["idle_gap_ms"] = 1000 * IDLE_GAP_S
    return figures


#: Sums in smchainer-serve's /metrics that say what its inference threads did.
SERVER_SUMS = ("smchainer_batch_size_sum", "smchainer_batch_size_count",
               "smchainer_batch_requests_sum", "smchainer_inference_seconds_sum",
               "smchainer_inference_seconds_count")


def server_sums(port: int) -> dict[str, float]:
    """:data:`SERVER_SUMS` from smchainer-serve's ``/metrics`` (all workers summed)."""
    status, text = http_get(port, "/metrics", timeout=10)
    if status != 200:
        raise SmchainerError(f"GET /metrics on port {port} answered {status or 'nothing'}")
    sums = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in SERVER_SUMS:
            sums[name] = float(value)
    return sums


def inference_threads(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server's inference threads did during one cell, from its /metrics.

    ``mean_items``/``mean_requests``: per ``predict_fn`` call of the batcher
    (1 and 1 without merging); ``inference_ms``: the mean time an inference
    thread spent on one unit of work (a request, or a merged batch), hooks
    only, so ``p50 - inference_ms`` at concurrency 1 is what HTTP and the
    queue cost, read from the server itself.
    """
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in SERVER_SUMS}
    calls = delta["smchainer_batch_size_count"]
    units = delta["smchainer_inference_seconds_count"]
    return {
        "predict_calls": int(calls),
        "mean_items": round(delta["smchainer_batch_size_sum"] / calls, 3) if calls else None,
        "mean_requests": (round(delta["smchainer_batch_requests_sum"] / calls, 3)
                          if calls else None),
        "inference_ms": (round(1000 * delta["smchainer_inference_seconds_sum"] / units, 3)
                         if units else None),
    }


def overhead(cells: list[dict[str, Any]], in_process: dict[str, Any],
             interleaved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per body: the served p50 at concurrency 1 minus the bare predict_fn time (and its split).

    From the :func:`interleaved_overhead` rounds where they ran
    (``"method": "interleaved"``); else the concurrency-1 load cell's p50
    against the child's first timing (``"method": "cell"``). ``codec_ms``
    (decoding and encoding in process) is from the child's first timing
    either way.
    """
    out = {}
    for cell in cells:
        first = in_process.get(cell["body"])
        if cell["concurrency"] != 1 or first is None or "p50_ms" not in cell:
            continue
        mixed = (interleaved or {}).get(cell["body"], {})
        if "served_p50_ms" in mixed:
            served, predict = mixed["served_p50_ms"], mixed["predict_ms"]
            threads_ms = mixed.get("in_server_inference_ms")
            figures: dict[str, Any] = {"method": "interleaved", "cell_p50_ms": cell["p50_ms"]}
        else:
            served, predict = cell["p50_ms"], first["predict_ms"]
            threads_ms = (cell.get("inference_threads") or {}).get("inference_ms")
            figures = {"method": "cell"}
        codec = first["in_process_request_ms"] - first["predict_ms"]
        figures.update({
            "served_p50_ms": served,
            "predict_ms": predict,
            "overhead_ms": round(served - predict, 3),
            "overhead_share": round((served - predict) / served, 4),
            "codec_ms": round(codec, 3),
            "http_and_server_ms": round(served - predict - codec, 3),
        })
        if "predict_after_idle_ms" in mixed:
            # What serving adds beyond the model's own slowdown after an idle CPU.
            figures["predict_after_idle_ms"] = mixed["predict_after_idle_ms"]
            figures["overhead_vs_idle_predict_ms"] = round(
                served - mixed["predict_after_idle_ms"], 3)
        if threads_ms is not None:
            # Read from the server itself: its threads' own time on each request.
            figures["in_server_inference_ms"] = threads_ms
            figures["http_and_queue_ms"] = round(served - threads_ms, 3)
        out[cell["body"]] = figures
    return out


# --- ratios between variants ----------------------------------------------------------------

def _ratio(numerator: Any, denominator: Any) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 4)


def batching_ceiling(in_process: dict[str, Any], workers: int, batch: int | None,
                     unbatched_images_per_s: float | None) -> dict[str, Any] | None:
    """The most any batching could serve here, from the bare ``predict_fn`` alone.

    Every busy worker (``workers``: the server's, or fewer when fewer clients
    were there to keep them busy) computing batches of ``batch``
    (:func:`ceiling_batch`) back to back, with no serving cost and no pause
    between batches: ``workers * batch / predict_ms(batch)`` images/s. ``over_unbatched``
    divides that by the unbatched server's measured images/s: no batcher
    can beat that ratio on this machine and model. It is an upper bound
    (both workers computing at once may each run slower than the bare
    ``predict_fn``, timed alone); ``bare_batch_scaling`` is the model's own
    images/s at ``batch`` over batch 1.
    """
    if not batch:
        return None
    single = (in_process.get("npy-1") or {}).get("predict_ms")
    merged = (in_process.get(f"npy-{batch}") or {}).get("predict_ms")
    if not single or not merged:
        return None
    images_per_s = workers * batch * 1000 / merged
    return {"batch": batch, "workers": workers, "bare_predict_ms": merged,
            "images_per_s": round(images_per_s, 2),
            "bare_batch_scaling": _ratio(batch / merged, 1 / single),
            "over_unbatched": _ratio(images_per_s, unbatched_images_per_s)}


def ratios(variants: list[dict[str, Any]], workers: int = 1,
           batch: int | None = None) -> dict[str, Any]:
    """smchainer / TorchServe per cell at equal batching, and batched / unbatched at batch 1.

    ``smchainer_over_torchserve``: one row per smchainer variant, body and
    concurrency whose TorchServe peer (``torchserve`` or
    ``torchserve-batched``) ran the same cell: ``images_per_s`` (above 1:
    smchainer serves more) and ``p99_ms`` (below 1: its tail is shorter).
    ``batched_over_unbatched``: per batched variant whose unbatched twin ran,
    the ``npy-1`` images/s at the highest concurrency both measured, and the
    ``ceiling`` of any batching there (:func:`batching_ceiling`, for
    ``workers`` workers merging up to ``batch`` requests).
    """
    by_name = {v["variant"]: v for v in variants if "error" not in v}
    cells = {name: {(c["body"], c["concurrency"]): c for c in v.get("cells", [])}
             for name, v in by_name.items()}
    versus = []
    for name in by_name:
        peer = VARIANTS[name].peer
        if peer is None or peer not in by_name:
            continue
        for key, cell in cells[name].items():
            other = cells[peer].get(key)
            if other is None:
                continue
            versus.append({"smchainer": name, "torchserve": peer, "body": key[0],
                           "concurrency": key[1],
                           "images_per_s": _ratio(cell.get("images_per_s"),
                                                  other.get("images_per_s")),
                           "p99_ms": _ratio(cell.get("p99_ms"), other.get("p99_ms"))})
    batched = {}
    for name in by_name:
        variant = VARIANTS[name]
        if not variant.batched or variant.unbatched not in by_name:
            continue
        shared = [c for (body, c) in cells[name]
                  if body == "npy-1" and ("npy-1", c) in cells[variant.unbatched]]
        if not shared:
            continue
        top = max(shared)
        unbatched = cells[variant.unbatched][("npy-1", top)].get("images_per_s")
        batched[f"{name}/{variant.unbatched}"] = {
            "body": "npy-1", "concurrency": top,
            "images_per_s": _ratio(cells[name][("npy-1", top)].get("images_per_s"), unbatched),
            "ceiling": batching_ceiling(by_name[name].get("in_process") or {},
                                        min(workers, top), batch, unbatched),
        }
    return {"smchainer_over_torchserve": versus, "batched_over_unbatched": batched}


# --- the command -----------------------------------------------------------------------------

def chainer_logits(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """The served model's logits for ``images``, by Chainer (what every variant must answer)."""
    import chainer

    from smchainer.default_plugins.vgg.modelfile import load_model

    model = load_model(model_dir)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(images).array.astype(np.float64)


def prepare_torchserve(model_dir: Path, folder: Path, class_names: list[str],
                       check_images: np.ndarray) -> dict[str, Any]:
    """The served model converted to PyTorch eager and archived; or ``{"error": why}``."""
    import torchserve_peer

    reason = torchserve_peer.missing_reason()
    if reason is not None:
        return {"error": f"TorchServe cannot run: {reason}"}
    from smchainer.default_plugins.vgg.modelfile import load_model

    print("[torchserve] converting and archiving the model ...", file=sys.stderr, flush=True)
    return torchserve_peer.archive_vgg(load_model(model_dir), class_names, folder,
                                       check_images=check_images)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Images, model, then every server variant; the whole record."""
    record = benchlib.context("serving_load", args.quick)
    images, class_names = load_test_images(args.test_zip, max(*predict_batches(args),
                                                              args.json_batch, CHECK_BATCH))
    bodies = make_bodies(images, args.npy_batches, args.json_batch)
    with tempfile.TemporaryDirectory(prefix="smchainer-serving-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        record["model"] = save_vgg(model_dir, args.depth, args.width, class_names, args.seed)
        images_file = Path(tmp) / "images.npz"
        np.savez(images_file, images=images)
        check = (images[:CHECK_BATCH], chainer_logits(model_dir, images[:CHECK_BATCH]))
        record["settings"] = {
            "workers": args.workers, "threads_per_worker": args.threads,
            "server_threads": "smchainer-serve default (gthread)",
            # smchainer-serve binds each worker to its own CPUs unless told not to; the
            # TorchServe peer and the bare predict_fn process are not bound.
            "cpu_affinity": os.environ.get(CPU_AFFINITY_ENV, "").strip() or DEFAULT_CPU_AFFINITY,
            "concurrency": list(args.concurrency), "max_requests": args.max_requests,
            "time_limit_s": args.time_limit, "request_timeout_s": args.request_timeout,
            "predict_repeats": args.predict_repeats, "overhead_rounds": args.overhead_rounds,
            "bodies": {b.name: {"bytes": len(b.data), "content_type": b.content_type,
                                "accept": b.accept} for b in bodies},
            "images": f"{args.test_zip.name}: {len(images)} CIFAR-10 test images",
            "load_generator": f"Python threads, one keep-alive {client_kind} connection each",
            "batching": {"max_batch_size": args.max_batch_size,
                         "max_batch_delay_ms": args.max_batch_delay_ms,
                         # smchainer's limit counts rows (images), TorchServe's requests:
                         # the same at batch 1, not for the larger bodies
                         "smchainer": " ".join(batching_arguments(args)) + " (rows)",
                         "smchainer_unbatched": "--max-batch-size 1",
                         "torchserve": f"batchSize={args.max_batch_size} (requests), "
                                       f"maxBatchDelay={args.max_batch_delay_ms} ms",
                         "torchserve_unbatched": "batchSize=1, maxBatchDelay=0"},
            "check_batch": CHECK_BATCH,
        }
        peer = None
        variants = list(args.variants)
        if any(VARIANTS[v].server == TORCHSERVE for v in variants):
            try:
                peer = prepare_torchserve(model_dir, Path(tmp) / "torchserve", class_names,
                                          check[0])
            except SmchainerError as error:
                peer = {"error": str(error)}
            record["torchserve_peer"] = {
                k: v for k, v in peer.items()
                if k not in ("mar", "torch_dir", "check_images", "reference_logits")}
            import torchserve_peer

            record["torchserve_peer"]["versions"] = torchserve_peer.versions()
            if "error" in peer and not args.variants_given:
                # the default set without the bench extra or Java: left out, not failed
                skipped = [v for v in variants if VARIANTS[v].server == TORCHSERVE]
                record["skipped_variants"] = {v: peer["error"] for v in skipped}
                variants = [v for v in variants if v not in skipped]
                print(f"[torchserve] skipped: {peer['error']}", file=sys.stderr, flush=True)
        cache: dict[str, Any] = {}
        try:
            record["variants"] = [run_variant(v, args, model_dir, images_file, bodies, check,
                                              peer, cache) for v in variants]
        finally:
            for child, _ in cache.values():
                child.close()
        record["ratios"] = ratios(record["variants"], args.workers, ceiling_batch(args))
    return benchlib.finish(record)


def build_parser() -> ArgumentParser:
    """The command line (``--help`` lists it)."""
    parser = ArgumentParser(prog="serving_load", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 requests or 1 s per cell, a width-0.125 VGG-8, "
                        "the onnx variant only (explicit options win)")
    parser.add_argument("--depth", type=int, choices=(8, 11, 13, 16, 19), default=None,
                        help="VGG depth (default 16)")
    parser.add_argument("--width", type=benchlib.positive(float), default=None,
                        help="VGG width multiplier (default 1.0)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="onnx: smchainer-serve with the ONNX Runtime plugin as installed; "
                        "chainer: SMCHAINER_ONNX=0; X-batched: with --max-batch-size and "
                        "--max-batch-delay-ms; torchserve(-batched): TorchServe with the same "
                        f"weights in PyTorch eager (default {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--max-batch-size", type=benchlib.positive(int), default=MAX_BATCH_SIZE,
                        help="batched variants: smchainer-serve's --max-batch-size and "
                        f"TorchServe's batchSize (default {MAX_BATCH_SIZE})")
    parser.add_argument("--max-batch-delay-ms", type=benchlib.positive(int),
                        default=MAX_BATCH_DELAY_MS,
                        help="batched variants: smchainer-serve's --max-batch-delay-ms and "
                        f"TorchServe's maxBatchDelay (default {MAX_BATCH_DELAY_MS})")
    parser.add_argument("--concurrency", type=benchlib.positive(int), nargs="+",
                        default=list(CONCURRENCY))
    parser.add_argument("--npy-batches", type=benchlib.positive(int), nargs="+",
                        default=list(NPY_BATCHES))
    parser.add_argument("--json-batch", type=int, default=JSON_BATCH,
                        help="images in the JSON body (0: no JSON cells)")
    parser.add_argument("--max-requests", type=benchlib.positive(int), default=None,
                        help="requests per cell at most (default 200)")
    parser.add_argument("--time-limit", type=benchlib.positive(float), default=None,
                        help="seconds per cell after which no request is sent (default 5)")
    parser.add_argument("--request-timeout", type=benchlib.positive(float), default=120.0)
    parser.add_argument("--client", choices=sorted(CLIENTS), default=None,
                        help="the load generator's HTTP client, for every server alike "
                             "(default curl where pycurl is installed, else http.client)")
    parser.add_argument("--workers", type=benchlib.positive(int), default=None,
                        help="server workers (default: the CPUs available)")
    parser.add_argument("--threads", type=benchlib.positive(int), default=None,
                        help="BLAS / ONNX Runtime threads per worker (default CPUs // workers)")
    parser.add_argument("--predict-repeats", type=benchlib.positive(int), default=None,
                        help="timed in-process predict_fn calls per body (default 25)")
    parser.add_argument("--overhead-rounds", type=int, default=None,
                        help="rounds of the interleaved overhead measurement per body, each "
                        "bare predict_fn calls then as many served requests (or the other "
                        "way round) at concurrency 1 (default 10; --quick 2; 0: none, the "
                        "overhead then comes from the concurrency-1 cell)")
    parser.add_argument("--start-timeout", type=benchlib.positive(float), default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-zip", type=Path,
                        default=benchlib.cifar10_folder() / "test.zip",
                        help="CIFAR-10 test.zip (default $SMCHAINER_SHARED/data/cifar10)")
    parser.add_argument("--output-dir", type=Path, default=benchlib.RESULTS,
                        help="where the JSON record goes (default benchmarks/results)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` and fill in the defaults of a full or ``--quick`` run."""
    args = build_parser().parse_args(argv)
    quick = args.quick
    args.variants_given = args.variants is not None
    defaults = {"depth": 8 if quick else 16, "width": 0.125 if quick else 1.0,
                "variants": ["onnx"] if quick else list(DEFAULT_VARIANTS),
                "max_requests": 32 if quick else 200, "time_limit": 1.0 if quick else 5.0,
                "predict_repeats": 3 if quick else 25, "overhead_rounds": 2 if quick else 10,
                "workers": benchlib.cpus_available()}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads is None:
        args.threads = max(1, benchlib.cpus_available() // args.workers)
    if args.json_batch < 0:
        raise SmchainerError("--json-batch must not be negative")
    if args.overhead_rounds < 0:
        raise SmchainerError("--overhead-rounds must not be negative")
    args.variants = list(dict.fromkeys(args.variants))  # each once, in the order given
    if args.client is None:
        args.client = default_client()
    elif args.client == "curl" and default_client() != "curl":
        raise SmchainerError("--client curl needs pycurl (make install EXTRAS=dev,bench)")
    return args


def fmt_ratio(value: float | None) -> str:
    """A ratio for the summary lines (``-`` when one side has no figure)."""
    return "-" if value is None else f"{value:6.3f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its record; 0, or 1 when a server variant failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--measure-predict"], ["--measure-torch-predict"]):  # a PredictChild
        answers = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # anything a library prints goes to stderr, not into the answers
        if argv[0] == "--measure-predict":
            model_dir, images_file, npy_batches, json_batch, repeats = argv[1:6]
            figures, calls = measure_predict(model_dir, images_file,
                                             [int(b) for b in npy_batches.split(",") if b],
                                             int(json_batch), int(repeats))
        else:
            torch_dir, images_file, npy_batches, json_batch, repeats, threads = argv[1:7]
            figures, calls = measure_torch_predict(
                torch_dir, images_file, [int(b) for b in npy_batches.split(",") if b],
                int(json_batch), int(repeats), int(threads))

        def answer(text: str) -> None:
            answers.write(text + "\n")
            answers.flush()

        answer(json.dumps(figures))
        serve_predicts(calls, sys.stdin, answer)
        return 0

    def body() -> int:
        global client_kind
        args = parse_args(argv)
        client_kind = args.client
        record = benchmark(args)
        path = benchlib.write_record(record, args.output_dir, "serving_load")
        for variant in record["variants"]:
            if "error" in variant:
                print(f"{variant['variant']}: {variant['error']}")
                continue
            for name, figures in variant["overhead"].items():
                print(f"{variant['variant']:18s} {name:8s} served p50 "
                      f"{figures['served_p50_ms']:8.1f} ms, predict_fn "
                      f"{figures['predict_ms']:8.1f} ms, overhead "
                      f"{figures['overhead_ms']:7.1f} ms")
            check = variant.get("answer_check", {})
            if check and not check.get("ok"):
                print(f"{variant['variant']}: answers differ from Chainer's: {check}")
        for row in record["ratios"]["smchainer_over_torchserve"]:
            print(f"{row['smchainer']:14s} / {row['torchserve']:18s} {row['body']:8s} "
                  f"c={row['concurrency']:<3d} images/s {fmt_ratio(row['images_per_s'])}  "
                  f"p99 {fmt_ratio(row['p99_ms'])}")
        for pair, row in record["ratios"]["batched_over_unbatched"].items():
            ceiling = row.get("ceiling") or {}
            print(f"{pair}: {row['body']} c={row['concurrency']} images/s "
                  f"{fmt_ratio(row['images_per_s'])} (any batching at most "
                  f"{fmt_ratio(ceiling.get('over_unbatched'))})")
        print(f"record: {path}")
        failed = [v["variant"] for v in record["variants"] if "error" in v]
        if failed:
            raise SmchainerError(f"server variant(s) {', '.join(failed)} did not start")
        wrong = [v["variant"] for v in record["variants"]
                 if not v.get("answer_check", {}).get("ok")]
        if wrong:
            raise SmchainerError(f"server variant(s) {', '.join(wrong)} answered the check "
                                 "batch wrongly")
        return 0

    return run(body, lambda: "--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
