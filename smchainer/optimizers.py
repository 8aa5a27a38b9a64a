"""Optimizers of the built-in trainer.

:class:`MomentumSGD` is Chainer's MomentumSGD with L2 weight decay folded into
its update: ``v = momentum * v - lr * (grad + decay * param); param += v``.
Chainer's ``WeightDecay`` hook computes the same thing as a separate pass
(one more kernel launched from Python for every parameter, every step), which
on a GPU step of a few milliseconds is time the GPU spends waiting. The
arithmetic and its order are Chainer's, so on the CPU the results equal
``MomentumSGD`` + ``WeightDecay`` exactly; the one visible difference is that
``param.grad`` keeps the loss gradient (the hook adds the decay term to it).
"""
from __future__ import annotations

import chainer
from chainer import optimizer


class MomentumSGDRule(optimizer.UpdateRule):
    """The update of one parameter (state ``v``, as Chainer's rule names it)."""

    def __init__(self, parent_hyperparam=None, lr=None, momentum=None, weight_decay=None):
        hyperparam = optimizer.Hyperparameter(parent_hyperparam)
        super().__init__(hyperparam)
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value is not None:
                setattr(self.hyperparam, name, value)

    def init_state(self, param) -> None:
        with chainer.using_device(param.device):
            self.state["v"] = param.device.xp.zeros_like(param.data)

    def update_core_cpu(self, param) -> None:
        grad = param.grad
        if grad is None:
            return
        hp = self.hyperparam
        v = self.state["v"]
        if hp.weight_decay != 0:
            grad = grad + param.dtype.type(hp.weight_decay) * param.data
        v *= hp.momentum
        v -= hp.lr * grad
        param.data += v

    def update_core_gpu(self, param) -> None:
        grad = param.grad
        if grad is None:
            return
        hp = self.hyperparam
        _momentum_kernel()(
            grad, param.dtype.type(hp.lr), param.dtype.type(hp.momentum),
            param.dtype.type(hp.weight_decay), param.data, self.state["v"],
        )


def _momentum_kernel():
    from chainer.backends import cuda

    return cuda.elementwise(
        "T grad, T lr, T momentum, T decay", "T param, T v",
        "T g = grad + decay * param; v = momentum * v - lr * g; param += v;",
        "smchainer_momentum_sgd",
    )


class MomentumSGD(optimizer.GradientMethod):
    """Momentum SGD with L2 weight decay in the same update (see the module docstring)."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__()
        if weight_decay < 0:
            raise ValueError(f"weight_decay must not be negative, not {weight_decay}")
        self.hyperparam.lr = lr
        self.hyperparam.momentum = momentum
        self.hyperparam.weight_decay = weight_decay

    lr = optimizer.HyperparameterProxy("lr")
    momentum = optimizer.HyperparameterProxy("momentum")
    weight_decay = optimizer.HyperparameterProxy("weight_decay")

    def create_update_rule(self):
        return MomentumSGDRule(self.hyperparam)
