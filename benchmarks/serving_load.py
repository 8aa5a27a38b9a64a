"""The real ``smchainer-serve`` under a bounded load, and what serving costs on top of the model.

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
shape).

Serving overhead: the median latency at concurrency 1 minus the bare
``predict_fn`` time for the same batch, measured in a separate process with
the server's environment (same plugins, same thread counts) on the same
model; ``codec_ms`` is the part spent decoding and encoding in process
(``input_fn`` + ``output_fn``), the rest is HTTP, gunicorn and the queue.

Variants: with the ONNX Runtime plugin as installed, and with
``SMCHAINER_ONNX=0`` (plain Chainer); ``--variants onnx`` or ``chainer`` runs
one. Writes one record to ``benchmarks/results/serving_load-<stamp>.json``::

    .venv/bin/python benchmarks/serving_load.py            # VGG-16, both variants
    .venv/bin/python benchmarks/serving_load.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
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
from smchainer.cli import ArgumentParser, add_common_arguments, run
from smchainer.errors import SmchainerError

NPY = "application/x-npy"
JSON = "application/json"
VARIANTS = {"onnx": "1", "chainer": "0"}  # value of SMCHAINER_ONNX
CONCURRENCY = (1, 4, 16)
NPY_BATCHES = (1, 10, 64)
JSON_BATCH = 10
N_CLASSES = 10


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

def run_load(port: int, body: Body, concurrency: int, max_requests: int, time_limit: float,
             request_timeout: float) -> dict[str, Any]:
    """Send ``body`` from ``concurrency`` threads until ``max_requests`` or ``time_limit``.

    Returns the cell's figures: requests/s and images/s over the wall time
    (first send to last answer), latency percentiles of the good answers in
    milliseconds, and the error count with the first few errors.
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
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=request_timeout)
        ready.wait()
        try:
            while True:
                with lock:
                    if issued >= max_requests or time.perf_counter() >= deadline:
                        return
                    issued += 1
                start = time.perf_counter()
                try:
                    connection.request("POST", "/invocations", body.data, headers)
                    response = connection.getresponse()
                    data = response.read()
                    ok = answer_is_valid(body, response.status, data)
                    problem = f"status {response.status}: {data[:200]!r}"
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()  # reconnects on the next request
                    ok, problem = False, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    if ok:
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


def warm_up(port: int, body: Body, workers: int, request_timeout: float) -> int:
    """Two requests per worker, ``workers`` at a time; returns how many failed."""
    cell = run_load(port, body, workers, 2 * workers, 3600.0, request_timeout)
    return cell["errors"]


# --- the bare predict_fn, in a process of its own ---------------------------------------------

def measure_predict(model_dir: str, images_file: str, npy_batches: Sequence[int],
                    json_batch: int, repeats: int) -> dict[str, Any]:
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
    for body in bodies:
        decoded = hooks.input_fn(body.data, body.content_type)
        for _ in range(2):
            hooks.transform(model, body.data, body.content_type, body.accept)
        predict, whole = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            hooks.predict_fn(decoded, model)
            middle = time.perf_counter()
            hooks.transform(model, body.data, body.content_type, body.accept)
            whole.append(time.perf_counter() - middle)
            predict.append(middle - start)
        out[body.name] = {"predict_ms": round(1000 * statistics.median(predict), 3),
                          "in_process_request_ms": round(1000 * statistics.median(whole), 3),
                          "repeats": repeats}
    return out


