"""The channels-last functions' NumPy implementation against Chainer's functions.

The same cases run on the GPU in ``tests/gpu/test_fused.py``; here they pin the
arithmetic the CUDA kernels must reproduce. The kernels' source is compiled by
NVRTC where CuPy is installed (no GPU is needed to compile).
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from smchainer.functions import channels_last
from smchainer.models.vgg import VGG
from tests.functions import cases

CPU = cases.CPU
TOL = {"rtol": 1e-4, "atol": 1e-5}


def assert_sides_equal(result: dict, **tol) -> None:
    tol = tol or TOL
    reference, fused = result["reference"], result["fused"]
    assert reference.keys() == fused.keys()
    for key in reference:
        np.testing.assert_allclose(fused[key], reference[key], **tol, err_msg=key)


@pytest.mark.parametrize("shape", [(3, 5, 6, 4, 7), (2, 3, 32, 32, 8), (2, 64, 2, 2, 3)])
def test_conv3x3_equals_chainer_convolution(shape) -> None:
    n, c, h, w, o = shape
    assert_sides_equal(cases.conv_case(CPU, n=n, c=c, h=h, w=w, o=o))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (16, 12)])
def test_batch_norm_relu_equals_chainer(shape, train, relu) -> None:
    result = cases.bn_case(CPU, shape=shape, train=train, relu=relu)
    assert_sides_equal(result)
    if train:  # the running statistics moved, as Chainer moves them
        assert not np.allclose(result["fused"]["avg_mean"], cases.bn_case(
            CPU, shape=shape, train=False, relu=relu)["fused"]["avg_mean"])


def test_batch_norm_statistics_hold_with_a_large_mean() -> None:
    # sum(x^2)/m - mean^2 in float64 keeps float32 accuracy when |mean| >> std
    assert_sides_equal(cases.bn_case(CPU, shape=(8, 4, 6, 6), shift=50.0), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fused_dropout_equals_chainer_times_the_same_mask(ratio) -> None:
    result = cases.bn_dropout_case(CPU, ratio=ratio)
    assert_sides_equal(result)
    kept = result["keep"].mean()
    assert abs(kept - (1 - ratio)) < 0.1, kept  # 960 draws


def test_fused_dropout_statistics_and_repeatability() -> None:
    ratio = 0.4
    keep = channels_last.dropout_keep(12345, 200_000, ratio)
    assert abs(keep.mean() - (1 - ratio)) < 0.005
    # neighbours are independent: P(both kept) = P(kept)^2
    assert abs((keep[1:] & keep[:-1]).mean() - (1 - ratio) ** 2) < 0.005
    assert np.array_equal(keep, channels_last.dropout_keep(12345, 200_000, ratio))
    assert not np.array_equal(keep, channels_last.dropout_keep(12346, 200_000, ratio))
    x = np.ones((4, 8, 8, 16), dtype=np.float32)
    gamma, beta = np.ones(16, dtype=np.float32), np.ones(16, dtype=np.float32)

    def draw(seed):
        np.random.seed(seed)
        node = channels_last.BatchNormReLU(2e-5, None, None, 0.9, relu=True, dropout=ratio)
        return node.apply((x, gamma, beta))[0].array

    assert np.array_equal(draw(1), draw(1)) and not np.array_equal(draw(1), draw(2))
    y = draw(1)  # x is constant: BN gives beta = 1 everywhere, kept values 1 / (1 - ratio)
    values = np.unique(y)
    assert len(values) == 2 and values[0] == 0.0
    assert values[1] == pytest.approx(1 / (1 - ratio), rel=1e-4)


def test_dropout_needs_the_relu_and_a_ratio_below_one() -> None:
    with pytest.raises(ValueError, match="only after the ReLU"):
        channels_last.BatchNormReLU(2e-5, None, None, 0.9, relu=False, dropout=0.2)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        channels_last.BatchNormReLU(2e-5, None, None, 0.9, relu=True, dropout=1.0)


@pytest.mark.parametrize("ties", [True, False])
def test_max_pool_2x2_equals_chainer_including_ties(ties) -> None:
    assert_sides_equal(cases.pool_case(CPU, ties=ties))


def test_max_pool_2x2_refuses_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even height and width"):
        channels_last.max_pool_2x2(np.zeros((1, 3, 4, 2), dtype=np.float32))


@pytest.mark.parametrize("train", [True, False])
def test_fused_vgg_equals_chainer_vgg(train) -> None:
    result = cases.vgg_case(CPU, train=train)
    reference, fused = result["reference"], result["fused"]
    np.testing.assert_allclose(fused["y"], reference["y"], rtol=1e-4, atol=1e-4)
    assert fused["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert fused["grads"].keys() == reference["grads"].keys()
    for name in reference["grads"]:
        np.testing.assert_allclose(fused["grads"][name], reference["grads"][name],
                                   rtol=1e-3, atol=1e-5, err_msg=name)
    for name in reference["stats"]:
        np.testing.assert_allclose(fused["stats"][name], reference["stats"][name],
                                   rtol=1e-4, atol=1e-6, err_msg=name)


def test_fused_vgg_keeps_the_parameters_and_saves_like_any_other(tmp_path) -> None:
    np.random.seed(0)
    model = VGG(width=0.125, depth=8)
    model.fused = True
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    with chainer.using_config("train", False):
        fused_y = model(x).array
    path = tmp_path / "model.npz"
    chainer.serializers.save_npz(str(path), model)
    plain = VGG(width=0.125, depth=8)
    chainer.serializers.load_npz(str(path), plain)
    assert plain.fused is None  # not saved: the loaded model chooses by device again
    plain.fused = False  # Chainer's own functions, from the same file
    with chainer.using_config("train", False):
        np.testing.assert_allclose(plain(x).array, fused_y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_dropout_scale_zero_turns_dropout_off(fused) -> None:
    np.random.seed(0)
    model = VGG(width=0.125, depth=8)
    model.fused = fused
    model.dropout_scale = 0.0
    x = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    with chainer.using_config("train", True):
        first, second = model(x).array, model(x).array
    np.testing.assert_array_equal(first, second)  # no random mask: the same twice
    model.dropout_scale = 1.0
    with chainer.using_config("train", True):
        assert not np.array_equal(model(x).array, model(x).array)


def numerical_check(fn, inputs, gy, eps=1e-3, tol=1e-5) -> None:
    """Backward of ``fn`` equals central differences of ``sum(fn(*inputs) * gy)`` (float64)."""
    variables = [chainer.Variable(x.copy()) for x in inputs]
    y = fn(*variables)
    y.grad = gy
    y.backward()
    for position, (variable, x) in enumerate(zip(variables, inputs, strict=True)):
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            values = []
            for step in (eps, -eps):
                moved = [a.copy() for a in inputs]
                moved[position][index] += step
                values.append(float((fn(*moved).array * gy).sum()))
            numeric[index] = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(variable.grad, numeric, rtol=tol, atol=tol)


def test_numerical_gradients() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3, 3))
    W = rng.standard_normal((2, 3, 3, 3))
    numerical_check(channels_last.conv3x3, [x, W], rng.standard_normal((2, 4, 3, 2)))
    x = rng.standard_normal((1, 4, 4, 3)) * 3  # distinct values: no ties at the kinks
    numerical_check(channels_last.max_pool_2x2, [x], rng.standard_normal((1, 2, 2, 3)))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)

    def bn(x, gamma, beta):
        node = channels_last.BatchNormReLU(2e-5, None, None, 0.9, relu=False)
        return node.apply((x, gamma, beta))[0]

    x = rng.standard_normal((5, 2, 3))
    numerical_check(bn, [x, gamma, beta], rng.standard_normal((5, 2, 3)), tol=1e-4)


def test_double_backpropagation_is_refused() -> None:
    x = chainer.Variable(np.ones((1, 2, 2, 3), dtype=np.float32))
    W = chainer.Variable(np.ones((2, 3, 3, 3), dtype=np.float32))
    y = F.sum(channels_last.conv3x3(x, W))
    with pytest.raises(NotImplementedError, match="double backpropagation"):
        y.backward(enable_double_backprop=True)


def test_kernel_source_compiles_with_nvrtc() -> None:
    from tests.gpu.test_cupy_compat import _compile, _cuda_include_dirs, _nvrtc

    nvrtc = _nvrtc()
    log = _compile(nvrtc, channels_last.CUDA_SOURCE, _cuda_include_dirs())
    assert log is None, log
    for name in channels_last.KERNEL_NAMES:
        assert f"void {name}(" in channels_last.CUDA_SOURCE


def test_fused_vgg_dropout_follows_numpys_seed() -> None:
    np.random.seed(0)
    model = VGG(width=0.125, depth=8)
    model.fused = True
    x = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    with chainer.using_config("train", True):
        np.random.seed(3)
        first = model(x).array
        second = model(x).array
        np.random.seed(3)
        again = model(x).array
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)


def test_an_unset_fused_follows_the_device_policy(monkeypatch) -> None:
    np.random.seed(0)
    model = VGG(width=0.125, depth=8)
    assert model.fused is None
    calls = []
    original = channels_last.conv3x3
    monkeypatch.setattr(channels_last, "conv3x3", lambda *a: calls.append(1) or original(*a))
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    with chainer.using_config("train", False):
        model(x)
    assert calls  # on the CPU an unset model runs the fused functions
    assert channels_last.fused_by_default(on_gpu=False)
    assert channels_last.fused_by_default(on_gpu=True) is channels_last.FUSED_BY_DEFAULT_ON_GPU
    model.fused = False
    calls.clear()
    with chainer.using_config("train", False):
        model(x)
    assert not calls
