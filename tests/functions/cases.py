"""The channels-last functions against Chainer's own, on any device.

Each case runs Chainer's NCHW function on the CPU (the reference) and the
channels-last function on ``device`` from the same inputs and output gradient,
and returns both sides' outputs and gradients on the host. ``tests/functions``
runs the cases on the CPU (the NumPy implementation) and ``tests/gpu`` on the
GPU (the CUDA kernels).
"""
from __future__ import annotations

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from smchainer.functions import channels_last
from smchainer.models.vgg import VGG

CPU = chainer.get_device("@numpy")


def host(array):
    return CPU.send(array)


def nhwc(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def nchw(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def conv_case(device, n=3, c=5, h=6, w=4, o=7, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    W = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((n, o, h, w)).astype(np.float32)

    xr, Wr = chainer.Variable(x), chainer.Variable(W)
    yr = F.convolution_2d(xr, Wr, pad=1)
    yr.grad = gy
    yr.backward()

    xf = chainer.Variable(device.send(nhwc(x)))
    Wf = chainer.Variable(device.send(W))
    yf = channels_last.conv3x3(xf, Wf)
    yf.grad = device.send(nhwc(gy))
    yf.backward()
    return {
        "reference": {"y": yr.array, "gx": xr.grad, "gW": Wr.grad},
        "fused": {"y": nchw(host(yf.array)), "gx": nchw(host(xf.grad)), "gW": host(Wf.grad)},
    }


def bn_case(device, shape=(4, 6, 5, 3), train=True, relu=True, seed=0, shift=0.0) -> dict:
    """Batch norm (+ ReLU) over every axis but the channel one, NCHW ``shape``."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + shift).astype(np.float32)
    channels = shape[1]
    gy = rng.standard_normal(shape).astype(np.float32)

    def link():
        bn = L.BatchNormalization(channels)
        bn.gamma.array[...] = rng_params.standard_normal(channels).astype(np.float32)
        bn.beta.array[...] = rng_params.standard_normal(channels).astype(np.float32)
        bn.avg_mean[...] = rng_params.standard_normal(channels).astype(np.float32)
        bn.avg_var[...] = rng_params.random(channels).astype(np.float32) + 0.5
        return bn

    rng_params = np.random.default_rng(seed + 100)
    reference_bn = link()
    rng_params = np.random.default_rng(seed + 100)
    fused_bn = link()
    fused_bn.to_device(device)

    with chainer.using_config("train", train):
        xr = chainer.Variable(x)
        yr = reference_bn(xr)
        if relu:
            yr = F.relu(yr)
        yr.grad = gy
        yr.backward()

        # Channels last: (n, h, w, c) for images, (n, c) as it is for vectors.
        to_last = nhwc if x.ndim == 4 else np.ascontiguousarray
        from_last = nchw if x.ndim == 4 else np.ascontiguousarray
        xf = chainer.Variable(device.send(to_last(x)))
        yf = channels_last.batch_norm_relu(xf, fused_bn, relu=relu)
        yf.grad = device.send(to_last(gy))
        yf.backward()
    return {
        "reference": {
            "y": yr.array, "gx": xr.grad, "ggamma": reference_bn.gamma.grad,
            "gbeta": reference_bn.beta.grad, "avg_mean": reference_bn.avg_mean,
            "avg_var": reference_bn.avg_var,
        },
        "fused": {
            "y": from_last(host(yf.array)), "gx": from_last(host(xf.grad)),
            "ggamma": host(fused_bn.gamma.grad), "gbeta": host(fused_bn.beta.grad),
            "avg_mean": host(fused_bn.avg_mean), "avg_var": host(fused_bn.avg_var),
        },
    }


def pool_case(device, shape=(3, 4, 6, 8), seed=0, ties=True) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if ties:  # as after a ReLU: whole windows of zeros, and pairs of equal maxima
        x = np.maximum(x, 0)
        x[:, :, 0:2, 0:2] = 0.0
        x[:, :, 2, 2] = x[:, :, 3, 3] = 5.0
    gy = rng.standard_normal((shape[0], shape[1], shape[2] // 2, shape[3] // 2))
    gy = gy.astype(np.float32)

    xr = chainer.Variable(x)
    yr = F.max_pooling_2d(xr, 2, 2)
    yr.grad = gy
    yr.backward()

    xf = chainer.Variable(device.send(nhwc(x)))
    yf = channels_last.max_pool_2x2(xf)
    yf.grad = device.send(nhwc(gy))
    yf.backward()
    return {
        "reference": {"y": yr.array, "gx": xr.grad},
        "fused": {"y": nchw(host(yf.array)), "gx": nchw(host(xf.grad))},
    }


def vgg_case(device, train=True, batch=8, depth=11, width=0.25, seed=0) -> dict:
    """A whole VGG, fused on ``device`` against Chainer's functions on the CPU.

    Dropout is off (``dropout_scale = 0``) so that both sides compute the same
    function; everything else, batch statistics included, is the network's.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 3, 32, 32), dtype=np.float32)
    t = rng.integers(0, 10, batch).astype(np.int32)
    np.random.seed(seed)
    reference = VGG(n_classes=10, width=width, depth=depth)
    fused = reference.copy(mode="copy")
    for model in (reference, fused):
        model.dropout_scale = 0.0
    reference.fused = False
    fused.fused = True
    fused.to_device(device)

    out = {}
    with chainer.using_config("train", train):
        for name, model, dev in (("reference", reference, CPU), ("fused", fused, device)):
            y = model(dev.send(x))
            loss = F.softmax_cross_entropy(y, dev.send(t))
            model.cleargrads()
            loss.backward()
            grads = {name: host(p.grad) for name, p in model.namedparams()}
            stats = {f"{name}/avg_mean": host(link.avg_mean)
                     for name, link in model.namedlinks()
                     if isinstance(link, L.BatchNormalization)}
            out[name] = {"y": host(y.array), "loss": float(loss.array), "grads": grads,
                         "stats": stats}
    return out


def bn_dropout_case(device, shape=(8, 6, 5, 4), ratio=0.3, seed=0) -> dict:
    """Fused batch norm + ReLU + dropout against Chainer's BN and ReLU times the same mask."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    reference_bn = L.BatchNormalization(channels)
    fused_bn = L.BatchNormalization(channels)
    for bn in (reference_bn, fused_bn):
        params = np.random.default_rng(seed + 100)
        bn.gamma.array[...] = params.standard_normal(channels).astype(np.float32)
        bn.beta.array[...] = params.standard_normal(channels).astype(np.float32)
    fused_bn.to_device(device)
    with chainer.using_config("train", True):
        xf = chainer.Variable(device.send(nhwc(x)))
        node = channels_last.BatchNormReLU(fused_bn.eps, fused_bn.avg_mean, fused_bn.avg_var,
                                           fused_bn.decay, relu=True, dropout=ratio)
        yf = node.apply((xf, fused_bn.gamma, fused_bn.beta))[0]
        yf.grad = device.send(nhwc(gy))
        yf.backward()

        keep = channels_last.dropout_keep(node.seed, x.size, ratio)
        keep = nchw(keep.reshape(shape[0], shape[2], shape[3], shape[1]))
        mask = keep.astype(np.float32) * np.float32(1 / (1 - ratio))
        xr = chainer.Variable(x)
        yr = F.relu(reference_bn(xr)) * mask
        yr.grad = gy
        yr.backward()
    return {
        "reference": {"y": yr.array, "gx": xr.grad, "ggamma": reference_bn.gamma.grad,
                      "gbeta": reference_bn.beta.grad},
        "fused": {"y": nchw(host(yf.array)), "gx": nchw(host(xf.grad)),
                  "ggamma": host(fused_bn.gamma.grad), "gbeta": host(fused_bn.beta.grad)},
        "keep": keep,
    }
