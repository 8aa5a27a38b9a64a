"""The trainer's data: channels read on rank 0, each rank's share and its iterators.

The order of the training batches and their augmentation come from
:mod:`.sampling`, as pure functions of the seed and the position in training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import chainer
import numpy as np

from smchainer import datasets
from smchainer.default_plugins.vgg.sampling import DerivedOrderSampler
from smchainer.functions.augment import SCALE

if TYPE_CHECKING:
    from smchainer.datasets import ImageDataset
    from smchainer.default_plugins.vgg.hyperparameters import Hyperparameters
    from smchainer.training.env import TrainingEnv

logger = logging.getLogger(__name__)

#: The channels the trainer evaluates on, the first present one wins.
TEST_CHANNELS = ("test", "validation", "eval")


@dataclass
class PreparedData:
    """What every rank needs to know about the data before training."""

    class_names: list[str]
    mean: list[float]
    std: list[float]
    train_size: int
    test_size: int
    test_source: str


@dataclass
class RankData:
    """One rank's share of the data: training arrays and their iterators.

    ``train_iter`` deals out row numbers of the training arrays (the updater
    holds the arrays themselves on the device), in an order that snapshots
    save; ``test_iter`` walks the evaluation set once per evaluation.
    """

    prepared: PreparedData
    train_images: np.ndarray
    train_labels: np.ndarray
    train_iter: Any
    test_iter: Any


def load_data(env: TrainingEnv, hp: Hyperparameters) -> tuple[ImageDataset, ImageDataset, str]:
    """Training and evaluation data of ``env``'s channels, and where the latter came from."""
    channels = dict(env.channels)
    train_path = channels.get("train")
    if train_path is None:
        others = [name for name in channels if name not in TEST_CHANNELS]
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
    test_name = next((n for n in TEST_CHANNELS if n in channels), None)
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


def rank_data(env: TrainingEnv, hp: Hyperparameters, comm: Any = None) -> RankData:
    """Read the channels on rank 0 and give every rank its share, with its iterators.

    The other ranks learn the outcome, or the data error, from rank 0, so a
    bad channel fails every rank with the same message. Training data become
    two arrays (the updater holds them on the device; the iterator deals out
    row numbers); evaluation goes through ``(image, label)`` tuples. Under
    MPI each rank receives only its rows (ChainerMN's shares).
    """
    master = env.is_rank_zero
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
    train_arrays: tuple[np.ndarray, np.ndarray] | None = None
    test_set = None
    if master:
        assert train is not None and test is not None
        train_arrays = (train.images, train.labels)
        test_set = chainer.datasets.TupleDataset(test.images, test.labels)
    if comm is not None:
        from smchainer.training.mpi import scatter_arrays

        train_arrays = scatter_arrays(train_arrays, comm, shuffle=True, seed=hp["seed"])
        test_arrays = None if test is None else (test.images, test.labels)
        test_set = chainer.datasets.TupleDataset(*scatter_arrays(test_arrays, comm))
    assert train_arrays is not None and test_set is not None  # every rank holds its share now
    images, labels = train_arrays
    train_iter = chainer.iterators.SerialIterator(
        np.arange(len(labels)), hp["batch-size"],
        order_sampler=DerivedOrderSampler(hp["seed"], env.rank),
    )
    test_iter = chainer.iterators.SerialIterator(
        test_set, hp["eval-batch-size"], repeat=False, shuffle=False
    )
    return RankData(prepared, images, labels, train_iter, test_iter)


# --- batches ---------------------------------------------------------------------------


def stack_batch(batch: list[tuple[np.ndarray, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """A list of ``(uint8 image, label)`` as a uint8 array and an int32 array."""
    images = np.stack([example[0] for example in batch])
    labels = np.asarray([example[1] for example in batch], dtype=np.int32)
    return images, labels


def to_float(images):
    """uint8 images (NumPy or CuPy) as float32 in [0, 1], what the model and clients use."""
    return images.astype(np.float32) * SCALE


@chainer.dataset.converter()
def evaluation_converter(batch, device=None):
    """Evaluator converter: stack, send to ``device`` (as uint8: 4x less to copy), scale."""
    images, labels = stack_batch(batch)
    if device is not None:
        return to_float(device.send(images)), device.send(labels)
    return to_float(images), labels
