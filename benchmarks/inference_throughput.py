"""VGG inference on the CPU: Chainer, smchainer's fused path, ONNX Runtime, PyTorch eager.

``chainer`` runs the network through Chainer's own functions; ``smchainer-fused``
through :mod:`smchainer.functions.channels_last` (``VGG.fused``, what a served
VGG runs on the CPU without the ONNX plugin). One run measures all of them on
the same network with the same weights:
batch-1 latency (median milliseconds per call) and batch-64 throughput
(images per second, from the median call). Warm-up calls are not timed;
the frameworks take turns within each repeat, so background load on a shared
machine falls on all of them alike. Before timing, every framework's output
is checked against Chainer's on the same batch.

Prints a table and writes one JSON record (machine, CPU model, versions, git
commit, the figures and the batch-64 ONNX Runtime / PyTorch ratio) to
``benchmarks/results/inference_throughput-<UTC timestamp>.json``.

    .venv/bin/python benchmarks/inference_throughput.py            # VGG-16, full run
    .venv/bin/python benchmarks/inference_throughput.py --quick    # smoke run

PyTorch is optional (``pip install -e '.[bench]'``); without it the PyTorch
column is empty and the ratio is null. ``--threads`` sets ONNX Runtime's and
PyTorch's threads; Chainer computes through NumPy's OpenBLAS, whose threads
come from ``OPENBLAS_NUM_THREADS`` (all CPUs when unset), so pin both for a
one-thread comparison:

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/inference_throughput.py --threads 1
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# isort: off
import smchainer  # noqa: F401  (Chainer's NumPy 2 compat before chainer loads)
import chainer

# isort: on
import benchlib
import chainer.links as L
from smchainer_onnx.runtime import convert

from smchainer.cli import ArgumentParser, add_common_arguments, run
from smchainer.device import cpu_count
from smchainer.errors import SmchainerError
from smchainer.models import VGG
from smchainer.models.vgg import INPUT_SHAPE, STAGES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BATCH = 64
#: Variables that set the BLAS thread count NumPy (so Chainer) uses.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Outputs must agree with Chainer's this closely before anything is timed.
TOLERANCE = 1e-3


def build_chainer_vgg(depth: int, width: float, seed: int) -> VGG:
    """A VGG with random weights and batch-norm statistics far from 0 and 1."""
    np.random.seed(seed)
    model = VGG(depth=depth, width=width)
    rng = np.random.default_rng(seed)
    norms: list[Any] = [link for link in model.links() if isinstance(link, L.BatchNormalization)]
    for norm in norms:
        size = norm.avg_mean.shape
        norm.avg_mean[...] = rng.normal(0.0, 0.2, size)
        norm.avg_var[...] = rng.uniform(0.5, 2.0, size)
        norm.gamma.array[...] = rng.uniform(0.8, 1.2, size)
        norm.beta.array[...] = rng.normal(0.0, 0.1, size)
    return model


def build_torch_vgg(model: Any) -> Any:
    """The same network in PyTorch eager mode, with the Chainer model's weights.

    Written as a PyTorch user would (Conv2d, BatchNorm2d, ReLU, MaxPool2d,
    Linear, BatchNorm1d; dropout is the identity in evaluation mode).
    """
    import torch
    from torch import nn

    def tensor(array: Any) -> Any:
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def batch_norm(link: Any, cls: type) -> Any:
        norm = cls(link.avg_mean.shape[0], eps=link.eps)
        norm.weight.data = tensor(link.gamma.array)
        norm.bias.data = tensor(link.beta.array)
        norm.running_mean.data = tensor(link.avg_mean)
        norm.running_var.data = tensor(link.avg_var)
        return norm

    layers: list[Any] = []
    for names in model.stage_blocks:
        for name in names:
            block = getattr(model, name)
            weight = block.conv.W.array
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, bias=False)
            conv.weight.data = tensor(weight)
            layers += [conv, batch_norm(block.bn, nn.BatchNorm2d), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2, 2))
    fc1 = nn.Linear(model.fc1.W.shape[1], model.fc1.W.shape[0], bias=False)
    fc1.weight.data = tensor(model.fc1.W.array)
    fc2 = nn.Linear(model.fc2.W.shape[1], model.fc2.W.shape[0], bias=False)
    fc2.weight.data = tensor(model.fc2.W.array)

    class TorchVGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", tensor(model.mean).reshape(1, -1, 1, 1))
            self.register_buffer("scale", 1 / tensor(model.std).reshape(1, -1, 1, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(
                nn.Flatten(), fc1, batch_norm(model.bn_fc1, nn.BatchNorm1d),
                nn.ReLU(inplace=True), fc2,
            )

        def forward(self, x: Any) -> Any:
            return self.classifier(self.features((x - self.mean) * self.scale))

    return TorchVGG().eval()


def runners(model: VGG, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray] | None]:
    """One ``batch -> logits`` function per framework (None: not installed)."""

    def evaluate(fused: bool) -> Callable[[np.ndarray], np.ndarray]:
        network = model.copy(mode="share")  # the same parameters, its own switch
        network.fused = fused

        def run(batch: np.ndarray) -> np.ndarray:
            with chainer.using_config("train", False), chainer.no_backprop_mode():
                return network(batch).array

        return run

    onnx_model = convert(model, INPUT_SHAPE, threads=threads)
    found: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
        "chainer": evaluate(fused=False),
        "smchainer-fused": evaluate(fused=True),
        "onnxruntime": onnx_model.predict,
        "torch": None,
    }
    try:
        import torch
    except ImportError:
        return found
    torch.set_num_threads(threads)
    torch_model = build_torch_vgg(model)

    def torch_eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch_model(torch.from_numpy(batch)).numpy()

    found["torch"] = torch_eager
    return found


def timed(function: Callable[[np.ndarray], Any], batch: np.ndarray) -> float:
    start = time.perf_counter()
    function(batch)
    return time.perf_counter() - start


def measure(
    functions: dict[str, Callable[[np.ndarray], Any]], batch: np.ndarray, warmup: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Seconds per call of each function, repeats interleaved, after warm-up."""
    for function in functions.values():
        for _ in range(warmup):
            function(batch)
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            seconds[name].append(timed(function, batch))
    return seconds


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("smchainer", "smchainer-onnx", "chainer", "numpy", "onnx", "onnxruntime",
                 "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'framework':<12} {'batch 1 ms':>11} {f'batch {BATCH} img/s':>15}"]
    for name, figures in results.items():
        if figures is None:
            lines.append(f"{name:<12} {'-':>11} {'-':>15}   (not installed)")
            continue
        lines.append(f"{name:<12} {figures['batch1_latency_ms']:>11.2f} "
                     f"{figures[f'batch{BATCH}_images_per_s']:>15.1f}")
    return "\n".join(lines)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    threads = args.threads or cpu_count()
    load_before = benchlib.load_average()
    model = build_chainer_vgg(args.depth, args.width, args.seed)
    functions = runners(model, threads)
    available = {name: f for name, f in functions.items() if f is not None}
    rng = np.random.default_rng(args.seed)
    batch = rng.random((BATCH, *INPUT_SHAPE), dtype=np.float32)
    reference = available["chainer"](batch)
    differences = {}
    for name, function in available.items():
        difference = float(np.abs(function(batch) - reference).max())
        scale = max(1.0, float(np.abs(reference).max()))
        if difference > TOLERANCE * scale:
            raise SmchainerError(f"{name} differs from Chainer by {difference:g}: "
                                 "not the same network, nothing timed")
        differences[name] = difference
    warmup = 1 if args.quick else 3
    repeats_1 = 3 if args.quick else args.repeats * 4
    repeats_64 = 2 if args.quick else args.repeats
    single = measure(available, batch[:1], warmup, repeats_1)
    full = measure(available, batch, warmup, repeats_64)
    results: dict[str, Any] = {}
    for name in functions:
        if name not in available:
            results[name] = None
            continue
        results[name] = {
            "batch1_latency_ms": 1000 * statistics.median(single[name]),
            f"batch{BATCH}_images_per_s": BATCH / statistics.median(full[name]),
            "batch1_seconds": single[name],
            f"batch{BATCH}_seconds": full[name],
        }
    ratio = None
    if results["torch"] is not None:
        ratio = (results["onnxruntime"][f"batch{BATCH}_images_per_s"]
                 / results["torch"][f"batch{BATCH}_images_per_s"])
    return {
        "benchmark": "inference_throughput",
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "cpu_model": benchlib.cpu_model(),
            "cpus_available": cpu_count(),
            "cpus_total": os.cpu_count(),
            # Other processes' load skews every figure; the ratio less (turns are interleaved).
            "load_average_before": load_before,
            "load_average_after": benchlib.load_average(),
        },
        "versions": versions(),
        "git": benchlib.git_commit(),
        "model": {"architecture": "smchainer.models.VGG", "depth": args.depth,
                  "width": args.width, "parameters": int(sum(p.size for p in model.params()))},
        "settings": {
            "threads": threads, "warmup": warmup, "batch1_repeats": repeats_1,
            f"batch{BATCH}_repeats": repeats_64, "statistic": "median",
            # Chainer's NumPy backend threads through OpenBLAS, which reads these.
            "blas_environment": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        },
        "max_abs_difference_vs_chainer": differences,
        "results": results,
        f"ratio_onnxruntime_over_torch_batch{BATCH}": ratio,
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="inference_throughput", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one warm-up call and two or three timed calls")
    parser.add_argument("--depth", type=int, default=16, choices=sorted(STAGES),
                        help="VGG depth (default 16)")
    parser.add_argument("--width", type=benchlib.positive(float), default=1.0,
                        help="VGG width multiplier (default 1.0)")
    parser.add_argument("--repeats", type=benchlib.positive(int), default=7,
                        help=f"timed batch-{BATCH} calls per framework (batch 1: 4x as many)")
    parser.add_argument("--threads", type=benchlib.positive(int), default=None,
                        help="threads of ONNX Runtime and PyTorch (default: the CPUs "
                        "available); Chainer's NumPy uses OpenBLAS's own, set with "
                        "OPENBLAS_NUM_THREADS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS,
                        help="where the JSON record goes (default benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        record = benchmark(args)
        print(f"VGG-{args.depth} width {args.width}, {record['settings']['threads']} threads, "
              f"{record['machine']['cpu_model']}")
        print(table(record["results"]))
        ratio = record[f"ratio_onnxruntime_over_torch_batch{BATCH}"]
        if ratio is not None:
            print(f"batch-{BATCH} throughput, ONNX Runtime / PyTorch eager: {ratio:.2f}")
        args.output_dir.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = args.output_dir / f"inference_throughput-{stamp}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"record: {path}")
        return 0

    return run(body, lambda: "--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
