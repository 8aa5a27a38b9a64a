"""A typed facade over the plugin manager: one method per hook, and the request pipeline.

Callers (the server, the training launcher, tests) use :class:`Hooks` instead
of ``pm.hook.<name>(...)`` so that arguments are passed by keyword in one
place, every serving hook gets its :class:`~smchainer.context.ServingContext`,
and "nobody answered" becomes a clear error instead of a silent ``None``.
:meth:`Hooks.transform` is the one path a request takes through the hooks,
for the server and for everyone else.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from smchainer import content
from smchainer.context import ServingContext
from smchainer.errors import NotAcceptable, SmchainerError

if TYPE_CHECKING:
    from smchainer.plugins import PluginManager
    from smchainer.training.env import TrainingEnv


class NoImplementation(SmchainerError):
    """No registered plugin answered a hook that needs an answer."""


class Hooks:
    """Call the smchainer hooks of one plugin manager.

    The contexts of the models its :meth:`model_fn` loaded are kept (the
    last few), so a request for one of them carries that model's context.
    """

    #: How many loaded models keep their context (a server worker loads one).
    KEPT_CONTEXTS = 8

    def __init__(self, pm: PluginManager) -> None:
        self.pm = pm
        self._contexts: OrderedDict[int, ServingContext] = OrderedDict()
        self._media_types: content.MediaTypes | None = None

    def _answer(self, name: str, **kwargs: Any) -> Any:
        result = getattr(self.pm.hook, name)(**kwargs)
        if result is None:
            raise NoImplementation(
                f"no plugin answered {name}: every implementation returned None"
            )
        return result

    def implements(self, name: str) -> bool:
        """Whether any registered plugin implements the hook ``name``."""
        return bool(getattr(self.pm.hook, name).get_hookimpls())

    def media_types(self) -> content.MediaTypes:
        """What the registered plugins decode and encode (the ``media_types`` hook, merged).

        In registration order (pluggy answers from the last registered), so
        the built-in NumPy types keep their place first in ``type/*``.
        """
        if self._media_types is None:
            answers = [t for t in self.pm.hook.media_types() if t is not None]
            self._media_types = content.MediaTypes.merged(reversed(answers))
        return self._media_types

    # -- contexts ------------------------------------------------------------

    def new_context(self, model_dir: str | None, model: Any = None) -> ServingContext:
        """A model's context, knowing what the registered plugins support."""
        return ServingContext(model_dir, model, media_types=self.media_types())

    def context_of(self, model: Any) -> ServingContext:
        """The context :meth:`model_fn` made for ``model``, else a bare one (no directory)."""
        context = self._contexts.get(id(model))
        if context is not None and context.model is model:
            return context
        return self.new_context(None, model)

    def request_context(self, model: Any) -> ServingContext:
        """A fresh context for one request to ``model``."""
        return self.context_of(model).for_request()

    # -- the hooks -----------------------------------------------------------

    def model_fn(self, model_dir: str) -> Any:
        context = self.new_context(model_dir)
        model = self._answer("model_fn", model_dir=model_dir, context=context)
        context.model = model
        self._contexts[id(model)] = context
        self._contexts.move_to_end(id(model))
        while len(self._contexts) > self.KEPT_CONTEXTS:
            self._contexts.popitem(last=False)
        return model

    def input_fn(self, input_data: bytes, content_type: str,
                 context: ServingContext | None = None) -> Any:
        context = context if context is not None else self.new_context(None)
        return self._answer("input_fn", input_data=input_data, content_type=content_type,
                            context=context)

    def batch_fn(self, input_data: Any, model: Any, context: ServingContext) -> Any:
        """The request's input as a batch that may be merged with others, or None."""
        return self.pm.hook.batch_fn(input_data=input_data, model=model, context=context)

    def batching_refusal(self) -> str | None:
        """Why requests may never be merged (a sentence), or None when they may.

        Merging is for plugins that said so: any plugin (a user module, an
        installed package) with ``input_fn`` or ``predict_fn`` but no
        ``batch_fn`` refuses it, and so does any ``transform_fn``, since
        either could see a merged batch it never expected. The built-in
        defaults answer last and say for themselves (``batch_fn``).
        """
        if self.implements("transform_fn"):
            names = sorted({i.plugin_name for i in self.pm.hook.transform_fn.get_hookimpls()})
            return f"{', '.join(names)} defines transform_fn"
        vouching = {i.plugin_name for i in self.pm.hook.batch_fn.get_hookimpls()}
        for hook in ("input_fn", "predict_fn"):
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                source = getattr(self.pm, "sources", {}).get(impl.plugin_name)
                if getattr(source, "kind", None) == "default" or impl.plugin_name in vouching:
                    continue
                return (f"{impl.plugin_name} defines {hook} but not batch_fn, which would say "
                        "that it may be given several requests at once")
        if not vouching:
            return "no plugin defines batch_fn"
        return None

    def predict_fn(self, input_data: Any, model: Any,
                   context: ServingContext | None = None) -> Any:
        context = context if context is not None else self.request_context(model)
        return self._answer("predict_fn", input_data=input_data, model=model, context=context)

    def output_fn(self, prediction: Any, accept: str,
                  context: ServingContext | None = None) -> tuple[bytes, str]:
        context = context if context is not None else self.new_context(None)
        answer = self._answer("output_fn", prediction=prediction, accept=accept, context=context)
        return normalize_body(answer, accept)

    def transform_fn(
        self, model: Any, input_data: bytes, content_type: str, accept: str,
        context: ServingContext | None = None,
    ) -> tuple[bytes, str] | None:
        """The transform_fn answer, or None when no plugin defines one."""
        context = context if context is not None else self.request_context(model)
        result = self.pm.hook.transform_fn(
            model=model, input_data=input_data, content_type=content_type, accept=accept,
            context=context,
        )
        return None if result is None else normalize_body(result, accept)

    def transform(
        self, model: Any, input_data: bytes, content_type: str, accept: str | Sequence[str],
        context: ServingContext | None = None, deadline: float | None = None,
    ) -> tuple[bytes, str]:
        """One request through the hooks; the body and its media type.

        ``transform_fn`` when a plugin defines one, else ``input_fn`` ->
        ``predict_fn`` -> ``output_fn``. ``accept`` is one media type or the
        client's acceptable ones, best first (see
        :func:`smchainer.content.acceptable_types`): each is tried in turn
        until an output hook does not refuse it with
        :class:`~smchainer.errors.NotAcceptable`. With a ``deadline``
        (:func:`time.monotonic`), the request stops between hooks once it
        passes, and hooks may stop sooner (``context.check_deadline``).
        """
        accepts = [accept] if isinstance(accept, str) else list(accept)
        context = context if context is not None else self.request_context(model)
        if deadline is not None:
            context.deadline = deadline
        refused: list[str] = []
        if self.implements("transform_fn"):
            for media_type in accepts:
                try:
                    answered = self.transform_fn(model, input_data, content_type, media_type,
                                                 context)
                except NotAcceptable as error:
                    refused.append(str(error))
                    continue
                if answered is None:
                    break
                return answered
        if refused:
            raise self.not_acceptable(accepts, refused)
        context.check_deadline("waiting for the model")
        decoded = self.input_fn(input_data, content_type, context)
        context.check_deadline("decoding the request")
        prediction = self.predict_fn(decoded, model, context)
        context.check_deadline("predicting")
        return self.encode(prediction, accepts, context)

    def encode(self, prediction: Any, accepts: Sequence[str],
               context: ServingContext) -> tuple[bytes, str]:
        """``output_fn`` for the first of ``accepts`` that it does not refuse (406)."""
        refused: list[str] = []
        for media_type in accepts:
            try:
                return self.output_fn(prediction, media_type, context)
            except NotAcceptable as error:
                refused.append(str(error))
        raise self.not_acceptable(accepts, refused)

    def not_acceptable(self, accepts: Sequence[str], refused: list[str]) -> NotAcceptable:
        supported = ", ".join(self.media_types().encodes) or "none declared"
        return NotAcceptable(
            f"no acceptable response type: Accept asks for {', '.join(accepts)}; "
            + (refused[-1] if refused else f"supported: {supported}")
        )

    def train(self, env: TrainingEnv) -> Any:
        return self._answer("train", env=env)


def normalize_body(result: Any, accept: str) -> tuple[bytes, str]:
    """An output hook's answer as ``(bytes, content_type)``."""
    if isinstance(result, tuple) and len(result) == 2:
        body, content_type = result
    else:
        body, content_type = result, accept
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise SmchainerError(
            f"output hook returned {type(body).__name__}, expected bytes, str or (body, type)"
        )
    return bytes(body), str(content_type)
