"""Batch normalization (training, inference, backward) with CuPy 7-13's signatures.

Through cuDNN's ``...Ex`` calls, operation ``CUDNN_BATCHNORM_OPS_BN``, as CuPy
did from cuDNN 7.4.1 on. The parameters (gamma, beta, statistics) are in the
type cuDNN derives for them: double for double data, else float, so float16
inputs get float32 parameters (cast here, and the running statistics copied
back). ``reserve_space`` exists only for the fast NHWC float16 kernel
(``CUDNN_BATCHNORM_SPATIAL_PERSISTENT``, channels a multiple of 4), as in CuPy.
"""
from __future__ import annotations

import ctypes
import warnings
from typing import Any

import numpy

from smchainer.compat.cudnn import _context, libcudnn
from smchainer.compat.cudnn._descriptors import Descriptor, Scope, get_data_type, new_tensor
from smchainer.compat.cudnn.constants import (
    CUDNN_BATCHNORM_OPS_BN,
    CUDNN_BATCHNORM_SPATIAL_PERSISTENT,
    CUDNN_ERRQUERY_BLOCKING,
    CUDNN_STATUS_SUCCESS,
    CUDNN_TENSOR_NCHW,
    CUDNN_TENSOR_NHWC,
)

_ref = ctypes.byref


def _param_dtype(dtype: Any) -> Any:
    return numpy.dtype(numpy.float64 if numpy.dtype(dtype).char == "d" else numpy.float32)


