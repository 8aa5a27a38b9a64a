"""The CuPy 12-14 side of the compat layer: what Chainer 7.8.1 needs on today's CuPy.

Applied by the import hook in :mod:`smchainer.compat` around and after the
import of ``chainer.backends.cuda``; CuPy is imported here only just before
Chainer imports it (to see whether it lacks ``cupy.cudnn``).

``cupy.cudnn is deprecated``
    CuPy 12 and 13 warn when Chainer imports ``cupy.cudnn``. Under ``-W error``
    (or pytest's ``filterwarnings = error``) that warning becomes an exception
    that Chainer catches, and cuDNN is then silently disabled. That one message
    is ignored while ``chainer.backends.cuda`` is imported.
``half`` in raw kernels
    ChainerMN's gradient packing kernels use the ``half`` type, which CuPy 14's
    headers no longer declare for raw kernels. ``chainer.backends.cuda.raw``
    gets the ``<cuda_fp16.h>`` include prepended to sources that use ``half``.
``cuDNN is not enabled``
    CuPy 14 has no cuDNN at all, yet Chainer warns at the first GPU use that
    CuPy should be reinstalled with cuDNN (an exception under ``-W error``).
    On CuPy 14 that advice cannot be followed, so it is logged once instead.
No ``cupy.cudnn`` (CuPy 14)
    :func:`quiet_cudnn_deprecation` is also the moment
    :func:`smchainer.compat.cudnn.install_into_cupy` puts smchainer's cuDNN 9
    binding in its place, when a ``libcudnn.so.9`` is found, so that Chainer
    enables cuDNN. :func:`describe_gpu_stack` names the library in use.
CUDA libraries from PyPI (the ``gpu-cudnn`` extra)
    CuPy 13 does not look inside the ``nvidia-*-cu12`` wheels for cuDNN,
    cuBLAS, NCCL..., so without ``LD_LIBRARY_PATH`` Chainer silently ran on the
    CPU. :func:`preload_cuda_wheels` loads them (``RTLD_GLOBAL``) before CuPy
    is imported, so CuPy's own look-ups by soname find them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "FP16_HEADER",
    "cupy_major",
    "cuda_wheel_libraries",
    "preload_cuda_wheels",
    "describe_gpu_stack",
    "fix_cuda_backend",
    "quiet_cudnn_deprecation",
    "uses_half",
    "with_fp16_header",
]

FP16_HEADER = "#include <cuda_fp16.h>"
CUDNN_DEPRECATION = r"cupy\.cudnn is deprecated"

_HALF = re.compile(r"\bhalf\b")
_FP16_INCLUDED = re.compile(r"#\s*include\s*[<\"](?:cuda_fp16\.h|cupy/float16\.cuh)[>\"]")
_LINE_COMMENT = re.compile(r"//[^\n]*")
_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


def uses_half(source: str) -> bool:
    """Whether CUDA ``source`` names ``half`` outside comments without including its header."""
    code = _LINE_COMMENT.sub("", _BLOCK_COMMENT.sub("", source))
    return bool(_HALF.search(code)) and not _FP16_INCLUDED.search(code)


def with_fp16_header(source: str) -> str:
    """``source`` with ``#include <cuda_fp16.h>`` first when it needs it, else unchanged."""
    if not uses_half(source):
        return source
    return f"{FP16_HEADER}\n{source}"


#: Load order of the CUDA wheels' libraries: each after what it links against.
_CUDA_LIBRARY_ORDER = (
    "libcudart", "libnvJitLink", "libnvrtc", "libcublasLt", "libcublas", "libcufft",
    "libcurand", "libcusparse", "libcusolver", "libcudnn", "libnccl",
)
_preloaded: list[str] | None = None


def cuda_wheel_libraries(search_path: list[str] | None = None) -> list[str]:
    """The shared libraries of installed ``nvidia-*`` wheels, in load order.

    ``search_path`` is where the ``nvidia`` namespace package may live
    (default: ``sys.path``); nothing is imported.
    """
    import glob

    found: list[str] = []
    for entry in sys.path if search_path is None else search_path:
        found += glob.glob(os.path.join(entry, "nvidia", "*", "lib", "lib*.so*"))

    def rank(path: str) -> tuple[int, str]:
        name = os.path.basename(path)
        for position, prefix in enumerate(_CUDA_LIBRARY_ORDER):
            if name.startswith(prefix + ".") or name.startswith(prefix + "_"):
                return position, name
        return len(_CUDA_LIBRARY_ORDER), name

    unique = {os.path.realpath(path): path for path in found}
    return sorted(unique.values(), key=rank)


