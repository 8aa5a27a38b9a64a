"""Channels-last (NHWC) functions for VGG's layers, with fused GPU kernels.

Without cuDNN, Chainer's own GPU path spends most of a VGG step outside the
GEMMs: its convolution writes a column buffer, lets ``tensordot`` copy it
into another layout and returns a strided view, and its batch normalisation
is some twenty small CuPy kernels and reductions over strided axes, each
launched from Python. On an H200 that made batch normalisation alone cost
more than the convolutions (``benchmarks/results/gpu-h200-20261128``).

These functions keep activations channels-last, where each layer is one
contiguous ``(rows, channels)`` matrix:

:func:`conv3x3`
    3x3 convolution, stride 1, padding 1, no bias (every VGG convolution):
    one im2col kernel writing the GEMM's operand in place, one cuBLAS GEMM
    (TF32 when ``CUPY_TF32=1``); backward is two GEMMs and one gather kernel.
:func:`batch_norm_relu`
    Batch normalisation, ReLU and dropout as one function: per-channel sums
    in one pass (coalesced, double accumulation), one kernel for the
    statistics and the running averages, one for the output (dropout's mask
    drawn in it from a counter-based generator, never stored); backward is
    one reduction and one elementwise kernel.
:func:`max_pool_2x2`
    2x2 max pooling, stride 2, with the window's argmax kept as one byte.

The weights keep Chainer's shapes (``W`` is O x C x 3 x 3), so a model trained
this way saves, loads and serves like any other. On the CPU the same
functions run a NumPy implementation of the same arithmetic: it is what the
GPU kernels are tested against, and it lets the fused model run anywhere.
Double backpropagation is not supported (VGG training needs none).
"""
from __future__ import annotations

import functools
from typing import Any

import chainer
import numpy as np
from chainer import backend, function_node

from smchainer.functions import cuda_source

#: Whether the fused path is the default on a GPU (``VGG.fused = None``, the trainer's
#: ``kernels=auto``). The CUDA kernels' logic is tested on the CPU (the same source
#: compiled as C++ and run through the same launches, ``tests/functions``) and NVRTC
#: compiles them, but until ``tests/gpu`` has passed on a GPU with them, GPUs default
#: to the path that has: Chainer's own functions. ``VGG.fused = True`` opts in.
FUSED_BY_DEFAULT_ON_GPU = False

#: Threads per block of the elementwise kernels.
THREADS = 256
#: Column block of the per-channel reductions (one warp across channels).
REDUCE_X = 32
#: Row lanes of the per-channel reductions.
REDUCE_Y = 8

CUDA_SOURCE = cuda_source("channels_last.cu")

KERNEL_NAMES = (
    "smchainer_im2col3x3", "smchainer_col2im3x3", "smchainer_channel_sums",
    "smchainer_bn_statistics", "smchainer_affine_relu", "smchainer_bn_relu_grad",
    "smchainer_bn_fixed", "smchainer_max_pool2x2", "smchainer_max_pool2x2_grad",
)


@functools.cache
def _module(device_id: int) -> Any:
    """The compiled kernels for one GPU (compiled on first use, cached by CuPy on disk)."""
    import cupy

    del device_id  # part of the cache key only: a module is loaded per device
    return cupy.RawModule(code=CUDA_SOURCE, options=("-std=c++17",))


def _kernel(name: str) -> Any:
    import cupy

    return _module(cupy.cuda.Device().id).get_function(name)


def _i64(value: int) -> np.int64:
    return np.int64(value)


def _i32(value: int) -> np.int32:
    return np.int32(value)


def _f64(value: float) -> np.float64:
    return np.float64(value)


