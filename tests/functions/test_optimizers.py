"""smchainer's MomentumSGD equals Chainer's MomentumSGD + WeightDecay."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from smchainer import optimizers
from smchainer.models.vgg import VGG


def train(model, optimizer, steps=4):
    rng = np.random.default_rng(0)
    for step in range(steps):
        x = rng.random((4, 3, 32, 32), dtype=np.float32)
        t = rng.integers(0, 10, 4).astype(np.int32)
        np.random.seed(step)  # the same dropout masks on both sides
        loss = F.softmax_cross_entropy(model(x), t)
        model.cleargrads()
        loss.backward()
        optimizer.update()
    return {name: p.array.copy() for name, p in model.namedparams()}


def test_equals_chainer_momentum_sgd_with_the_weight_decay_hook() -> None:
    np.random.seed(0)
    chainer_model = VGG(width=0.125, depth=8)
    ours = chainer_model.copy(mode="copy")
    reference = chainer.optimizers.MomentumSGD(lr=0.05, momentum=0.9)
    reference.setup(chainer_model)
    reference.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))
    want = train(chainer_model, reference)
    fused = optimizers.MomentumSGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
    fused.setup(ours)
    got = train(ours, fused)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.random.seed(0)
    start = {name: p.array for name, p in VGG(width=0.125, depth=8).namedparams()}
    assert all(not np.array_equal(got[name], start[name]) for name in start)  # it trained


def test_hyperparameters_can_change_between_updates() -> None:
    opt = optimizers.MomentumSGD(lr=0.1, momentum=0.5, weight_decay=0.0)
    link = chainer.Link()
    with link.init_scope():
        link.w = chainer.Parameter(np.array([1.0, 2.0], dtype=np.float32))
    opt.setup(link)
    link.w.grad = np.array([1.0, 1.0], dtype=np.float32)
    opt.update()
    np.testing.assert_allclose(link.w.array, [0.9, 1.9])
    opt.lr, opt.weight_decay = 0.2, 0.5
    link.w.grad = np.array([1.0, 1.0], dtype=np.float32)
    opt.update()  # v = 0.5 * -0.1 - 0.2 * (1 + 0.5 * w)
    np.testing.assert_allclose(link.w.array, [0.9 - 0.05 - 0.2 * 1.45, 1.9 - 0.05 - 0.2 * 1.95],
                               rtol=1e-6)
    np.testing.assert_array_equal(link.w.grad, [1.0, 1.0])  # the loss gradient is left alone


def test_negative_weight_decay_is_refused() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        optimizers.MomentumSGD(weight_decay=-1)
