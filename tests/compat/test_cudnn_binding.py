"""The cuDNN 9 binding against a stub libcudnn that checks every call as cuDNN would.

The stub (``cudnn_stub.c``, compiled here) logs each call with its arguments
and returns ``CUDNN_STATUS_BAD_PARAM`` for anything the real API rejects;
arrays are NumPy host buffers behind the binding's runtime, so no GPU is
needed. Shapes are VGG-16's first layers on CIFAR (batch 64).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from smchainer.compat.cudnn import _context, convolution, discovery, highlevel, libcudnn
from smchainer.compat.cudnn import constants as C
from tests.compat.cudnn_fakes import (
    STREAM,
    HostArray,
    HostRuntime,
    Stub,
    build_stub,
    compiler,
    host,
)

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler to build the stub")


@pytest.fixture(scope="session")
def stub_path(tmp_path_factory):
    return build_stub(tmp_path_factory.mktemp("cudnn-stub"))


@pytest.fixture
def stub(stub_path):
    """The binding on the stub library and host memory; every descriptor destroyed after."""
    library = discovery.check(str(stub_path), "test")
    libcudnn.use_library(library.handle)
    runtime = HostRuntime()
    _context.set_runtime(runtime)
    convolution.clear_caches()
    controls = Stub(stub_path)
    controls.reset()
    controls.runtime = runtime
    yield controls
    assert controls.violations() == []
    _context.set_runtime(None)
    libcudnn.use_library(None)
    convolution.clear_caches()
    _context.set_max_workspace_size(8 * 1024 * 1024)


RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return host(RNG.standard_normal(shape).astype(dtype))


def empty(*shape, dtype=np.float32):
    return host(np.full(shape, np.nan, dtype=dtype))


def conv_forward(x, W, b, y, pad=(1, 1), stride=(1, 1), dilation=(1, 1), groups=1, **kw):
    kw.setdefault("auto_tune", False)
    kw.setdefault("tensor_core", "auto")
    highlevel.convolution_forward(x, W, b, y, pad, stride, dilation, groups, **kw)


def test_convolution_forward_vgg_layer_with_bias(stub):
    x, W, b, y = rand(64, 3, 32, 32), rand(64, 3, 3, 3), rand(64), empty(64, 64, 32, 32)
    conv_forward(x, W, b, y)
    # the stub zeroes y (beta = 0) and really adds b through the (1, C, 1, 1) descriptor
    np.testing.assert_array_equal(y.array, np.broadcast_to(b.array[None, :, None, None], y.shape))
    tensors = [c["dims"] for c in stub.calls("cudnnSetTensor4dDescriptor")]
    assert tensors == ["64,3,32,32", "64,64,32,32", "1,64,1,1"]
    assert stub.calls("cudnnSetFilter4dDescriptor")[0]["dims"] == "64,3,3,3"
    conv = stub.calls("cudnnSetConvolution2dDescriptor")[0]
    assert (conv["pad"], conv["stride"], conv["dilation"], conv["mode"], conv["compute"]) == \
        ("1,1", "1,1", "1,1", str(C.CUDNN_CROSS_CORRELATION), "0")
    run = stub.calls("cudnnConvolutionForward")[0]
    # heuristics' first choice (algo 1), FMA math (TF32 off), the workspace the query reported
    assert run["algo"] == "1" and run["math"] == str(C.CUDNN_FMA_MATH)
    reported = int(stub.calls("cudnnGetConvolutionForwardWorkspaceSize")[0]["size"])
    assert int(run["workspace"]) == reported == 4096 + 256
    assert reported in stub.runtime.allocations
    assert int(run["stream"]) == STREAM
    assert stub.live() == 0


def test_tf32_only_when_asked(stub, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")
    conv_forward(rand(8, 16, 8, 8), rand(16, 16, 3, 3), None, empty(8, 16, 8, 8))
    assert stub.calls("cudnnSetConvolutionMathType")[0]["math"] == str(C.CUDNN_DEFAULT_MATH)
    assert stub.calls("cudnnConvolutionForward")[0]["math"] == str(C.CUDNN_DEFAULT_MATH)


def test_nhwc_layouts(stub):
    x, W, b, y = rand(8, 32, 32, 16), rand(32, 3, 3, 16), rand(32), empty(8, 32, 32, 32)
    conv_forward(x, W, b, y, d_layout=C.CUDNN_TENSOR_NHWC, w_layout=C.CUDNN_TENSOR_NHWC)
    x_call, y_call = stub.calls("cudnnSetTensor4dDescriptor")[:2]
    assert (x_call["format"], x_call["dims"]) == ("1", "8,16,32,32")
    assert (y_call["format"], y_call["dims"]) == ("1", "8,32,32,32")
    f = stub.calls("cudnnSetFilter4dDescriptor")[0]
    assert (f["format"], f["dims"]) == ("1", "32,16,3,3")
    # channels are the last axis: the bias lands there
    np.testing.assert_array_equal(y.array, np.broadcast_to(b.array, y.shape))


def test_groups_and_dilation(stub):
    y = empty(4, 16, 16, 16)
    conv_forward(rand(4, 8, 16, 16), rand(16, 4, 3, 3), None, y, pad=(2, 2), dilation=(2, 2),
                 groups=2)
    assert stub.calls("cudnnSetConvolutionGroupCount")[0]["groups"] == "2"
    assert stub.calls("cudnnSetConvolution2dDescriptor")[0]["dilation"] == "2,2"
    assert stub.calls("cudnnConvolutionForward")[0]["groups"] == "2"
    assert np.all(y.array == 0)


def test_inconsistent_groups_raise_cudnn_error_with_its_message(stub):
    with pytest.raises(libcudnn.CuDNNError) as info:
        conv_forward(rand(4, 8, 16, 16), rand(16, 8, 3, 3), None, empty(4, 16, 16, 16),
                     groups=2)
    assert info.value.status == C.CUDNN_STATUS_BAD_PARAM
    assert "CUDNN_STATUS_BAD_PARAM" in str(info.value)
    assert "x channels 8 != filter channels 8 x groups 2" in str(info.value)
    assert stub.live() == 0  # descriptors destroyed on the error path too
    stub.reset()  # the violation was the point


def test_status_maps_to_cudnn_error_with_context(stub):
    stub.fail("cudnnConvolutionForward", C.CUDNN_STATUS_NOT_SUPPORTED)
    with pytest.raises(libcudnn.CuDNNError) as info:
        conv_forward(rand(2, 3, 8, 8), rand(4, 3, 3, 3), None, empty(2, 4, 8, 8))
    assert info.value.status == 3000
    text = str(info.value)
    assert text.startswith("CUDNN_STATUS_NOT_SUPPORTED")
    assert "func: cudnnConvolutionForward" in text and "pad=(1, 1)" in text
    assert stub.live() == 0


def test_convolution_3d(stub):
    y = empty(2, 6, 8, 8, 8)
    conv_forward(rand(2, 4, 8, 8, 8), rand(6, 4, 3, 3, 3), rand(6), y, pad=(1, 1, 1),
                 stride=(1, 1, 1), dilation=(1, 1, 1))
    nd = stub.calls("cudnnSetConvolutionNdDescriptor")[0]
    assert (nd["pad"], nd["stride"], nd["dilation"]) == ("1,1,1", "1,1,1", "1,1,1")
    assert stub.calls("cudnnSetFilterNdDescriptor")[0]["dims"] == "6,4,3,3,3"
    dims = [c["dims"] for c in stub.calls("cudnnSetTensorNdDescriptor")]
    assert dims == ["2,4,8,8,8", "2,6,8,8,8", "1,6,1,1,1"]
    assert np.all(np.isfinite(y.array))


def test_backward_filter_and_data_choose_deterministic_algorithms(stub):
    x, gy = rand(64, 3, 32, 32), rand(64, 64, 32, 32)
    for deterministic, algo in ((False, "0"), (True, "1")):
        gW = empty(64, 3, 3, 3)
        highlevel.convolution_backward_filter(
            x, gy, gW, (1, 1), (1, 1), (1, 1), 1, deterministic=deterministic,
            auto_tune=False, tensor_core="auto")
        assert stub.calls("cudnnConvolutionBackwardFilter")[-1]["algo"] == algo
        assert np.all(gW.array == 0)
    W, b, gx = rand(64, 3, 3, 3), rand(3), empty(64, 3, 32, 32)
    highlevel.convolution_backward_data(W, gy, b, gx, (1, 1), (1, 1), (1, 1), 1,
                                        deterministic=True, auto_tune=False, tensor_core="auto")
    assert stub.calls("cudnnConvolutionBackwardData")[0]["algo"] == "1"
    np.testing.assert_array_equal(gx.array, np.broadcast_to(b.array[None, :, None, None],
                                                            gx.shape))


def test_workspace_limit(stub):
    _context.set_max_workspace_size(1000)  # algo 1 needs 4096 bytes: the next one fits
    conv_forward(rand(2, 3, 8, 8), rand(4, 3, 3, 3), None, empty(2, 4, 8, 8))
    assert stub.calls("cudnnConvolutionForward")[0]["algo"] == "0"
    assert highlevel.get_max_workspace_size() == 1000
    with pytest.raises(RuntimeError, match="No deterministic ConvolutionBackwardFilter algo"):
        highlevel.convolution_backward_filter(
            rand(2, 3, 8, 8), rand(2, 4, 8, 8), empty(4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1,
            deterministic=True, auto_tune=False, tensor_core="auto")


def test_autotune_searches_once_per_shape(stub):
    for shape in ((8, 3, 16, 16), (8, 3, 16, 16), (4, 3, 16, 16)):
        conv_forward(rand(*shape), rand(8, 3, 3, 3), None, empty(shape[0], 8, 16, 16),
                     auto_tune=True)
    finds = stub.calls("cudnnFindConvolutionForwardAlgorithmEx")
    assert len(finds) == 2 and len(stub.calls("cudnnConvolutionForward")) == 3
    assert finds[0]["workspace"] == str(8 * 1024 * 1024)
    assert stub.calls("cudnnGetConvolutionForwardAlgorithm_v7") == []
    for _ in range(2):  # heuristics are cached too
        conv_forward(rand(8, 3, 16, 16), rand(8, 3, 3, 3), None, empty(8, 8, 16, 16))
    assert len(stub.calls("cudnnGetConvolutionForwardAlgorithm_v7")) == 1


def bn_arrays(dtype=np.float32, shape=(64, 64, 32, 32), param=None):
    channels = shape[1] if len(shape) == 4 and param != "nhwc" else shape[-1]
    p = np.float32 if dtype == np.float16 else dtype
    pdt = dtype if param is None or param == "nhwc" else p
    return (rand(*shape, dtype=dtype), rand(channels, dtype=pdt), rand(channels, dtype=pdt),
            host(np.zeros(channels, pdt)), host(np.ones(channels, pdt)))


def test_batch_normalization_training_and_backward(stub):
    x, gamma, beta, mean, var = bn_arrays()
    reserve, y, save_mean, save_inv_std = highlevel.batch_normalization_forward_training_ex(
        x, gamma, beta, mean, var, None, None, 2e-5, 0.9, True, C.CUDNN_BATCHNORM_SPATIAL,
        False)
    assert reserve is None and y.shape == x.shape and np.all(y.array == 1)
    assert save_mean.shape == (64,) and np.all(save_mean.array == 0)
    assert np.all(save_inv_std.array == 1)
    run = stub.calls("cudnnBatchNormalizationForwardTrainingEx")[0]
    assert float(run["factor"]) == pytest.approx(0.1) and float(run["eps"]) == pytest.approx(2e-5)
    assert run["workspace"] == "4096" and run["reserve"] == "0"
    gx, ggamma, gbeta = highlevel.batch_normalization_backward(
        x, gamma, rand(*x.shape), save_mean, save_inv_std, 2e-5, True,
        C.CUDNN_BATCHNORM_SPATIAL, False, reserve_space=reserve)
    assert gx.shape == x.shape and np.all(gx.array == 1)
    assert ggamma.shape == gbeta.shape == (64,) and np.all(ggamma.array == 1)
    assert stub.calls("cudnnBatchNormalizationBackwardEx")[0]["workspace"] == "8192"
    assert stub.live() == 0


def test_batch_normalization_inference_and_linear_layout(stub):
    x, gamma, beta, mean, var = bn_arrays(shape=(64, 512))
    y = highlevel.batch_normalization_forward_inference(
        x, gamma, beta, mean, var, 1e-5, False, C.CUDNN_BATCHNORM_PER_ACTIVATION)
    assert y.shape == (64, 512) and np.all(y.array == 1)
    assert stub.calls("cudnnSetTensor4dDescriptor")[0]["dims"] == "64,512,1,1"
    assert stub.calls("cudnnDeriveBNTensorDescriptor")[0]["mode"] == "0"


def test_batch_normalization_half_gets_float_parameters_and_reserve(stub):
    x, gamma, beta, mean, var = bn_arrays(np.float16, shape=(8, 16, 16, 64), param="nhwc")
    reserve, y, save_mean, _ = highlevel.batch_normalization_forward_training_ex(
        x, gamma, beta, mean, var, None, None, 1e-5, 0.9, True,
        C.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, True, d_layout=C.CUDNN_TENSOR_NHWC)
    assert save_mean.dtype == np.float32 and y.dtype == np.float16
    assert reserve is not None and reserve.size == 1024
    assert stub.calls("cudnnQueryRuntimeError")  # debug + persistent: overflow checked
    _, ggamma, _ = highlevel.batch_normalization_backward(
        x, gamma, rand(*x.shape, dtype=np.float16), save_mean, save_mean, 1e-5, True,
        C.CUDNN_BATCHNORM_SPATIAL_PERSISTENT, False, C.CUDNN_TENSOR_NHWC, reserve_space=reserve)
    assert ggamma.dtype == np.float16
    assert stub.calls("cudnnBatchNormalizationBackwardEx")[0]["reserve"] == "1024"


def test_double_data_takes_double_scalars(stub, monkeypatch):
    conv_forward(rand(2, 3, 8, 8, dtype=np.float64), rand(4, 3, 3, 3, dtype=np.float64),
                 rand(4, dtype=np.float64), empty(2, 4, 8, 8, dtype=np.float64))
    assert stub.calls("cudnnConvolutionForward")[0]["math"] == str(C.CUDNN_DEFAULT_MATH)
    monkeypatch.setattr(_context, "scalars", lambda dtype: (ctypes.c_float(1), ctypes.c_float(0)))
    with pytest.raises(libcudnn.CuDNNError, match="read as double"):
        highlevel.activation_forward(rand(4, 4, dtype=np.float64), C.CUDNN_ACTIVATION_RELU)
    stub.reset()


def test_pooling(stub):
    x, y = rand(64, 64, 32, 32), empty(64, 64, 16, 16)
    out = highlevel.pooling_forward(x, y, (2, 2), (2, 2), (0, 0), C.CUDNN_POOLING_MAX)
    assert out is y and np.all(y.array == 0)
    window = stub.calls("cudnnSetPooling2dDescriptor")[0]
    assert (window["window"], window["stride"], window["mode"]) == ("2,2", "2,2", "0")
    gx = highlevel.pooling_backward(x, y, rand(64, 64, 16, 16), (2, 2), (2, 2), (0, 0),
                                    C.CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING)
    assert gx.shape == x.shape and np.all(gx.array == 1)
    with pytest.raises(libcudnn.CuDNNError):  # 32 -> 16 is not what a 3x3 window gives
        highlevel.pooling_forward(x, empty(64, 64, 16, 16), (3, 3), (1, 1), (0, 0), 0)
    stub.reset()


@pytest.mark.parametrize("mode, reference", [
    (C.CUDNN_ACTIVATION_RELU, lambda v: np.maximum(v, 0)),
    (C.CUDNN_ACTIVATION_SIGMOID, lambda v: 1 / (1 + np.exp(-v))),
    (C.CUDNN_ACTIVATION_TANH, np.tanh),
])
def test_activations(stub, mode, reference):
    x = rand(64, 64, 32, 32)
    y = highlevel.activation_forward(x, mode)
    np.testing.assert_allclose(y.array, reference(x.array), rtol=1e-6, atol=1e-7)
    assert stub.calls("cudnnSetTensor4dDescriptor")[0]["dims"] == "64,65536,1,1"
    gx = highlevel.activation_backward(x, y, rand(*x.shape), mode)
    assert np.all(gx.array == 1)


def test_clipped_relu_passes_its_ceiling(stub):
    highlevel.activation_forward(rand(4, 8), C.CUDNN_ACTIVATION_CLIPPED_RELU, 20.0)
    assert stub.calls("cudnnSetActivationDescriptor")[0]["coef"] == "20"


def test_softmax_layouts(stub):
    y = highlevel.softmax_forward(rand(64, 10), 1, C.CUDNN_SOFTMAX_ACCURATE)
    assert y.shape == (64, 10)
    call = stub.calls("cudnnSoftmaxForward")[0]
    assert (call["dims"], call["mode"], call["algo"]) == ("64,10,1,1", "1", "1")
    highlevel.softmax_forward(rand(8, 5, 4, 3), 1, C.CUDNN_SOFTMAX_LOG)
    assert stub.calls("cudnnSoftmaxForward")[1]["dims"] == "8,5,12,1"
    gx = highlevel.softmax_backward(y, rand(64, 10), 1, C.CUDNN_SOFTMAX_ACCURATE)
    assert np.all(gx.array == 1)


def test_descriptors_and_their_lifetime(stub):
    desc = highlevel.create_tensor_descriptor(rand(2, 3, 4, 5))
    value = desc.value
    desc.destroy()
    with pytest.raises(libcudnn.CuDNNError, match="not alive"):
        libcudnn.setTensor4dDescriptor(value, 0, 0, 1, 1, 1, 1)
    stub.reset()
    with pytest.raises(ValueError, match="c-contiguous"):
        highlevel.create_tensor_descriptor(HostArray(np.zeros((6, 4), np.float32).T))
    nd = highlevel.create_tensor_nd_descriptor(rand(2, 3, 4))
    assert highlevel.create_tensor_nd_descriptor(rand(2, 3, 4)) is nd  # cached per shape
    assert highlevel.get_data_type(np.dtype("e")) == C.CUDNN_DATA_HALF
    with pytest.raises(TypeError):
        highlevel.get_data_type(np.int32)
    assert not highlevel.is_tensor_core_available(np.float16)  # CuPy's rule: only sm 70
    with pytest.raises(NotImplementedError, match="Chainer's own"):
        highlevel.DropoutStates(None, 0)


def test_handle_per_device_and_stream_set(stub):
    first = highlevel.get_handle()
    assert highlevel.get_handle() == first
    assert len(stub.calls("cudnnCreate")) == 1
    assert [c["stream"] for c in stub.calls("cudnnSetStream")] == [str(STREAM)] * 2