def _grid(total: int) -> tuple[tuple[int], tuple[int]]:
    blocks = max(1, min((total + THREADS - 1) // THREADS, 65535 * 8))
    return (blocks,), (THREADS,)


def _row_grid(rows: int, width: int) -> tuple[tuple[int], tuple[int]]:
    """One block per row (up to 2^31 - 1 blocks), a warp multiple of threads for its values."""
    threads = min(THREADS, -(-width // 32) * 32)
    return (max(1, min(rows, 2**31 - 1)),), (threads,)


def _reduce_grid(rows: int, channels: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Grid, block and rows per block of :data:`smchainer_channel_sums`: about 2048 blocks."""
    column_blocks = (channels + REDUCE_X - 1) // REDUCE_X
    row_blocks_wanted = max(1, 2048 // column_blocks)
    rows_per_block = max(REDUCE_Y * 4, -(-rows // row_blocks_wanted))
    row_blocks = max(1, -(-rows // rows_per_block))
    return (column_blocks, row_blocks), (REDUCE_X, REDUCE_Y), rows_per_block


def fused_by_default(on_gpu: bool) -> bool:
    """Whether a model that has not chosen runs these functions: always on the CPU
    (where the NumPy path also trains VGG-16 1.8-2x as fast as Chainer's functions),
    on a GPU as :data:`FUSED_BY_DEFAULT_ON_GPU` says."""
    return not on_gpu or FUSED_BY_DEFAULT_ON_GPU


def _host(xp: Any) -> bool:
    """Whether to run the NumPy implementation (else the CUDA kernels, given ``xp``'s arrays).

    A function of its own so that the tests can run the kernel path on the CPU,
    through the kernels compiled as C++ (``tests/functions/emulation.py``).
    """
    return xp is np


def _require_float32(*arrays: Any) -> None:
    for array in arrays:
        if array.dtype != np.float32:
            raise TypeError(f"the fused GPU kernels take float32 arrays, not {array.dtype}")


def _no_double_backprop(name: str) -> None:
    if chainer.config.enable_backprop:
        raise NotImplementedError(f"{name} does not support double backpropagation")


def _variable(array: Any) -> chainer.Variable:
    return chainer.Variable(array, requires_grad=False)


# --- 3x3 convolution ---------------------------------------------------------------------


def im2col3x3(x: Any) -> Any:
    """The (N*H*W, 9*C) patch matrix of an NHWC array (rows: pixels; columns: kh, kw, c)."""
    n, h, w, c = x.shape
    xp = backend.get_array_module(x)
    if _host(xp):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
        return np.concatenate(patches, axis=3).reshape(n * h * w, 9 * c)
    x = xp.ascontiguousarray(x)
    rows = n * h * w
    col = xp.empty((rows, 9 * c), dtype=x.dtype)
    args = (x, col, _i64(rows), _i32(h), _i32(w), _i32(c))
    _kernel("smchainer_im2col3x3")(*_row_grid(rows, 9 * c), args)
    return col


def col2im3x3(gcol: Any, shape: tuple[int, int, int, int]) -> Any:
    """The adjoint of :func:`im2col3x3`: sums each pixel's entries back into an NHWC array."""
    n, h, w, c = shape
    xp = backend.get_array_module(gcol)
    if _host(xp):
        patches = gcol.reshape(n, h, w, 3, 3, c)
        padded = np.zeros((n, h + 2, w + 2, c), dtype=gcol.dtype)
        for i in range(3):
            for j in range(3):
                padded[:, i:i + h, j:j + w, :] += patches[:, :, :, i, j, :]
        return np.ascontiguousarray(padded[:, 1:h + 1, 1:w + 1, :])
    gcol = xp.ascontiguousarray(gcol)
    gx = xp.empty(shape, dtype=gcol.dtype)
    rows = n * h * w
    args = (gcol, gx, _i64(rows), _i32(h), _i32(w), _i32(c))
    _kernel("smchainer_col2im3x3")(*_row_grid(rows, c), args)
    return gx


class Conv3x3(function_node.FunctionNode):
    """3x3 convolution, stride 1, padding 1, no bias: NHWC input and output, OIHW weights."""

    def forward(self, inputs):
        x, W = inputs
        n, h, w, c = x.shape
        out_channels = W.shape[0]
        if W.shape[1:] != (c, 3, 3):
            raise ValueError(f"conv3x3 needs W of shape (O, {c}, 3, 3), not {W.shape}")
        xp = backend.get_array_module(x)
        if not _host(xp):
            _require_float32(x, W)
        self.x_shape = x.shape
        self.col = im2col3x3(x)
        # The weight matrix in the patch order (kh, kw, c): a small copy per step.
        self.wm = xp.ascontiguousarray(W.transpose(0, 2, 3, 1)).reshape(out_channels, 9 * c)
        y = xp.matmul(self.col, self.wm.T)
        return y.reshape(n, h, w, out_channels),

    def backward(self, indexes, grad_outputs):
        _no_double_backprop("conv3x3")
        gy = grad_outputs[0].array
        xp = backend.get_array_module(gy)
        n, h, w, c = self.x_shape
        out_channels = gy.shape[-1]
        gy = xp.ascontiguousarray(gy).reshape(-1, out_channels)
        grads = []
        if 0 in indexes:
            grads.append(_variable(col2im3x3(xp.matmul(gy, self.wm), self.x_shape)))
        if 1 in indexes:
            gwm = xp.matmul(gy.T, self.col).reshape(out_channels, 3, 3, c)
            grads.append(_variable(xp.ascontiguousarray(gwm.transpose(0, 3, 1, 2))))
        self.col = self.wm = None
        return tuple(grads)


def conv3x3(x, W) -> chainer.Variable:
    """3x3 convolution (stride 1, padding 1, no bias) of an NHWC ``x`` with OIHW ``W``."""
    return Conv3x3().apply((x, W))[0]


# --- batch normalisation + ReLU ---------------------------------------------------------


def dropout_keep(seed: int, total: int, ratio: float) -> np.ndarray:
    """The elements dropout keeps (bool, flat), as the GPU kernel draws them.

    Element ``i`` is kept when the top 24 bits of splitmix64(``seed`` +
    (i + 1) * golden gamma), as a float32 in [0, 1), are at least ``ratio``:
    a counter-based draw, so the mask is a pure function of ``(seed, i)``,
    needs no state or storage, and is the same on the CPU and the GPU.
    """
    z = np.uint64(seed) + (np.arange(total, dtype=np.uint64) + np.uint64(1)) * np.uint64(
        0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    uniform = (z >> np.uint64(40)).astype(np.float32) * np.float32(1 / 16777216)
    return uniform >= np.float32(ratio)


def _dropout_scales(ratio: float) -> tuple[np.float32, np.float32]:
    """Dropout's ratio and the scale of the kept values, as the kernels take them (float32)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"dropout ratio must be in [0, 1), not {ratio}")
    return np.float32(ratio), np.float32(1 / (1 - ratio)) if ratio else np.float32(1)


class BatchNormReLU(function_node.FunctionNode):
    """Training-mode batch normalisation over all axes but the last, ReLU, dropout.

    Updates ``running_mean`` and ``running_var`` in place exactly as
    ``chainer.functions.batch_normalization`` does (the variance unbiased by
    m / (m - 1)). With ``dropout`` > 0 (and ``relu``), each output is then
    kept with probability ``1 - dropout`` and scaled by ``1 / (1 - dropout)``,
    the mask drawn by :func:`dropout_keep` from a seed taken from NumPy's
    global generator (so ``numpy.random.seed`` makes a run repeatable, as it
    does Chainer's CPU dropout). The backward pass needs no mask: an output
    is positive exactly where ReLU passed and dropout kept.
    """

    def __init__(self, eps: float, running_mean, running_var, decay: float, relu: bool,
                 dropout: float = 0.0) -> None:
        self.eps = eps
        self.running_mean = running_mean
        self.running_var = running_var
        self.decay = decay
        self.relu = relu
        if dropout and not relu:
            raise ValueError("batch_norm_relu applies dropout only after the ReLU")
        self.ratio, self.keep_scale = _dropout_scales(dropout)
        self.seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64)) if dropout else 0

    def forward(self, inputs):
        x, gamma, beta = inputs
        self.retain_inputs((0, 1))
        self.retain_outputs((0,))
        xp = backend.get_array_module(x)
        channels = gamma.size
        x2 = xp.ascontiguousarray(x).reshape(-1, channels)
        m = x2.shape[0]
        adjust = m / max(m - 1.0, 1.0)
        if _host(xp):
            mean = x2.mean(axis=0, dtype=np.float64)
            var = np.maximum(np.square(x2, dtype=np.float64).mean(axis=0) - mean**2, 0.0)
            inv_std = 1.0 / np.sqrt(var + self.eps)
            scale = gamma * inv_std
            y = x2 * scale.astype(x.dtype) + (beta - mean * scale).astype(x.dtype)
            if self.relu:
                y = np.maximum(y, 0, out=y)
            if self.ratio > 0:
                keep = dropout_keep(self.seed, y.size, self.ratio).reshape(y.shape)
                y = np.where(keep, y * self.keep_scale, np.float32(0)).astype(x.dtype)
            if self.running_mean is not None:
                self.running_mean *= self.decay
                self.running_mean += ((1 - self.decay) * mean).astype(self.running_mean.dtype)
                self.running_var *= self.decay
                self.running_var += ((1 - self.decay) * adjust * var).astype(self.running_var.dtype)
            self.mean = mean.astype(x.dtype)
            self.inv_std = inv_std.astype(x.dtype)
            return y.astype(x.dtype, copy=False).reshape(x.shape),
        _require_float32(x2, gamma, beta)
        sums = xp.zeros(2 * channels, dtype=np.float64)
        grid, block, rows_per_block = _reduce_grid(m, channels)
        _kernel("smchainer_channel_sums")(grid, block, (
            x2, x2, x2, gamma, gamma, _i64(m), _i32(channels), _i32(rows_per_block),
            _i32(0), _i32(0), np.float32(1), sums,
        ))
        mean, inv_std, scale, shift = (xp.empty(channels, dtype=np.float32) for _ in range(4))
        running_mean, running_var = self.running_mean, self.running_var
        if running_mean is None:  # statistics not tracked: write them into scratch
            running_mean = xp.zeros(channels, dtype=np.float32)
            running_var = xp.zeros(channels, dtype=np.float32)
        _require_float32(running_mean, running_var)
        _kernel("smchainer_bn_statistics")(((channels + THREADS - 1) // THREADS,), (THREADS,), (
            sums, gamma, beta, _i32(channels), _f64(m), _f64(self.eps), _f64(self.decay),
            _f64(adjust), mean, inv_std, scale, shift, running_mean, running_var,
        ))
        y = xp.empty_like(x2)
        _kernel("smchainer_affine_relu")(*_grid(y.size), (
            x2, scale, shift, y, _i64(y.size), _i32(channels), _i32(self.relu),
            self.ratio, self.keep_scale, np.uint64(self.seed),
        ))
        self.mean, self.inv_std = mean, inv_std
        return y.reshape(x.shape),

    def backward(self, indexes, grad_outputs):
        _no_double_backprop("batch_norm_relu")
        x, gamma = self.get_retained_inputs()
        y = self.get_retained_outputs()[0]
        x, gamma, y = x.array, gamma.array, y.array
        gy = grad_outputs[0].array
        xp = backend.get_array_module(x)
        channels = gamma.size
        x2 = xp.ascontiguousarray(x).reshape(-1, channels)
        y2 = y.reshape(-1, channels)
        gy2 = xp.ascontiguousarray(gy).reshape(-1, channels)
        m = x2.shape[0]
        if _host(xp):
            g = np.where(y2 > 0, gy2 * self.keep_scale, 0).astype(x.dtype) if self.relu else gy2
            xhat = (x2 - self.mean) * self.inv_std
            gbeta = g.sum(axis=0, dtype=np.float64)
            ggamma = (g * xhat).sum(axis=0, dtype=np.float64)
            gx = (gamma * self.inv_std) * (
                g - xhat * (ggamma / m).astype(x.dtype) - (gbeta / m).astype(x.dtype)
            )
            grads = gx.astype(x.dtype, copy=False), ggamma.astype(x.dtype), gbeta.astype(x.dtype)
        else:
            sums = xp.zeros(2 * channels, dtype=np.float64)
            grid, block, rows_per_block = _reduce_grid(m, channels)
            _kernel("smchainer_channel_sums")(grid, block, (
                x2, gy2, y2, self.mean, self.inv_std, _i64(m), _i32(channels),
                _i32(rows_per_block), _i32(1), _i32(self.relu), self.keep_scale, sums,
            ))
            gx = xp.empty_like(x2)
            _kernel("smchainer_bn_relu_grad")(*_grid(gx.size), (
                x2, gy2, y2, self.mean, self.inv_std, gamma, sums, gx, _i64(gx.size),
                _i32(channels), _f64(m), _i32(self.relu), self.keep_scale,
            ))
            as_float = sums.astype(np.float32)
            grads = gx, as_float[channels:], as_float[:channels]
        gx, ggamma, gbeta = grads
        return _variable(gx.reshape(x.shape)), _variable(ggamma), _variable(gbeta)


class FixedBatchNormReLU(function_node.FunctionNode):
    """Inference-mode batch normalisation (given mean and variance), then ReLU."""

    def __init__(self, eps: float, relu: bool) -> None:
        self.eps = eps
        self.relu = relu

    def forward(self, inputs):
        x, gamma, beta, mean, var = inputs
        xp = backend.get_array_module(x)
        channels = gamma.size
        x2 = xp.ascontiguousarray(x).reshape(-1, channels)
        if _host(xp):
            scale = gamma / np.sqrt(var.astype(np.float64) + self.eps)
            y = x2 * scale.astype(x.dtype) + (beta - mean * scale).astype(x.dtype)
            if self.relu:
                y = np.maximum(y, 0, out=y)
            self.retain_inputs((0, 3, 4))
            self.retain_outputs((0,))
            self.scale = scale.astype(x.dtype)
            return y.astype(x.dtype, copy=False).reshape(x.shape),
        _require_float32(x2, gamma, beta, mean, var)
        scale = xp.empty(channels, dtype=np.float32)
        shift = xp.empty(channels, dtype=np.float32)
        _kernel("smchainer_bn_fixed")(((channels + THREADS - 1) // THREADS,), (THREADS,), (
            gamma, beta, mean, var, _i32(channels), _f64(self.eps), scale, shift,
        ))
        y = xp.empty_like(x2)
        _kernel("smchainer_affine_relu")(*_grid(y.size), (
            x2, scale, shift, y, _i64(y.size), _i32(channels), _i32(self.relu),
            np.float32(0), np.float32(1), np.uint64(0),
        ))
        self.retain_inputs((0, 3, 4))
        self.retain_outputs((0,))
        self.scale = scale
        return y.reshape(x.shape),

    def backward(self, indexes, grad_outputs):
        # Gradients of x, gamma and beta; the running statistics get none.
        _no_double_backprop("batch_norm_relu")
        x, mean, var = self.get_retained_inputs()
        y = self.get_retained_outputs()[0].array
        gy = grad_outputs[0].array
        channels = self.scale.size
        g = gy.reshape(-1, channels)
        if self.relu:
            g = g * (y.reshape(-1, channels) > 0)
        xp = backend.get_array_module(g)
        xhat = (x.array.reshape(-1, channels) - mean.array) / xp.sqrt(var.array + self.eps)
        grads = {
            0: g * self.scale,
            1: (g * xhat).sum(axis=0),
            2: g.sum(axis=0),
        }
        shapes = {0: gy.shape, 1: (channels,), 2: (channels,)}
        return tuple(
            _variable(grads[i].reshape(shapes[i]).astype(gy.dtype, copy=False))
            if i in grads else None
            for i in indexes
        )


def batch_norm_relu(x, bn: chainer.links.BatchNormalization, relu: bool = True,
                    dropout: float = 0.0):
    """``dropout(relu(bn(x)))`` over the last axis of ``x``, as one fused function.

    Uses the link's parameters and running statistics exactly as the link
    would: batch statistics (and running averages updated with its
    ``decay``) when ``chainer.config.train``, its running statistics
    otherwise. ``dropout`` is the ratio of outputs dropped in training (see
    :class:`BatchNormReLU`); evaluation drops nothing.
    """
    if bn.axis is not None and tuple(bn.axis) != tuple(range(x.ndim - 1)):
        raise ValueError("batch_norm_relu normalises over every axis but the last")
    if chainer.config.train:
        node = BatchNormReLU(bn.eps, bn.avg_mean, bn.avg_var, bn.decay, relu, dropout)
        return node.apply((x, bn.gamma, bn.beta))[0]
    return FixedBatchNormReLU(bn.eps, relu).apply(
        (x, bn.gamma, bn.beta, bn.avg_mean, bn.avg_var)
    )[0]


# --- 2x2 max pooling ---------------------------------------------------------------------


class MaxPool2x2(function_node.FunctionNode):
    """2x2 max pooling, stride 2, of an NHWC array with even height and width."""

    def forward(self, inputs):
        x, = inputs
        n, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"max_pool_2x2 needs an even height and width, not {h} x {w}")
        self.x_shape = x.shape
        xp = backend.get_array_module(x)
        if _host(xp):
            windows = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
            windows = windows.reshape(n, h // 2, w // 2, c, 4)
            self.arg = windows.argmax(axis=-1).astype(np.int8)
            y = np.take_along_axis(windows, self.arg[..., None].astype(np.intp), -1)[..., 0]
            return np.ascontiguousarray(y),
        _require_float32(x)
        x = xp.ascontiguousarray(x)
        y = xp.empty((n, h // 2, w // 2, c), dtype=x.dtype)
        self.arg = xp.empty(y.shape, dtype=np.int8)
        _kernel("smchainer_max_pool2x2")(*_grid(y.size), (
            x, y, self.arg, _i64(y.size), _i32(h), _i32(w), _i32(c),
        ))
        return y,

    def backward(self, indexes, grad_outputs):
        _no_double_backprop("max_pool_2x2")
        gy = grad_outputs[0].array
        xp = backend.get_array_module(gy)
        n, h, w, c = self.x_shape
        if _host(xp):
            onehot = self.arg[..., None] == np.arange(4, dtype=np.int8)
            windows = np.where(onehot, gy[..., None], 0).astype(gy.dtype)
            gx = windows.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
            return (_variable(np.ascontiguousarray(gx.reshape(self.x_shape))),)
        gy = xp.ascontiguousarray(gy)
        gx = xp.empty(self.x_shape, dtype=gy.dtype)
        _kernel("smchainer_max_pool2x2_grad")(*_grid(gx.size), (
            gy, self.arg, gx, _i64(gx.size), _i32(h), _i32(w), _i32(c),
        ))
        return (_variable(gx),)


def max_pool_2x2(x) -> chainer.Variable:
    """2x2 max pooling with stride 2 of an NHWC ``x`` (the first maximum wins ties)."""
    return MaxPool2x2().apply((x,))[0]
