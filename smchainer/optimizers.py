"""Optimizers of the built-in trainer.

:class:`MomentumSGD` is Chainer's MomentumSGD with L2 weight decay folded into
its update: ``v = momentum * v - lr * (grad + decay * param); param += v``.
Chainer's ``WeightDecay`` hook computes the same thing as a separate pass
(one more kernel launched from Python for every parameter, every step), which
on a GPU step of a few milliseconds is time the GPU spends waiting. The
arithmetic and its order are Chainer's, so on the CPU the results equal
``MomentumSGD`` + ``WeightDecay`` exactly; the one visible difference is that
``param.grad`` keeps the loss gradient (the hook adds the decay term to it).

It also updates all parameters at once: the parameters and the momentum
buffers become views of two flat arrays, the gradients are gathered into a
third, and one elementwise pass updates everything (one kernel on a GPU
instead of one per parameter, each with Chainer's per-parameter Python in
front of it). Whenever that cannot be done exactly (hooks, loss scaling,
per-parameter hyperparameters, mixed dtypes or devices, a parameter without
a gradient) the update falls back to Chainer's per-parameter path, which
computes the same thing.
"""
from __future__ import annotations

from typing import Any

import chainer
from chainer import backend, optimizer


class MomentumSGDRule(optimizer.UpdateRule):
    """The update of one parameter (state ``v``, as Chainer's rule names it)."""

    def __init__(self, parent_hyperparam=None, lr=None, momentum=None, weight_decay=None):
        super().__init__(parent_hyperparam)
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

    _flat: dict[str, Any] | None = None

    def update(self, lossfun=None, *args, **kwds):
        """As :meth:`chainer.GradientMethod.update`, all parameters in one pass when it can."""
        if lossfun is not None:
            loss = lossfun(*args, **kwds)
            self.target.cleargrads()
            loss.backward(loss_scale=self._loss_scale)
            del loss
        params = self._flat_params()
        if params is None:
            super().update()
            return
        flat = self._flat_buffers(params)
        xp = backend.get_array_module(flat["param"])
        grad = xp.concatenate([param.grad.reshape(-1) for param in params])
        hp = self.hyperparam
        self.t += 1
        for param in params:
            param.update_rule.t += 1
        dtype = flat["param"].dtype.type
        if xp is chainer.backends.cuda.cupy:
            _momentum_kernel()(grad, dtype(hp.lr), dtype(hp.momentum), dtype(hp.weight_decay),
                               flat["param"], flat["v"])
        else:  # the per-parameter CPU update's operations, in its order
            if hp.weight_decay != 0:
                grad += dtype(hp.weight_decay) * flat["param"]
            flat["v"] *= hp.momentum
            flat["v"] -= hp.lr * grad
            flat["param"] += flat["v"]

    def _flat_params(self) -> list | None:
        """The parameters, when one flat update computes what the per-parameter one would."""
        hookable: Any = self._hookable
        target: Any = self.target
        if (self._loss_scale is not None or hookable._pre_update_hooks
                or hookable._post_update_hooks):
            return None
        params = list(target.params())
        if not params:
            return None
        first = params[0]
        shared = self.hyperparam
        for param in params:
            rule = param.update_rule
            # A rule whose hyperparameter object holds nothing of its own (only its parent,
            # this optimizer's) uses the optimizer's lr, momentum and weight decay.
            if (rule is None or not rule.enabled or param.grad is None or param.array is None
                    or rule._hookable._pre_update_hooks or rule._hookable._post_update_hooks
                    or rule._use_fp32_update or param.dtype != first.dtype
                    or param.device != first.device
                    or vars(rule.hyperparam).keys() != {"_parent"}
                    or rule.hyperparam._parent is not shared):
                return None
        return params

    def _flat_buffers(self, params: list) -> dict[str, Any]:
        """Flat parameter and momentum arrays whose views the parameters and states are.

        Built on the first flat update and again whenever a parameter's array
        is no longer the view handed to it (``to_device``, a loaded snapshot
        assigned new arrays, a communicator broadcast replaced them).
        """
        flat = self._flat
        if flat is not None and len(flat["views"]) == len(params) and all(
            param.array is view for param, view in zip(params, flat["views"], strict=True)
        ):
            return flat
        xp = backend.get_array_module(params[0].array)
        with chainer.using_device(params[0].device):
            sizes = [param.size for param in params]
            flat_param = xp.concatenate([param.array.reshape(-1) for param in params])
            flat_v = xp.zeros_like(flat_param)
            views = []
            offset = 0
            for param, size in zip(params, sizes, strict=True):
                view = flat_param[offset:offset + size].reshape(param.shape)
                v_view = flat_v[offset:offset + size].reshape(param.shape)
                rule = param.update_rule
                if rule.state is not None and "v" in rule.state:  # keep the momentum so far
                    v_view[...] = rule.state["v"]
                rule._state = {"v": v_view}
                param.array = view
                views.append(view)
                offset += size
        self._flat = {"param": flat_param, "v": flat_v, "views": views}
        return self._flat
