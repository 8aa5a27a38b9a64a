"""Chainer's cuDNN-backed functions through smchainer's cuDNN 9 binding, against Chainer's own path.

Each test runs one Chainer function forward and backward on the GPU twice,
with ``use_cudnn='always'`` (the binding) and ``'never'`` (Chainer's
im2col/GEMM and elementwise kernels), from the same inputs and output
gradient, and compares every output; it also checks that cuDNN was called in
the first run and not in the second. Shapes are VGG-16's on CIFAR at batch
64. Tolerances are float32's (the device script runs these with
``CUPY_TF32=0``; the binding keeps TF32 off then).
"""
from __future__ import annotations

import os

import chainer
import chainer.functions as F
import numpy as np
import pytest

from smchainer.compat import cudnn
from smchainer.compat.cudnn import libcudnn

pytestmark = pytest.mark.gpu

TOL = {"rtol": 1e-3, "atol": 1e-4}
if os.environ.get("CUPY_TF32") == "1":
    TOL = {"rtol": 2e-2, "atol": 2e-2}


@pytest.fixture
def binding(gpu_device, monkeypatch):
    """The GPU device, once the binding is known to be active; counts the cuDNN calls."""
    if not cudnn.active():
        message = f"the cuDNN binding is not active: {cudnn.status()['reason']}"
        if os.environ.get("SMCHAINER_REQUIRE_GPU") == "1":
            pytest.fail(message)
        pytest.skip(message)
    calls: list[str] = []
    original = libcudnn.call

    def counting(name, *args):
        calls.append(name)
        return original(name, *args)

    monkeypatch.setattr(libcudnn, "call", counting)
    return gpu_device, calls


def run(device, fn, inputs, seed=1):
    xs = [chainer.Variable(device.send(x)) for x in inputs]
    y = fn(*xs)
    gy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    y.grad = device.send(gy)
    y.backward()
    cpu = chainer.backend.CpuDevice().send
    return cpu(y.array), [None if x.grad is None else cpu(x.grad) for x in xs]


def compare(binding, fn, *inputs, tol=None, **config):
    device, calls = binding
    results = {}
    for mode in ("always", "never"):
        calls.clear()
        with chainer.using_config("use_cudnn", mode), chainer.using_config("train", True):
            with chainer.using_config("autotune", config.get("autotune", False)), \
                    chainer.using_config("cudnn_deterministic",
                                         config.get("deterministic", False)):
                results[mode] = run(device, fn, inputs)
        if mode == "always":
            assert calls, "cuDNN was not called with use_cudnn='always'"
        else:
            assert not calls, f"cuDNN was called with use_cudnn='never': {calls[:3]}"
    (y1, g1), (y0, g0) = results["always"], results["never"]
    tol = tol or TOL
    np.testing.assert_allclose(y1, y0, **tol, err_msg="forward")
    for a, b in zip(g1, g0, strict=True):
        if a is not None or b is not None:
            np.testing.assert_allclose(a, b, **tol, err_msg="gradient")


RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


X = rand(64, 3, 32, 32)
W = rand(64, 3, 3, 3, scale=0.2)
B = rand(64)
H = rand(64, 64, 32, 32)


def test_cudnn_enabled_when_library_present(gpu_device):
    import chainer.backends.cuda as cuda

    from smchainer.compat.cudnn import discovery

    found = discovery.discover()
    if found.library is None:
        pytest.skip(f"no cuDNN 9 library here: {found.reason}")
    assert cudnn.active(), cudnn.status()
    assert cuda.cudnn_enabled is (os.environ.get("CHAINER_CUDNN", "1") != "0")
    assert cuda._cudnn_version == found.library.version


def test_convolution_2d(binding):
    compare(binding, lambda x, w, b: F.convolution_2d(x, w, b, pad=1), X, W, B)


def test_convolution_2d_deep_layer_autotune_deterministic(binding):
    w = rand(128, 64, 3, 3, scale=0.05)
    compare(binding, lambda x, w: F.convolution_2d(x, w, pad=1), H, w, autotune=True,
            deterministic=True)


def test_convolution_groups_dilation(binding):
    w = rand(64, 32, 3, 3, scale=0.05)
    compare(binding, lambda x, w: F.convolution_2d(x, w, pad=2, dilate=2, groups=2), H, w)


def test_deconvolution_2d(binding):
    w = rand(64, 32, 4, 4, scale=0.05)
    compare(binding, lambda x, w: F.deconvolution_2d(x, w, stride=2, pad=1), H[:, :, :16, :16],
            w)


def test_convolution_nd(binding):
    x, w = rand(8, 4, 8, 8, 8), rand(16, 4, 3, 3, 3, scale=0.2)
    compare(binding, lambda x, w: F.convolution_nd(x, w, pad=1), x, w)


def test_batch_normalization_training(binding):
    gamma, beta = rand(64) + 1, rand(64)
    compare(binding, lambda x, g, b: F.batch_normalization(x, g, b, eps=2e-5), H, gamma, beta)


def test_batch_normalization_linear(binding):
    gamma, beta = rand(512) + 1, rand(512)
    compare(binding, lambda x, g, b: F.batch_normalization(x, g, b), rand(64, 512), gamma,
            beta)


def test_fixed_batch_normalization(binding):
    gamma, beta, mean, var = rand(64) + 1, rand(64), rand(64), np.abs(rand(64)) + 0.5
    compare(binding, lambda x, g, b: F.fixed_batch_normalization(
        x, g, b, chainer.backend.get_array_module(x).asarray(mean),
        chainer.backend.get_array_module(x).asarray(var)), H, gamma, beta)


def test_max_pooling_2d(binding):
    compare(binding, lambda x: F.max_pooling_2d(x, 2, 2), H)


def test_average_pooling_2d(binding):
    compare(binding, lambda x: F.average_pooling_2d(x, 2, 2), H)


@pytest.mark.parametrize("function", [F.relu, F.sigmoid, F.tanh])
def test_activation(binding, function):
    compare(binding, function, H)


@pytest.mark.parametrize("function", [F.softmax, F.log_softmax])
def test_softmax(binding, function):
    compare(binding, function, rand(64, 10, scale=3))


def test_dropout_takes_chainers_path(binding):
    device, calls = binding
    with chainer.using_config("use_cudnn", "always"):
        y = F.dropout(chainer.Variable(device.send(H)), 0.5)
    assert y.shape == H.shape and not calls
