"""Padded random crops and horizontal flips gathered straight from the whole training set.

:func:`crop_flip` takes the full uint8 N x C x H x W training array (NumPy or
CuPy), the rows of one batch and each image's crop offset and flip, and
returns the batch as float32 in [0, 1]: gather, zero padding, crop, flip and
scaling in one pass. With the training set resident on the GPU, an update
then moves only ``4 x batch`` int64 numbers to the device instead of the
uint8 images.

On the CPU it is a NumPy fancy-indexing gather; on the GPU it is one raw CUDA kernel,
:data:`CROP_FLIP_SOURCE`. The scale is ``np.float32(1 / 255)`` on both, applied
as one float32 multiply, so the two agree bit for bit.

CuPy is imported only when a CuPy array arrives, and the kernel is compiled
on first use, so importing this module costs nothing on a CPU-only machine.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from smchainer.functions import cuda_source

logger = logging.getLogger(__name__)

#: The multiplier from uint8 to [0, 1], the one scale of every uint8 image smchainer reads.
SCALE = np.float32(1 / 255)
#: Zero padding on each side of the usual CIFAR recipe.
PAD = 4
#: Threads per block of the CUDA kernel.
BLOCK = 256
#: Upper bound of the launched blocks; the grid-stride loop covers the rest.
MAX_BLOCKS = 65535
KERNEL_NAME = "smchainer_crop_flip"

#: CUDA source of the GPU path (also compile-checked by NVRTC in the CPU tests).
#:
#: One thread per output element in a grid-stride loop, with 64-bit index
#: arithmetic throughout (the training set alone can exceed 2**31 bytes).
#: The padding is never materialised: a source pixel outside the image reads
#: as 0. A row index outside ``[0, n)`` cannot be reported without a host
#: synchronisation, so that image comes out as NaN, which the loss shows,
#: instead of reading out of bounds.
CROP_FLIP_SOURCE = cuda_source("crop_flip.cu")


def crop_flip(images: Any, index: Any, top: Any, left: Any, flip: Any, pad: int = PAD) -> Any:
    """The images ``index`` of ``images``, cropped, flipped and scaled to float32 [0, 1].

    ``out[b, c, y, x] = padded[index[b], c, top[b] + y, left[b] + x']  / 255`` where
    ``padded`` is ``images`` zero-padded by ``pad`` on each side and ``x'`` is
    ``width - 1 - x`` when ``flip[b]``, else ``x``. ``top == left == pad`` and
    no flip is the image itself.

    :param images: the whole uint8 N x C x H x W set, NumPy or CuPy; the
        result lives where it does.
    :param index: int array (B,) of rows to take.
    :param top: int array (B,) in ``[0, 2 * pad]``.
    :param left: int array (B,) in ``[0, 2 * pad]``.
    :param flip: bool (or 0/1 int) array (B,).
    :raises ValueError: on shapes, dtypes or (CPU only: checking on the GPU
        would synchronise) out-of-range offsets.
    """
    if getattr(images, "ndim", None) != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"crop_flip needs uint8 N x C x H x W images, not {getattr(images, 'dtype', None)} "
            f"of shape {getattr(images, 'shape', None)}"
        )
    if pad < 0:
        raise ValueError(f"crop_flip pad must not be negative, not {pad}")
    batch = len(index)
    for name, values in (("index", index), ("top", top), ("left", left), ("flip", flip)):
        if values.shape != (batch,):
            raise ValueError(f"crop_flip {name} must have shape ({batch},), not {values.shape}")
    if isinstance(images, np.ndarray):
        return _crop_flip_numpy(images, index, top, left, flip, pad)
    return _crop_flip_cupy(images, index, top, left, flip, pad)


def _crop_flip_numpy(images, index, top, left, flip, pad: int) -> np.ndarray:
    """One fancy-indexing gather from the zero-padded batch, then the scale."""
    index, top, left = (np.asarray(v, dtype=np.int64) for v in (index, top, left))
    flip = np.asarray(flip).astype(bool)
    if top.size and (min(top.min(), left.min()) < 0 or max(top.max(), left.max()) > 2 * pad):
        raise ValueError(f"crop_flip top and left must be in [0, {2 * pad}]")
    batch = len(index)
    channels, height, width = images.shape[1:]
    padded = np.pad(images[index], ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    cropped = padded[
        np.arange(batch)[:, None, None, None],
        np.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return cropped.astype(np.float32) * SCALE


def _crop_flip_cupy(images, index, top, left, flip, pad: int):
    """One launch of :data:`CROP_FLIP_SOURCE`; nothing waits for the GPU."""
    import cupy

    with images.device:
        images = cupy.ascontiguousarray(images)
        # No-ops for the int64 views the trainer passes; others are converted on the device.
        index, top, left, flip = (
            cupy.ascontiguousarray(cupy.asarray(v).astype(cupy.int64, copy=False))
            for v in (index, top, left, flip)
        )
        n, channels, height, width = images.shape
        batch = len(index)
        out = cupy.empty((batch, channels, height, width), dtype=np.float32)
        total = out.size
        if total:
            blocks = min(-(-total // BLOCK), MAX_BLOCKS)
            _kernel(images.device.id)(
                (blocks,), (BLOCK,),
                (images, index, top, left, flip, out, np.int64(n), np.int64(batch),
                 np.int64(channels), np.int64(height), np.int64(width), np.int64(pad),
                 SCALE),
            )
        return out


@functools.cache
def _module():
    """The compiled module (CuPy caches the binary on disk as well)."""
    import cupy

    return cupy.RawModule(code=CROP_FLIP_SOURCE, options=("-std=c++17",))


@functools.cache
def _kernel(device_id: int):
    """The kernel loaded on GPU ``device_id`` (a loaded function is per device)."""
    logger.debug("loading %s on GPU %d", KERNEL_NAME, device_id)
    return _module().get_function(KERNEL_NAME)
