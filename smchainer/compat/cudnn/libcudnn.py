"""The low-level ``cupy.cuda.cudnn`` module: cuDNN 9's legacy API through ctypes.

What Chainer 7.8.1 reads from ``chainer.backends.cuda.libcudnn`` (the enum
constants, ``getVersion``, ``CUDNN_BN_MIN_EPSILON``, ``CuDNNError``) and the
handle and descriptor calls that :mod:`smchainer.compat.cudnn.highlevel` builds
on. Every cuDNN function is declared once in ``_SIGNATURES`` (argument types;
all return ``cudnnStatus_t``) and called through :func:`call`, which turns a
status other than ``CUDNN_STATUS_SUCCESS`` into :class:`CuDNNError`.

Nothing is loaded on import: :func:`use_library` is given the library that
:mod:`smchainer.compat.cudnn.discovery` found (or a test's stub).
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from smchainer.compat.cudnn.constants import *  # noqa: F403  (cuDNN's names, as CuPy had them)
from smchainer.compat.cudnn.constants import CUDNN_STATUS_SUCCESS

_P, _I, _Z, _D = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_double
_PERF_QUERY = (_P, _P, _P, _P, _P, _I, _P, _P)
_PERF_FIND = (_P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _Z)
_WORKSPACE = (_P, _P, _P, _P, _P, _I, _P)
_CONVOLVE = (_P, _P, _P, _P, _P, _P, _P, _I, _P, _Z, _P, _P, _P)
_ONE_POINTER = (_P,)

#: Argument types of every cuDNN function the binding calls.
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "cudnnCreate": _ONE_POINTER,
    "cudnnDestroy": _ONE_POINTER,
    "cudnnSetStream": (_P, _P),
    "cudnnCreateTensorDescriptor": _ONE_POINTER,
    "cudnnSetTensor4dDescriptor": (_P, _I, _I, _I, _I, _I, _I),
    "cudnnSetTensorNdDescriptor": (_P, _I, _I, _P, _P),
    "cudnnDestroyTensorDescriptor": _ONE_POINTER,
    "cudnnCreateFilterDescriptor": _ONE_POINTER,
    "cudnnSetFilter4dDescriptor": (_P, _I, _I, _I, _I, _I, _I),
    "cudnnSetFilterNdDescriptor": (_P, _I, _I, _I, _P),
    "cudnnDestroyFilterDescriptor": _ONE_POINTER,
    "cudnnCreateConvolutionDescriptor": _ONE_POINTER,
    "cudnnSetConvolution2dDescriptor": (_P, _I, _I, _I, _I, _I, _I, _I, _I),
    "cudnnSetConvolutionNdDescriptor": (_P, _I, _P, _P, _P, _I, _I),
    "cudnnSetConvolutionMathType": (_P, _I),
    "cudnnSetConvolutionGroupCount": (_P, _I),
    "cudnnDestroyConvolutionDescriptor": _ONE_POINTER,
    "cudnnGetConvolutionForwardAlgorithm_v7": _PERF_QUERY,
    "cudnnGetConvolutionBackwardDataAlgorithm_v7": _PERF_QUERY,
    "cudnnGetConvolutionBackwardFilterAlgorithm_v7": _PERF_QUERY,
    "cudnnFindConvolutionForwardAlgorithmEx": _PERF_FIND,
    "cudnnFindConvolutionBackwardDataAlgorithmEx": _PERF_FIND,
    "cudnnFindConvolutionBackwardFilterAlgorithmEx": _PERF_FIND,
    "cudnnGetConvolutionForwardWorkspaceSize": _WORKSPACE,
    "cudnnGetConvolutionBackwardDataWorkspaceSize": _WORKSPACE,
    "cudnnGetConvolutionBackwardFilterWorkspaceSize": _WORKSPACE,
    "cudnnConvolutionForward": _CONVOLVE,
    "cudnnConvolutionBackwardData": _CONVOLVE,
    "cudnnConvolutionBackwardFilter": _CONVOLVE,
    "cudnnAddTensor": (_P,) * 7,
    "cudnnCreatePoolingDescriptor": _ONE_POINTER,
    "cudnnSetPooling2dDescriptor": (_P, _I, _I, _I, _I, _I, _I, _I, _I),
    "cudnnSetPoolingNdDescriptor": (_P, _I, _I, _I, _P, _P, _P),
    "cudnnDestroyPoolingDescriptor": _ONE_POINTER,
    "cudnnPoolingForward": (_P,) * 8,
    "cudnnPoolingBackward": (_P,) * 12,
    "cudnnCreateActivationDescriptor": _ONE_POINTER,
    "cudnnSetActivationDescriptor": (_P, _I, _I, _D),
    "cudnnDestroyActivationDescriptor": _ONE_POINTER,
    "cudnnActivationForward": (_P,) * 8,
    "cudnnActivationBackward": (_P,) * 12,
    "cudnnSoftmaxForward": (_P, _I, _I) + (_P,) * 6,
    "cudnnSoftmaxBackward": (_P, _I, _I) + (_P,) * 8,
    "cudnnDeriveBNTensorDescriptor": (_P, _P, _I),
    "cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize": (_P, _I, _I) + (_P,) * 6,
    "cudnnGetBatchNormalizationTrainingExReserveSpaceSize": (_P, _I, _I, _P, _P, _P),
    "cudnnGetBatchNormalizationBackwardExWorkspaceSize": (_P, _I, _I) + (_P,) * 8,
    "cudnnBatchNormalizationForwardTrainingEx": (
        (_P, _I, _I) + (_P,) * 11 + (_D, _P, _P, _D) + (_P,) * 4 + (_Z, _P, _Z)),
    "cudnnBatchNormalizationForwardInference": (_P, _I) + (_P,) * 11 + (_D,),
    "cudnnBatchNormalizationBackwardEx": (
        (_P, _I, _I) + (_P,) * 19 + (_D,) + (_P,) * 4 + (_Z, _P, _Z)),
    "cudnnQueryRuntimeError": (_P, _P, _I, _P),
}


class CuDNNError(RuntimeError):
    """A cuDNN call returned a status other than success; the message is cuDNN's own."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = int(status)
        message = _error_string(self.status)
        if detail:
            message = f"{message}: {detail}"
        self._infos: list[str] = []
        super().__init__(message)

    def add_infos(self, infos: Sequence[str]) -> None:
        """Append lines of context (the function and its arguments), as CuPy's error does."""
        self._infos.extend(infos)

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *self._infos])


