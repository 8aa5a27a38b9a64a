"""smchainer's MomentumSGD equals Chainer's MomentumSGD + WeightDecay."""
from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np
import pytest

from smchainer import optimizers
from smchainer.models.vgg import VGG


def batches(count: int) -> list:
    rng = np.random.default_rng(0)
    return [(rng.random((4, 3, 32, 32), dtype=np.float32),
             rng.integers(0, 10, 4).astype(np.int32)) for _ in range(count)]


def run_steps(model, optimizer, data, first_step=0):
    for step, (x, t) in enumerate(data, first_step):
        np.random.seed(step)  # the same dropout masks on both sides
        loss = F.softmax_cross_entropy(model(x), t)
        model.cleargrads()
        loss.backward()
        optimizer.update()
    return {name: p.array.copy() for name, p in model.namedparams()}


def twin_models(hook) -> tuple[VGG, chainer.Optimizer, VGG]:
    """A small VGG with Chainer's MomentumSGD and ``hook``, and an identical copy."""
    np.random.seed(0)
    reference_model = VGG(width=0.125, depth=8)
    ours = reference_model.copy(mode="copy")
    reference = chainer.optimizers.MomentumSGD(lr=0.05, momentum=0.9)
    reference.setup(reference_model)
    reference.add_hook(hook)
    return reference_model, reference, ours


def test_equals_chainer_momentum_sgd_with_the_weight_decay_hook() -> None:
    chainer_model, reference, ours = twin_models(chainer.optimizer_hooks.WeightDecay(5e-4))
    data = batches(4)
    want = run_steps(chainer_model, reference, data)
    fused = optimizers.MomentumSGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
    fused.setup(ours)
    got = run_steps(ours, fused, data)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert fused._flat is not None  # the one-pass update ran
    flat = fused._flat["param"]
    assert all(np.shares_memory(p.array, flat) for p in ours.params())
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


def test_a_hook_takes_the_per_parameter_path_with_the_same_result() -> None:
    reference_model, reference, ours = twin_models(
        chainer.optimizer_hooks.GradientHardClipping(-1e-3, 1e-3))
    fused = optimizers.MomentumSGD(lr=0.05, momentum=0.9)
    fused.setup(ours)
    fused.add_hook(chainer.optimizer_hooks.GradientHardClipping(-1e-3, 1e-3))
    data = batches(3)
    want, got = run_steps(reference_model, reference, data), run_steps(ours, fused, data)
    assert fused._flat is None  # the hook must see every parameter: no flat pass
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def two_parameters() -> chainer.Link:
    """A link with parameters ``a`` (2 values) and ``b`` (1 value)."""
    link = chainer.Link()
    with link.init_scope():
        link.a = chainer.Parameter(np.array([1.0, 2.0], dtype=np.float32))
        link.b = chainer.Parameter(np.array([3.0], dtype=np.float32))
    return link


def test_a_parameter_without_a_gradient_is_left_as_chainer_leaves_it() -> None:
    reference_link, our_link = two_parameters(), two_parameters()
    reference = chainer.optimizers.MomentumSGD(lr=0.1)
    reference.setup(reference_link)
    reference.add_hook(chainer.optimizer_hooks.WeightDecay(0.5))
    fused = optimizers.MomentumSGD(lr=0.1, weight_decay=0.5)
    fused.setup(our_link)
    for link, opt in ((reference_link, reference), (our_link, fused)):
        for _ in range(2):
            link.cleargrads()
            link.a.grad = np.array([1.0, -1.0], dtype=np.float32)  # b gets no gradient
            opt.update()
    assert fused._flat is None
    for name in ("a", "b"):  # Chainer decays even the parameter with no gradient
        np.testing.assert_array_equal(getattr(our_link, name).array,
                                      getattr(reference_link, name).array, err_msg=name)


def test_resuming_from_a_snapshot_equals_an_uninterrupted_run(tmp_path) -> None:
    def fresh():
        np.random.seed(0)
        model = VGG(width=0.125, depth=8)
        opt = optimizers.MomentumSGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
        opt.setup(model)
        return model, opt

    data = batches(4)
    want = run_steps(*fresh(), data)
    model, opt = fresh()
    run_steps(model, opt, data[:2])
    chainer.serializers.save_npz(str(tmp_path / "model.npz"), model)
    chainer.serializers.save_npz(str(tmp_path / "opt.npz"), opt)
    model, opt = fresh()
    chainer.serializers.load_npz(str(tmp_path / "model.npz"), model)
    chainer.serializers.load_npz(str(tmp_path / "opt.npz"), opt)
    assert opt.t == 2
    got = run_steps(model, opt, data[2:], first_step=2)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert opt._flat is not None


def test_a_parameter_with_its_own_learning_rate_takes_the_per_parameter_path() -> None:
    reference_link, our_link = two_parameters(), two_parameters()
    reference = chainer.optimizers.MomentumSGD(lr=0.1)
    reference.setup(reference_link)
    reference_link.b.update_rule.hyperparam.lr = 0.5
    fused = optimizers.MomentumSGD(lr=0.1)
    fused.setup(our_link)
    our_link.b.update_rule.hyperparam.lr = 0.5
    for link, opt in ((reference_link, reference), (our_link, fused)):
        for _ in range(2):
            link.cleargrads()
            link.a.grad = np.array([1.0, -1.0], dtype=np.float32)
            link.b.grad = np.array([2.0], dtype=np.float32)
            opt.update()
    assert fused._flat is None
    for name in ("a", "b"):
        np.testing.assert_array_equal(getattr(our_link, name).array,
                                      getattr(reference_link, name).array, err_msg=name)
