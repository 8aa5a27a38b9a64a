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

#: ``cpu`` here keeps training ranks and serving workers off the GPUs.
DEVICE_ENV = "SMCHAINER_DEVICE"

_GPU_SPEC = re.compile(r"^(?:gpu|cuda|@cupy)[:]?(\d+)?$|^(\d+)$")


class DeviceError(SmchainerError):
    """A GPU was asked for and cannot be used."""


def cpu_count() -> int:
    """The CPUs this process may run on: its affinity mask, not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


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
    logger.info("using GPU %d with %s", gpu, cudnn_in_use())
    return device


def cudnn_in_use() -> str:
    """The cuDNN Chainer uses: ``cuDNN 9.19.0 (smchainer ctypes binding, /path)``, or why none.

    Chainer's own switch (``CHAINER_CUDNN=0``) and CuPy 13's own binding are
    named as such.
    """
    import chainer.backends.cuda as cuda

    from smchainer.compat import cudnn

    if cudnn.active():
        if not cuda.cudnn_enabled:
            return f"no cuDNN (CHAINER_CUDNN=0; available: {cudnn.describe()})"
        return cudnn.describe()
    if cuda.cudnn_enabled:
        version = getattr(cuda, "_cudnn_version", -1)
        return f"cuDNN {version} (CuPy's own binding)"
    return cudnn.describe()


def cpu_requested() -> bool:
    """``SMCHAINER_DEVICE=cpu``: stay on the CPU even where GPUs are visible.

    The Python API's ``local`` instance type sets it (with an empty
    ``CUDA_VISIBLE_DEVICES``) so that a CPU job or endpoint never picks a GPU.
    """
    return os.environ.get(DEVICE_ENV, "").lower() == "cpu"


def rank_device(local_rank: int, num_gpus: int) -> str:
    """The device of a training rank: GPU ``local_rank`` of its host, else the CPU.

    ``num_gpus`` is what the rank reports as ``SM_NUM_GPUS`` (passed in so
    that the two always agree). There is no wrapping round, unlike
    :func:`worker_gpu`: ranks sharing a GPU fight over its memory and NCCL
    refuses them, so a rank without a GPU of its own is refused by
    :func:`check_rank_device` instead.
    """
    if num_gpus <= 0 or cpu_requested():
        return "cpu"
    return f"gpu:{local_rank}"


def check_rank_device(device: str, local_rank: int, num_gpus: int, host: str) -> None:
    """Refuse a rank whose :func:`rank_device` names a GPU that its host lacks.

    Only the ``train(env)`` hook is held to it: a script chooses its own
    device from ``SM_NUM_GPUS`` and may well share GPUs on purpose.
    """
    if num_gpus and device != "cpu" and local_rank >= num_gpus:
        raise DeviceError(
            f"local rank {local_rank} has no GPU of its own ({num_gpus} on "
            f"{host}): start at most {num_gpus} processes per host"
        )


def worker_gpu(worker_index: int, default: str | None = None) -> str:
    """The device of serving worker ``worker_index``: GPU ``i mod n``, else the CPU.

    Serving workers may outnumber the GPUs (they mostly wait on requests), so
    they share them round-robin. ``default`` (the server's ``--device``) wins.
    """
    if default is not None:
        return default
    count = 0 if cpu_requested() else gpu_count()
    return f"gpu:{worker_index % count}" if count else "cpu"
