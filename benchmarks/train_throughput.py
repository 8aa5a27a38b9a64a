"""VGG-16 training throughput: smchainer (Chainer) against PyTorch eager, same device.

One training step is forward + backward + MomentumSGD update with weight decay
(lr 0.05, momentum 0.9, 5e-4: the SageMaker example's settings) on a batch that
already sits on the device, so the figure is the model's speed, not the data
loader's. Warm-up steps (kernel compilation, cuDNN autotuning, memory pools)
are excluded; the device is synchronised before the clock starts and before
it stops, and the loss is read only then (no host sync inside the loop).

Frameworks:

``chainer``
    :class:`smchainer.models.vgg.VGG` through Chainer's own functions with
    ``use_cudnn='never'``: convolutions as im2col + cuBLAS GEMM, the rest
    CuPy / Chainer kernels (what CuPy 14 gave before smchainer's cuDNN binding).
``chainer-cudnn``
    The same functions with ``use_cudnn='auto'`` through
    :mod:`smchainer.compat.cudnn` (cuDNN 9 as ``cupy.cudnn``): Chainer's own
    cuDNN paths for convolution, batch norm, pooling, ReLU and softmax. An
    error in the record when the binding is not active.
``smchainer-fused``
    The same model with ``fused = True``: channels-last, through
    :mod:`smchainer.functions.channels_last` (one im2col kernel + cuBLAS per
    convolution, batch norm + ReLU and pooling as fused kernels), and
    :class:`smchainer.optimizers.MomentumSGD` (weight decay inside the
    update): what the built-in trainer runs on a GPU.
``torch``
    The same network in PyTorch eager (cuDNN, ``cudnn.benchmark=True``).
``torch-nocudnn``
    The same, with cuDNN switched off: PyTorch's own im2col + GEMM path, the
    like-for-like comparison for Chainer without cuDNN.

TF32 follows ``CUPY_TF32`` (read by CuPy at the first float32 GEMM); PyTorch
is set to match, so both sides run the same precision.

Mixed precision (``--amp``, default ``off``), each side with its own machinery:

``--amp fp16``
    Chainer: ``chainer.config.dtype = chainer.mixed16`` while the model is
    built (float16 weights and activations, float32 batch-norm parameters
    and statistics), ``optimizer.use_fp32_update()`` (float32 master copies
    of the float16 weights), dynamic loss scaling ``optimizer.loss_scaling()``
    and the loss computed on float32 logits. PyTorch:
    ``torch.autocast(device_type, dtype=torch.float16)`` and
    ``torch.amp.GradScaler``.
``--amp bf16``
    PyTorch: ``torch.autocast(device_type, dtype=torch.bfloat16)``, no scaler.
    Chainer 7.8.1 has no bfloat16 (``mixed16`` is float16; NumPy and CuPy have
    no bfloat16 dtype): its frameworks are recorded as unsupported, with the
    reason, and no figure.

``smchainer-fused`` runs float32 only (the GPU kernels of
:mod:`smchainer.functions.channels_last` take float32 arrays), so under
``--amp`` it is recorded as unsupported too. Every result row says the
precision it ran (``fp32``, ``tf32``, ``fp16`` or ``bf16``), and the ratios
compare figures of one record, so always the same precision on both sides. ``--profile`` adds a
per-function and per-phase time breakdown of one Chainer step (CUDA events,
one synchronisation at the end). Writes one JSON record (``--out``, else
stdout)::

    python benchmarks/train_throughput.py --device gpu --out vgg_gpu.json
    python benchmarks/train_throughput.py --device cpu --quick
    python benchmarks/train_throughput.py --device gpu --amp fp16 --frameworks chainer-cudnn torch
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import benchlib  # beside this script: timestamp, machine, versions, git commit
import numpy as np

import smchainer  # noqa: F401  (the compat layer goes in before chainer)

LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
N_CLASSES = 10
FRAMEWORKS = ("chainer", "chainer-cudnn", "smchainer-fused", "torch", "torch-nocudnn")
CHAINER_FRAMEWORKS = ("chainer", "chainer-cudnn", "smchainer-fused")
ENV_RECORDED = ("CUPY_TF32", "CHAINER_CUDNN", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
AMP_MODES = ("off", "bf16", "fp16")
#: How each side runs ``--amp fp16`` / ``bf16`` (recorded in each framework's meta).
CHAINER_MIXED16 = ("chainer.mixed16: float16 weights and activations, float32 batch-norm "
                   "parameters; use_fp32_update() master copies; dynamic loss_scaling(); "
                   "loss on float32 logits")
UNSUPPORTED = {
    ("chainer", "bf16"): "Chainer 7.8.1 has no bfloat16 (chainer.mixed16 is float16; NumPy "
                         "and CuPy have no bfloat16 dtype)",
    ("smchainer-fused", "fp16"): "the fused kernels (smchainer.functions.channels_last) take "
                                 "float32 arrays only",
}


def tf32_requested() -> bool:
    """Whether ``CUPY_TF32=1``: TF32 GEMMs for CuPy, and PyTorch set to match."""
    return os.environ.get("CUPY_TF32", "0").strip() == "1"


def unsupported_reason(name: str, amp: str) -> str | None:
    """Why ``name`` cannot run ``--amp amp``, or None when it can."""
    if amp == "off":
        return None
    if name == "smchainer-fused":
        return UNSUPPORTED[("smchainer-fused", "fp16")]
    if name in CHAINER_FRAMEWORKS and amp == "bf16":
        return UNSUPPORTED[("chainer", "bf16")]
    return None


def precision(args: argparse.Namespace) -> str:
    """What a result row ran: ``fp16`` / ``bf16`` under ``--amp``, else ``tf32`` or ``fp32``."""
    if args.amp != "off":
        return args.amp
    return "tf32" if args.device == "gpu" and tf32_requested() else "fp32"


def synthetic_batches(batch_size: int, count: int, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """``count`` batches of float32 images in [0, 1] and int32 labels, on the host."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((batch_size, 3, 32, 32), dtype=np.float32),
            rng.integers(0, N_CLASSES, batch_size).astype(np.int32),
        )
        for _ in range(count)
    ]


