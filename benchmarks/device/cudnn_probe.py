"""The cuDNN stage of the device run: is cuDNN 9 found, bound, and right? (well under 60 s)

Finds the library as :mod:`smchainer.compat.cudnn` does and prints its path
and version; then runs one VGG convolution (forward + backward) and one batch
normalization (training forward + backward) through Chainer twice, with
``use_cudnn='always'`` (the binding) and ``'never'`` (Chainer's own kernels),
and compares outputs and gradients (``CUPY_TF32=0`` for float32 tolerances)
and times both. Writes one JSON record (``--out``, default ``$OUT/cudnn.json``)::

    CUPY_TF32=0 python benchmarks/device/cudnn_probe.py --out /tmp/cudnn.json

``--stand-in`` runs the binding's functions on host (NumPy) buffers instead of
a GPU: for rehearsing against a stub ``libcudnn.so.9`` where there is none.
Exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

import smchainer  # noqa: F401  (the compat layer, and the binding, go in before chainer)

TOLERANCE = 1e-3  # relative to the largest reference value


def _calls() -> list[str]:
    """Names of the cuDNN functions called from now on (the binding's one entry point)."""
    from smchainer.compat.cudnn import libcudnn

    seen: list[str] = []
    original = libcudnn.call
    if not getattr(original, "_probe", False):
        def counting(name: str, *args: Any) -> None:
            seen.append(name)
            original(name, *args)

        counting._probe = True  # type: ignore[attr-defined]
        counting.seen = seen  # type: ignore[attr-defined]
        libcudnn.call = counting
        return seen
    return original.seen  # type: ignore[attr-defined]


def _difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def compare_on_gpu(name: str, fn: Any, inputs: list[np.ndarray], iters: int) -> dict:
    """Forward + backward of ``fn`` with and without cuDNN: agreement and milliseconds."""
    import chainer

    device = chainer.get_device("@cupy:0")
    seen = _calls()
    out: dict[str, Any] = {"name": name, "shapes": [list(x.shape) for x in inputs]}
    results = {}
    for mode in ("always", "never"):
        xs = [chainer.Variable(device.send(x)) for x in inputs]

        def step(xs: list = xs) -> Any:
            for x in xs:
                x.cleargrad()
            y = fn(*xs)
            y.grad = device.xp.ones_like(y.array)
            y.backward()
            return y

        with chainer.using_config("use_cudnn", mode), chainer.using_config("train", True):
            seen.clear()
            y = step()
            out[f"cudnn_calls_{mode}"] = len(seen)
            device.xp.cuda.Device().synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            device.xp.cuda.Device().synchronize()
            out[f"ms_{mode}"] = round((time.perf_counter() - start) / iters * 1000, 3)
        cpu = chainer.backend.CpuDevice().send
        results[mode] = [cpu(y.array)] + [cpu(x.grad) for x in xs]
    errors = [_difference(a, b) for a, b in zip(results["always"], results["never"], strict=True)]
    out["relative_error"] = [round(e, 8) for e in errors]
    out["speedup"] = round(out["ms_never"] / max(out["ms_always"], 1e-9), 2)
    out["ok"] = (max(errors) < TOLERANCE and out["cudnn_calls_always"] > 0
                 and out["cudnn_calls_never"] == 0)
    return out


def run_gpu(iters: int) -> list[dict]:
    import chainer.functions as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64, 32, 32)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    gamma = (rng.standard_normal(64) + 1).astype(np.float32)
    return [
        compare_on_gpu("convolution_2d", lambda x, w, b: F.convolution_2d(x, w, b, pad=1),
                       [x, w, b], iters),
        compare_on_gpu("batch_normalization",
                       lambda x, g, b: F.batch_normalization(x, g, b, eps=2e-5),
                       [x, gamma, b], iters),
    ]


