"""Tensor, filter, convolution, pooling and activation descriptors for an array.

The rules are CuPy 7-13's: 4-D arrays get ``cudnnSetTensor4dDescriptor`` in
the layout given (NCHW or NHWC), others an N-d descriptor from their element
strides; a size-1 axis takes the C-contiguous stride; only C-contiguous arrays
are accepted where cuDNN's layout is implied.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy

from smchainer.compat.cudnn import libcudnn
from smchainer.compat.cudnn.constants import (
    CUDNN_DATA_DOUBLE,
    CUDNN_DATA_FLOAT,
    CUDNN_DATA_HALF,
    CUDNN_DEFAULT_MATH,
    CUDNN_FMA_MATH,
    CUDNN_NOT_PROPAGATE_NAN,
    CUDNN_PROPAGATE_NAN,
    CUDNN_TENSOR_NCHW,
    CUDNN_TENSOR_NHWC,
    CUDNN_TENSOR_OP_MATH,
)

_thread_local = threading.local()


class Descriptor:
    """A cuDNN descriptor, destroyed once: by :meth:`destroy` or when collected."""

    def __init__(self, value: int, destroyer: Callable[[int], None] | None) -> None:
        self.value = value
        self._destroy = destroyer

    def destroy(self) -> None:
        if self.value and self._destroy is not None:
            value, self.value = self.value, 0
            self._destroy(value)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.destroy()


def get_data_type(dtype: Any) -> int:
    """``CUDNN_DATA_FLOAT``/``DOUBLE``/``HALF`` for float32/float64/float16, else ``TypeError``."""
    char = numpy.dtype(dtype).char
    types = {"f": CUDNN_DATA_FLOAT, "d": CUDNN_DATA_DOUBLE, "e": CUDNN_DATA_HALF}
    if char not in types:
        raise TypeError(f"Dtype {numpy.dtype(dtype)} is not supported in cuDNN")
    return types[char]


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    """C-contiguous element strides of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return strides[::-1]


def is_c_contiguous(array: Any) -> bool:
    """Whether ``array``'s strides are C-contiguous (size-1 axes may have any stride)."""
    itemsize = numpy.dtype(array.dtype).itemsize
    expected = contiguous_strides(array.shape)
    return all(size <= 1 or stride == step * itemsize
               for size, stride, step in zip(array.shape, array.strides, expected, strict=True))


