"""The update step: one batch gathered, cropped and flipped where the data are, one update."""
from __future__ import annotations

import chainer
import numpy as np
from chainer.training import updaters

from smchainer.default_plugins.vgg.sampling import draw_crops, iteration_rng
from smchainer.functions.augment import crop_flip


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
    crops from its own generator with :func:`draw_crops`, so a run resumed
    from a snapshot repeats the uninterrupted run exactly on the CPU.

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
