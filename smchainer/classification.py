"""Classification results: scores, probabilities, labels and their JSON entries.

One home for how a classifier's output reads to a client, used by the
built-in VGG's ``predict_fn`` / ``output_fn`` and by the image plugin's
``top_k`` answers, so that both give the same numbers to the bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in the scores' own precision (max-shifted)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


def probabilities_of(scores: np.ndarray) -> np.ndarray:
    """Rows that already are distributions (in [0, 1], summing to 1) as they are; else softmax.

    Computed in float64, for predictions that may be either logits or
    probabilities (a user's model).
    """
    scores = np.asarray(scores, np.float64)
    if (scores.min() >= 0 and scores.max() <= 1
            and np.allclose(scores.sum(axis=1), 1.0, rtol=0, atol=1e-4)):
        return scores
    return softmax(scores)


def class_name(class_names: Sequence[str], label: int) -> str:
    """The name of ``label``, or the label as text when the names stop short."""
    return class_names[label] if label < len(class_names) else str(label)


def entries(scores: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
            labels: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One ``{"label", "class", "probability", "scores"}`` per row.

    The label of a row is ``labels``' (by default the most probable class).
    """
    if labels is None:
        labels = probabilities.argmax(axis=1)
    result = []
    for row, label in enumerate(labels.tolist()):
        result.append({
            "label": label,
            "class": class_name(class_names, label),
            "probability": float(probabilities[row, label]),
            "scores": [float(v) for v in scores[row]],
        })
    return result


def top_classes(probabilities: np.ndarray, class_names: Sequence[str],
                k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one row, most probable first (ties: lower label)."""
    order = sorted(range(len(probabilities)), key=lambda label: (-probabilities[label], label))
    return [
        {
            "label": label,
            "class": class_name(class_names, label),
            "probability": float(probabilities[label]),
        }
        for label in order[:k]
    ]


@dataclass
class Classification:
    """A classifier's answer for a batch: scores (logits) and the class names."""

    scores: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, rows: slice) -> Classification:
        """The classification of some rows (dynamic batching cuts a merged one so)."""
        if not isinstance(rows, slice):
            raise TypeError("a Classification is sliced by rows, not indexed")
        return Classification(self.scores[rows], self.class_names)

    @property
    def labels(self) -> np.ndarray:
        return self.scores.argmax(axis=1)

    @property
    def probabilities(self) -> np.ndarray:
        """The softmax of the scores, in their precision."""
        return softmax(self.scores)

    def as_json(self) -> dict[str, Any]:
        """``{"predictions": [{"label", "class", "probability", "scores"}, ...]}``."""
        return {"predictions": entries(self.scores, self.probabilities, self.class_names,
                                       self.labels)}
