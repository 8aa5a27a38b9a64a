"""The built-in VGG trainer's hyperparameters: names, types, defaults and checks.

:func:`parse_hyperparameters` is the one place a job's ``hyperparameters``
become the trainer's settings; every other module of the trainer reads the
checked :class:`Hyperparameters` it returns. Nothing here imports Chainer.
"""
from __future__ import annotations

from typing import Any

from smchainer.errors import SmchainerError

LR_SCHEDULES = ("step", "cosine", "onecycle")
KERNELS = ("auto", "chainer", "fused")
#: The largest dropout rate of the network, which the ``dropout`` multiplier must keep below 1.
MAX_DROPOUT_RATE = 0.5

#: name -> (type, default, help). ``None`` defaults are decided at run time.
HYPERPARAMETERS: dict[str, tuple[type, Any, str]] = {
    "epochs": (int, 50, "passes over the training data"),
    "iterations": (int, 0, "stop after this many updates instead (0: use epochs)"),
    "batch-size": (int, 64, "images per update on each rank"),
    "learning-rate": (float, 0.05, "peak learning rate of MomentumSGD"),
    "momentum": (float, 0.9, "MomentumSGD momentum"),
    "weight-decay": (float, 5e-4, "L2 weight decay"),
    "lr-schedule": (str, "step", "step | cosine | onecycle"),
    "lr-step-epochs": (float, 25, "step schedule: epochs between learning-rate drops"),
    "lr-step-factor": (float, 0.5, "step schedule: factor of each drop"),
    "seed": (int, 0, "seed of weights, data order, augmentation and dropout"),
    "width": (float, 1.0, "channel multiplier of every layer"),
    "depth": (int, 16, "VGG depth: 8, 11, 13, 16 or 19"),
    "augment": (bool, True, "random 4-pixel-padded crops and horizontal flips"),
    "kernels": (str, "auto", "auto | chainer | fused: fused runs the network channels-last "
                "through smchainer's fused kernels (CUDA on a GPU, NumPy on the CPU) and, on a "
                "GPU, gathers each batch there; chainer runs Chainer's own functions; auto: "
                "fused on the CPU, chainer on a GPU (see "
                "smchainer.functions.channels_last.FUSED_BY_DEFAULT_ON_GPU)"),
    "dropout": (float, 1.0, "multiplier of the network's dropout rates (0: no dropout; < 2, "
                "as the largest rate is 0.5)"),
    "label-smoothing": (float, 0.0, "cross entropy against targets smoothed by this much "
                        "(in [0, 1)); the evaluation loss is the same smoothed loss"),
    "communicator": (str, None, "ChainerMN communicator (default pure_nccl on GPU, naive on CPU)"),
    "checkpoint-every": (int, 0, "snapshot every N iterations (0: every epoch)"),
    "keep-checkpoints": (int, 2, "snapshots kept per rank"),
    "holdout": (float, 0.1, "share of train held out for evaluation without a test channel"),
    "train-samples": (int, 0, "use a seeded random subset of this many training images (0: all)"),
    "test-samples": (int, 0, "use a seeded random subset of this many test images (0: all)"),
    "eval-batch-size": (int, 256, "images per evaluation batch"),
    "progress-bar": (bool, True, "show Chainer's progress bar on rank 0 (on a terminal only)"),
    "cache-dir": (str, None, "decoded-image cache folder (see smchainer.datasets)"),
}


class Hyperparameters(dict):
    """Checked hyperparameters, keyed by their dashed names.

    Also readable as attributes with underscores (``hp.batch_size`` is
    ``hp["batch-size"]``), for plugins and scripts that prefer them.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name.replace("_", "-")]
        except KeyError:
            raise AttributeError(name) from None


def parse_hyperparameters(raw: dict[str, Any]) -> Hyperparameters:
    """Apply defaults to ``raw`` and convert its values, refusing unknown names.

    Names may use underscores for dashes; ``sagemaker_*`` keys are ignored.
    """
    values = Hyperparameters({name: spec[1] for name, spec in HYPERPARAMETERS.items()})
    for key, value in raw.items():
        if key.startswith("sagemaker_"):
            continue
        name = key.strip().lower().replace("_", "-")
        if name not in HYPERPARAMETERS:
            raise SmchainerError(
                f"unknown hyperparameter {key!r} for the built-in VGG trainer; "
                f"known: {', '.join(HYPERPARAMETERS)}"
            )
        kind = HYPERPARAMETERS[name][0]
        values[name] = None if value is None else _convert(name, kind, value)
    _check(values)
    return values


def _check(values: Hyperparameters) -> None:
    """Range and choice checks, once every value has its type."""
    if values["lr-schedule"] not in LR_SCHEDULES:
        raise SmchainerError(
            f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, not {values['lr-schedule']!r}"
        )
    for name in ("epochs", "batch-size", "eval-batch-size", "keep-checkpoints"):
        if values[name] < 1:
            raise SmchainerError(f"hyperparameter {name} must be at least 1, not {values[name]}")
    for name in ("iterations", "checkpoint-every", "train-samples", "test-samples", "weight-decay"):
        if values[name] < 0:
            raise SmchainerError(f"hyperparameter {name} must not be negative")
    if not values["learning-rate"] > 0 or not values["width"] > 0:
        raise SmchainerError("learning-rate and width must be positive")
    for name in ("kernels", "dropout", "label-smoothing"):  # no run-time default: None is unset
        if values[name] is None:
            values[name] = HYPERPARAMETERS[name][1]
    values["kernels"] = values["kernels"].strip().lower()
    if values["kernels"] not in KERNELS:
        raise SmchainerError(
            f"hyperparameter kernels must be one of {', '.join(KERNELS)}, not {values['kernels']!r}"
        )
    limit = 1 / MAX_DROPOUT_RATE
    if not 0 <= values["dropout"] < limit:
        raise SmchainerError(
            f"hyperparameter dropout must be in [0, {limit:g}) (it multiplies dropout rates of "
            f"up to {MAX_DROPOUT_RATE}, which must stay below 1), not {values['dropout']}"
        )
    if not 0 <= values["label-smoothing"] < 1:
        raise SmchainerError(
            f"hyperparameter label-smoothing must be in [0, 1), not {values['label-smoothing']}"
        )


def _convert(name: str, kind: type, value: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                text = value.strip().lower()
                if text in ("true", "1", "yes", "on"):
                    return True
                if text in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        return kind(value)
    except (TypeError, ValueError):
        raise SmchainerError(
            f"hyperparameter {name} must be {kind.__name__}, not {value!r}"
        ) from None


def resolve_kernels(choice: str, on_gpu: bool) -> str:
    """``fused`` or ``chainer``: what the ``kernels`` hyperparameter means here.

    ``auto`` follows :func:`smchainer.functions.channels_last.fused_by_default`:
    fused on the CPU, where the NumPy implementation is also faster than
    Chainer's own functions (about 1.8x for VGG-16 training at batch 64 on this
    project's 2-core build machine; ``benchmarks/train_throughput.py``), and on
    a GPU once the CUDA kernels have been verified there. On a GPU without
    them, each batch is also gathered on the host.
    """
    if choice != "auto":
        return choice
    from smchainer.functions import channels_last

    return "fused" if channels_last.fused_by_default(on_gpu) else "chainer"
