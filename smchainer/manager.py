"""A typed facade over the plugin manager: one method per hook.

Callers (the server, the training launcher) use :class:`Hooks` instead of
``pm.hook.<name>(...)`` so that arguments are passed by keyword in one place
and "nobody answered" becomes a clear error instead of a silent ``None``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smchainer.errors import SmchainerError

if TYPE_CHECKING:
    from smchainer.plugins import PluginManager
    from smchainer.training.env import TrainingEnv


class NoImplementation(SmchainerError):
    """No registered plugin answered a hook that needs an answer."""


class Hooks:
    """Call the smchainer hooks of one plugin manager."""

    def __init__(self, pm: PluginManager) -> None:
        self.pm = pm

    def _answer(self, name: str, **kwargs: Any) -> Any:
        result = getattr(self.pm.hook, name)(**kwargs)
        if result is None:
            raise NoImplementation(
                f"no plugin answered {name}: every implementation returned None"
            )
        return result

    def model_fn(self, model_dir: str) -> Any:
        return self._answer("model_fn", model_dir=model_dir)

    def input_fn(self, input_data: bytes, content_type: str) -> Any:
        return self._answer("input_fn", input_data=input_data, content_type=content_type)

    def predict_fn(self, input_data: Any, model: Any) -> Any:
        return self._answer("predict_fn", input_data=input_data, model=model)

    def output_fn(self, prediction: Any, accept: str) -> tuple[bytes, str]:
        answer = self._answer("output_fn", prediction=prediction, accept=accept)
        return normalize_body(answer, accept)

    def transform_fn(
        self, model: Any, input_data: bytes, content_type: str, accept: str
    ) -> tuple[bytes, str] | None:
        """The transform_fn answer, or None when no plugin defines one."""
        result = self.pm.hook.transform_fn(
            model=model, input_data=input_data, content_type=content_type, accept=accept
        )
        return None if result is None else normalize_body(result, accept)

    def transform(
        self, model: Any, input_data: bytes, content_type: str, accept: str
    ) -> tuple[bytes, str]:
        """One request: transform_fn if defined, else input -> predict -> output."""
        answered = self.transform_fn(model, input_data, content_type, accept)
        if answered is not None:
            return answered
        decoded = self.input_fn(input_data, content_type)
        prediction = self.predict_fn(decoded, model)
        return self.output_fn(prediction, accept)

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
