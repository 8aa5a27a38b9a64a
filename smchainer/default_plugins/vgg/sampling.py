"""The order and the augmentation of training batches, as pure functions of the position.

Every source of randomness is a function of the ``seed`` hyperparameter and
the position in training (rank, epoch, iteration), which is what lets a run
resumed from a snapshot end with the same weights as an uninterrupted one on
the CPU.
"""
from __future__ import annotations

import zlib

import numpy as np


def iteration_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    """The random stream of one update: a pure function of (seed, rank, iteration)."""
    return np.random.default_rng([seed, rank, iteration])


def draw_crops(
    rng: np.random.Generator, n: int, pad: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets and flips of ``n`` images: top, left (in ``[0, 2 * pad]``), flip.

    Drawn in this order from ``rng`` by the updater, so a given generator
    state gives the same crops whoever draws them.
    """
    top = np.asarray(rng.integers(0, 2 * pad + 1, size=n))
    left = np.asarray(rng.integers(0, 2 * pad + 1, size=n))
    flip = np.asarray(rng.random(n) < 0.5)
    return top, left, flip


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
