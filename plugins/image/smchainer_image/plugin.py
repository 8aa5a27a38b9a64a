"""The hooks: images in, the model's batch out, top-k classes back as JSON.

How the pieces meet, through the hooks' ``context`` argument
(:class:`smchainer.context.ServingContext`), which SageMaker-style functions
never see:

``model_fn`` (a wrapper)
    Whatever loaded the model (a user's ``model_fn``, the built-in VGG
    loader), this reads the input and class names that the model's contract
    (``smchainer-model.json``) describes and keeps them in
    ``context.shared`` as what this model takes. The model is returned as
    it came: the ONNX plugin's wrapper and every ``predict_fn`` see no change.
``input_fn``
    Decodes ``image/png``, ``image/jpeg`` (and SageMaker's
    ``application/x-image``) bodies and ``application/zip`` batches into the
    plain float32 ``N x C x H x W`` array the model's spec asks for, so any
    ``predict_fn`` (the built-in VGG one, a user's, the generic default) runs
    it unchanged, and notes the request's images in ``context.request``.
    Other types pass on to the next plugin.
``predict_fn`` (a wrapper)
    When the input is the very array ``input_fn`` decoded, notes that the
    prediction answers those images. The prediction itself is not touched:
    an ``output_fn`` of the user's still sees the object it expects.
``batch_fn`` (a wrapper)
    The same note when the images go into a merged batch (dynamic
    batching): the request's own rows of the prediction answer them. Whether
    they may is the word of whichever ``batch_fn`` answers (the built-in
    VGG's for its models).
``output_fn``
    Answers ``application/json`` for predictions of images that are
    classifications (the built-in VGG's, or an ``N x classes`` array when the
    contract names the classes): the built-in VGG's JSON (``label``,
    ``class``, ``probability``, ``scores``) with a ``top_k`` list per image
    and, for zip members, the member's ``image`` name. Other types and other
    predictions pass on (npy and CSV give the class scores, as without the
    plugin).

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from smchainer import classification, content, hookimpl
from smchainer.context import ServingContext
from smchainer.environ import env_positive_int
from smchainer_image.archive import decode_zip
from smchainer_image.decode import InputSpec, decode_image

logger = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg", "application/x-image")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
#: This plugin's key in ``context.shared`` and ``context.request``.
CONTEXT_KEY = "image"
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
        return cls(
            top_k=env_positive_int(TOP_K_ENV, DEFAULT_TOP_K, environ),
            max_batch=env_positive_int(MAX_BATCH_ENV, DEFAULT_MAX_BATCH, environ),
        )


@dataclass(frozen=True)
class ServedModel:
    """What this worker knows of its model: the input it takes and its classes."""

    spec: InputSpec
    class_names: tuple[str, ...]
    settings: ImageSettings


@dataclass
class ImageRequest:
    """The images of one request: the decoded batch, member names (zips), and the answer's k."""

    batch: np.ndarray
    names: tuple[str, ...] | None
    top_k: int
    predicted: bool = False

    @property
    def count(self) -> int:
        return len(self.batch)


def describe_model(context: ServingContext, model: Any = None) -> ServedModel:
    """The input spec and class names that the model's contract gives.

    Without a contract: images at their own size, and the class names the
    model object carries (``model.class_names``), if any.

    :raises SmchainerError: for a metadata file that cannot be read or
        describes an unusable input, and for bad settings in the environment.
    """
    settings = ImageSettings.from_env()
    contract = context.contract
    spec = InputSpec.from_contract(contract)
    names = contract.class_names or tuple(getattr(model, "class_names", None) or ())
    return ServedModel(spec, tuple(str(name) for name in names), settings)


def served_model(context: ServingContext) -> ServedModel:
    """The model as :func:`model_fn` described it, else what the environment gives."""
    served = context.shared.get(CONTEXT_KEY)
    if served is not None:
        return served
    return ServedModel(InputSpec(), (), ImageSettings.from_env())


@hookimpl
def media_types() -> content.MediaTypes:
    """PNG, JPEG and zips of them in; JSON (with ``top_k``) out."""
    return content.MediaTypes(IMAGE_TYPES + ZIP_TYPES, (content.JSON,))