def _x_descriptor(scope: Scope, x: Any, is_for_conv2d: bool, d_layout: int) -> Descriptor:
    if is_for_conv2d:
        return scope.tensor(x, d_layout)
    channels = int(x.shape[-1]) if len(x.shape) else 1
    desc = scope.hold(new_tensor())
    libcudnn.setTensor4dDescriptor(desc.value, CUDNN_TENSOR_NCHW, get_data_type(x.dtype),
                                   int(x.size) // max(channels, 1), channels, 1, 1)
    return desc


def _bn_descriptor(scope: Scope, x_desc: Descriptor, mode: int) -> Descriptor:
    derived = scope.hold(new_tensor())
    libcudnn.deriveBNTensorDescriptor(derived.value, x_desc.value, mode)
    return derived


def _params(rt: _context.Runtime, dtype: Any, *arrays: Any) -> list[Any]:
    return [rt.ascontiguous(a) if a.dtype == dtype else rt.astype(a, dtype) for a in arrays]


def _check_overflow(handle: int, debug: bool, mode: int) -> None:
    if debug and mode == CUDNN_BATCHNORM_SPATIAL_PERSISTENT:
        status = libcudnn.queryRuntimeError(handle, CUDNN_ERRQUERY_BLOCKING)
        if status != CUDNN_STATUS_SUCCESS:
            warnings.warn("A numerical overflow might have happened in cuDNN "
                          f"batch normalization (status:{status})", stacklevel=3)


def _forward_training(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                      mean: Any, inv_std: Any, eps: float, decay: float, is_for_conv2d: bool,
                      cudnn_mode: int, debug: bool, d_layout: int) -> tuple:
    if (mean is None) != (inv_std is None):
        raise ValueError("Both mean and inv_std must be None if one is.")
    rt = _context.runtime()
    x = rt.ascontiguous(x)
    y = rt.empty(tuple(x.shape), x.dtype)
    dtype = _param_dtype(x.dtype)
    gamma, beta, mean_tmp, var_tmp = _params(rt, dtype, gamma, beta, running_mean, running_var)
    if mean is None:
        mean, inv_std = rt.empty(tuple(gamma.shape), dtype), rt.empty(tuple(gamma.shape), dtype)
    one, zero = _context.scalars(x.dtype)
    handle = _context.get_handle()
    workspace = reserve = None
    with Scope() as scope:
        x_desc = _x_descriptor(scope, x, is_for_conv2d, d_layout)
        bn_desc = _bn_descriptor(scope, x_desc, cudnn_mode)
        size = libcudnn.size_query(
            "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize", handle, cudnn_mode,
            CUDNN_BATCHNORM_OPS_BN, x_desc.value, x_desc.value, x_desc.value, bn_desc.value,
            None)
        workspace = rt.alloc(size) if size else None
        if (cudnn_mode == CUDNN_BATCHNORM_SPATIAL_PERSISTENT and x.dtype == numpy.float16
                and d_layout == CUDNN_TENSOR_NHWC and int(x.shape[3]) % 4 == 0):
            size = libcudnn.size_query(
                "cudnnGetBatchNormalizationTrainingExReserveSpaceSize", handle, cudnn_mode,
                CUDNN_BATCHNORM_OPS_BN, None, x_desc.value)
            reserve = rt.alloc(size)
        p = _context.pointer
        libcudnn.call(
            "cudnnBatchNormalizationForwardTrainingEx", handle, cudnn_mode,
            CUDNN_BATCHNORM_OPS_BN, _ref(one), _ref(zero), x_desc.value, p(x), x_desc.value,
            None, x_desc.value, p(y), bn_desc.value, p(gamma), p(beta), 1.0 - decay,
            p(mean_tmp), p(var_tmp), eps, p(mean), p(inv_std), None, p(workspace),
            _context.nbytes(workspace), p(reserve), _context.nbytes(reserve))
        _check_overflow(handle, debug, cudnn_mode)
    if mean_tmp is not running_mean:
        rt.copyto(running_mean, mean_tmp)
        rt.copyto(running_var, var_tmp)
    return reserve, y, mean, inv_std


def batch_normalization_forward_training(
        x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any, mean: Any,
        inv_std: Any, eps: float, decay: float, is_for_conv2d: bool, cudnn_mode: int,
        debug: bool, d_layout: int = CUDNN_TENSOR_NCHW) -> Any:
    """``y`` (with the saved mean and inverse std when ``mean`` is None); running stats updated."""
    _, y, save_mean, save_inv_std = _forward_training(
        x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay, is_for_conv2d,
        cudnn_mode, debug, d_layout)
    return (y, save_mean, save_inv_std) if mean is None else y


def batch_normalization_forward_training_ex(
        x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any, mean: Any,
        inv_std: Any, eps: float, decay: float, is_for_conv2d: bool, cudnn_mode: int,
        debug: bool, d_layout: int = CUDNN_TENSOR_NCHW) -> tuple:
    """As :func:`batch_normalization_forward_training`, with the reserve space first."""
    reserve, y, save_mean, save_inv_std = _forward_training(
        x, gamma, beta, running_mean, running_var, mean, inv_std, eps, decay, is_for_conv2d,
        cudnn_mode, debug, d_layout)
    return (reserve, y, save_mean, save_inv_std) if mean is None else (reserve, y)


def batch_normalization_forward_inference(
        x: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float, is_for_conv2d: bool,
        cudnn_mode: int, d_layout: int = CUDNN_TENSOR_NCHW) -> Any:
    """``y = gamma (x - mean) / sqrt(var + eps) + beta``."""
    rt = _context.runtime()
    x = rt.ascontiguous(x)
    y = rt.empty(tuple(x.shape), x.dtype)
    gamma, beta, mean, var = _params(rt, _param_dtype(x.dtype), gamma, beta, mean, var)
    one, zero = _context.scalars(x.dtype)
    p = _context.pointer
    with Scope() as scope:
        x_desc = _x_descriptor(scope, x, is_for_conv2d, d_layout)
        bn_desc = _bn_descriptor(scope, x_desc, cudnn_mode)
        libcudnn.call("cudnnBatchNormalizationForwardInference", _context.get_handle(),
                      cudnn_mode, _ref(one), _ref(zero), x_desc.value, p(x), x_desc.value, p(y),
                      bn_desc.value, p(gamma), p(beta), p(mean), p(var), eps)
    return y


def batch_normalization_backward(
        x: Any, gamma: Any, gy: Any, mean: Any, inv_std: Any, eps: float, is_for_conv2d: bool,
        cudnn_mode: int, debug: bool, d_layout: int = CUDNN_TENSOR_NCHW, *,
        reserve_space: Any = None) -> tuple[Any, Any, Any]:
    """``(gx, ggamma, gbeta)`` from the saved mean and inverse std of the forward pass."""
    rt = _context.runtime()
    x, gy = rt.ascontiguous(x), rt.ascontiguous(gy)
    gx = rt.empty(tuple(x.shape), x.dtype)
    dtype = _param_dtype(x.dtype)
    need_cast = gamma.dtype != dtype
    (gamma,) = _params(rt, dtype, gamma)
    ggamma, gbeta = rt.empty(tuple(gamma.shape), dtype), rt.empty(tuple(gamma.shape), dtype)
    one, zero = _context.scalars(x.dtype)
    handle = _context.get_handle()
    p = _context.pointer
    with Scope() as scope:
        x_desc = _x_descriptor(scope, x, is_for_conv2d, d_layout)
        bn_desc = _bn_descriptor(scope, x_desc, cudnn_mode)
        d = x_desc.value
        size = libcudnn.size_query(
            "cudnnGetBatchNormalizationBackwardExWorkspaceSize", handle, cudnn_mode,
            CUDNN_BATCHNORM_OPS_BN, d, d, d, d, d, bn_desc.value, None)
        workspace = rt.alloc(size) if size else None
        libcudnn.call(
            "cudnnBatchNormalizationBackwardEx", handle, cudnn_mode, CUDNN_BATCHNORM_OPS_BN,
            _ref(one), _ref(zero), _ref(one), _ref(zero), d, p(x), d, None, d, p(gy), d, None,
            d, p(gx), bn_desc.value, p(gamma), None, p(ggamma), p(gbeta), eps, p(mean),
            p(inv_std), None, p(workspace), _context.nbytes(workspace), p(reserve_space),
            _context.nbytes(reserve_space))
        _check_overflow(handle, debug, cudnn_mode)
    if need_cast:
        ggamma, gbeta = rt.astype(ggamma, x.dtype), rt.astype(gbeta, x.dtype)
    return gx, ggamma, gbeta