def run_stand_in() -> list[dict]:
    """The binding's calls on host buffers: they go through, descriptors and all (no figures)."""
    from smchainer.compat.cudnn import _context, highlevel
    from smchainer.compat.cudnn import constants as C

    class Host(_context.Runtime):
        def empty(self, shape, dtype):
            return wrap(np.zeros(shape, dtype))

        def ascontiguous(self, array):
            return array

        def astype(self, array, dtype):
            return wrap(array.array.astype(dtype))

        def copyto(self, dst, src):
            np.copyto(dst.array, src.array, casting="unsafe")

        def alloc(self, nbytes):
            return wrap(np.zeros(max(nbytes, 1), np.uint8)[:nbytes])

        def stream(self):
            return 0

        def device_id(self):
            return 0

        def compute_capability(self):
            return "90"

    def wrap(array: np.ndarray) -> Any:
        return SimpleNamespace(array=array, data=SimpleNamespace(ptr=array.ctypes.data),
                               shape=array.shape, strides=array.strides, dtype=array.dtype,
                               size=array.size, astype=lambda d: wrap(array.astype(d)))

    _context.set_runtime(Host())
    seen = _calls()
    x, w, b = (wrap(np.ones(s, np.float32)) for s in ((64, 64, 32, 32), (64, 64, 3, 3), (64,)))
    y, gw = wrap(np.zeros((64, 64, 32, 32), np.float32)), wrap(np.zeros((64, 64, 3, 3), np.float32))
    seen.clear()
    conv: dict[str, Any] = {"auto_tune": False, "tensor_core": "auto"}
    highlevel.convolution_forward(x, w, b, y, (1, 1), (1, 1), (1, 1), 1, **conv)
    highlevel.convolution_backward_data(w, y, None, x, (1, 1), (1, 1), (1, 1), 1,
                                        deterministic=False, **conv)
    highlevel.convolution_backward_filter(x, y, gw, (1, 1), (1, 1), (1, 1), 1,
                                          deterministic=False, **conv)
    conv_calls = len(seen)
    seen.clear()
    mean, var = wrap(np.zeros(64, np.float32)), wrap(np.ones(64, np.float32))
    _, _, m, s = highlevel.batch_normalization_forward_training_ex(
        x, b, b, mean, var, None, None, 2e-5, 0.9, True, C.CUDNN_BATCHNORM_SPATIAL, False)
    highlevel.batch_normalization_backward(x, b, y, m, s, 2e-5, True, C.CUDNN_BATCHNORM_SPATIAL,
                                           False)
    return [{"name": "convolution_2d", "stand_in": True, "cudnn_calls_always": conv_calls,
             "ok": conv_calls > 0},
            {"name": "batch_normalization", "stand_in": True, "cudnn_calls_always": len(seen),
             "ok": len(seen) > 0}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cudnn.json"))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--stand-in", action="store_true",
                        help="host buffers instead of a GPU (rehearsal with a stub library)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import chainer.backends.cuda as cuda

    from smchainer.compat import cudnn

    record: dict[str, Any] = {
        "probe": "cudnn", "stand_in": args.stand_in, "binding": cudnn.status(),
        "describe": cudnn.describe(), "cudnn_enabled": bool(cuda.cudnn_enabled),
        "chainer_cudnn_version": getattr(cuda, "_cudnn_version", -1),
        "env": {k: os.environ.get(k) for k in ("CUPY_TF32", "CHAINER_CUDNN", "SMCHAINER_CUDNN",
                                                 "SMCHAINER_CUDNN_LIBRARY")},
        "checks": [],
    }
    print(f"cuDNN: {record['describe']}", flush=True)
    try:
        if not record["binding"]["active"]:
            raise RuntimeError(f"the binding is not active: {record['binding']['reason']}")
        record["checks"] = run_stand_in() if args.stand_in else run_gpu(args.iters)
    except Exception as exc:  # recorded: the stage fails, the run goes on
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["ok"] = bool(record["checks"]) and all(c["ok"] for c in record["checks"])
    record["seconds"] = round(time.perf_counter() - start, 2)
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=2, default=str)
    print(json.dumps({k: record[k] for k in ("ok", "checks", "seconds")}, default=str))
    if "error" in record:
        print(record["error"], file=sys.stderr)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
