"""Convolution forward, backward data and backward filter, with CuPy 7-13's signatures.

Algorithm choice: ``cudnnGet*Algorithm_v7`` (cuDNN's heuristics) by default,
``cudnnFind*AlgorithmEx`` (timed on the device) with ``auto_tune``; the first
result that succeeded, fits :func:`get_max_workspace_size` and, with
``deterministic``, is deterministic. Choices are cached per shape, dtype,
parameters and workspace limit, heuristics and tuning apart. The workspace is
what ``cudnnGet*WorkspaceSize`` reports for the chosen algorithm.

Math type (TF32): a float32 convolution runs with ``CUDNN_FMA_MATH`` (no
TF32) unless ``CUPY_TF32=1``, also when the chosen algorithm prefers tensor
cores, as PyTorch does with ``allow_tf32 = False``; ``NVIDIA_TF32_OVERRIDE=0``
turns TF32 off in cuDNN whatever the binding asks. float16 gets
``CUDNN_TENSOR_OP_MATH`` when tensor cores are requested (Chainer's
``use_cudnn_tensor_core``), else ``CUDNN_DEFAULT_MATH`` (which lets cuDNN 9
use them anyway).
"""
from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from smchainer.compat.cudnn import _context, libcudnn
from smchainer.compat.cudnn._context import is_tensor_core_available
from smchainer.compat.cudnn._descriptors import (
    Descriptor,
    Scope,
    create_convolution_descriptor,
    create_filter_descriptor,
    new_tensor,
    set_tensor_shape,
    tf32_enabled,
)
from smchainer.compat.cudnn.constants import (
    CUDNN_CROSS_CORRELATION,
    CUDNN_DETERMINISTIC,
    CUDNN_FMA_MATH,
    CUDNN_STATUS_SUCCESS,
    CUDNN_TENSOR_NCHW,
)

logger = logging.getLogger(__name__)

#: Results asked of the heuristics and of the search.
_REQUESTED = 8


@dataclass(frozen=True)
class Algorithm:
    """A chosen algorithm, its workspace (as the query reported it) and math type."""

    algo: int
    memory: int
    math_type: int


@dataclass(frozen=True)
class _Operation:
    """One of the three convolutions: the cuDNN names of its calls."""

    name: str

    @property
    def heuristic(self) -> str:
        return f"cudnnGet{self.name}Algorithm_v7"

    @property
    def find(self) -> str:
        return f"cudnnFind{self.name}AlgorithmEx"

    @property
    def workspace(self) -> str:
        return f"cudnnGet{self.name}WorkspaceSize"

    @property
    def execute(self) -> str:
        return f"cudnn{self.name}"


FORWARD = _Operation("ConvolutionForward")
BACKWARD_DATA = _Operation("ConvolutionBackwardData")
BACKWARD_FILTER = _Operation("ConvolutionBackwardFilter")

_heuristic_cache: dict[tuple, Algorithm] = {}
_tuned_cache: dict[tuple, Algorithm] = {}


def clear_caches() -> None:
    """Forget every algorithm chosen so far."""
    _heuristic_cache.clear()
    _tuned_cache.clear()


def _choose(results: list[libcudnn.AlgoPerf], limit: int, deterministic: bool,
            what: str) -> Algorithm:
    for perf in results:
        if perf.status != CUDNN_STATUS_SUCCESS:
            continue
        if deterministic and perf.determinism != CUDNN_DETERMINISTIC:
            continue
        if perf.memory > limit:
            logger.debug("%s: algorithm %d needs %d bytes of workspace (limit %d)",
                         what, perf.algo, perf.memory, limit)
            continue
        return Algorithm(int(perf.algo), int(perf.memory), int(perf.mathType))
    kind = "deterministic " if deterministic else ""
    raise RuntimeError(f"No {kind}{what} algo available with workspace size less equal {limit}")