class _Clock:
    """Device-synchronised wall clock."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize

    def time(self) -> float:
        self.synchronize()
        return time.perf_counter()


def time_steps(step: Callable[[int], Any], clock: _Clock, warmup: int, iters: int) -> dict:
    """Seconds for ``iters`` calls of ``step`` after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    start = clock.time()
    loss = None
    for i in range(iters):
        loss = step(i)
    elapsed = clock.time() - start
    return {"seconds": elapsed, "last_loss": loss}


# --- Chainer --------------------------------------------------------------------------------

def make_optimizer(model: Any, fused: bool, amp: str = "off") -> Any:
    """MomentumSGD with weight decay: Chainer's hook, or smchainer's update that folds it in.

    ``amp="fp16"``: float32 master copies of the float16 weights and dynamic loss scaling.
    """
    import chainer

    from smchainer import optimizers

    if fused:
        optimizer = optimizers.MomentumSGD(lr=LEARNING_RATE, momentum=MOMENTUM,
                                           weight_decay=WEIGHT_DECAY)
        optimizer.setup(model)
        return optimizer
    optimizer = chainer.optimizers.MomentumSGD(lr=LEARNING_RATE, momentum=MOMENTUM)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(WEIGHT_DECAY))
    if amp == "fp16":
        optimizer.use_fp32_update()
        optimizer.loss_scaling()  # dynamic: starts at 1, doubles while the gradients are finite
    return optimizer


def chainer_loss(model: Any, x: Any, t: Any, amp: str) -> Any:
    """Softmax cross entropy of the model's logits; in float32 under ``--amp``."""
    import chainer.functions as F

    y = model(x)
    if amp != "off":
        y = F.cast(y, np.float32)
    return F.softmax_cross_entropy(y, t)