def element_strides(array: Any) -> list[int]:
    """``array``'s strides in elements; a size-1 axis takes the stride C order would give it."""
    itemsize = numpy.dtype(array.dtype).itemsize
    strides = [int(s) // itemsize for s in array.strides]
    following = 1
    for i in reversed(range(len(strides))):
        if array.shape[i] <= 1:
            strides[i] = following
        else:
            following = int(array.shape[i]) * strides[i]
    return strides


def _require_contiguous(array: Any) -> None:
    if not is_c_contiguous(array):
        raise ValueError("cupy.cudnn (smchainer) supports c-contiguous arrays only")


def new_tensor() -> Descriptor:
    """An unset tensor descriptor."""
    return Descriptor(libcudnn.createTensorDescriptor(), libcudnn.destroyTensorDescriptor)


def set_tensor_nd(desc: Descriptor, array: Any, data_type: int | None = None) -> None:
    """An N-d descriptor with ``array``'s shape and element strides."""
    dtype = get_data_type(array.dtype) if data_type is None else data_type
    libcudnn.setTensorNdDescriptor(desc.value, dtype, list(array.shape), element_strides(array))


def _nchw(shape: Sequence[int], format: int) -> tuple[int, int, int, int]:
    """A 4-D shape in ``format`` (``(n, c, h, w)`` or ``(n, h, w, c)``) as ``(n, c, h, w)``."""
    if format == CUDNN_TENSOR_NCHW:
        n, c, h, w = shape
    elif format == CUDNN_TENSOR_NHWC:
        n, h, w, c = shape
    else:
        raise ValueError(f"unknown cudnnTensorFormat: {format}")
    return n, c, h, w


def set_tensor(desc: Descriptor, array: Any, format: int = CUDNN_TENSOR_NCHW) -> None:
    """4-D in ``format`` (NCHW, or NHWC for an ``(n, h, w, c)`` array), else N-d."""
    _require_contiguous(array)
    if len(array.shape) != 4:
        set_tensor_nd(desc, array)
        return
    n, c, h, w = _nchw(array.shape, format)
    libcudnn.setTensor4dDescriptor(desc.value, format, get_data_type(array.dtype), n, c, h, w)


def set_tensor_shape(desc: Descriptor, shape: Sequence[int], dtype: Any) -> None:
    """A packed NCHW descriptor of ``shape`` (4-D) or an N-d one, for arrays viewed reshaped."""
    data_type = get_data_type(dtype)
    if len(shape) == 4:
        libcudnn.setTensor4dDescriptor(desc.value, CUDNN_TENSOR_NCHW, data_type, *shape)
    else:
        libcudnn.setTensorNdDescriptor(desc.value, data_type, list(shape),
                                       contiguous_strides(shape))


def create_tensor_descriptor(arr: Any, format: int = CUDNN_TENSOR_NCHW) -> Descriptor:
    """A tensor descriptor of C-contiguous ``arr`` (4-D in ``format``, else N-d)."""
    desc = new_tensor()
    set_tensor(desc, arr, format)
    return desc


def create_uninitialized_tensor_descriptor() -> Descriptor:
    """A tensor descriptor to be set later (by ``cudnnDeriveBNTensorDescriptor``, say)."""
    return new_tensor()


def create_tensor_nd_descriptor(arr: Any) -> Descriptor:
    """An N-d descriptor of C-contiguous ``arr``, cached per thread by dtype and shape."""
    if int(arr.size) == 0:
        return Descriptor(0, None)
    _require_contiguous(arr)
    key = (get_data_type(arr.dtype), tuple(arr.shape))
    cache = getattr(_thread_local, "nd_tensors", None)
    if cache is None:
        cache = _thread_local.nd_tensors = {}
    if key not in cache:
        desc = new_tensor()
        set_tensor_nd(desc, arr, key[0])
        cache[key] = desc
    return cache[key]


def set_filter(desc: Descriptor, arr: Any, format: int = CUDNN_TENSOR_NCHW) -> None:
    """4-D ``(k, c, h, w)`` in NCHW or ``(k, h, w, c)`` in NHWC; N-d filters as they are."""
    data_type = get_data_type(arr.dtype)
    if len(arr.shape) == 4:
        k, c, h, w = _nchw(arr.shape, format)
        libcudnn.setFilter4dDescriptor(desc.value, data_type, format, k, c, h, w)
    else:
        libcudnn.setFilterNdDescriptor(desc.value, data_type, format, list(arr.shape))


def create_filter_descriptor(arr: Any, format: int = CUDNN_TENSOR_NCHW) -> Descriptor:
    """A filter descriptor of ``arr`` (``(out, in / groups, kh, kw)`` in NCHW)."""
    desc = Descriptor(libcudnn.createFilterDescriptor(), libcudnn.destroyFilterDescriptor)
    set_filter(desc, arr, format)
    return desc


def create_convolution_descriptor(pad: Sequence[int], stride: Sequence[int], dtype: Any,
                                  mode: int = 1, dilation: Sequence[int] | None = None,
                                  use_tensor_core: bool = False, groups: int = 1,
                                  math_type: int | None = None) -> Descriptor:
    """A convolution descriptor (cross-correlation by default), compute type float for half.

    ``math_type`` defaults to what :func:`choose_math`
    chooses for ``dtype`` (TF32 only when ``CUPY_TF32=1``).
    """

    if len(pad) != len(stride):
        raise ValueError("pad and stride must be of same length")
    dilation = tuple(dilation) if dilation is not None else (1,) * len(pad)
    compute = get_data_type(dtype)
    if compute == CUDNN_DATA_HALF:
        compute = CUDNN_DATA_FLOAT
    desc = Descriptor(libcudnn.createConvolutionDescriptor(),
                      libcudnn.destroyConvolutionDescriptor)
    libcudnn.setConvolutionNdDescriptor(desc.value, list(pad), list(stride), list(dilation),
                                        mode, compute)
    chosen = choose_math(dtype, use_tensor_core) if math_type is None else math_type
    libcudnn.setConvolutionMathType(desc.value, chosen)
    if groups > 1:
        libcudnn.setConvolutionGroupCount(desc.value, groups)
    return desc


def create_pooling_descriptor(ksize: Sequence[int], stride: Sequence[int],
                              pad: Sequence[int], mode: int) -> Descriptor:
    """A pooling descriptor (2-D or N-d), NaN not propagated."""
    if not len(ksize) == len(stride) == len(pad):
        raise ValueError("ksize, stride, and pad must be of same length")
    desc = Descriptor(libcudnn.createPoolingDescriptor(), libcudnn.destroyPoolingDescriptor)
    libcudnn.setPoolingNdDescriptor(desc.value, mode, CUDNN_NOT_PROPAGATE_NAN,
                                    list(ksize), list(pad), list(stride))
    return desc


def create_activation_descriptor(mode: int, nan_prop_mode: int = CUDNN_PROPAGATE_NAN,
                                 coef: float = 0.0) -> Descriptor:
    """An activation descriptor (``coef``: the clipped ReLU's ceiling, the ELU's alpha)."""
    desc = Descriptor(libcudnn.createActivationDescriptor(),
                      libcudnn.destroyActivationDescriptor)
    libcudnn.setActivationDescriptor(desc.value, mode, nan_prop_mode, coef)
    return desc


class Scope(contextlib.AbstractContextManager):
    """Descriptors made for one call, all destroyed when it ends (also on error)."""

    def __init__(self) -> None:
        self._held: list[Descriptor] = []

    def hold(self, desc: Descriptor) -> Descriptor:
        self._held.append(desc)
        return desc

    def tensor(self, array: Any, format: int = CUDNN_TENSOR_NCHW) -> Descriptor:
        return self.hold(create_tensor_descriptor(array, format))

    def __exit__(self, *exc: object) -> None:
        while self._held:
            self._held.pop().destroy()


def tf32_enabled() -> bool:
    """``CUPY_TF32=1``: float32 convolutions may use TF32 tensor cores."""
    return os.environ.get("CUPY_TF32", "0") == "1"


def choose_math(dtype: Any, use_tensor_core: bool) -> int:
    """The descriptor's math type before an algorithm is chosen."""
    if use_tensor_core:
        return CUDNN_TENSOR_OP_MATH
    if numpy.dtype(dtype).char == "f" and not tf32_enabled():
        return CUDNN_FMA_MATH
    return CUDNN_DEFAULT_MATH
