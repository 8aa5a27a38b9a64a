"""The training loop of the built-in VGG trainer (imported when ``train`` runs).

Kept apart from :mod:`smchainer.default_plugins.vgg` so that loading the
default plugins does not import Chainer. Every source of randomness is a
function of the ``seed`` hyperparameter and the position in training (rank,
epoch, iteration), which is what lets a run resumed from a snapshot end with
the same weights as an uninterrupted one on the CPU.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import serializers, training
from chainer.training import extensions, updaters

import smchainer
from smchainer import datasets, optimizers
from smchainer.default_plugins.vgg import ARCHITECTURE, METADATA_FILE, MODEL_FILE
from smchainer.device import get_device
from smchainer.errors import SmchainerError
from smchainer.functions import channels_last
from smchainer.functions.augment import crop_flip
from smchainer.models.vgg import INPUT_SHAPE, VGG

if TYPE_CHECKING:
    from smchainer.datasets import ImageDataset
    from smchainer.training.env import TrainingEnv

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("step", "cosine", "onecycle")
KERNELS = ("auto", "chainer", "fused")
#: The largest dropout rate of the network, which the ``dropout`` multiplier must keep below 1.
MAX_DROPOUT_RATE = 0.5
#: Share of training spent warming up under the one-cycle schedule.
ONECYCLE_WARMUP = 0.3
SNAPSHOT_PATTERN = re.compile(r"^snapshot_iter_(\d+)\.rank(\d+)of(\d+)\.npz$")

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
    "progress-bar": (bool, True, "show Chainer's progress bar on rank 0"),
    "cache-dir": (str, None, "decoded-image cache folder (see smchainer.datasets)"),
}


class Hyperparameters(dict):
    """Checked hyperparameters, keyed by their dashed names."""

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
    return values


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


# --- data on the device --------------------------------------------------------------


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random ``pad``-pixel-padded crops and horizontal flips of a uint8 N x C x H x W batch.

    One fancy-indexing gather for the whole batch; zero padding as in the
    usual CIFAR recipe.
    """
    n, channels, height, width = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    top, left, flip = draw_crops(rng, n, pad)
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[
        np.arange(n)[:, None, None, None],
        np.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def draw_crops(
    rng: np.random.Generator, n: int, pad: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets and flips of ``n`` images: top, left (in ``[0, 2 * pad]``), flip.

    Drawn in this order from ``rng`` by both :func:`augment` and the
    updater, so a given generator state gives the same crops either way.
    """
    top = np.asarray(rng.integers(0, 2 * pad + 1, size=n))
    left = np.asarray(rng.integers(0, 2 * pad + 1, size=n))
    flip = np.asarray(rng.random(n) < 0.5)
    return top, left, flip


def stack_batch(batch: list[tuple[np.ndarray, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """A list of ``(uint8 image, label)`` as a uint8 array and an int32 array."""
    images = np.stack([example[0] for example in batch])
    labels = np.asarray([example[1] for example in batch], dtype=np.int32)
    return images, labels


def to_float(images):
    """uint8 images (NumPy or CuPy) as float32 in [0, 1], what the model and clients use."""
    return images.astype(np.float32) * np.float32(1 / 255)


@chainer.dataset.converter()
def evaluation_converter(batch, device=None):
    """Evaluator converter: stack, send to ``device`` (as uint8: 4x less to copy), scale."""
    images, labels = stack_batch(batch)
    if device is not None:
        return to_float(device.send(images)), device.send(labels)
    return to_float(images), labels


def iteration_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    """The random stream of one update: a pure function of (seed, rank, iteration)."""
    return np.random.default_rng([seed, rank, iteration])


class DerivedOrderSampler:
    """Shuffles each epoch with a seed derived from the previous order.

    Chainer's ``ShuffleOrderSampler`` keeps a RandomState that snapshots do
    not save, so a resumed run would see other orders. This sampler has no
    state: the next order is a function of the seed and the order a snapshot
    does save, so a resumed run continues with the same sequence.
    """

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed = seed
        self.rank = rank

    def __call__(self, current_order: np.ndarray, current_position: int) -> np.ndarray:
        digest = zlib.crc32(np.ascontiguousarray(current_order, dtype=np.int64).tobytes())
        rng = np.random.default_rng([self.seed, self.rank, digest])
        return rng.permutation(len(current_order))


# --- the loss ------------------------------------------------------------------------


class SmoothedCrossEntropy:
    """Softmax cross entropy against label-smoothed targets (the Classifier's ``lossfun``).

    The target puts ``1 - eps`` on the label and spreads ``eps`` evenly over
    all classes (the label included), so an image's loss is
    ``-((1 - eps) * log p[t] + eps * mean_k log p[k])`` and the result is the
    mean over the batch. Written with Chainer functions, so it runs and
    differentiates on the CPU and the GPU alike. Unlike
    ``F.softmax_cross_entropy`` there is no ignore label: the trainer's labels
    are all classes.
    """

    def __init__(self, eps: float) -> None:
        if not 0 <= eps < 1:
            raise ValueError(f"label smoothing must be in [0, 1), not {eps}")
        self.eps = float(eps)

    def __call__(self, y, t):
        log_p = F.log_softmax(y)
        per_image = (self.eps - 1) * F.select_item(log_p, t) - self.eps * F.mean(log_p, axis=1)
        return F.mean(per_image)

    def __repr__(self) -> str:
        return f"SmoothedCrossEntropy(eps={self.eps})"


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
    return "fused" if channels_last.fused_by_default(on_gpu) else "chainer"


# --- learning-rate schedules ---------------------------------------------------------


def learning_rate(hp: Hyperparameters, epoch_detail: float, total_epochs: float) -> float:
    """The learning rate at ``epoch_detail`` (fractional epochs done)."""
    base = hp["learning-rate"]
    schedule = hp["lr-schedule"]
    if schedule == "step":
        return base * hp["lr-step-factor"] ** math.floor(epoch_detail / hp["lr-step-epochs"])
    progress = min(max(epoch_detail / total_epochs, 0.0), 1.0) if total_epochs > 0 else 1.0
    if schedule == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * progress))
    # onecycle: linear warm-up from base/25 to base, then cosine down to base/1e4.
    start, end = base / 25, base / 1e4
    if progress < ONECYCLE_WARMUP:
        return start + (base - start) * progress / ONECYCLE_WARMUP
    down = (progress - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * down))


# --- the training job ----------------------------------------------------------------


@dataclass
class PreparedData:
    """What every rank needs to know about the data before training."""

    class_names: list[str]
    mean: list[float]
    std: list[float]
    train_size: int
    test_size: int
    test_source: str


def load_data(env: TrainingEnv, hp: Hyperparameters) -> tuple[ImageDataset, ImageDataset, str]:
    """Training and evaluation data of ``env``'s channels, and where the latter came from."""
    channels = dict(env.channels)
    train_path = channels.get("train")
    if train_path is None:
        others = [name for name in channels if name not in ("test", "validation", "eval")]
        if len(others) != 1:
            raise datasets.DatasetError(
                "the built-in VGG trainer needs a 'train' channel "
                f"(channels given: {sorted(channels) or 'none'})"
            )
        logger.info("using channel %r as the training data", others[0])
        train_path = channels[others[0]]
    cache_dir = hp["cache-dir"]
    train = datasets.load_channel(train_path, "train", cache_dir=cache_dir)
    if hp["train-samples"]:
        train = train.sample(hp["train-samples"], hp["seed"])
    test_name = next((n for n in ("test", "validation", "eval") if n in channels), None)
    if test_name is not None:
        test = datasets.load_channel(channels[test_name], "test", cache_dir=cache_dir)
        test = datasets.align_classes(test, train.class_names)
        source = f"channel {test_name}"
    else:
        train, test = datasets.split_holdout(train, hp["holdout"], hp["seed"])
        source = f"{hp['holdout']:.0%} of train held out (seed {hp['seed']})"
        logger.info("no test channel: evaluating on %d images, %s", len(test), source)
    if hp["test-samples"]:
        test = test.sample(hp["test-samples"], hp["seed"] + 1)
    return train, test, source


def channel_statistics(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, scaled to [0, 1]."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].astype(np.float64)
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return (mean / 255).tolist(), (std / 255).tolist()


def run_training(env: TrainingEnv, hp: Hyperparameters) -> dict[str, Any]:
    """Train VGG as ``env`` describes; return the final metrics."""
    started = time.monotonic()
    device = get_device(env.device)
    on_gpu = device.xp is not np
    kernels = resolve_kernels(hp["kernels"], on_gpu)
    comm = None
    if env.size > 1:
        import chainermn

        name = hp["communicator"] or ("pure_nccl" if on_gpu else "naive")
        comm = chainermn.create_communicator(name)
        if comm.size != env.size or comm.rank != env.rank:
            raise SmchainerError(
                f"MPI says rank {comm.rank} of {comm.size}, the job says {env.rank} of {env.size}"
            )
        logger.info("rank %d of %d, communicator %s, device %s", env.rank, env.size, name, device)
    master = env.rank == 0

    # Rank 0 reads the channels; the others learn the outcome (or the error) from it.
    train = test = None
    prepared: PreparedData | str
    if master:
        try:
            train, test, source = load_data(env, hp)
            mean, std = channel_statistics(train.images)
            prepared = PreparedData(
                train.class_names, mean, std, len(train), len(test), source
            )
        except datasets.DatasetError as error:
            prepared = str(error)
    if comm is not None:
        prepared = comm.bcast_obj(prepared if master else None)
    if isinstance(prepared, str):
        raise datasets.DatasetError(prepared)
    if master:
        logger.info(
            "training on %d images of %d classes, evaluating on %d (%s)",
            prepared.train_size, len(prepared.class_names), prepared.test_size,
            prepared.test_source,
        )

    # Training data are two arrays the updater holds (on the device); the iterator
    # only deals out their row numbers. Evaluation goes through (image, label) tuples.
    train_arrays: tuple[np.ndarray, np.ndarray] | None = None
    test_set = None
    if master:
        assert train is not None and test is not None
        train_arrays = (train.images, train.labels)
        test_set = chainer.datasets.TupleDataset(test.images, test.labels)
    if comm is not None:  # each rank receives its rows only (ChainerMN's shares)
        from smchainer.training.mpi import scatter_arrays

        train_arrays = scatter_arrays(train_arrays, comm, shuffle=True, seed=hp["seed"])
        test_arrays = None if test is None else (test.images, test.labels)
        test_set = chainer.datasets.TupleDataset(*scatter_arrays(test_arrays, comm))

    assert train_arrays is not None and test_set is not None  # every rank holds its share now
    train_images, train_labels = train_arrays
    np.random.seed(hp["seed"])  # Chainer's initializers draw from NumPy's global RNG
    if on_gpu:
        device.xp.random.seed(hp["seed"] + env.rank)  # GPU dropout masks
    model = VGG(
        n_classes=len(prepared.class_names), width=hp["width"], depth=hp["depth"],
        mean=prepared.mean, std=prepared.std,
    )
    model.fused = kernels == "fused"
    model.dropout_scale = hp["dropout"]
    if master:
        logger.info(
            "kernels: %s (%s)", kernels,
            f"auto on the {'GPU' if on_gpu else 'CPU'}" if hp["kernels"] == "auto" else "chosen",
        )
    if hp["label-smoothing"] > 0:
        classifier = L.Classifier(model, lossfun=SmoothedCrossEntropy(hp["label-smoothing"]))
    else:  # Chainer's own function: the unsmoothed loss stays exactly what it was
        classifier = L.Classifier(model)
    classifier.to_device(device)

    # Weight decay inside the momentum update: one kernel per parameter, not two.
    optimizer = optimizers.MomentumSGD(
        lr=hp["learning-rate"], momentum=hp["momentum"], weight_decay=hp["weight-decay"]
    )
    if comm is not None:
        import chainermn

        comm.bcast_data(classifier)
        optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    optimizer.setup(classifier)

    batch_size = hp["batch-size"]
    train_iter = chainer.iterators.SerialIterator(
        np.arange(len(train_labels)), batch_size,
        order_sampler=DerivedOrderSampler(hp["seed"], env.rank),
    )
    test_iter = chainer.iterators.SerialIterator(
        test_set, hp["eval-batch-size"], repeat=False, shuffle=False
    )
    updater = AugmentingUpdater(
        train_iter, optimizer, device=device, seed=hp["seed"], rank=env.rank,
        augment=hp["augment"], images=train_images, labels=train_labels,
        # the crop kernel goes with the fused kernels on a GPU (the CPU has no kernel)
        gather_on_device=kernels == "fused" or not on_gpu,
    )
    if hp["iterations"]:
        stop = (hp["iterations"], "iteration")
        total_epochs = hp["iterations"] * batch_size / len(train_labels)
    else:
        stop = (hp["epochs"], "epoch")
        total_epochs = float(hp["epochs"])
    output_data_dir = Path(env.output_data_dir)
    checkpoints = Path(env.checkpoints)
    trainer = training.Trainer(
        updater, stop, out=str(output_data_dir if master else checkpoints)
    )

    trainer.extend(LearningRateSchedule(hp, total_epochs), trigger=(1, "iteration"))
    evaluator: Any = RecordingEvaluator(
        test_iter, classifier, converter=evaluation_converter, device=device
    )
    if comm is not None:
        import chainermn

        evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
    trainer.extend(evaluator, trigger=(1, "epoch"), name="validation")
    if master:
        trainer.extend(extensions.observe_lr(), trigger=(1, "epoch"))
        trainer.extend(extensions.LogReport(trigger=(1, "epoch")))
        trainer.extend(extensions.PlotReport(
            ["main/loss", "validation/main/loss"], "epoch", filename="loss.png"
        ))
        trainer.extend(extensions.PlotReport(
            ["main/accuracy", "validation/main/accuracy"], "epoch", filename="accuracy.png"
        ))
        trainer.extend(extensions.PrintReport([
            "epoch", "iteration", "main/loss", "validation/main/loss", "main/accuracy",
            "validation/main/accuracy", "lr", "elapsed_time",
        ]))
        if hp["progress-bar"]:
            trainer.extend(extensions.ProgressBar(update_interval=10))
    every = (hp["checkpoint-every"], "iteration") if hp["checkpoint-every"] else (1, "epoch")
    checkpointer = Checkpointer(checkpoints, env.rank, env.size, hp["keep-checkpoints"])
    trainer.extend(checkpointer, trigger=every)

    checkpointer.resume(trainer, comm)
    first_iteration = updater.iteration
    trainer.run()

    # (create_multi_node_evaluator patches and returns the same object.)
    last = evaluator.last
    if last is not None and last[0] == updater.iteration:
        result = last[1]
    else:  # nothing was trained (the job had already finished) or no epoch end
        with chainer.Reporter().scope({}):
            result = evaluator()
    metrics = {
        "test_accuracy": float(result["validation/main/accuracy"]),
        "test_loss": float(result["validation/main/loss"]),
        "test_source": prepared.test_source,
        "epoch": updater.epoch_detail,
        "iteration": updater.iteration,
        "resumed_from_iteration": first_iteration or None,
        "train_images": prepared.train_size,
        "test_images": prepared.test_size,
        "ranks": env.size,
        "kernels": kernels,
        "elapsed_seconds": round(time.monotonic() - started, 3),
    }
    if master:
        save_model(model, Path(env.model_dir), prepared.class_names, hp)
        output_data_dir.mkdir(parents=True, exist_ok=True)
        (output_data_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info(
            "test accuracy %.4f, loss %.4f; model saved in %s",
            metrics["test_accuracy"], metrics["test_loss"], env.model_dir,
        )
    return metrics


class AugmentingUpdater(updaters.StandardUpdater):
    """StandardUpdater over row numbers of training arrays it holds on the device.

    ``iterator`` yields row numbers (it iterates over ``np.arange(n)``, so
    snapshots save only its order and position); ``images`` (uint8
    N x C x H x W) and ``labels`` go to ``device`` once, here. An update then
    sends one small int64 array (rows, crop offsets, flips) and builds the
    float32 batch where the data are with :func:`crop_flip`, labels gathered
    there too: no image crosses the bus and nothing waits for the GPU
    (CuPy stages the small copy through pinned memory, asynchronously).

    Randomness is a function of (seed, rank, iteration): each update reseeds
    NumPy's global RNG (Chainer's CPU dropout draws from it) and draws the
    crops from its own generator, in :func:`augment`'s order, so a run resumed
    from a snapshot repeats the uninterrupted run exactly on the CPU, with the
    same results as the former per-batch NumPy pipeline.

    With ``gather_on_device=False`` the arrays stay on the host instead: the
    same :func:`crop_flip` runs there with NumPy and the float32 batch is
    sent (the path for a GPU without the fused kernels).
    """

    #: Zero padding of the random crops.
    pad = 4

    def __init__(
        self, iterator, optimizer, device, seed: int, rank: int, augment: bool,
        images: np.ndarray, labels: np.ndarray, gather_on_device: bool = True,
    ):
        super().__init__(iterator, optimizer, device=device)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} training images but {len(labels)} labels")
        self.seed = seed
        self.rank = rank
        self.augment = augment
        self.target_device = device
        self.gather_on_device = gather_on_device
        holder = device if gather_on_device else chainer.get_device("@numpy")
        self.images = holder.send(np.ascontiguousarray(images, dtype=np.uint8))
        self.labels = holder.send(np.ascontiguousarray(labels, dtype=np.int32))

    def update_core(self) -> None:
        iterator = self._iterators["main"]
        optimizer = self._optimizers["main"]
        rng = iteration_rng(self.seed, self.rank, self.iteration)
        np.random.seed(int(rng.integers(2**32)))
        rows = np.asarray(iterator.next(), dtype=np.int64)
        if self.augment:
            top, left, flip = draw_crops(rng, len(rows), self.pad)
        else:  # the identity crop
            top = left = np.full(len(rows), self.pad)
            flip = np.zeros(len(rows), dtype=bool)
        # One host-to-device copy per update: rows, top, left and flip as one int64 array.
        steps = np.stack([rows, top, left, flip]).astype(np.int64, copy=False)
        if self.gather_on_device:
            steps = self.target_device.send(steps)
        x = crop_flip(self.images, steps[0], steps[1], steps[2], steps[3], self.pad)
        t = self.labels[steps[0]]
        if not self.gather_on_device:
            x, t = self.target_device.send(x), self.target_device.send(t)
        optimizer.update(optimizer.target, x, t)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)


class LearningRateSchedule:
    """Sets the optimizer's lr from the epoch position alone (so resuming needs no state)."""

    trigger = (1, "iteration")
    priority = 300  # before the reporting extensions of the same iteration
    name = "LearningRateSchedule"

    def __init__(self, hp: Hyperparameters, total_epochs: float) -> None:
        self.hp = hp
        self.total_epochs = total_epochs

    def initialize(self, trainer) -> None:
        self(trainer)

    def __call__(self, trainer) -> None:
        optimizer = trainer.updater.get_optimizer("main")
        optimizer.lr = learning_rate(self.hp, trainer.updater.epoch_detail, self.total_epochs)


class RecordingEvaluator(extensions.Evaluator):
    """An Evaluator that weights batches by size and remembers its last result.

    Chainer's Evaluator averages per-batch means, so a short last batch
    counts as much as a full one; here the result is the mean over images.
    """

    last: tuple[int, dict] | None = None

    def evaluate(self) -> dict:
        iterator = self._iterators["main"]
        target = self.eval_func or self._targets["main"]
        iterator.reset()
        summary = chainer.reporter.DictSummary()
        for batch in iterator:
            observation: dict = {}
            with chainer.reporter.report_scope(observation):
                x, t = self.converter(batch, self.device)
                with chainer.no_backprop_mode():
                    target(x, t)
            summary.add({key: (value, len(batch)) for key, value in observation.items()})
        return summary.compute_mean()

    def __call__(self, trainer=None):
        result = super().__call__(trainer)
        if trainer is not None:
            self.last = (trainer.updater.iteration, result)
        return result


class Checkpointer:
    """Writes and restores per-rank trainer snapshots in the checkpoint folder.

    Files are ``snapshot_iter_<N>.rank<r>of<size>.npz``, written to a
    temporary name and renamed, so a crash leaves no half snapshot; the
    newest ``keep`` of each rank are kept.
    """

    priority = -100  # after LogReport has written the log of this iteration
    name = "Checkpointer"

    def __init__(self, folder: Path, rank: int, size: int, keep: int) -> None:
        self.folder = folder
        self.rank = rank
        self.size = size
        self.keep = keep

    def _iterations(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = SNAPSHOT_PATTERN.match(path.name)
            if match and (int(match[2]), int(match[3])) == (self.rank, self.size):
                found.append(int(match[1]))
        return sorted(found)

    def path(self, iteration: int) -> Path:
        return self.folder / f"snapshot_iter_{iteration}.rank{self.rank}of{self.size}.npz"

    def __call__(self, trainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        iteration = trainer.updater.iteration
        target = self.path(iteration)
        temporary = target.with_name(target.name + ".tmp")
        serializers.save_npz(str(temporary), trainer)
        os.replace(temporary, target)
        for old in self._iterations()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)

    def resume(self, trainer, comm=None) -> int:
        """Load the newest snapshot every rank has; return its iteration (0: none)."""
        mine = set(self._iterations())
        if comm is not None:
            common = set.intersection(*comm.mpi_comm.allgather(mine))
        else:
            common = mine
        if not common:
            return 0
        iteration = max(common)
        serializers.load_npz(str(self.path(iteration)), trainer)
        if self.rank == 0:
            logger.info("resumed from the snapshot at iteration %d in %s", iteration, self.folder)
        return iteration


def save_model(model, model_dir: Path, class_names: list[str], hp: Hyperparameters) -> None:
    """Write ``model.npz`` and ``smchainer-model.json`` into ``model_dir``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    serializers.save_npz(str(model_dir / MODEL_FILE), model)
    config = model.config()
    metadata = {
        "architecture": ARCHITECTURE,
        "n_classes": config["n_classes"],
        "width": config["width"],
        "depth": config["depth"],
        "class_names": list(class_names),
        "normalization": {"mean": config["mean"], "std": config["std"]},
        "input": {"shape": list(INPUT_SHAPE), "dtype": "float32", "range": [0.0, 1.0]},
        "weights": MODEL_FILE,
        "hyperparameters": dict(hp),
        "smchainer_version": smchainer.__version__,
    }
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
