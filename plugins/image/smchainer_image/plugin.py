"""The hooks: images in, the model's batch out, top-k classes back as JSON.

How the pieces meet, since ``input_fn`` never sees the model:

``model_fn`` (a wrapper)
    Whatever loaded the model (a user's ``model_fn``, the built-in VGG
    loader), this reads ``smchainer-model.json`` from the model directory and
    records the input it describes (:class:`~smchainer_image.decode.InputSpec`)
    and the class names as *this worker's model*. A gunicorn worker loads one
    model, once, before it answers a request, so a per-process record is
    exactly "the model these requests go to". The model is returned as it
    came: the ONNX plugin's wrapper and every ``predict_fn`` see no change.
``input_fn``
    Decodes ``image/png``, ``image/jpeg`` (and SageMaker's
    ``application/x-image``) bodies and ``application/zip`` batches into the
    plain float32 ``N x C x H x W`` array the recorded spec asks for, so any
    ``predict_fn`` (the built-in VGG one, a user's, the generic default) runs
    it unchanged. Other types pass on to the next plugin.
``predict_fn`` (a wrapper)
    When the input is the very array ``input_fn`` decoded, the prediction is
    marked as an answer to images (the built-in VGG's ``Classification`` gets
    an attribute; a plain ``N x classes`` array, when the metadata names its
    classes, becomes a view that carries it). Nothing else changes: an
    ``output_fn`` of the user's still sees the object it expects.
``output_fn``
    Answers ``application/json`` for marked predictions only: the built-in
    VGG's JSON (``label``, ``class``, ``probability``, ``scores``) with a
    ``top_k`` list per image and, for zip members, the member's ``image``
    name. Other types and unmarked predictions pass on (npy and CSV give the
    class scores, as without the plugin).

Environment (read when the model loads; a bad value fails the load, so
``/ping`` says why):

``SMCHAINER_TOP_K``
    How many classes ``top_k`` lists (default 5; at most the number of
    classes). An environment variable because the server drops Accept
    parameters, as SageMaker's contract does.
``SMCHAINER_IMAGE_MAX_BATCH``
    The most images one zip may hold (default 256).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smchainer import content, hookimpl
from smchainer.errors import SmchainerError
from smchainer_image.archive import decode_zip
from smchainer_image.decode import InputSpec, decode_image

logger = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg", "application/x-image")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
METADATA_FILE = "smchainer-model.json"
TOP_K_ENV = "SMCHAINER_TOP_K"
MAX_BATCH_ENV = "SMCHAINER_IMAGE_MAX_BATCH"
DEFAULT_TOP_K = 5
DEFAULT_MAX_BATCH = 256


@dataclass(frozen=True)
class ImageSettings:
    """The plugin's switches (see the module docstring)."""

    top_k: int = DEFAULT_TOP_K
    max_batch: int = DEFAULT_MAX_BATCH

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ImageSettings:
        """Read ``SMCHAINER_TOP_K`` and ``SMCHAINER_IMAGE_MAX_BATCH``.

        :raises SmchainerError: when either is set to anything but a positive integer.
        """
        environ = os.environ if environ is None else environ
        return cls(
            top_k=_positive_int(environ, TOP_K_ENV, DEFAULT_TOP_K),
            max_batch=_positive_int(environ, MAX_BATCH_ENV, DEFAULT_MAX_BATCH),
        )


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SmchainerError(f"{name} must be a positive integer, not {raw!r}")
    return value


@dataclass(frozen=True)
class ServedModel:
    """What this worker knows of its model: the input it takes and its classes."""

    spec: InputSpec
    class_names: tuple[str, ...]
    settings: ImageSettings


@dataclass(frozen=True)
class ImageRequest:
    """Marks a prediction as the answer to images: their names (zip members) and count."""

    count: int
    names: tuple[str, ...] | None
    top_k: int


class ImageScores(np.ndarray):
    """A plain ``N x classes`` prediction that carries its images and class names."""

    image_request: ImageRequest | None = None
    class_names: tuple[str, ...] = ()


_served: ServedModel | None = None
_last_decoded = threading.local()


def describe_model(model_dir: str | os.PathLike[str], model: Any = None) -> ServedModel:
    """The input spec and class names that ``model_dir``'s ``smchainer-model.json`` gives.

    Without the file: images at their own size, and the class names the
    model object carries (``model.class_names``), if any.

    :raises SmchainerError: for a metadata file that cannot be read or
        describes an unusable input, and for bad settings in the environment.
    """
    settings = ImageSettings.from_env()
    path = Path(model_dir) / METADATA_FILE
    metadata: dict[str, Any] = {}
    if path.is_file():
        try:
            metadata = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SmchainerError(f"cannot read {path}: {error}") from None
        if not isinstance(metadata, dict):
            raise SmchainerError(f"{path} holds {type(metadata).__name__}, not an object")
    spec = InputSpec.from_metadata(metadata, str(path))
    names = metadata.get("class_names") or getattr(model, "class_names", None) or ()
    return ServedModel(spec, tuple(str(name) for name in names), settings)


def served_model() -> ServedModel:
    """This worker's model as :func:`model_fn` recorded it, else what the environment gives."""
    if _served is not None:
        return _served
    return ServedModel(InputSpec(), (), ImageSettings.from_env())


def forget_served_model() -> None:
    """Drop the record of this process's model (for tests that load several)."""
    global _served
    _served = None


