"""The fused channels-last kernels on the GPU against Chainer's functions on the CPU.

The cases are those of ``tests/functions`` (where the NumPy implementation and
the kernels, emulated on the CPU, pass them); here the kernels run for real,
at VGG's shapes as well as small ones.
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from smchainer.functions import channels_last
from smchainer.models.vgg import VGG
from tests.functions import cases
from tests.functions.test_channels_last import assert_sides_equal
from tests.gpu.test_layers import gemm_tolerance

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(3, 5, 6, 4, 7), (8, 3, 32, 32, 64), (16, 128, 8, 8, 256),
                                   (4, 512, 2, 2, 512)])
def test_conv3x3(gpu_device, shape) -> None:
    n, c, h, w, o = shape
    assert_sides_equal(cases.conv_case(gpu_device, n=n, c=c, h=h, w=w, o=o), **gemm_tolerance())


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (64, 64, 32, 32), (128, 512), (3, 70, 9, 7)])
def test_batch_norm_relu(gpu_device, shape, train, relu) -> None:
    assert_sides_equal(cases.bn_case(gpu_device, shape=shape, train=train, relu=relu),
                       rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fused_dropout_draws_the_cpu_mask(gpu_device, ratio) -> None:
    assert_sides_equal(cases.bn_dropout_case(gpu_device, shape=(64, 64, 16, 16), ratio=ratio),
                       rtol=2e-4, atol=2e-5)


def test_batch_norm_with_a_large_mean(gpu_device) -> None:
    assert_sides_equal(cases.bn_case(gpu_device, shape=(32, 16, 8, 8), shift=50.0),
                       rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 6, 8), (32, 64, 32, 32)])
def test_max_pool_2x2(gpu_device, shape, ties) -> None:
    assert_sides_equal(cases.pool_case(gpu_device, shape=shape, ties=ties))


@pytest.mark.parametrize("train", [True, False])
def test_fused_vgg16(gpu_device, train) -> None:
    result = cases.vgg_case(gpu_device, train=train, batch=16, depth=16, width=0.5)
    reference, fused = result["reference"], result["fused"]
    tol = gemm_tolerance()
    np.testing.assert_allclose(fused["y"], reference["y"], **tol)
    assert fused["loss"] == pytest.approx(reference["loss"], rel=tol["rtol"])
    for name in reference["grads"]:
        scale = np.abs(reference["grads"][name]).max() + 1e-6
        np.testing.assert_allclose(fused["grads"][name] / scale, reference["grads"][name] / scale,
                                   rtol=0, atol=5 * tol["rtol"], err_msg=name)


def test_fused_training_lowers_the_loss(gpu_device) -> None:
    rng = np.random.default_rng(0)
    x = gpu_device.send(rng.random((64, 3, 32, 32), dtype=np.float32))
    t = gpu_device.send(rng.integers(0, 10, 64).astype(np.int32))
    np.random.seed(0)
    model = VGG(width=0.5)
    model.fused = True
    model.to_device(gpu_device)
    optimizer = chainer.optimizers.MomentumSGD(lr=0.02)
    optimizer.setup(model)
    losses = []
    for _ in range(30):
        loss = F.softmax_cross_entropy(model(x), t)
        model.cleargrads()
        loss.backward()
        optimizer.update()
        losses.append(float(loss.array))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_kernels_compile_for_this_gpu(gpu_device) -> None:
    for name in channels_last.KERNEL_NAMES:
        assert channels_last._kernel(name) is not None


def test_momentum_sgd_with_decay_equals_chainer_on_the_gpu(gpu_device) -> None:
    from smchainer import optimizers

    np.random.seed(0)
    reference = VGG(width=0.25, depth=11)
    reference.dropout_scale = 0.0
    ours = reference.copy(mode="copy")
    chainer_sgd = chainer.optimizers.MomentumSGD(lr=0.05, momentum=0.9)
    chainer_sgd.setup(reference)
    chainer_sgd.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))
    our_sgd = optimizers.MomentumSGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
    our_sgd.setup(ours)
    rng = np.random.default_rng(0)
    batches = [(rng.random((8, 3, 32, 32), dtype=np.float32),
                rng.integers(0, 10, 8).astype(np.int32)) for _ in range(3)]
    for model, optimizer in ((reference, chainer_sgd), (ours, our_sgd)):
        model.to_device(gpu_device)
        for x, t in batches:
            loss = F.softmax_cross_entropy(model(gpu_device.send(x)), gpu_device.send(t))
            model.cleargrads()
            loss.backward()
            optimizer.update()
    assert our_sgd._flat is not None  # the one-kernel update ran on the GPU
    want = {name: cases.host(p.array) for name, p in reference.namedparams()}
    for name, param in ours.namedparams():
        np.testing.assert_allclose(cases.host(param.array), want[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