def _run(op: _Operation, descs: Sequence[Descriptor], conv: Descriptor, arrays: Sequence[Any],
         key: tuple, auto_tune: bool, deterministic: bool, dtype: Any) -> None:
    """Choose (or recall) an algorithm for ``op`` and run it: ``arrays[2] = op(arrays[0:2])``."""
    rt = _context.runtime()
    handle = _context.get_handle()
    limit = _context.get_max_workspace_size()
    d1, d2, d3 = (d.value for d in descs)
    p1, p2, p3 = (_context.pointer(a) for a in arrays)
    key = (rt.device_id(), op.name, *key, limit)
    cache = _tuned_cache if auto_tune else _heuristic_cache
    algorithm = cache.get(key)
    if algorithm is None:
        if auto_tune:
            buffer = rt.alloc(limit)
            results = libcudnn.perf_query(
                op.find, _REQUESTED, handle, d1, p1, d2, p2, conv.value, d3, p3,
                find_tail=(_context.pointer(buffer), _context.nbytes(buffer)))
            del buffer
        else:
            results = libcudnn.perf_query(op.heuristic, _REQUESTED, handle, d1, d2, conv.value,
                                          d3)
        algorithm = cache[key] = _choose(results, limit, deterministic, op.name)
    chosen_math = algorithm.math_type
    if numpy.dtype(dtype).char == "f" and not tf32_enabled():
        chosen_math = CUDNN_FMA_MATH  # the algorithm may prefer TF32: not asked for
    libcudnn.setConvolutionMathType(conv.value, chosen_math)
    size = libcudnn.size_query(op.workspace, handle, d1, d2, conv.value, d3, algorithm.algo)
    workspace = rt.alloc(size) if size else None
    one, zero = _context.scalars(dtype)
    libcudnn.call(op.execute, handle, _ref(one), d1, p1, d2, p2, conv.value, algorithm.algo,
                  _context.pointer(workspace), _context.nbytes(workspace), _ref(zero), d3, p3)


def _ref(value: Any) -> Any:
    return ctypes.byref(value)


def _should_use_tensor_core(tensor_core: str, dtype: Any) -> bool:
    if tensor_core in ("auto", "always"):
        return is_tensor_core_available(dtype)
    if tensor_core == "never":
        return False
    raise ValueError('tensor_code_mode must be either of "always", "auto", or "never".')


def _add_bias(b: Any, y: Any, y_desc: Descriptor) -> None:
    """``y += b`` broadcast over channels (axis 1 of the logical NCHW shape)."""
    rt = _context.runtime()
    b = rt.ascontiguous(b)
    shape = [1] * len(y.shape)
    shape[1] = int(b.size)
    with Scope() as scope:
        b_desc = scope.hold(new_tensor())
        set_tensor_shape(b_desc, shape, b.dtype)
        one, _ = _context.scalars(y.dtype)
        libcudnn.call("cudnnAddTensor", _context.get_handle(), _ref(one), b_desc.value,
                      _context.pointer(b), _ref(one), y_desc.value, _context.pointer(y))


def _conv_key(a: Any, b: Any, c: Any, pad: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int], groups: int, layouts: tuple[int, int],
              use_tensor_core: bool, deterministic: bool) -> tuple:
    return (tuple(a.shape), tuple(b.shape), tuple(c.shape), numpy.dtype(a.dtype).str,
            tuple(pad), tuple(stride), tuple(dilation), groups, layouts, use_tensor_core,
            deterministic, tf32_enabled())


def _descriptors(scope: Scope, tensors: Sequence[Any], filter_array: Any, pad: tuple,
                 stride: tuple, dilation: tuple, groups: int, use_tc: bool, d_layout: int,
                 w_layout: int) -> tuple[list[Descriptor], Descriptor, Descriptor]:
    """The two tensors', the filter's and the convolution's descriptors, held by ``scope``."""
    descs = [scope.tensor(array, d_layout) for array in tensors]
    w_desc = scope.hold(create_filter_descriptor(filter_array, w_layout))
    conv = scope.hold(create_convolution_descriptor(
        pad, stride, tensors[0].dtype, CUDNN_CROSS_CORRELATION, dilation, use_tc, groups))
    return descs, w_desc, conv


