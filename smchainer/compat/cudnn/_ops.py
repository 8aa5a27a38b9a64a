"""Pooling, activation and softmax, forward and backward, with CuPy 7-13's signatures."""
from __future__ import annotations

import ctypes
from typing import Any

from smchainer.compat.cudnn import _context, libcudnn
from smchainer.compat.cudnn._descriptors import (
    Scope,
    create_activation_descriptor,
    create_pooling_descriptor,
    get_data_type,
    is_c_contiguous,
    new_tensor,
    set_tensor_nd,
)
from smchainer.compat.cudnn.constants import (
    CUDNN_NOT_PROPAGATE_NAN,
    CUDNN_SOFTMAX_MODE_CHANNEL,
    CUDNN_SOFTMAX_MODE_INSTANCE,
    CUDNN_TENSOR_NCHW,
)

_ref = ctypes.byref


def _pooling_descriptors(scope: Scope, x: Any, y: Any, ksize: tuple, stride: tuple, pad: tuple,
                         mode: int) -> tuple[Any, Any, Any]:
    """N-d descriptors of ``x`` and ``y`` and the pooling's, held by ``scope``."""
    x_desc, y_desc = scope.hold(new_tensor()), scope.hold(new_tensor())
    set_tensor_nd(x_desc, x)
    set_tensor_nd(y_desc, y)
    return x_desc, y_desc, scope.hold(create_pooling_descriptor(ksize, stride, pad, mode))


def pooling_forward(x: Any, y: Any, ksize: tuple, stride: tuple, pad: tuple, mode: int) -> Any:
    """Pool ``x`` into ``y`` (C-contiguous, allocated by the caller); returns ``y``."""
    rt = _context.runtime()
    x = rt.ascontiguous(x)
    if not is_c_contiguous(y):
        raise ValueError("pooling_forward supports c-contiguous y only")
    one, zero = _context.scalars(x.dtype)
    with Scope() as scope:
        x_desc, y_desc, pool = _pooling_descriptors(scope, x, y, ksize, stride, pad, mode)
        libcudnn.call("cudnnPoolingForward", _context.get_handle(), pool.value, _ref(one),
                      x_desc.value, _context.pointer(x), _ref(zero), y_desc.value,
                      _context.pointer(y))
    return y


def pooling_backward(x: Any, y: Any, gy: Any, ksize: tuple, stride: tuple, pad: tuple,
                     mode: int) -> Any:
    """The gradient of :func:`pooling_forward` with respect to ``x``."""
    rt = _context.runtime()
    gx = rt.empty(tuple(x.shape), x.dtype)
    x, y, gy = rt.ascontiguous(x), rt.ascontiguous(y), rt.ascontiguous(gy)
    one, zero = _context.scalars(x.dtype)
    with Scope() as scope:
        x_desc, y_desc, pool = _pooling_descriptors(scope, x, y, ksize, stride, pad, mode)
        libcudnn.call("cudnnPoolingBackward", _context.get_handle(), pool.value, _ref(one),
                      y_desc.value, _context.pointer(y), y_desc.value, _context.pointer(gy),
                      x_desc.value, _context.pointer(x), _ref(zero), x_desc.value,
                      _context.pointer(gx))
    return gx


def _as_4d(scope: Scope, array: Any) -> Any:
    """``(n, size / n, 1, 1)``: how CuPy lays an elementwise operand out for cuDNN."""
    desc = scope.hold(new_tensor())
    first = int(array.shape[0]) if len(array.shape) else 1
    libcudnn.setTensor4dDescriptor(desc.value, CUDNN_TENSOR_NCHW, get_data_type(array.dtype),
                                   first, int(array.size) // max(first, 1), 1, 1)
    return desc


def activation_forward(x: Any, mode: int, coef: float = 0.0) -> Any:
    """``y = f(x)`` for a cuDNN activation (``coef``: the clipped ReLU's ceiling)."""
    rt = _context.runtime()
    x = rt.ascontiguous(x)
    y = rt.empty(tuple(x.shape), x.dtype)
    one, zero = _context.scalars(x.dtype)
    with Scope() as scope:
        desc = _as_4d(scope, x)
        act = scope.hold(create_activation_descriptor(mode, CUDNN_NOT_PROPAGATE_NAN, coef))
        libcudnn.call("cudnnActivationForward", _context.get_handle(), act.value, _ref(one),
                      desc.value, _context.pointer(x), _ref(zero), desc.value,
                      _context.pointer(y))
    return y


def activation_backward(x: Any, y: Any, gy: Any, mode: int, coef: float = 0.0) -> Any:
    """The gradient of :func:`activation_forward` with respect to ``x``."""
    rt = _context.runtime()
    gx = rt.empty(tuple(x.shape), x.dtype)
    x, y, gy = rt.ascontiguous(x), rt.ascontiguous(y), rt.ascontiguous(gy)
    one, zero = _context.scalars(x.dtype)
    with Scope() as scope:
        desc = _as_4d(scope, y)
        act = scope.hold(create_activation_descriptor(mode, CUDNN_NOT_PROPAGATE_NAN, coef))
        libcudnn.call("cudnnActivationBackward", _context.get_handle(), act.value, _ref(one),
                      desc.value, _context.pointer(y), desc.value, _context.pointer(gy),
                      desc.value, _context.pointer(x), _ref(zero), desc.value,
                      _context.pointer(gx))
    return gx


def _softmax_layout(scope: Scope, array: Any, axis: int) -> tuple[Any, int]:
    """``(before, axis, after, 1)``, and the mode: per channel unless the axis is last and alone."""
    shape = [int(s) for s in array.shape]
    axis = axis + len(shape) if axis < 0 else axis
    left = 1
    for size in shape[:axis]:
        left *= size
    right = 1
    for size in shape[axis + 1:]:
        right *= size
    center = shape[axis]
    desc = scope.hold(new_tensor())
    libcudnn.setTensor4dDescriptor(desc.value, CUDNN_TENSOR_NCHW, get_data_type(array.dtype),
                                   left, center, right, 1)
    if center == 1 and right == 1:
        return desc, CUDNN_SOFTMAX_MODE_INSTANCE
    return desc, CUDNN_SOFTMAX_MODE_CHANNEL


def softmax_forward(x: Any, axis: int, algorithm: int) -> Any:
    """Softmax (or log-softmax, ``CUDNN_SOFTMAX_LOG``) of ``x`` along ``axis``."""
    rt = _context.runtime()
    x = rt.ascontiguous(x)
    y = rt.empty(tuple(x.shape), x.dtype)
    one, zero = _context.scalars(x.dtype)
    with Scope() as scope:
        desc, mode = _softmax_layout(scope, x, axis)
        libcudnn.call("cudnnSoftmaxForward", _context.get_handle(), algorithm, mode, _ref(one),
                      desc.value, _context.pointer(x), _ref(zero), desc.value,
                      _context.pointer(y))
    return y


def softmax_backward(y: Any, gy: Any, axis: int, algorithm: int) -> Any:
    """The gradient of :func:`softmax_forward` from its output ``y``."""
    rt = _context.runtime()
    gx = rt.empty(tuple(y.shape), y.dtype)
    y, gy = rt.ascontiguous(y), rt.ascontiguous(gy)
    one, zero = _context.scalars(y.dtype)
    with Scope() as scope:
        desc, mode = _softmax_layout(scope, y, axis)
        libcudnn.call("cudnnSoftmaxBackward", _context.get_handle(), algorithm, mode, _ref(one),
                      desc.value, _context.pointer(y), desc.value, _context.pointer(gy),
                      _ref(zero), desc.value, _context.pointer(gx))
    return gx