@hookimpl(wrapper=True)
def model_fn(model_dir: str) -> Any:
    """Record the loaded model's input spec and class names; return the model unchanged."""
    global _served
    model = yield
    if model is not None:
        _served = describe_model(model_dir, model)
        shape = _served.spec.shape
        logger.info(
            "image requests: %s, %d class names",
            f"resized to {shape[2]}x{shape[1]}" if shape else "passed at their own size",
            len(_served.class_names),
        )
    return model


@hookimpl
def input_fn(input_data: bytes, content_type: str) -> Any:
    """A PNG / JPEG (``1 x C x H x W``) or a zip of them (``N x C x H x W``); else None."""
    if content_type in IMAGE_TYPES:
        model = served_model()
        batch, names = decode_image(input_data, model.spec), None
    elif content_type in ZIP_TYPES:
        model = served_model()
        batch, member_names = decode_zip(input_data, model.spec, model.settings.max_batch)
        names = tuple(member_names)
    else:
        return None
    # Only the identity of this array links the coming prediction to these images.
    _last_decoded.batch = weakref.ref(batch)
    _last_decoded.request = ImageRequest(len(batch), names, model.settings.top_k)
    return batch


def image_request_of(input_data: Any) -> ImageRequest | None:
    """The request that :func:`input_fn` decoded into ``input_data``, if it did."""
    reference = getattr(_last_decoded, "batch", None)
    if reference is None or reference() is not input_data:
        return None
    return _last_decoded.request


@hookimpl(wrapper=True)
def predict_fn(input_data: Any, model: Any) -> Any:
    """Mark the prediction for images decoded by :func:`input_fn` (see the module docstring)."""
    prediction = yield
    request = image_request_of(input_data)
    if request is None:
        return prediction
    return mark_prediction(prediction, request, served_model().class_names)


def mark_prediction(prediction: Any, request: ImageRequest,
                    class_names: tuple[str, ...]) -> Any:
    """``prediction`` carrying ``request``, when it is a classification; else as it is.

    A classification is an object with ``scores``, ``class_names`` and
    ``as_json()`` (the built-in VGG's), or an ``N x len(class_names)``
    array for the ``N`` images.
    """
    if all(hasattr(prediction, a) for a in ("scores", "class_names", "as_json")):
        try:
            prediction.image_request = request
        except AttributeError:  # a frozen or slotted object: leave it alone
            pass
        return prediction
    if (isinstance(prediction, np.ndarray) and prediction.ndim == 2
            and prediction.shape == (request.count, len(class_names))
            and np.issubdtype(prediction.dtype, np.floating)):
        scores = prediction.view(ImageScores)
        scores.image_request = request
        scores.class_names = class_names
        return scores
    return prediction


@hookimpl
def output_fn(prediction: Any, accept: str) -> Any:
    """JSON with ``top_k`` for predictions marked as answers to images; else None."""
    request = getattr(prediction, "image_request", None)
    if request is None or content.match_media_range(accept, (content.JSON,)) is None:
        return None
    return json.dumps(classification_json(prediction, request)).encode(), content.JSON


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the scores' own precision, computed as the VGG default's JSON does.

    So each ``top_k`` probability equals the entry's ``probability`` to the bit.
    """
    shifted = scores - scores.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


def probabilities_of(scores: np.ndarray) -> np.ndarray:
    """Rows that already are distributions (in [0, 1], summing to 1) as they are; else softmax."""
    scores = np.asarray(scores, np.float64)
    if (scores.min() >= 0 and scores.max() <= 1
            and np.allclose(scores.sum(axis=1), 1.0, rtol=0, atol=1e-4)):
        return scores
    return softmax(scores)


def top_classes(probabilities: np.ndarray, class_names: tuple[str, ...] | list[str],
                k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one row, most probable first (ties: lower label)."""
    order = sorted(range(len(probabilities)), key=lambda label: (-probabilities[label], label))
    return [
        {
            "label": label,
            "class": class_names[label] if label < len(class_names) else str(label),
            "probability": float(probabilities[label]),
        }
        for label in order[:k]
    ]


def classification_json(prediction: Any, request: ImageRequest) -> dict[str, Any]:
    """``{"predictions": [...]}``, one entry per image, each with ``top_k`` (and ``image``).

    For the built-in VGG's ``Classification`` the entries are its own
    ``as_json()`` ones (probabilities: the softmax of the scores); for a
    plain array, the same keys, with the rows themselves as probabilities
    when they already are distributions.
    """
    if isinstance(prediction, ImageScores):
        scores = np.asarray(prediction)
        probabilities = probabilities_of(scores)
        names = prediction.class_names
        entries = []
        for row, label in enumerate(probabilities.argmax(axis=1).tolist()):
            entries.append({
                "label": label,
                "class": names[label] if label < len(names) else str(label),
                "probability": float(probabilities[row, label]),
                "scores": [float(v) for v in scores[row]],
            })
        body: dict[str, Any] = {"predictions": entries}
    else:
        body = prediction.as_json()
        probabilities = softmax(np.asarray(prediction.scores))
        names = prediction.class_names
    images = request.names
    if images is not None and len(images) != len(body["predictions"]):
        images = None  # a predict_fn that changed the batch: names would be misleading
    for row, entry in enumerate(body["predictions"]):
        entry["top_k"] = top_classes(probabilities[row], names, request.top_k)
        if images is not None:
            entry["image"] = images[row]
    return body
