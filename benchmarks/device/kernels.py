"""GPU time of each piece of a fused VGG-16 training step, layer by layer (CUDA events).

Where ``train_throughput.py --profile`` times whole Chainer functions (and,
when the step is host-bound, the host's time with them), this times the
kernels and GEMMs alone with ``cupyx.profiler.benchmark``: im2col, the three
GEMMs and col2im of every convolution, the batch-norm reduction and
elementwise kernels, pooling. Their sum is the GPU's share of a step; set
beside the measured step time it says whether the step waits for the GPU or
for Python. Writes one JSON record::

    python benchmarks/device/kernels.py --batch-size 256 --out kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

import smchainer  # noqa: F401  (the compat layer goes in before chainer)


def vgg16_layers(batch: int, width: float = 1.0) -> list[dict]:
    """(n, h, w, c_in, c_out) of every 3x3 convolution and where pooling follows."""
    from smchainer.models.vgg import STAGE_WIDTHS, STAGES

    layers, c_in, size = [], 3, 32
    for count, channels in zip(STAGES[16], STAGE_WIDTHS, strict=True):
        c_out = max(1, round(channels * width))
        for index in range(count):
            layers.append({"n": batch, "h": size, "w": size, "c_in": c_in, "c_out": c_out,
                           "pool_after": index == count - 1})
            c_in = c_out
        size //= 2
    return layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import chainer
    import cupy
    from cupyx.profiler import benchmark

    from smchainer.functions import channels_last as cl

    rng = cupy.random.default_rng(0)

    def gpu_ms(fn, *fn_args) -> float:
        result = benchmark(fn, fn_args, n_repeat=args.repeat, n_warmup=3)
        return float(np.median(result.gpu_times[0]) * 1000)

    rows, totals = [], defaultdict(float)
    for number, layer in enumerate(vgg16_layers(args.batch_size), 1):
        n, h, w, c, o = layer["n"], layer["h"], layer["w"], layer["c_in"], layer["c_out"]
        x = rng.standard_normal((n, h, w, c), dtype=np.float32)
        W = rng.standard_normal((o, c, 3, 3), dtype=np.float32)
        col = cl.im2col3x3(x)
        wm = cupy.ascontiguousarray(W.transpose(0, 2, 3, 1)).reshape(o, 9 * c)
        y = col @ wm.T
        gy = rng.standard_normal(y.shape, dtype=np.float32)
        times = {
            "im2col": gpu_ms(cl.im2col3x3, x),
            "gemm_forward": gpu_ms(cupy.matmul, col, wm.T),
            "gemm_grad_w": gpu_ms(cupy.matmul, gy.T, col),
        }
        if number > 1:  # the first layer's input needs no gradient
            gcol = gy @ wm
            times["gemm_grad_x"] = gpu_ms(cupy.matmul, gy, wm)
            times["col2im"] = gpu_ms(cl.col2im3x3, gcol, x.shape)

        bn = _batch_norm(o)
        y4 = y.reshape(n, h, w, o)

        def bn_forward(y4=y4, bn=bn):
            return cl.BatchNormReLU(bn["eps"], bn["mean"], bn["var"], 0.9, True).forward(
                (y4, bn["gamma"], bn["beta"]))

        times["bn_relu_forward"] = gpu_ms(bn_forward)
        node = cl.BatchNormReLU(bn["eps"], bn["mean"], bn["var"], 0.9, True)
        yv = node.apply((chainer.Variable(y4), bn["gamma_v"], bn["beta_v"]))[0]
        g = chainer.Variable(gy.reshape(n, h, w, o))

        def bn_backward(node=node, g=g):
            with chainer.using_config("enable_backprop", False):
                return node.backward((0, 1, 2), (g,))

        times["bn_relu_backward"] = gpu_ms(bn_backward)
        del yv
        if layer["pool_after"]:
            pool = cl.MaxPool2x2()
            pooled = pool.forward((y4,))[0]
            gp = chainer.Variable(cupy.ones_like(pooled))
            times["pool_forward"] = gpu_ms(lambda pool=pool, y4=y4: pool.forward((y4,)))

            def pool_backward(pool=pool, gp=gp):
                with chainer.using_config("enable_backprop", False):
                    return pool.backward((0,), (gp,))

            times["pool_backward"] = gpu_ms(pool_backward)
        flops = 2 * n * h * w * 9 * c * o
        times = {k: round(v, 4) for k, v in times.items()}
        for key, value in times.items():
            totals[key] += value
        rows.append({"layer": number, **layer, "ms": times,
                     "gemm_forward_tflops": round(flops / times["gemm_forward"] / 1e9, 1)})
        print(f"conv{number:2d} {h:2d}x{w:<2d} {c:3d}->{o:3d}: " + "  ".join(
            f"{k} {v:.3f}" for k, v in times.items()), file=sys.stderr, flush=True)

    record = {
        "benchmark": "vgg16_fused_kernels",
        "batch_size": args.batch_size,
        "gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "cupy": cupy.__version__,
        "CUPY_TF32": os.environ.get("CUPY_TF32"),
        "layers": rows,
        "total_ms_by_kind": {k: round(v, 3) for k, v in sorted(totals.items(),
                                                             key=lambda kv: -kv[1])},
        "total_ms": round(sum(totals.values()), 3),
    }
    text = json.dumps(record, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    return 0


def _batch_norm(channels: int) -> dict:
    import chainer
    import cupy

    gamma = cupy.ones(channels, dtype=np.float32)
    beta = cupy.zeros(channels, dtype=np.float32)
    return {"eps": 2e-5, "gamma": gamma, "beta": beta,
            "gamma_v": chainer.Variable(gamma), "beta_v": chainer.Variable(beta),
            "mean": cupy.zeros(channels, dtype=np.float32),
            "var": cupy.ones(channels, dtype=np.float32)}


if __name__ == "__main__":
    sys.exit(main())
