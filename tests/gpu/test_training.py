"""A short VGG training run on learnable data: the loss falls, on the CPU and on the GPU.

The data are ten random image templates plus noise, the label being the
template's index, so a working forward/backward/update learns them within
tens of steps while a broken one (wrong gradients, a no-op update) does not.
"""
from __future__ import annotations

import chainer  # tests/conftest.py imported smchainer first, so this works on NumPy 2
import chainer.functions as F
import numpy as np
import pytest


def learnable_batches(batch_size: int, count: int, seed: int = 0):
    """Batches of float32 images in [0, 1] whose label is the template they came from."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 3, 32, 32), dtype=np.float32)
    batches = []
    for _ in range(count):
        labels = rng.integers(0, 10, batch_size).astype(np.int32)
        noise = rng.random((batch_size, 3, 32, 32), dtype=np.float32)
        batches.append((0.6 * templates[labels] + 0.4 * noise, labels))
    return batches


def train_losses(device, width: float, depth: int, steps: int, batch_size: int) -> list[float]:
    """Per-step training losses of a fresh VGG on ``device``."""
    from smchainer.models.vgg import VGG

    np.random.seed(0)
    model = VGG(width=width, depth=depth)
    model.to_device(device)
    optimizer = chainer.optimizers.MomentumSGD(lr=0.05, momentum=0.9)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))
    losses = []
    with chainer.using_config("train", True):
        for x, t in learnable_batches(batch_size, steps):
            loss = F.softmax_cross_entropy(model(device.send(x)), device.send(t))
            model.cleargrads()
            loss.backward()
            optimizer.update()
            losses.append(loss)
    return [float(chainer.backend.CpuDevice().send(loss.array)) for loss in losses]


def assert_loss_falls(losses: list[float]) -> None:
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert np.isfinite(losses).all(), losses
    assert first > 1.5, f"the first losses should be near ln(10), not {first:.3f}"
    assert last < 0.5 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_short_training_loss_falls_on_cpu():
    assert_loss_falls(train_losses(chainer.get_device("@numpy"), width=0.125, depth=8,
                                   steps=40, batch_size=32))


@pytest.mark.gpu
def test_short_training_loss_falls_on_gpu(gpu_device):
    # VGG-11 at half width: on the CPU its loss falls from 2.7 to 0.5 in these 100 steps
    assert_loss_falls(train_losses(gpu_device, width=0.5, depth=11, steps=100, batch_size=64))


@pytest.fixture(scope="module")
def decode_cache(tmp_path_factory):
    """One decoded-image cache for the trainer runs below (decoding 60,000 JPEGs once)."""
    return tmp_path_factory.mktemp("decoded")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fused", "chainer"])
def test_the_built_in_trainer_learns_cifar10_on_the_gpu(gpu_device, tmp_path, cifar10,
                                                       decode_cache, kernels):
    """The built-in VGG trainer on real CIFAR-10 images with each kernel set."""
    from smchainer.default_plugins.vgg import hyperparameters as vgg_hp
    from smchainer.default_plugins.vgg import trainer as vgg_trainer
    from smchainer.training.env import TrainingEnv

    del gpu_device  # the job's device is gpu:0
    env = TrainingEnv(job_dir=tmp_path / "job", device="gpu:0", num_gpus=1,
                      channels={"train": cifar10 / "train.zip", "test": cifar10 / "test.zip"})
    hp = vgg_hp.parse_hyperparameters({
        "epochs": 3, "batch-size": 128, "learning-rate": 0.1, "lr-schedule": "onecycle",
        "width": 0.5, "depth": 11, "train-samples": 10000, "test-samples": 2000,
        "kernels": kernels, "progress-bar": False, "cache-dir": str(decode_cache),
    })
    metrics = vgg_trainer.run_training(env, hp)
    assert metrics["kernels"] == kernels
    assert metrics["test_accuracy"] > 0.35, metrics  # chance: 0.1
