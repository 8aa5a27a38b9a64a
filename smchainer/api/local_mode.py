"""How the SageMaker SDK's arguments map onto this machine.

SageMaker notebooks pass arguments that only mean something on AWS (``role``,
``framework_version``, ``volume_size``...). They are accepted and ignored
with one :class:`IgnoredArgumentWarning` each, so that a notebook runs after
changing its imports. Instance types choose the device: ``local`` is the CPU
(GPUs hidden, as SageMaker's CPU containers see none), ``local_gpu`` the
GPUs, and an AWS type (``ml.p3.2xlarge``) runs as the local type of its family.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

LOCAL = "local"
LOCAL_GPU = "local_gpu"
#: AWS instance families with GPUs: ml.p2, ml.p3, ml.g4dn, ml.g5...
_GPU_FAMILY = re.compile(r"^ml\.(p|g)\d")


class IgnoredArgumentWarning(UserWarning):
    """An argument that has no meaning outside AWS was ignored."""


def warn_ignored(arguments: Mapping[str, Any] | Iterable[str], where: str,
                 stacklevel: int = 3) -> None:
    """One warning line per ignored argument name, pointing at the user's call."""
    for name in sorted(arguments):
        warnings.warn(f"{where}: {name}= only matters on AWS SageMaker; ignored here",
                      IgnoredArgumentWarning, stacklevel=stacklevel)


def resolve_instance_type(instance_type: str | None, stacklevel: int = 3) -> str:
    """``local`` or ``local_gpu`` for an instance type; ``ml.*`` types are mapped (warned)."""
    text = (instance_type or LOCAL).strip()
    if text in (LOCAL, LOCAL_GPU):
        return text
    if text.startswith("ml."):
        local = LOCAL_GPU if _GPU_FAMILY.match(text) else LOCAL
        warnings.warn(f"instance_type {text!r} runs on this machine as {local!r}",
                      IgnoredArgumentWarning, stacklevel=stacklevel)
        return local
    raise ValueError(f"instance_type {instance_type!r}: use 'local' (CPU) or 'local_gpu'")


def require_gpu() -> int:
    """The number of usable GPUs; a :class:`~smchainer.device.DeviceError` when there is none."""
    from smchainer.device import DeviceError, cuda_unavailable_reason, gpu_count

    count = gpu_count()
    if count == 0:
        reason = cuda_unavailable_reason() or "no GPU is visible"
        raise DeviceError(f"instance_type='local_gpu' asks for a GPU but {reason}; "
                          "use instance_type='local' to run on the CPU")
    return count


def device_environment(instance_type: str, environ: Mapping[str, str] | None = None
                       ) -> dict[str, str]:
    """The environment of a child process for ``instance_type`` (``local``/``local_gpu``)."""
    env = dict(os.environ if environ is None else environ)
    if instance_type == LOCAL_GPU:
        if env.get("SMCHAINER_DEVICE", "").lower() == "cpu":
            del env["SMCHAINER_DEVICE"]
    else:
        env["SMCHAINER_DEVICE"] = "cpu"
        # A CPU instance sees no GPU, so SM_NUM_GPUS is 0 and scripts pick the CPU.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def positive_int(name: str, value: int | None) -> int | None:
    """``value`` checked to be a whole number >= 1 (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
    return value


def pick_count(name: str, value: int | None, legacy_name: str, legacy: int | None,
               default: int = 1) -> int:
    """``instance_count`` or its SDK v1 name ``train_instance_count``, checked."""
    if value is not None and legacy is not None and value != legacy:
        raise ValueError(f"{name}={value} and {legacy_name}={legacy} disagree; give one")
    chosen = positive_int(name, value if value is not None else legacy)
    return default if chosen is None else chosen


def pick_type(value: str | None, legacy: str | None, name: str, legacy_name: str) -> str | None:
    """``instance_type`` or its SDK v1 name ``train_instance_type``."""
    if value is not None and legacy is not None and value != legacy:
        raise ValueError(f"{name}={value!r} and {legacy_name}={legacy!r} disagree; give one")
    return value if value is not None else legacy
