"""The one place that decides and checks the device (CPU or a CUDA GPU).

Chainer quietly falls back to the CPU when CuPy fails to import and errors
only when a GPU array is requested. smchainer asks first: requesting a GPU that
is not usable is a :class:`DeviceError` naming the reason, never a silent CPU
run.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

_GPU_SPEC = re.compile(r"^(?:gpu|cuda|@cupy)[:]?(\d+)?$|^(\d+)$")


class DeviceError(SmchainerError):
    """A GPU was asked for and cannot be used."""


def parse_device(spec: str | int | None) -> int:
    """``"cpu"``, ``-1``, ``None`` -> -1; ``"gpu"``, ``"gpu:1"``, ``"@cupy:1"``, ``1`` -> GPU id."""
    if spec is None:
        return -1
    if isinstance(spec, int):
        return spec if spec >= 0 else -1
    text = str(spec).strip().lower()
    if text in {"cpu", "-1", "", "@numpy"}:
        return -1
    match = _GPU_SPEC.match(text)
    if not match:
        raise DeviceError(f"unknown device {spec!r}: use 'cpu', 'gpu' or 'gpu:N'")
    return int(match.group(1) or match.group(2) or 0)


def gpu_count() -> int:
    """GPUs visible to this process; 0 when CuPy is missing or sees none."""
    from smchainer.compat.cupy import preload_cuda_wheels

    preload_cuda_wheels()
    try:
        import cupy
    except Exception:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def cuda_unavailable_reason() -> str | None:
    """Why Chainer cannot use CUDA, or None when it can."""
    import chainer.backends.cuda as cuda

    if cuda.available:
        if gpu_count() == 0:
            return "CuPy is installed but sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)"
        return None
    error = getattr(cuda, "_resolution_error", None)
    if error is None:
        return "CuPy is not installed"
    return f"CuPy failed to import: {type(error).__name__}: {error}"


def get_device(spec: str | int | None) -> Any:
    """A Chainer device for ``spec``, checked; the device is made current."""
    import chainer

    gpu = parse_device(spec)
    if gpu < 0:
        return chainer.get_device("@numpy")
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise DeviceError(f"device {spec!r} was asked for but {reason}")
    count = gpu_count()
    if gpu >= count:
        raise DeviceError(f"device {spec!r} was asked for but only {count} GPU(s) are visible")
    device = chainer.get_device(f"@cupy:{gpu}")
    device.use()
    logger.info("using GPU %d", gpu)
    return device


def worker_gpu(worker_index: int, default: str | None = None) -> str:
    """The device of serving worker ``worker_index``: GPU ``i mod n``, else the CPU."""
    if default is not None:
        return default
    count = gpu_count() if os.environ.get("SMCHAINER_DEVICE", "").lower() != "cpu" else 0
    return f"gpu:{worker_index % count}" if count else "cpu"