def preload_cuda_wheels(search_path: list[str] | None = None) -> list[str]:
    """Load the CUDA wheels' libraries globally so CuPy finds them; the ones loaded.

    Only for ``cupy-cuda12x`` (the ``gpu-cudnn`` stack: CuPy 13 with the
    ``nvidia-*-cu12`` wheels); other CuPy builds find their libraries
    themselves and are left alone. Idempotent; a library that fails to load is
    logged and skipped rather than stopping the import.
    """
    global _preloaded
    if _preloaded is not None and search_path is None:
        return _preloaded
    import ctypes
    from importlib import metadata

    try:
        metadata.version("cupy-cuda12x")
    except metadata.PackageNotFoundError:
        _preloaded = []
        return _preloaded
    loaded = []
    for path in cuda_wheel_libraries(search_path):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            logger.debug("not preloading %s: %s", path, error)
            continue
        loaded.append(path)
    if loaded:
        logger.debug("preloaded %d CUDA libraries from the nvidia-* wheels", len(loaded))
    if search_path is None:
        _preloaded = loaded
    return loaded


@contextlib.contextmanager
def quiet_cudnn_deprecation() -> Iterator[None]:
    """Ignore CuPy's ``cupy.cudnn is deprecated`` warning, and only that one, inside.

    Also the moment CuPy is about to be imported: the CUDA wheels' libraries
    are preloaded first (:func:`preload_cuda_wheels`), then the cuDNN 9
    binding goes in where CuPy has no ``cupy.cudnn``.
    """
    preload_cuda_wheels()
    from smchainer.compat import cudnn

    cudnn.install_into_cupy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CUDNN_DEPRECATION, category=DeprecationWarning)
        yield


def cupy_major() -> int:
    """The major version of the installed CuPy, imported; 0 when it is not importable."""
    try:
        import cupy
    except Exception:
        return 0
    return int(str(cupy.__version__).split(".")[0])


def _fp16_raw(raw: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap Chainer's ``raw(code, name, ...)`` so that sources using ``half`` compile."""

    def raw_with_fp16(code: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return raw(with_fp16_header(code), name, *args, **kwargs)

    raw_with_fp16.__doc__ = raw.__doc__
    raw_with_fp16.__wrapped__ = raw  # type: ignore[attr-defined]
    raw_with_fp16._smchainer_fp16 = True  # type: ignore[attr-defined]
    return raw_with_fp16


def fix_cuda_backend(module: types.ModuleType) -> None:
    """Adjust ``chainer.backends.cuda`` after its import (idempotent)."""
    raw = module.raw
    if not getattr(raw, "_smchainer_fp16", False):
        module.raw = _fp16_raw(raw)  # type: ignore[attr-defined]
    if not getattr(module, "available", False) or getattr(module, "cudnn_enabled", False):
        return
    cupy = sys.modules.get("cupy")
    major = int(str(getattr(cupy, "__version__", "0")).split(".")[0])
    if major >= 14:
        # Chainer's advice (reinstall CuPy with cuDNN) is impossible on CuPy 14.
        module.check_cuda_available._already_warned = True
        logger.debug(
            "CuPy %s has no cuDNN: Chainer uses its own GPU kernels (im2col + GEMM)",
            cupy.__version__,  # type: ignore[union-attr]
        )


def describe_gpu_stack() -> dict[str, Any]:
    """Versions and switches of the GPU stack, for benchmark records and bug reports.

    Imports Chainer (through :mod:`smchainer`) and CuPy; never raises: what
    cannot be read is reported as ``None`` or as an ``error`` string.
    """
    import chainer
    import chainer.backends.cuda as cuda
    import numpy

    from smchainer.compat import cudnn

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "chainer": chainer.__version__,
        "cupy": None,
        "cuda_available": bool(cuda.available),
        "cudnn_enabled": bool(cuda.cudnn_enabled),
        "cudnn_version": getattr(cuda, "_cudnn_version", -1),
        "cudnn": cudnn.status(),
        "CHAINER_CUDNN": os.environ.get("CHAINER_CUDNN"),
        "CUPY_TF32": os.environ.get("CUPY_TF32"),
    }
    if not cuda.available:
        error = getattr(cuda, "_resolution_error", None)
        info["error"] = None if error is None else f"{type(error).__name__}: {error}"
        return info
    cupy = cuda.cupy
    info["cupy"] = cupy.__version__
    readers: dict[str, Callable[[], Any]] = {
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion,
        "cuda_driver": cupy.cuda.runtime.driverGetVersion,
        "nvrtc": lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
        "gpu_count": cupy.cuda.runtime.getDeviceCount,
        "gpu_name": lambda: _device_name(cupy),
        "compute_capability": lambda: cupy.cuda.Device(0).compute_capability,
    }
    for key, read in readers.items():
        try:
            info[key] = read()
        except Exception as exc:  # a missing driver or library is worth reporting, not raising
            info[key] = None
            info.setdefault("error", f"{key}: {type(exc).__name__}: {exc}")
    return info


def _device_name(cupy: Any) -> str:
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