def bare_predict(model_dir: Path, images_file: Path, args: argparse.Namespace,
                 env: dict[str, str]) -> dict[str, Any]:
    """Run :func:`measure_predict` in a child process with ``env``; its JSON answer."""
    done = subprocess.run(
        [sys.executable, __file__, "--measure-predict", str(model_dir), str(images_file),
         ",".join(map(str, args.npy_batches)), str(args.json_batch), str(args.predict_repeats)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if done.returncode != 0:
        raise SmchainerError(f"measuring predict_fn failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- one server variant ----------------------------------------------------------------------

def server_environment(variant: str, workers: int, threads: int) -> dict[str, str]:
    """The server's environment: the plugin switch and one set of thread counts per worker."""
    env = dict(os.environ)
    env.update({
        "SMCHAINER_ONNX": VARIANTS[variant],
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
        "SMCHAINER_ONNX_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "SMCHAINER_DEVICE": "cpu",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "warning",  # no access-log line per request
    })
    return env


def run_variant(variant: str, args: argparse.Namespace, model_dir: Path, images_file: Path,
                bodies: list[Body]) -> dict[str, Any]:
    """Bare predict_fn times, then the server under every cell's load."""
    from smchainer.api.endpoint import EndpointError, LocalEndpoint

    env = server_environment(variant, args.workers, args.threads)
    result: dict[str, Any] = {"variant": variant, "SMCHAINER_ONNX": VARIANTS[variant]}
    print(f"[{variant}] bare predict_fn ...", file=sys.stderr, flush=True)
    result["in_process"] = bare_predict(model_dir, images_file, args, env)
    endpoint = LocalEndpoint(f"bench-{variant}-{os.getpid()}", str(model_dir),
                             workers=args.workers, env=env)
    started = time.perf_counter()
    try:
        endpoint.start(timeout=args.start_timeout)
    except EndpointError as error:
        result["error"] = str(error)
        return result
    result["server_start_s"] = round(time.perf_counter() - started, 3)
    cells = []
    try:
        for body in bodies:
            failed = warm_up(endpoint.port, body, args.workers, args.request_timeout)
            for concurrency in args.concurrency:
                cell = run_load(endpoint.port, body, concurrency, args.max_requests,
                                args.time_limit, args.request_timeout)
                cell["warmup_errors"] = failed
                cells.append(cell)
                print(f"[{variant}] {body.name:8s} c={concurrency:<3d} "
                      f"{cell['requests_per_s'] or 0:8.2f} req/s {cell['images_per_s'] or 0:9.1f} "
                      f"img/s  p50 {cell.get('p50_ms', float('nan')):8.1f} ms  "
                      f"p99 {cell.get('p99_ms', float('nan')):8.1f} ms  errors {cell['errors']}",
                      file=sys.stderr, flush=True)
    finally:
        if not cells:
            result["server_log_tail"] = endpoint.log_tail(10)
        result["server_exit_status"] = endpoint.stop()
    result["cells"] = cells
    result["overhead"] = overhead(cells, result["in_process"])
    return result


def overhead(cells: list[dict[str, Any]], in_process: dict[str, Any]) -> dict[str, Any]:
    """Per body: p50 latency at concurrency 1 minus the bare predict_fn time (and its split)."""
    out = {}
    for cell in cells:
        bare = in_process.get(cell["body"])
        if cell["concurrency"] != 1 or bare is None or "p50_ms" not in cell:
            continue
        served = cell["p50_ms"]
        out[cell["body"]] = {
            "served_p50_ms": served,
            "predict_ms": bare["predict_ms"],
            "overhead_ms": round(served - bare["predict_ms"], 3),
            "overhead_share": round((served - bare["predict_ms"]) / served, 4),
            "codec_ms": round(bare["in_process_request_ms"] - bare["predict_ms"], 3),
            "http_and_server_ms": round(served - bare["in_process_request_ms"], 3),
        }
    return out


# --- the command -----------------------------------------------------------------------------

def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Images, model, then every server variant; the whole record."""
    record = benchlib.context("serving_load", args.quick)
    images, class_names = load_test_images(args.test_zip, max(*args.npy_batches,
                                                              args.json_batch))
    bodies = make_bodies(images, args.npy_batches, args.json_batch)
    with tempfile.TemporaryDirectory(prefix="smchainer-serving-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        record["model"] = save_vgg(model_dir, args.depth, args.width, class_names, args.seed)
        images_file = Path(tmp) / "images.npz"
        np.savez(images_file, images=images)
        record["settings"] = {
            "workers": args.workers, "threads_per_worker": args.threads,
            "server_threads": "smchainer-serve default (gthread)",
            "concurrency": list(args.concurrency), "max_requests": args.max_requests,
            "time_limit_s": args.time_limit, "request_timeout_s": args.request_timeout,
            "predict_repeats": args.predict_repeats,
            "bodies": {b.name: {"bytes": len(b.data), "content_type": b.content_type,
                                "accept": b.accept} for b in bodies},
            "images": f"{args.test_zip.name}: {len(images)} CIFAR-10 test images",
            "load_generator": "Python threads, one keep-alive http.client connection each",
        }
        record["variants"] = [run_variant(v, args, model_dir, images_file, bodies)
                              for v in args.variants]
    return benchlib.finish(record)


def build_parser() -> ArgumentParser:
    """The command line (``--help`` lists it)."""
    parser = ArgumentParser(prog="serving_load", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 requests or 1 s per cell, a width-0.125 VGG-8, "
                        "the ONNX variant only (explicit options win)")
    parser.add_argument("--depth", type=int, choices=(8, 11, 13, 16, 19), default=None,
                        help="VGG depth (default 16)")
    parser.add_argument("--width", type=benchlib.positive(float), default=None,
                        help="VGG width multiplier (default 1.0)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="onnx: the ONNX Runtime plugin as installed; chainer: "
                        "SMCHAINER_ONNX=0 (default both)")
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
    parser.add_argument("--workers", type=benchlib.positive(int), default=None,
                        help="server workers (default: the CPUs available)")
    parser.add_argument("--threads", type=benchlib.positive(int), default=None,
                        help="BLAS / ONNX Runtime threads per worker (default CPUs // workers)")
    parser.add_argument("--predict-repeats", type=benchlib.positive(int), default=None,
                        help="timed in-process predict_fn calls per body (default 7)")
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
    defaults = {"depth": 8 if quick else 16, "width": 0.125 if quick else 1.0,
                "variants": ["onnx"] if quick else ["onnx", "chainer"],
                "max_requests": 32 if quick else 200, "time_limit": 1.0 if quick else 5.0,
                "predict_repeats": 3 if quick else 7, "workers": benchlib.cpus_available()}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads is None:
        args.threads = max(1, benchlib.cpus_available() // args.workers)
    if args.json_batch < 0:
        raise SmchainerError("--json-batch must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its record; 0, or 1 when a server variant failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--measure-predict"]:  # the child process of bare_predict
        model_dir, images_file, npy_batches, json_batch, repeats = argv[1:6]
        print(json.dumps(measure_predict(model_dir, images_file,
                                         [int(b) for b in npy_batches.split(",") if b],
                                         int(json_batch), int(repeats))))
        return 0

    def body() -> int:
        args = parse_args(argv)
        record = benchmark(args)
        path = benchlib.write_record(record, args.output_dir, "serving_load")
        for variant in record["variants"]:
            if "error" in variant:
                print(f"{variant['variant']}: {variant['error']}")
                continue
            for name, figures in variant["overhead"].items():
                print(f"{variant['variant']:8s} {name:8s} served p50 "
                      f"{figures['served_p50_ms']:8.1f} ms, predict_fn "
                      f"{figures['predict_ms']:8.1f} ms, overhead "
                      f"{figures['overhead_ms']:7.1f} ms")
        print(f"record: {path}")
        failed = [v["variant"] for v in record["variants"] if "error" in v]
        if failed:
            raise SmchainerError(f"server variant(s) {', '.join(failed)} did not start")
        return 0

    return run(body, lambda: "--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
