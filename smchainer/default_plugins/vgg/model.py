"""The network the trainer builds and the loss it trains with."""
from __future__ import annotations

from typing import TYPE_CHECKING

import chainer.functions as F
import chainer.links as L
import numpy as np

from smchainer.models.vgg import VGG

if TYPE_CHECKING:
    from smchainer.default_plugins.vgg.data import PreparedData
    from smchainer.default_plugins.vgg.hyperparameters import Hyperparameters


class SmoothedCrossEntropy:
    """Softmax cross entropy against label-smoothed targets (the Classifier's ``lossfun``).

    The target puts ``1 - eps`` on the label and spreads ``eps`` evenly over
    all classes (the label included), so an image's loss is
    ``-((1 - eps) * log p[t] + eps * mean_k log p[k])`` and the result is the
    mean over the batch. Written with Chainer functions, so it runs and
    differentiates on the CPU and the GPU alike. Unlike
    ``F.softmax_cross_entropy`` there is no ignore label: the trainer's labels
    are all classes.
    """

    def __init__(self, eps: float) -> None:
        if not 0 <= eps < 1:
            raise ValueError(f"label smoothing must be in [0, 1), not {eps}")
        self.eps = float(eps)

    def __call__(self, y, t):
        log_p = F.log_softmax(y)
        per_image = (self.eps - 1) * F.select_item(log_p, t) - self.eps * F.mean(log_p, axis=1)
        return F.mean(per_image)

    def __repr__(self) -> str:
        return f"SmoothedCrossEntropy(eps={self.eps})"


def build_classifier(hp: Hyperparameters, prepared: PreparedData, kernels: str) -> L.Classifier:
    """The VGG that ``hp`` describes, inside the Classifier that computes its loss.

    Chainer's initializers draw from NumPy's global RNG, so it is seeded
    first: the same seed builds the same weights on every rank.
    """
    np.random.seed(hp["seed"])
    model = VGG(
        n_classes=len(prepared.class_names), width=hp["width"], depth=hp["depth"],
        mean=prepared.mean, std=prepared.std,
    )
    model.fused = kernels == "fused"
    model.dropout_scale = hp["dropout"]
    if hp["label-smoothing"] > 0:
        return L.Classifier(model, lossfun=SmoothedCrossEntropy(hp["label-smoothing"]))
    return L.Classifier(model)  # Chainer's own function: the unsmoothed loss stays exactly so
