"""Response bodies for :class:`~smchainer.api.predictor.Predictor`, as the SageMaker SDK names them.

A deserializer has ``ACCEPT`` (the types asked for, best first) and
``deserialize(stream, content_type)``; any object with both works.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from typing import IO, Any

import numpy as np

from smchainer import content


class NumpyDeserializer:
    """A NumPy array from an ``.npy``, JSON or CSV answer (``.npy`` asked for first).

    :param dtype: the dtype of arrays read from JSON or CSV (default: as parsed).
    """

    def __init__(self, dtype: Any = None, accept: str = content.NPY) -> None:
        self.dtype = dtype
        self.ACCEPT = (accept,)

    def deserialize(self, stream: IO[bytes], content_type: str) -> np.ndarray:
        body = stream.read()
        kind = content.media_type(content_type)
        if kind == content.NPY:
            return np.load(io.BytesIO(body), allow_pickle=False)
        if kind == content.JSON:
            return np.asarray(json.loads(body), dtype=self.dtype)
        if kind == content.CSV:
            return np.loadtxt(io.StringIO(body.decode()), delimiter=",", ndmin=2,
                              dtype=self.dtype or float)
        raise ValueError(f"NumpyDeserializer cannot read a {content_type!r} answer")


class JSONDeserializer:
    """The decoded JSON value (lists, dicts, numbers)."""

    ACCEPT = (content.JSON,)

    def deserialize(self, stream: IO[bytes], content_type: str) -> Any:
        return json.load(codecs.getreader("utf-8")(stream))


class CSVDeserializer:
    """A list of rows, each a list of strings (as the SDK returns them)."""

    ACCEPT = (content.CSV,)

    def deserialize(self, stream: IO[bytes], content_type: str) -> list[list[str]]:
        return list(csv.reader(io.StringIO(stream.read().decode())))


class BytesDeserializer:
    """The answer's bytes, unchanged."""

    ACCEPT = ("*/*",)

    def deserialize(self, stream: IO[bytes], content_type: str) -> bytes:
        return stream.read()
