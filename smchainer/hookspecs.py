"""The hook contract: what plugins, user scripts and the defaults implement.

Every hook is ``firstresult``: implementations are called from the most
recently registered to the first, and the first one that returns something
other than ``None`` answers. Returning ``None`` passes the call on. The
built-in defaults (:mod:`smchainer.default_plugins`) are registered
``trylast=True``, so any installed plugin or user module wins regardless of
registration order.

Names and argument orders are SageMaker's, so the functions of a SageMaker
``inference.py`` or training script map over unchanged; such functions need no
marker (see :func:`smchainer.plugins.plugin_from_module`). Plugins distributed
as packages mark their functions with ``@smchainer.hookimpl``.

Every serving hook also has a ``context`` argument
(:class:`smchainer.context.ServingContext`: the model, its directory, its
``smchainer-model.json`` and state kept per model and per request). pluggy
passes an implementation only the arguments it names, so an implementation
that does not name ``context`` never sees it; SageMaker-style user functions
never do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from smchainer.content import MediaTypes
    from smchainer.context import ServingContext
    from smchainer.training.env import TrainingEnv

PROJECT_NAME = "smchainer"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: The serving hooks, in the order a request meets them.
SERVING_HOOKS = ("model_fn", "input_fn", "batch_fn", "predict_fn", "output_fn", "transform_fn")
#: Every hook name a user module may define, serving and training.
HOOK_NAMES = SERVING_HOOKS + ("train",)
#: And the hooks only installed plugins implement.
PLUGIN_HOOKS = HOOK_NAMES + ("media_types",)


@hookspec(firstresult=True)
def model_fn(model_dir: str, context: ServingContext) -> Any | None:
    """Load the model that the server will use.

    Called once per server worker, when the worker starts and before it
    answers ``/ping`` with 200. The built-in default loads a model saved by
    smchainer's own trainer (``model.npz`` with its ``smchainer-model.json``)
    and otherwise raises an error that asks the user for a ``model_fn``.

    Stops at the first non-None result.

    :param model_dir: directory holding the model artifacts (the extracted
        ``model.tar.gz``).
    :param context: the model's context; its ``model`` is None until a
        ``model_fn`` answers (a ``wrapper=True`` implementation sees the
        answer and may keep what it learns in ``context.shared``).
    :return: the model object passed to :func:`predict_fn` and
        :func:`transform_fn`, usually a :class:`chainer.Link`.
    """


@hookspec(firstresult=True)
def input_fn(input_data: bytes, content_type: str, context: ServingContext) -> Any | None:
    """Decode a request body into the input of :func:`predict_fn`.

    Called once per ``/invocations`` request. The default decodes
    ``application/x-npy`` (never unpickling), ``application/json`` (float32)
    and ``text/csv`` (a 2-D float32 array; one row keeps its batch dimension),
    and raises :class:`smchainer.errors.UnsupportedMediaType` (415) for
    other types. A plugin that does not handle ``content_type`` returns None.

    Stops at the first non-None result.

    :param input_data: the raw request body.
    :param content_type: the media type, lower-cased, without parameters
        (``text/csv; charset=utf-8`` arrives as ``text/csv``).
    :param context: this request's context.
    :return: the decoded input, usually a :class:`numpy.ndarray`.
    """


@hookspec(firstresult=True)
def batch_fn(input_data: Any, model: Any, context: ServingContext) -> Any | None:
    """Say that a request may share one :func:`predict_fn` call with others.

    With dynamic batching on (``smchainer-serve --max-batch-size N``, N > 1),
    requests that wait for the model together are merged: each decoded input
    is given to this hook, and the arrays it returns (one row per item along
    the first axis) are concatenated into one ``predict_fn`` call, whose
    prediction is then cut back into each request's rows (an array, or any
    object that slices along its first axis to the total length, such as the
    built-in VGG's classification) for its own :func:`output_fn`.

    Returning None keeps this request to a call of its own, as without
    batching. An error raised here is this request's answer alone (the
    built-in VGG checks its images here, so one bad request fails by
    itself). A plugin or user module that defines ``input_fn`` or
    ``predict_fn`` but not this hook turns batching off for the server: its
    functions never meet a merged batch unless it says they may. The
    built-in VGG (plain, fused and ONNX) answers for its models; a user's
    ``predict_fn`` that runs any batch along the first axis opts in with
    ``def batch_fn(input_data, model): return input_data``.

    Stops at the first non-None result.

    :param input_data: what :func:`input_fn` returned for this request.
    :param model: what :func:`model_fn` returned.
    :param context: this request's context.
    :return: an array with the request's items along its first axis, or None.
    """


@hookspec(firstresult=True)
def predict_fn(input_data: Any, model: Any, context: ServingContext) -> Any | None:
    """Run the model on decoded input.

    The default calls ``model(input_data)`` in Chainer's evaluation mode
    (``train=False``, no backprop graph) on the model's device and returns a
    NumPy array, moving it off the GPU if needed.

    Stops at the first non-None result.

    :param input_data: what :func:`input_fn` returned.
    :param model: what :func:`model_fn` returned.
    :param context: this request's context.
    :return: the prediction passed to :func:`output_fn`.
    """


@hookspec(firstresult=True)
def output_fn(prediction: Any, accept: str, context: ServingContext) -> Any | None:
    """Encode a prediction as the response body.

    The default encodes NumPy-compatible predictions as ``application/json``,
    ``application/x-npy`` or ``text/csv`` and raises
    :class:`smchainer.errors.NotAcceptable` (406) for other types; the server
    then tries the client's next acceptable type.

    Stops at the first non-None result.

    :param prediction: what :func:`predict_fn` returned.
    :param accept: one media type the client accepts. The server resolves
        q-values and ``*/*`` before calling, and tries a ``type/*`` range as
        each registered type it covers first (see ``media_types``), then as
        the range itself, for an implementation that answers ranges.
    :param context: this request's context.
    :return: the body as ``bytes`` or ``str`` (sent as ``accept``), or a
        ``(body, content_type)`` pair.
    """


@hookspec(firstresult=True)
def transform_fn(
    model: Any, input_data: bytes, content_type: str, accept: str, context: ServingContext
) -> Any | None:
    """Handle a whole request in one function, replacing the other three.

    When an implementation returns non-None, :func:`input_fn`,
    :func:`predict_fn` and :func:`output_fn` are not called. There is no
    default: without one, the server runs the three hooks in turn. A user
    module that defines both ``transform_fn`` and any of the three is refused.

    Stops at the first non-None result.

    :param model: what :func:`model_fn` returned.
    :param input_data: the raw request body.
    :param content_type: the request's media type, without parameters.
    :param accept: one media type the client accepts, as for :func:`output_fn`.
    :param context: this request's context.
    :return: as for :func:`output_fn`.
    """


@hookspec
def media_types() -> MediaTypes | None:
    """Say which media types this plugin decodes and encodes.

    Every implementation is called (not only the first), and the server
    merges their answers: a client's ``type/*`` Accept range is tried as
    each registered type it covers, and 415 / 406 errors list everything
    the plugins can read or write. A plugin that adds types returns a
    :class:`smchainer.content.MediaTypes`; the built-in NumPy codecs
    declare ``application/json``, ``application/x-npy`` and ``text/csv``.
    SageMaker-style user modules do not declare any.

    :return: the plugin's types, or None.
    """


@hookspec(firstresult=True)
def train(env: TrainingEnv) -> Any | None:
    """Run a training job when no entry-point script is given.

    Called by ``smchainer-train`` on every rank after the job directory,
    channels and configuration files are in place. The built-in default
    trains the Chainer CIFAR-10 VGG network on the ``train`` (and optional
    ``test``) channel.

    Stops at the first non-None result.

    :param env: the job: directories, channels, hyperparameters, hosts,
        rank and device (:class:`smchainer.training.env.TrainingEnv`).
    :return: anything non-None (for example a dict of final metrics) to say
        the job was handled.
    """