class AlgoPerf(ctypes.Structure):
    """``cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t`` (one layout for all three)."""

    _fields_ = [
        ("algo", ctypes.c_int), ("status", ctypes.c_int), ("time", ctypes.c_float),
        ("memory", ctypes.c_size_t), ("determinism", ctypes.c_int),
        ("mathType", ctypes.c_int), ("reserved", ctypes.c_int * 3),
    ]


_library: ctypes.CDLL | None = None
_functions: dict[str, Any] = {}


def use_library(library: ctypes.CDLL | None) -> None:
    """Call cuDNN through ``library`` from now on (``None``: no library)."""
    global _library
    _library = library
    _functions.clear()


def loaded() -> bool:
    """Whether a library is in use."""
    return _library is not None


def _function(name: str) -> Any:
    function = _functions.get(name)
    if function is None:
        if _library is None:
            raise RuntimeError("no cuDNN library is loaded (smchainer.compat.cudnn)")
        function = getattr(_library, name)
        function.argtypes = list(_SIGNATURES[name])
        function.restype = ctypes.c_int
        _functions[name] = function
    return function


def _error_string(status: int) -> str:
    if _library is None:
        return f"cuDNN status {status}"
    get = _library.cudnnGetErrorString
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_char_p
    name = (get(status) or b"").decode(errors="replace") or f"cuDNN status {status}"
    last = getattr(_library, "cudnnGetLastErrorString", None)
    if last is not None:  # cuDNN 9: what went wrong, in words
        buffer = ctypes.create_string_buffer(1024)
        last.argtypes, last.restype = [ctypes.c_void_p, ctypes.c_size_t], None
        last(buffer, len(buffer))
        if buffer.value:
            return f"{name} ({buffer.value.decode(errors='replace').strip()})"
    return name


def call(name: str, *args: Any) -> None:
    """Call cuDNN function ``name``; a failed status raises :class:`CuDNNError`."""
    status = _function(name)(*args)
    if status != CUDNN_STATUS_SUCCESS:
        raise CuDNNError(status, name)


def getVersion() -> int:
    """``cudnnGetVersion()``: 91900 for cuDNN 9.19.0."""
    if _library is None:
        raise RuntimeError("no cuDNN library is loaded (smchainer.compat.cudnn)")
    get = _library.cudnnGetVersion
    get.argtypes, get.restype = [], ctypes.c_size_t
    return int(get())


def _create(name: str) -> int:
    handle = ctypes.c_void_p()
    call(name, ctypes.byref(handle))
    return int(handle.value or 0)


def _ints(values: Sequence[int]) -> Any:
    return (ctypes.c_int * len(values))(*[int(v) for v in values])


# --- handle ----------------------------------------------------------------------------------
def create() -> int:
    """A new cuDNN handle (needs a current CUDA context)."""
    return _create("cudnnCreate")


def destroy(handle: int) -> None:
    call("cudnnDestroy", handle)


def setStream(handle: int, stream: int) -> None:
    call("cudnnSetStream", handle, stream)


# --- descriptors -----------------------------------------------------------------------------
def createTensorDescriptor() -> int:
    return _create("cudnnCreateTensorDescriptor")


