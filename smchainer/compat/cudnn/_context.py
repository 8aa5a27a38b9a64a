"""What the high-level functions need besides cuDNN: arrays, workspace, streams, handles.

:class:`Runtime` is the one door to device memory and streams. The default,
:class:`CupyRuntime`, is CuPy (``cupy.empty(n, dtype=uint8)`` for workspace,
``cupy.cuda.get_current_stream().ptr`` for the stream); tests install one over
NumPy host buffers (:func:`set_runtime`), since the arrays are touched only
through ``.data.ptr``, ``.shape``, ``.strides``, ``.dtype`` and ``.size``.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy

from smchainer.compat.cudnn import libcudnn


class Runtime:
    """Device arrays, workspace and streams, as the binding uses them (an interface)."""

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A new C-contiguous array."""
        raise NotImplementedError

    def ascontiguous(self, array: Any) -> Any:
        """``array`` itself when C-contiguous, else a C-contiguous copy."""
        raise NotImplementedError

    def astype(self, array: Any, dtype: Any) -> Any:
        """A C-contiguous copy of ``array`` in ``dtype``."""
        raise NotImplementedError

    def copyto(self, dst: Any, src: Any) -> None:
        """``dst[...] = src`` (with a cast)."""
        raise NotImplementedError

    def alloc(self, nbytes: int) -> Any:
        """Workspace: an object with ``.data.ptr`` and ``.size`` (bytes)."""
        raise NotImplementedError

    def stream(self) -> int:
        """The current CUDA stream (``cudaStream_t`` as an int; 0 is the legacy stream)."""
        raise NotImplementedError

    def device_id(self) -> int:
        """The current device."""
        raise NotImplementedError

    def compute_capability(self) -> str:
        """The current device's compute capability, ``"90"`` for an H100."""
        raise NotImplementedError


class CupyRuntime(Runtime):
    """The default: CuPy's arrays, memory pool and current stream."""

    def __init__(self) -> None:
        import cupy

        self._cupy = cupy

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._cupy.empty(shape, dtype=dtype)

    def ascontiguous(self, array: Any) -> Any:
        return self._cupy.ascontiguousarray(array)

    def astype(self, array: Any, dtype: Any) -> Any:
        return self._cupy.ascontiguousarray(array.astype(dtype))

    def copyto(self, dst: Any, src: Any) -> None:
        self._cupy.copyto(dst, src, casting="unsafe")

    def alloc(self, nbytes: int) -> Any:
        return self._cupy.empty(int(nbytes), dtype=numpy.uint8)

    def stream(self) -> int:
        return int(self._cupy.cuda.get_current_stream().ptr)

    def device_id(self) -> int:
        return int(self._cupy.cuda.runtime.getDevice())

    def compute_capability(self) -> str:
        return str(self._cupy.cuda.Device().compute_capability)


_runtime: Runtime | None = None
_lock = threading.Lock()
_handles: dict[int, int] = {}
_max_workspace_size = 8 * 1024 * 1024


def runtime() -> Runtime:
    """The runtime in use (CuPy unless :func:`set_runtime` chose another)."""
    global _runtime
    if _runtime is None:
        _runtime = CupyRuntime()
    return _runtime


def set_runtime(new: Runtime | None) -> Runtime | None:
    """Use ``new`` from now on (``None``: back to CuPy); returns the one it replaces.

    The handles belong to the runtime's devices, so they are dropped (not destroyed).
    """
    global _runtime
    old, _runtime = _runtime, new
    _handles.clear()
    return old


def get_handle() -> int:
    """The cuDNN handle of the current device (created once), on the current stream."""
    rt = runtime()
    device = rt.device_id()
    with _lock:
        handle = _handles.get(device)
        if handle is None:
            handle = _handles[device] = libcudnn.create()
    libcudnn.setStream(handle, rt.stream())
    return handle


def reset_handles() -> None:
    """Destroy every handle (at exit, or before a library is swapped)."""
    with _lock:
        for handle in _handles.values():
            try:
                libcudnn.destroy(handle)
            except Exception:  # a library already gone at interpreter exit
                pass
        _handles.clear()


def get_max_workspace_size() -> int:
    """The most workspace a convolution may use, in bytes (8 MiB unless set)."""
    return _max_workspace_size


def set_max_workspace_size(size: int) -> None:
    """Set the most workspace a convolution may use, in bytes."""
    global _max_workspace_size
    _max_workspace_size = int(size)


def scalars(dtype: Any, one: float = 1.0, zero: float = 0.0) -> tuple[Any, Any]:
    """``alpha``/``beta`` host values: ``double`` for double data, else ``float`` (cuDNN's rule)."""
    kind = ctypes.c_double if numpy.dtype(dtype).char == "d" else ctypes.c_float
    return kind(one), kind(zero)


def pointer(array: Any) -> int | None:
    """The device address of ``array`` (``None`` for no array)."""
    return None if array is None else int(array.data.ptr)


def nbytes(buffer: Any) -> int:
    """Size in bytes of a workspace from :meth:`Runtime.alloc` (0 for none)."""
    return 0 if buffer is None else int(buffer.size)


def is_tensor_core_available(dtype: Any) -> bool:
    """CuPy's rule: float16 on a compute capability 7.0 GPU (V100).

    Elsewhere cuDNN 9's default math type uses tensor cores for float16 by itself.
    """
    return (libcudnn.getVersion() >= 7000 and numpy.dtype(dtype).char == "e"
            and int(runtime().compute_capability()) == 70)
