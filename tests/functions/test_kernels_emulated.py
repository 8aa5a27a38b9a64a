"""The CUDA kernels' logic, run on the CPU through :mod:`tests.functions.emulation`.

The same cases as ``test_channels_last.py``, with the functions taking their
kernel path on NumPy arrays: every launch (grid, arguments, their types and
contiguity) is what the GPU will receive, and every kernel's arithmetic is
checked against Chainer's functions before a GPU ever runs it.
"""
from __future__ import annotations

import numpy as np
import pytest

from smchainer.functions import channels_last
from tests.functions import cases
from tests.functions.emulation import EmulatedKernels
from tests.functions.test_channels_last import assert_sides_equal

CPU = cases.CPU


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    try:
        return EmulatedKernels(channels_last.CUDA_SOURCE, tmp_path_factory.mktemp("kernels"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def emulated(kernels, monkeypatch):
    monkeypatch.setattr(channels_last, "_host", lambda xp: False)
    monkeypatch.setattr(channels_last, "_kernel", kernels)
    kernels.launches.clear()
    return kernels


def test_conv3x3_kernels(emulated) -> None:
    assert_sides_equal(cases.conv_case(CPU, n=2, c=5, h=6, w=4, o=3))
    assert emulated.launches == ["smchainer_im2col3x3", "smchainer_col2im3x3"]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (16, 40)])
def test_batch_norm_relu_kernels(emulated, shape, train, relu) -> None:
    assert_sides_equal(cases.bn_case(CPU, shape=shape, train=train, relu=relu))
    assert emulated.launches == (
        ["smchainer_channel_sums", "smchainer_bn_statistics", "smchainer_affine_relu",
         "smchainer_channel_sums", "smchainer_bn_relu_grad"]
        if train else ["smchainer_bn_fixed", "smchainer_affine_relu"]
    )


def test_fused_dropout_kernels_draw_the_cpu_mask(emulated) -> None:
    result = cases.bn_dropout_case(CPU, ratio=0.4)
    assert_sides_equal(result)  # the reference uses dropout_keep: the same draws, bit for bit
    assert "smchainer_affine_relu" in emulated.launches


def test_batch_norm_reduction_spans_many_blocks(emulated) -> None:
    # 70 channels (3 column blocks, the last partial) and 2 x 40 x 40 rows: several row blocks
    assert_sides_equal(cases.bn_case(CPU, shape=(2, 70, 40, 40)))


@pytest.mark.parametrize("ties", [True, False])
def test_max_pool_kernels(emulated, ties) -> None:
    assert_sides_equal(cases.pool_case(CPU, ties=ties))
    assert emulated.launches == ["smchainer_max_pool2x2", "smchainer_max_pool2x2_grad"]


def test_fused_vgg_through_the_kernels(emulated) -> None:
    result = cases.vgg_case(CPU, train=True, batch=4, depth=8, width=0.125)
    reference, fused = result["reference"], result["fused"]
    np.testing.assert_allclose(fused["y"], reference["y"], rtol=1e-4, atol=1e-4)
    for name in reference["grads"]:
        np.testing.assert_allclose(fused["grads"][name], reference["grads"][name],
                                   rtol=1e-3, atol=1e-5, err_msg=name)
    assert "smchainer_im2col3x3" in emulated.launches


def test_the_emulator_catches_a_wrong_argument(emulated) -> None:
    with pytest.raises(TypeError, match="needs int64"):
        emulated("smchainer_affine_relu")((1,), (1,), (
            np.zeros(2, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
            np.zeros(2, np.float32), 2, np.int32(1), np.int32(0), np.float32(0),
            np.float32(1), np.uint64(0),
        ))