def chainer_runner(args: argparse.Namespace, fused: bool = False, cudnn: bool = False) -> dict:
    """Build the Chainer model and optimizer; returns step, clock and metadata.

    ``cudnn``: Chainer's cuDNN paths (``use_cudnn='auto'``), else ``'never'``;
    set for the whole process, so each framework's runs see their own. So is
    ``chainer.config.dtype``: ``mixed16`` under ``--amp fp16``, else float32.
    """
    import chainer

    from smchainer.compat import cudnn as binding
    from smchainer.device import get_device
    from smchainer.models.vgg import VGG, count_parameters

    device = get_device("gpu:0" if args.device == "gpu" else "cpu")
    if cudnn and not (binding.active() and chainer.backends.cuda.cudnn_enabled):
        raise RuntimeError(f"cuDNN is not enabled in Chainer: {binding.describe()}")
    chainer.config.use_cudnn = "auto" if cudnn else "never"
    chainer.config.train = True
    chainer.config.autotune = False
    amp = args.amp
    if amp not in ("off", "fp16"):
        raise ValueError(f"Chainer runs --amp off or fp16, not {amp}")
    # Read by the links' initializers: float16 weights, float32 batch-norm parameters.
    chainer.config.dtype = chainer.mixed16 if amp == "fp16" else np.dtype(np.float32)
    model = VGG(n_classes=N_CLASSES, width=args.width, depth=args.depth)
    model.fused = fused
    model.to_device(device)
    optimizer = make_optimizer(model, fused, amp)
    xp = device.xp
    input_dtype = np.float16 if amp == "fp16" else np.float32

    def prepare(batches):
        return [(device.send(x.astype(input_dtype, copy=False)), device.send(t))
                for x, t in batches]

    def make_step(batches):
        if amp == "off":
            def step(i):
                x, t = batches[i % len(batches)]
                loss = chainer_loss(model, x, t, amp)
                model.cleargrads()
                loss.backward()
                optimizer.update()
                return loss

            return step

        def amp_step(i):
            # Optimizer.update(lossfun): cleargrads, backward with the loss scale, the NaN
            # check of dynamic scaling (an update is skipped when it fails), new scale.
            x, t = batches[i % len(batches)]
            losses = []

            def lossfun():
                losses.append(chainer_loss(model, x, t, amp))
                return losses[-1]

            optimizer.update(lossfun)
            return losses[-1]

        return amp_step

    if xp is np:
        def synchronize():
            return None
    else:
        synchronize = xp.cuda.Device().synchronize
    meta: dict[str, Any] = {"parameters": int(count_parameters(model)),
                            "use_cudnn": chainer.config.use_cudnn,
                            "cudnn": binding.describe() if cudnn else None,
                            "dtype": str(chainer.config.dtype),
                            "weight_dtype": str(model.fc1.W.dtype),
                            "batch_norm_dtype": str(model.bn_fc1.gamma.dtype),
                            "amp": CHAINER_MIXED16 if amp == "fp16" else None}
    if xp is not np:
        meta["cupy_compute_type_float32"] = _cupy_compute_type(xp)

    def row_extra() -> dict:
        if amp == "off":
            return {}
        return {"loss_scale": float(optimizer._loss_scale)}  # no public getter in Chainer 7

    return {"prepare": prepare, "make_step": make_step, "clock": _Clock(synchronize),
            "loss_value": lambda loss: float(loss.array), "meta": meta, "model": model,
            "amp": amp, "row_extra": row_extra}


def _cupy_compute_type(cupy: Any) -> str:
    try:
        from cupy._core import _routines_linalg as linalg

        return str(linalg.compute_type_to_str(linalg.get_compute_type(cupy.dtype("float32"))))
    except Exception as exc:  # private API: report rather than fail the benchmark
        return f"unknown ({type(exc).__name__})"


class StepProfile:
    """Chainer function hook timing every function's forward and backward.

    On the GPU each call is bracketed by CUDA events recorded on the stream
    (no synchronisation until :meth:`summary`), so the step runs as it would.
    """

    def __init__(self, xp: Any) -> None:
        import chainer

        self.xp = xp
        self.records: list[tuple[str, Any, Any]] = []
        self._open: list[tuple[str, Any]] = []
        outer = self

        class Hook(chainer.FunctionHook):
            name = "StepProfile"

            def forward_preprocess(self, function, in_data):
                outer._start(f"forward {function.label}")

            def forward_postprocess(self, function, in_data):
                outer._stop()

            def backward_preprocess(self, function, in_data, out_grad):
                outer._start(f"backward {function.label}")

            def backward_postprocess(self, function, in_data, out_grad):
                outer._stop()

        self.hook = Hook()

    def _now(self) -> Any:
        if self.xp is np:
            return time.perf_counter()
        event = self.xp.cuda.Event()
        event.record()
        return event

    def _start(self, name: str) -> None:
        self._open.append((name, self._now()))

    def _stop(self) -> None:
        name, start = self._open.pop()
        if not self._open:  # nested calls are inside their caller's time
            self.records.append((name, start, self._now()))

    def summary(self, steps: int) -> dict[str, dict[str, float]]:
        """Milliseconds per step and calls per step for each ``phase function``."""
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for name, start, stop in self.records:
            if self.xp is np:
                ms = (stop - start) * 1000
            else:
                ms = self.xp.cuda.get_elapsed_time(start, stop)
            totals[name][0] += ms
            totals[name][1] += 1
        ranked = sorted(totals.items(), key=lambda item: -item[1][0])
        return {name: {"ms_per_step": round(ms / steps, 3), "calls_per_step": count / steps}
                for name, (ms, count) in ranked}


