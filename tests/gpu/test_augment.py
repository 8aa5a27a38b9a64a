"""crop_flip's CUDA kernel and the GPU-resident updater give exactly the CPU's batches.

uint8 * float32(1/255) is one correctly rounded float32 multiply on both, so
the comparisons are exact, not within a tolerance.
"""
from __future__ import annotations

import chainer  # tests/conftest.py imported smchainer first, so this works on NumPy 2
import chainer.functions as F
import numpy as np
import pytest

from smchainer.default_plugins.vgg import data as vgg_data
from smchainer.default_plugins.vgg import sampling as vgg_sampling
from smchainer.default_plugins.vgg import updater as vgg_updater
from smchainer.functions.augment import crop_flip
from smchainer.testing import require_gpu

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device():
    require_gpu()
    from smchainer.device import get_device

    return get_device("gpu:0")


def cifar_like(seed: int, n: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_crop_flip_equals_the_cpu(device, seed) -> None:
    import cupy

    images = cifar_like(seed)
    rng = np.random.default_rng(seed + 100)
    index = rng.integers(0, len(images), size=256)
    top, left, flip = vgg_sampling.draw_crops(rng, 256)
    expected = crop_flip(images, index, top, left, flip)
    on_gpu = device.send(images)
    # As the trainer passes them: rows of one int64 array sent in one copy.
    steps = device.send(np.stack([index, top, left, flip]).astype(np.int64))
    got = crop_flip(on_gpu, steps[0], steps[1], steps[2], steps[3])
    assert isinstance(got, cupy.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(cupy.asnumpy(got), expected)
    # Separate arrays, a bool flip and NumPy offsets are converted, same result.
    again = crop_flip(on_gpu, device.send(index), top, left, cupy.asarray(flip))
    np.testing.assert_array_equal(cupy.asnumpy(again), expected)


def test_gpu_identity_crop_and_bad_rows(device) -> None:
    import cupy

    images = cifar_like(2, n=300)
    index = np.arange(0, 300, 7)
    centre = np.full(len(index), 4)
    no_flip = np.zeros(len(index), dtype=bool)
    same = crop_flip(device.send(images), device.send(index), centre, centre, no_flip)
    np.testing.assert_array_equal(cupy.asnumpy(same), vgg_data.to_float(images[index]))
    bad = index.copy()
    bad[[1, 4]] = [300, -2]
    marked = cupy.asnumpy(crop_flip(device.send(images), bad, centre, centre, no_flip))
    assert np.isnan(marked[[1, 4]]).all()
    assert not np.isnan(np.delete(marked, [1, 4], 0)).any()


def test_gpu_crop_flip_of_a_large_batch(device) -> None:
    """More elements than the launch has threads: the grid-stride loop covers them."""
    import cupy

    images = cifar_like(3, n=3000)
    rng = np.random.default_rng(3)
    index = rng.integers(0, 3000, size=2000)  # 6.1 M outputs > 65,535 blocks x 256
    top, left, flip = vgg_sampling.draw_crops(rng, 2000)
    got = crop_flip(device.send(images), device.send(index), top, left, flip)
    np.testing.assert_array_equal(cupy.asnumpy(got), crop_flip(images, index, top, left, flip))


class Recorder(chainer.Link):
    """A model that keeps what each update fed it."""

    def __init__(self) -> None:
        super().__init__()
        with self.init_scope():
            self.w = chainer.Parameter(np.zeros(1, dtype=np.float32))
        self.seen: list = []

    def forward(self, x, t):
        self.seen.append((x, t))
        return F.sum(self.w)


def fed_batches(device, images, labels, steps: int) -> list:
    """The (x, t) of ``steps`` updates of an AugmentingUpdater on ``device``, as it fed them."""
    recorder = Recorder()
    optimizer = chainer.optimizers.SGD()
    optimizer.setup(recorder)
    iterator = chainer.iterators.SerialIterator(
        np.arange(len(labels)), 128, order_sampler=vgg_sampling.DerivedOrderSampler(5))
    updater = vgg_updater.AugmentingUpdater(iterator, optimizer, device=device, seed=5, rank=0,
                                   augment=True, images=images, labels=labels)
    assert isinstance(updater.images, device.xp.ndarray)  # held where training runs
    for _ in range(steps):
        updater.update()
    return recorder.seen


def test_the_gpu_updater_feeds_the_cpu_updaters_batches(device) -> None:
    import cupy

    images = cifar_like(4)
    labels = np.random.default_rng(4).integers(0, 10, size=1000).astype(np.int32)
    gpu = fed_batches(device, images, labels, steps=10)  # crosses an epoch end
    cpu = fed_batches(chainer.get_device("@numpy"), images, labels, steps=10)
    for step, ((gx, gt), (cx, ct)) in enumerate(zip(gpu, cpu, strict=True)):
        assert isinstance(gx, cupy.ndarray) and isinstance(gt, cupy.ndarray)
        assert gx.dtype == np.float32 and gt.dtype == np.int32
        np.testing.assert_array_equal(cupy.asnumpy(gx), cx, err_msg=f"step {step}")
        np.testing.assert_array_equal(cupy.asnumpy(gt), ct, err_msg=f"step {step}")