def setTensor4dDescriptor(desc: int, format: int, data_type: int,
                          n: int, c: int, h: int, w: int) -> None:
    call("cudnnSetTensor4dDescriptor", desc, format, data_type, n, c, h, w)


def setTensorNdDescriptor(desc: int, data_type: int, dims: Sequence[int],
                          strides: Sequence[int]) -> None:
    call("cudnnSetTensorNdDescriptor", desc, data_type, len(dims), _ints(dims), _ints(strides))


def destroyTensorDescriptor(desc: int) -> None:
    call("cudnnDestroyTensorDescriptor", desc)


def createFilterDescriptor() -> int:
    return _create("cudnnCreateFilterDescriptor")


def setFilter4dDescriptor(desc: int, data_type: int, format: int,
                          k: int, c: int, h: int, w: int) -> None:
    call("cudnnSetFilter4dDescriptor", desc, data_type, format, k, c, h, w)


def setFilterNdDescriptor(desc: int, data_type: int, format: int,
                          dims: Sequence[int]) -> None:
    call("cudnnSetFilterNdDescriptor", desc, data_type, format, len(dims), _ints(dims))


def destroyFilterDescriptor(desc: int) -> None:
    call("cudnnDestroyFilterDescriptor", desc)


def createConvolutionDescriptor() -> int:
    return _create("cudnnCreateConvolutionDescriptor")


def setConvolutionNdDescriptor(desc: int, pad: Sequence[int], stride: Sequence[int],
                               dilation: Sequence[int], mode: int, compute_type: int) -> None:
    """2-D through ``cudnnSetConvolution2dDescriptor``, else the N-d call."""
    if len(pad) == 2:
        call("cudnnSetConvolution2dDescriptor", desc, pad[0], pad[1], stride[0], stride[1],
             dilation[0], dilation[1], mode, compute_type)
    else:
        call("cudnnSetConvolutionNdDescriptor", desc, len(pad), _ints(pad), _ints(stride),
             _ints(dilation), mode, compute_type)


def setConvolutionMathType(desc: int, math_type: int) -> None:
    call("cudnnSetConvolutionMathType", desc, math_type)


def setConvolutionGroupCount(desc: int, groups: int) -> None:
    call("cudnnSetConvolutionGroupCount", desc, groups)


def destroyConvolutionDescriptor(desc: int) -> None:
    call("cudnnDestroyConvolutionDescriptor", desc)


def createPoolingDescriptor() -> int:
    return _create("cudnnCreatePoolingDescriptor")


def setPoolingNdDescriptor(desc: int, mode: int, nan: int, window: Sequence[int],
                           pad: Sequence[int], stride: Sequence[int]) -> None:
    """2-D through ``cudnnSetPooling2dDescriptor``, else the N-d call."""
    if len(window) == 2:
        call("cudnnSetPooling2dDescriptor", desc, mode, nan, window[0], window[1],
             pad[0], pad[1], stride[0], stride[1])
    else:
        call("cudnnSetPoolingNdDescriptor", desc, mode, nan, len(window), _ints(window),
             _ints(pad), _ints(stride))


def destroyPoolingDescriptor(desc: int) -> None:
    call("cudnnDestroyPoolingDescriptor", desc)


def createActivationDescriptor() -> int:
    return _create("cudnnCreateActivationDescriptor")


def setActivationDescriptor(desc: int, mode: int, nan: int, coef: float) -> None:
    call("cudnnSetActivationDescriptor", desc, mode, nan, coef)


def destroyActivationDescriptor(desc: int) -> None:
    call("cudnnDestroyActivationDescriptor", desc)


def deriveBNTensorDescriptor(derived: int, x_desc: int, mode: int) -> None:
    call("cudnnDeriveBNTensorDescriptor", derived, x_desc, mode)


def queryRuntimeError(handle: int, mode: int) -> int:
    """The status of the last kernels (``CUDNN_STATUS_RUNTIME_FP_OVERFLOW`` after an overflow)."""
    status = ctypes.c_int()
    call("cudnnQueryRuntimeError", handle, ctypes.byref(status), mode, None)
    return status.value


def size_query(name: str, *args: Any) -> int:
    """Call a ``cudnnGet...Size`` function whose last argument is ``size_t *``."""
    size = ctypes.c_size_t()
    call(name, *args, ctypes.byref(size))
    return int(size.value)


def perf_query(name: str, count: int, *args: Any, find_tail: tuple = ()) -> list[AlgoPerf]:
    """The algorithms a ``cudnnGet*Algorithm_v7`` / ``cudnnFind*AlgorithmEx`` call returns."""
    results = (AlgoPerf * count)()
    returned = ctypes.c_int()
    call(name, *args, count, ctypes.byref(returned), results, *find_tail)
    return list(results[: returned.value])
