"""Every computation VGG training uses gives the same result on the GPU as on the CPU.

Each test runs one Chainer function (or the optimizer) forward and backward on
NumPy and on CuPy from the same inputs, parameters and output gradients, and
compares every output. The tolerance is float32's unless CuPy runs GEMMs in
TF32 (``CUPY_TF32=1``), whose 10-bit mantissa needs a looser one for the
convolution and linear layers.
"""
from __future__ import annotations

import os

import chainer  # tests/conftest.py imported smchainer first, so this works on NumPy 2
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

RTOL = 1e-4
ATOL = 1e-5


def gemm_tolerance() -> dict[str, float]:
    """Tolerances for results that went through a float32 GEMM."""
    if os.environ.get("CUPY_TF32") == "1":
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-3, "atol": 1e-4}


def run(device, build, inputs, grads_seed=1):
    """Forward ``build(*inputs)`` on ``device``, backward a fixed random gradient.

    Returns the outputs, the input gradients and the parameter gradients, on the CPU.
    """
    link, fn = build()
    if link is not None:
        link.to_device(device)
    xs = [chainer.Variable(device.send(x)) for x in inputs]
    y = fn(link, *xs)
    rng = np.random.default_rng(grads_seed)
    gy = rng.standard_normal(y.shape).astype(y.dtype)
    y.grad = device.send(gy)
    y.backward()
    to_cpu = chainer.backend.CpuDevice().send
    params = {} if link is None else {name: to_cpu(p.grad) for name, p in link.namedparams()}
    return {"y": to_cpu(y.array), "gx": [to_cpu(x.grad) for x in xs], "gparams": params,
            "link": link}


def compare(gpu_device, build, inputs, **tol):
    cpu = run(chainer.get_device("@numpy"), build, inputs)
    gpu = run(gpu_device, build, inputs)
    tol = tol or {"rtol": RTOL, "atol": ATOL}
    np.testing.assert_allclose(gpu["y"], cpu["y"], **tol, err_msg="forward")
    for got, want in zip(gpu["gx"], cpu["gx"], strict=True):
        np.testing.assert_allclose(got, want, **tol, err_msg="input gradient")
    assert gpu["gparams"].keys() == cpu["gparams"].keys()
    for name in cpu["gparams"]:
        np.testing.assert_allclose(gpu["gparams"][name], cpu["gparams"][name], **tol,
                                   err_msg=f"gradient of {name}")
    return cpu, gpu


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_convolution_3x3_no_bias(gpu_device):
    weight = images((32, 16, 3, 3), seed=10) * 0.1

    def build():
        link = L.Convolution2D(16, 32, 3, pad=1, nobias=True, initialW=weight)
        return link, lambda link, x: link(x)

    compare(gpu_device, build, [images((8, 16, 16, 16))], **gemm_tolerance())


def _batch_norm(train: bool):
    def build():
        rng = np.random.default_rng(1)
        link = L.BatchNormalization(32)
        link.gamma.array[...] = rng.uniform(0.5, 1.5, 32)
        link.beta.array[...] = rng.uniform(-0.5, 0.5, 32)
        link.avg_mean[...] = rng.uniform(-0.2, 0.2, 32)
        link.avg_var[...] = rng.uniform(0.5, 2.0, 32)

        def forward(link, x):
            with chainer.using_config("train", train):
                return link(x)

        return link, forward

    return build


def test_batch_normalization_train(gpu_device):
    cpu, gpu = compare(gpu_device, _batch_norm(True), [images((16, 32, 8, 8)) * 3 + 1])
    to_cpu = chainer.backend.CpuDevice().send
    for stat in ("avg_mean", "avg_var"):
        np.testing.assert_allclose(to_cpu(getattr(gpu["link"], stat)),
                                   getattr(cpu["link"], stat), rtol=RTOL, atol=ATOL,
                                   err_msg=f"running {stat}")


def test_batch_normalization_eval(gpu_device):
    compare(gpu_device, _batch_norm(False), [images((16, 32, 8, 8)) * 3 + 1])