def profile_chainer(model: Any, update: Callable[[], None], batches: list, clock: _Clock,
                    steps: int, amp: str = "off",
                    loss_scale: Callable[[], Any] = lambda: None) -> dict:
    """Per-phase (synchronised) and per-function (CUDA events) times of Chainer steps."""

    def forward(i: int) -> Any:
        x, t = batches[i % len(batches)]
        return chainer_loss(model, x, t, amp)

    def backward(loss: Any) -> None:
        model.cleargrads()
        loss.backward(loss_scale=loss_scale())

    backward(forward(0))
    update()  # warm
    phases: dict[str, float] = defaultdict(float)
    for i in range(steps):
        t0 = clock.time()
        loss = forward(i)
        t1 = clock.time()
        backward(loss)
        t2 = clock.time()
        update()
        t3 = clock.time()
        phases["forward"] += t1 - t0
        phases["backward"] += t2 - t1
        phases["update"] += t3 - t2
    profile = StepProfile(model.xp)
    start = clock.time()
    with profile.hook:
        for i in range(steps):
            backward(forward(i))
            update()
    hooked = clock.time() - start
    return {
        "phase_ms_per_step": {k: round(v / steps * 1000, 3) for k, v in phases.items()},
        "hooked_step_ms": round(hooked / steps * 1000, 3),
        "function_ms_per_step": profile.summary(steps),
    }


# --- PyTorch --------------------------------------------------------------------------------

def torch_vgg(torch: Any, depth: int, width: float) -> Any:
    """The Chainer VGG's twin in PyTorch: same layers, same initial scale, same normalisation."""
    from smchainer.models.vgg import (
        CIFAR10_MEAN,
        CIFAR10_STD,
        HIDDEN_UNITS,
        STAGE_WIDTHS,
        STAGES,
    )

    nn = torch.nn

    def bn(channels: int, dims: int) -> Any:
        # Chainer's BatchNormalization: eps 2e-5, running stats decay 0.9.
        cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        return cls(channels, eps=2e-5, momentum=0.1)

    layers: list[Any] = []
    in_channels = 3
    for stage, (count, channels) in enumerate(zip(STAGES[depth], STAGE_WIDTHS, strict=True)):
        out_channels = max(1, round(channels * width))
        for index in range(count):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                       bn(out_channels, 2), nn.ReLU(inplace=True)]
            if index < count - 1:
                layers.append(nn.Dropout(0.3 if stage == 0 else 0.4))
            in_channels = out_channels
        layers.append(nn.MaxPool2d(2, 2))
    hidden = max(1, round(HIDDEN_UNITS * width))
    layers += [nn.Flatten(), nn.Dropout(0.5), nn.Linear(in_channels, hidden, bias=False),
               bn(hidden, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),
               nn.Linear(hidden, N_CLASSES, bias=False)]

    class TorchVGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
            self.register_buffer("scale", 1 / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
            self.body = nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            return self.body((x - self.mean) * self.scale)

    return TorchVGG()


def torch_runner(args: argparse.Namespace, cudnn: bool) -> dict:
    """Build the PyTorch model and optimizer; returns step, clock and metadata.

    ``--amp``: the step under ``torch.autocast`` (float16 with a ``GradScaler``,
    bfloat16 without); ``off`` runs the plain float32 step.
    """
    import torch

    torch.manual_seed(0)
    on_gpu = args.device == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("--device gpu but torch.cuda.is_available() is False")
    device = torch.device("cuda:0" if on_gpu else "cpu")
    torch.backends.cudnn.enabled = cudnn
    torch.backends.cudnn.benchmark = cudnn
    torch.backends.cuda.matmul.allow_tf32 = tf32_requested()
    torch.backends.cudnn.allow_tf32 = tf32_requested()
    model = torch_vgg(torch, args.depth, args.width).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = args.amp
    device_type = "cuda" if on_gpu else "cpu"
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def prepare(batches):
        return [(torch.from_numpy(x).to(device), torch.from_numpy(t).long().to(device))
                for x, t in batches]

    def make_step(batches):
        if amp == "off":
            def step(i):
                x, t = batches[i % len(batches)]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), t)
                loss.backward()
                optimizer.step()
                return loss

            return step

        def amp_step(i):
            x, t = batches[i % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=autocast_dtype):
                loss = loss_fn(model(x), t)  # autocast computes cross entropy in float32
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped when a gradient is not finite
                scaler.update()
            return loss

        return amp_step

    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    meta = {
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "cudnn_enabled": bool(torch.backends.cudnn.enabled),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "allow_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "threads": torch.get_num_threads(),
        "amp": (None if amp == "off" else
                f"torch.autocast({device_type!r}, dtype={autocast_dtype})"
                + (" + torch.amp.GradScaler" if scaler is not None else "")),
    }

    def row_extra() -> dict:
        return {"loss_scale": float(scaler.get_scale())} if scaler is not None else {}

    return {"prepare": prepare, "make_step": make_step, "clock": _Clock(synchronize),
            "loss_value": lambda loss: float(loss.detach().float().item()), "meta": meta,
            "amp": amp, "row_extra": row_extra}


