"""The former per-batch augmentation, kept as the reference the trainer's data path must equal.

:func:`smchainer.functions.augment.crop_flip` (what the updater runs) must give
exactly what this pipeline gave, ``augment`` then ``to_float``, so CPU runs
keep their results.
"""
from __future__ import annotations

import numpy as np

from smchainer.default_plugins.vgg.sampling import draw_crops


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random ``pad``-pixel-padded crops and horizontal flips of a uint8 N x C x H x W batch.

    One fancy-indexing gather for the whole batch; zero padding as in the
    usual CIFAR recipe. Draws from ``rng`` through :func:`draw_crops`, as
    the updater does.
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