def convolution_forward(x: Any, W: Any, b: Any, y: Any, pad: tuple, stride: tuple,  # noqa: N803
                        dilation: tuple, groups: int, *, auto_tune: bool, tensor_core: str,
                        d_layout: int = CUDNN_TENSOR_NCHW,
                        w_layout: int = CUDNN_TENSOR_NCHW) -> None:
    """``y = conv(x, W) (+ b)``, written into ``y`` (C-contiguous, allocated by the caller)."""
    use_tc = _should_use_tensor_core(tensor_core, x.dtype) and all(d == 1 for d in dilation)
    rt = _context.runtime()
    x, W = rt.ascontiguous(x), rt.ascontiguous(W)
    with Scope() as scope:
        (x_desc, y_desc), w_desc, conv = _descriptors(
            scope, (x, y), W, pad, stride, dilation, groups, use_tc, d_layout, w_layout)
        key = _conv_key(x, W, y, pad, stride, dilation, groups, (d_layout, w_layout), use_tc,
                        False)
        try:
            _run(FORWARD, (x_desc, w_desc, y_desc), conv, (x, W, y), key, auto_tune, False,
                 x.dtype)
        except libcudnn.CuDNNError as error:
            error.add_infos([
                "func: cudnnConvolutionForward",
                f"x: {_info(x)}", f"W: {_info(W)}", f"b: {_info(b)}", f"y: {_info(y)}",
                f"pad={pad!r}, stride={stride!r}, dilation={dilation!r}, groups={groups!r}",
                f"auto_tune={auto_tune!r}, tensor_core={tensor_core!r}",
                f"d_layout={d_layout!r}, w_layout={w_layout!r}",
            ])
            raise
        if b is not None:
            _add_bias(b, y, y_desc)


def convolution_backward_filter(x: Any, gy: Any, gW: Any, pad: tuple, stride: tuple,  # noqa: N803
                                dilation: tuple, groups: int, *, deterministic: bool,
                                auto_tune: bool, tensor_core: str,
                                d_layout: int = CUDNN_TENSOR_NCHW,
                                w_layout: int = CUDNN_TENSOR_NCHW) -> None:
    """``gW = dconv/dW (x, gy)``, written into ``gW``."""
    use_tc = not deterministic and _should_use_tensor_core(tensor_core, x.dtype)
    rt = _context.runtime()
    x, gy = rt.ascontiguous(x), rt.ascontiguous(gy)
    with Scope() as scope:
        (x_desc, gy_desc), w_desc, conv = _descriptors(
            scope, (x, gy), gW, pad, stride, dilation, groups, use_tc, d_layout, w_layout)
        key = _conv_key(x, gy, gW, pad, stride, dilation, groups, (d_layout, w_layout), use_tc,
                        deterministic)
        _run(BACKWARD_FILTER, (x_desc, gy_desc, w_desc), conv, (x, gy, gW), key,
             auto_tune and not deterministic, deterministic, x.dtype)


def convolution_backward_data(W: Any, x: Any, b: Any, y: Any, pad: tuple, stride: tuple,  # noqa: N803
                              dilation: tuple, groups: int, *, deterministic: bool,
                              auto_tune: bool, tensor_core: str,
                              d_layout: int = CUDNN_TENSOR_NCHW,
                              w_layout: int = CUDNN_TENSOR_NCHW) -> None:
    """``y = dconv/dx (W, x) (+ b)``: the deconvolution of ``x``, written into ``y``."""
    use_tc = (not deterministic and _should_use_tensor_core(tensor_core, x.dtype)
              and all(d == 1 for d in dilation))
    rt = _context.runtime()
    x, W = rt.ascontiguous(x), rt.ascontiguous(W)
    with Scope() as scope:
        (x_desc, y_desc), w_desc, conv = _descriptors(
            scope, (x, y), W, pad, stride, dilation, groups, use_tc, d_layout, w_layout)
        key = _conv_key(W, x, y, pad, stride, dilation, groups, (d_layout, w_layout), use_tc,
                        deterministic)
        _run(BACKWARD_DATA, (w_desc, x_desc, y_desc), conv, (W, x, y), key,
             auto_tune and not deterministic, deterministic, x.dtype)
        if b is not None:
            _add_bias(b, y, y_desc)


def _info(array: Any) -> str:
    if array is None:
        return "None"
    return f"shape={tuple(array.shape)!r}, dtype={numpy.dtype(array.dtype).name}, " \
           f"strides={tuple(array.strides)!r}"