@hookimpl(wrapper=True)
def model_fn(model_dir: str, context: ServingContext) -> Any:
    """Keep the loaded model's input spec and class names; return the model unchanged."""
    model = yield
    if model is not None:
        served = describe_model(context, model)
        context.shared[CONTEXT_KEY] = served
        shape = served.spec.shape
        logger.info(
            "image requests: %s, %d class names",
            f"resized to {shape[2]}x{shape[1]}" if shape else "passed at their own size",
            len(served.class_names),
        )
    return model


@hookimpl
def input_fn(input_data: bytes, content_type: str, context: ServingContext) -> Any:
    """A PNG / JPEG (``1 x C x H x W``) or a zip of them (``N x C x H x W``); else None."""
    if content_type in IMAGE_TYPES:
        model = served_model(context)
        batch, names = decode_image(input_data, model.spec), None
    elif content_type in ZIP_TYPES:
        model = served_model(context)
        batch, member_names = decode_zip(
            input_data, model.spec, model.settings.max_batch,
            check=lambda name: context.check_deadline(f"decoding {name}"))
        names = tuple(member_names)
    else:
        return None
    context.request[CONTEXT_KEY] = ImageRequest(batch, names, model.settings.top_k)
    return batch


@hookimpl(wrapper=True)
def predict_fn(input_data: Any, model: Any, context: ServingContext) -> Any:
    """Note that the prediction answers the images :func:`input_fn` decoded, if it does."""
    prediction = yield
    request = context.request.get(CONTEXT_KEY)
    if request is not None and request.batch is input_data:
        request.predicted = True
    return prediction


@hookimpl(wrapper=True)
def batch_fn(input_data: Any, model: Any, context: ServingContext) -> Any:
    """Decoded images may share a ``predict_fn`` call when whoever answers says so.

    This plugin keeps no state of its own across that call: when the
    request's images go into a merged batch, its rows of the prediction come
    back to this request's ``output_fn``, so they answer its images.
    """
    batch = yield
    request = context.request.get(CONTEXT_KEY)
    if batch is not None and request is not None and request.batch is input_data:
        request.predicted = True
    return batch


def is_classification(prediction: Any) -> bool:
    """An object with ``scores``, ``class_names`` and ``as_json()`` (the built-in VGG's)."""
    return all(hasattr(prediction, a) for a in ("scores", "class_names", "as_json"))


def scores_of(prediction: Any, request: ImageRequest,
              class_names: tuple[str, ...]) -> np.ndarray | None:
    """A plain prediction as ``N x classes`` float scores for the ``N`` images, else None."""
    if (isinstance(prediction, np.ndarray) and prediction.ndim == 2
            and prediction.shape == (request.count, len(class_names))
            and np.issubdtype(prediction.dtype, np.floating)):
        return prediction
    return None


@hookimpl
def output_fn(prediction: Any, accept: str, context: ServingContext) -> Any:
    """JSON with ``top_k`` for classifications of this request's images; else None."""
    request = context.request.get(CONTEXT_KEY)
    if (request is None or not request.predicted
            or content.match_media_range(accept, (content.JSON,)) is None):
        return None
    class_names = served_model(context).class_names
    if is_classification(prediction):
        body = prediction.as_json()
        probabilities = classification.softmax(np.asarray(prediction.scores))
        names: tuple[str, ...] | list[str] = prediction.class_names
    else:
        scores = scores_of(prediction, request, class_names)
        if scores is None:
            return None
        probabilities = classification.probabilities_of(scores)
        names = class_names
        body = {"predictions": classification.entries(scores, probabilities, names)}
    return json.dumps(with_top_k(body, probabilities, names, request)).encode(), content.JSON


def with_top_k(body: dict[str, Any], probabilities: np.ndarray,
               names: tuple[str, ...] | list[str], request: ImageRequest) -> dict[str, Any]:
    """``body``'s entries, one per image, each with ``top_k`` (and ``image`` for zip members)."""
    images = request.names
    if images is not None and len(images) != len(body["predictions"]):
        images = None  # a predict_fn that changed the batch: names would be misleading
    for row, entry in enumerate(body["predictions"]):
        entry["top_k"] = classification.top_classes(probabilities[row], names, request.top_k)
        if images is not None:
            entry["image"] = images[row]
    return body
