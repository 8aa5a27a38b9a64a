"""The model contract: what ``smchainer-model.json`` beside a model's weights says.

smchainer's trainer writes this file into every model directory it saves
(see ``docs/CONTRACT.md``); plugins read it to learn what the model takes
and what its outputs mean, whatever loaded the model. Its keys:

``architecture``
    Who can rebuild the network (``smchainer.models.VGG`` for the built-in one).
``input`` (or a top-level ``input_shape``)
    ``shape`` of one input without the batch axis, ``dtype``, ``range`` of
    the values (default [0, 1]) and optional per-channel ``mean`` / ``std``
    a client applies before sending.
``class_names``
    The name of each output class, in label order.
``weights``
    The weights file, relative to the directory.

Every other key belongs to the architecture (the VGG's ``width``, ``depth``
and ``normalization``) and is read by its own loader from
:attr:`ModelContract.metadata`. This module reads the file once per model
and parses each key only when it is asked for, so a consumer fails or warns
only about the keys it uses. Nothing here imports Chainer.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

#: The file's name in a model directory.
METADATA_FILE = "smchainer-model.json"


def parse_shape(value: Any) -> tuple[int, ...] | None:
    """``value`` (a list, or text such as ``3,32,32`` / ``3x32x32``) as positive ints, or None."""
    if isinstance(value, str):
        value = [part for part in value.replace("x", ",").split(",") if part.strip()]
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        return None
    return shape if shape and all(d > 0 for d in shape) else None


class ModelContract:
    """One model directory's ``smchainer-model.json``, or its absence.

    :ivar metadata: the file's object as read (empty when there is no file).
    :ivar path: where the file is (or would be).
    :ivar present: whether the file exists.
    """

    def __init__(self, metadata: Mapping[str, Any], path: str | os.PathLike[str],
                 present: bool = True) -> None:
        self.metadata: dict[str, Any] = dict(metadata)
        self.path = Path(path)
        self.present = present

    def __repr__(self) -> str:
        return f"ModelContract({str(self.path)!r}, present={self.present})"

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("architecture")
        return None if value is None else str(value)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in label order (empty when the file names none)."""
        return tuple(str(name) for name in self.metadata.get("class_names") or ())

    @property
    def input(self) -> dict[str, Any]:
        """The ``input`` object (empty when absent or not an object)."""
        described = self.metadata.get("input")
        return described if isinstance(described, dict) else {}

    @property
    def declared_input_shape(self) -> Any:
        """The input shape as written: ``input_shape``, else ``input.shape``, else None."""
        return self.metadata.get("input_shape", self.input.get("shape"))

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """One input's shape without the batch axis; None when undeclared or malformed.

        A malformed shape is logged as a warning, naming the file.
        """
        declared = self.declared_input_shape
        if declared is None:
            return None
        shape = parse_shape(declared)
        if shape is None:
            logger.warning("%s: input_shape %r is not a list of positive integers",
                           self.path, declared)
        return shape

    def weights_path(self, default: str) -> Path:
        """The weights file the contract names, else ``default``, in the model directory."""
        return self.path.parent / str(self.metadata.get("weights", default))


def read_contract(model_dir: str | os.PathLike[str]) -> ModelContract:
    """The contract of ``model_dir``; ``present`` is False when it has no metadata file.

    :raises SmchainerError: for a file that cannot be read, is not JSON or
        does not hold an object.
    """
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return ModelContract({}, path, present=False)
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SmchainerError(f"cannot read {path}: {error}") from None
    if not isinstance(metadata, dict):
        raise SmchainerError(f"{path} holds {type(metadata).__name__}, not an object")
    return ModelContract(metadata, path)


def write_contract(model_dir: str | os.PathLike[str], metadata: Mapping[str, Any]) -> Path:
    """Write ``metadata`` as ``model_dir``'s ``smchainer-model.json``; return its path."""
    path = Path(model_dir) / METADATA_FILE
    path.write_text(json.dumps(dict(metadata), indent=2) + "\n")
    return path
