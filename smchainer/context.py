"""What a serving hook may know beyond SageMaker's arguments: its model and its request.

Every serving hook's spec has a ``context`` argument. pluggy passes an
implementation only the arguments it names, so SageMaker-style functions
(``def input_fn(input_data, content_type)``) never see it, and a plugin that
needs its model's metadata or a place to keep per-request state names it::

    @smchainer.hookimpl
    def input_fn(input_data, content_type, context):
        shape = context.contract.input_shape
        context.request["decoded"] = ...

One :class:`ServingContext` is made per loaded model (``model_fn`` gets it)
and one per request from it (:meth:`ServingContext.for_request`): the model,
its directory, its contract and :attr:`~ServingContext.shared` are the
model's; :attr:`~ServingContext.request` is the request's alone.
"""
from __future__ import annotations

import time
from typing import Any

from smchainer.content import NUMPY_MEDIA_TYPES, MediaTypes
from smchainer.errors import RequestTimeout
from smchainer.model_contract import ModelContract, read_contract


class ServingContext:
    """The model a hook serves and the request it is part of.

    :ivar model_dir: the model directory ``model_fn`` was given (None for a
        model the server did not load itself).
    :ivar model: what ``model_fn`` returned (None while it runs).
    :ivar shared: state plugins keep for this model across requests, one
        key per plugin (its name, by convention).
    :ivar request: state of this request only, handed from hook to hook
        (empty in ``model_fn``).
    :ivar media_types: what the registered plugins decode and encode
        (the ``media_types`` hook's answers, merged), for messages that name
        what is supported.
    :ivar deadline: when this request's time runs out (:func:`time.monotonic`),
        or None; see :meth:`check_deadline`.
    """

    def __init__(self, model_dir: str | None, model: Any = None,
                 shared: dict[str, Any] | None = None,
                 media_types: MediaTypes = NUMPY_MEDIA_TYPES) -> None:
        self.model_dir = model_dir
        self.model = model
        self.media_types = media_types
        self._contract: ModelContract | None = None
        self.shared: dict[str, Any] = {} if shared is None else shared
        self.request: dict[str, Any] = {}
        self.deadline: float | None = None
        self._parent: ServingContext | None = None

    @property
    def contract(self) -> ModelContract:
        """The model directory's ``smchainer-model.json``, read on first use.

        :raises SmchainerError: when the file exists but cannot be read
            (each access raises again, so every consumer says why).
        """
        if self._parent is not None:
            return self._parent.contract
        if self._contract is None:
            if self.model_dir is None:
                self._contract = ModelContract({}, "", present=False)
            else:
                self._contract = read_contract(self.model_dir)
        return self._contract

    def check_deadline(self, doing: str = "") -> None:
        """Stop here if this request's time has run out.

        The server has answered such a request with 504 already; a hook that
        works in steps (images of a batch, batches of a large input) calls
        this between them, so the worker gives up the abandoned work and
        serves the next request instead of finishing it for nobody.

        :raises RequestTimeout: once :attr:`deadline` has passed.
        """
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestTimeout(
                "the request's time ran out" + (f" while {doing}" if doing else "")
                + "; its work was abandoned")

    def for_request(self) -> ServingContext:
        """A context for one request: this model's, with a fresh :attr:`request`."""
        context = ServingContext(self.model_dir, self.model, shared=self.shared,
                                 media_types=self.media_types)
        context._parent = self._parent or self
        return context

    def __repr__(self) -> str:
        return f"ServingContext(model_dir={self.model_dir!r}, model={type(self.model).__name__})"