def torch_info() -> dict:
    """PyTorch's version and GPU stack, or why it is missing."""
    try:
        import torch
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info = {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
    return info


# --- the benchmark --------------------------------------------------------------------------

def run_framework(name: str, args: argparse.Namespace) -> dict:
    """All batch sizes for one framework; errors are recorded, not raised."""
    ran = precision(args)
    reason = unsupported_reason(name, args.amp)
    if reason is not None:
        print(f"{name:14s} --amp {args.amp}: not supported ({reason})", file=sys.stderr,
              flush=True)
        return {"framework": name, "precision": ran, "unsupported": reason, "results": []}
    try:
        if name in CHAINER_FRAMEWORKS:
            runner = chainer_runner(args, fused=(name == "smchainer-fused"),
                                    cudnn=(name == "chainer-cudnn"))
        else:
            runner = torch_runner(args, cudnn=(name == "torch"))
    except Exception as exc:
        failed = {"framework": name, "precision": ran, "error": f"{type(exc).__name__}: {exc}",
                  "results": []}
        if isinstance(exc, ImportError):  # torch is the optional `bench` extra
            failed["skipped"] = "not installed (pip install -e '.[bench]')"
        return failed
    results = []
    for batch_size in args.batch_sizes:
        batches = runner["prepare"](synthetic_batches(batch_size, args.distinct_batches))
        try:
            timing = time_steps(runner["make_step"](batches), runner["clock"],
                                args.warmup, args.iters)
        except Exception as exc:  # out of memory at a large batch, say: keep the others
            results.append({"batch_size": batch_size, "precision": ran,
                            "error": f"{type(exc).__name__}: {exc}"})
            continue
        seconds = timing["seconds"]
        results.append({
            "batch_size": batch_size,
            "precision": ran,
            "images_per_s": round(batch_size * args.iters / seconds, 2),
            "ms_per_step": round(seconds / args.iters * 1000, 3),
            "last_loss": runner["loss_value"](timing["last_loss"]),
            **runner["row_extra"](),
        })
        print(f"{name:14s} batch {batch_size:4d}: {results[-1]['images_per_s']:10.1f} images/s"
              f"  ({results[-1]['ms_per_step']:.2f} ms/step)", file=sys.stderr, flush=True)
    record = {"framework": name, "precision": ran, "meta": runner["meta"], "results": results}
    if name in CHAINER_FRAMEWORKS and args.profile:
        record["profile"] = _profile(runner, args)
    return record


def _profile(runner: dict, args: argparse.Namespace) -> dict:
    model = runner["model"]
    optimizer = make_optimizer(model, fused=model.fused, amp=runner["amp"])
    batch_size = args.batch_sizes[0]
    batches = runner["prepare"](synthetic_batches(batch_size, args.distinct_batches, seed=1))
    try:
        breakdown = profile_chainer(model, optimizer.update, batches, runner["clock"],
                                    args.profile_steps, amp=runner["amp"],
                                    loss_scale=lambda: optimizer._loss_scale)
        return {"batch_size": batch_size, **breakdown}
    except Exception as exc:
        return {"batch_size": batch_size, "error": f"{type(exc).__name__}: {exc}"}


def ratios(records: list[dict]) -> dict:
    """``chainer / other`` and ``smchainer-fused / other`` images/s per batch size."""
    by: dict[str, dict[int, float]] = {}
    for record in records:
        by[record["framework"]] = {r["batch_size"]: r["images_per_s"]
                                   for r in record["results"] if "images_per_s" in r}
    out: dict[str, dict[str, float]] = {}
    for mine in CHAINER_FRAMEWORKS:
        for other in ("torch", "torch-nocudnn", "chainer"):
            if other == mine:
                continue
            pairs = {bs: by[mine][bs] / by[other][bs]
                     for bs in by.get(mine, {}) if bs in by.get(other, {})}
            if pairs:
                out[f"{mine}/{other}"] = {str(bs): round(r, 3) for bs, r in sorted(pairs.items())}
    return out


def write_record(record: dict, path: str) -> None:
    """Write ``record`` as JSON to ``path`` through a temporary file (never half-written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=None,
                        help="default: all five on the GPU; on the CPU chainer, "
                             "smchainer-fused and torch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--distinct-batches", type=int, default=4,
                        help="batches cycled through, so no step reuses the last one's input")
    parser.add_argument("--amp", choices=AMP_MODES, default="off",
                        help="mixed precision: fp16 (Chainer mixed16 + loss scaling, torch "
                             "autocast + GradScaler) or bf16 (torch autocast only; Chainer "
                             "has none); default off")
    parser.add_argument("--profile", action="store_true",
                        help="add a per-phase and per-function breakdown of Chainer's step")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up and 3 timed steps: proves it runs, figures are rough")
    parser.add_argument("--out", help="write the JSON record here (default: stdout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.profile_steps = 1, 3, 2
    if args.frameworks is None:
        args.frameworks = (list(FRAMEWORKS) if args.device == "gpu"
                           else ["chainer", "smchainer-fused", "torch"])
    if min(args.batch_sizes) < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("batch sizes and --iters must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON record; 1 when no framework produced a figure."""
    args = parse_args(argv)
    from smchainer.compat.cupy import describe_gpu_stack

    uses_torch = any(f.startswith("torch") for f in args.frameworks)
    record: dict[str, Any] = {
        "benchmark": "vgg_train_throughput",
        "step": "forward+backward+MomentumSGD(lr=0.05, momentum=0.9)+WeightDecay(5e-4)",
        "device": args.device,
        "amp": args.amp,
        "precision": precision(args),
        "model": {"name": f"VGG-{args.depth}", "depth": args.depth, "width": args.width},
        "tf32": tf32_requested(),
        "warmup_steps": args.warmup,
        "timed_steps": args.iters,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "env": {k: os.environ.get(k) for k in ENV_RECORDED},
        "chainer_stack": describe_gpu_stack(),
        "torch_stack": torch_info() if uses_torch else None,
        "frameworks": [],
        "ratio_images_per_s": {},
    }
    context = benchlib.context(record["benchmark"], args.quick)
    record.update({k: v for k, v in context.items() if k not in record})
    for name in args.frameworks:
        record["frameworks"].append(run_framework(name, args))
        record["ratio_images_per_s"] = ratios(record["frameworks"])
        if args.out:  # after each framework, so a run stopped by a time cap keeps the rest
            write_record(record, args.out)
    benchlib.finish(record)
    if args.out:
        write_record(record, args.out)
    else:
        print(json.dumps(record, indent=2, default=str))
    print(json.dumps({"ratio_images_per_s": record["ratio_images_per_s"]}), file=sys.stderr)
    produced = any("images_per_s" in r for f in record["frameworks"] for r in f["results"])
    return 0 if produced else 1


if __name__ == "__main__":
    sys.exit(main())