def test_batch_normalization_1d_train(gpu_device):
    def build():
        link = L.BatchNormalization(64)

        def forward(link, x):
            with chainer.using_config("train", True):
                return link(x)

        return link, forward

    compare(gpu_device, build, [images((32, 64))])


def test_relu(gpu_device):
    compare(gpu_device, lambda: (None, lambda _, x: F.relu(x)), [images((8, 16, 8, 8))])


def test_max_pooling_2x2(gpu_device):
    # distinct values, so the argmax (and so the gradient's route) is the same on both
    x = np.random.default_rng(2).permutation(8 * 16 * 8 * 8).astype(np.float32)
    x = x.reshape(8, 16, 8, 8) / x.size
    compare(gpu_device, lambda: (None, lambda _, v: F.max_pooling_2d(v, 2, 2)), [x])


def test_dropout_eval_is_identity(gpu_device):
    def build():
        def forward(_, x):
            with chainer.using_config("train", False):
                return F.dropout(x, ratio=0.5)

        return None, forward

    cpu, gpu = compare(gpu_device, build, [images((8, 16, 4, 4))])
    np.testing.assert_array_equal(gpu["y"], images((8, 16, 4, 4)))


def test_dropout_train_drops_and_rescales(gpu_device):
    x = gpu_device.send(np.ones((256, 512), dtype=np.float32))
    with chainer.using_config("train", True):
        y = chainer.backend.CpuDevice().send(F.dropout(x, ratio=0.4).array)
    kept = y != 0
    assert abs(kept.mean() - 0.6) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.6, rtol=1e-6)


def test_linear_no_bias(gpu_device):
    weight = images((128, 512), seed=11) * 0.05

    def build():
        return L.Linear(512, 128, nobias=True, initialW=weight), lambda link, x: link(x)

    compare(gpu_device, build, [images((16, 512))], **gemm_tolerance())


def test_softmax_cross_entropy(gpu_device):
    t = np.random.default_rng(4).integers(0, 10, 32).astype(np.int32)

    def run_on(device):
        x = chainer.Variable(device.send(images((32, 10)) * 4))
        loss = F.softmax_cross_entropy(x, device.send(t))
        loss.backward()
        to_cpu = chainer.backend.CpuDevice().send
        return to_cpu(loss.array), to_cpu(x.grad)

    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = run_on(chainer.get_device("@numpy")), run_on(
        gpu_device)
    np.testing.assert_allclose(gpu_loss, cpu_loss, rtol=RTOL)
    np.testing.assert_allclose(gpu_grad, cpu_grad, rtol=RTOL, atol=ATOL)


def test_momentum_sgd_with_weight_decay(gpu_device):
    def updated(device):
        np.random.seed(5)
        link = L.Linear(64, 32)
        link.to_device(device)
        optimizer = chainer.optimizers.MomentumSGD(lr=0.05, momentum=0.9)
        optimizer.setup(link)
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))
        rng = np.random.default_rng(6)
        for _ in range(3):
            link.cleargrads()
            for param in link.params():
                param.grad = device.send(rng.standard_normal(param.shape).astype(np.float32))
            optimizer.update()
        to_cpu = chainer.backend.CpuDevice().send
        return {name: to_cpu(p.array) for name, p in link.namedparams()}

    cpu, gpu = updated(chainer.get_device("@numpy")), updated(gpu_device)
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=RTOL, atol=ATOL, err_msg=name)


def test_vgg_forward_matches(gpu_device):
    from smchainer.models.vgg import VGG

    def logits(device):
        np.random.seed(7)
        model = VGG(width=0.25, depth=11)
        model.to_device(device)
        x = device.send(np.random.default_rng(8).random((8, 3, 32, 32), dtype=np.float32))
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return chainer.backend.CpuDevice().send(model(x).array)

    tol = gemm_tolerance()
    np.testing.assert_allclose(logits(gpu_device), logits(chainer.get_device("@numpy")),
                               rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
