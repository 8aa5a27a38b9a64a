"""Request bodies for :class:`~smchainer.api.predictor.Predictor`, as the SageMaker SDK names them.

A serializer has ``CONTENT_TYPE`` and ``serialize(data) -> bytes``; any
object with both works. The NumPy codecs are :mod:`smchainer.content`'s, the
ones the server decodes with.
"""
from __future__ import annotations

from typing import Any

from smchainer import content


class NumpySerializer:
    """``application/x-npy`` (the Chainer predictor's default); never pickled.

    :param dtype: convert the data to this dtype first (for example ``"float32"``).
    """

    def __init__(self, dtype: Any = None, content_type: str = content.NPY) -> None:
        self.dtype = dtype
        self.CONTENT_TYPE = content_type

    def serialize(self, data: Any) -> bytes:
        """``data`` (an array, a list, a Chainer variable) as an ``.npy`` file's bytes."""
        array = content.to_numpy(data)
        if self.dtype is not None:
            array = array.astype(self.dtype)
        if array.dtype == object:
            raise ValueError("NumpySerializer: object arrays cannot be sent (they would need "
                             "pickle, which the server refuses)")
        return content.encode_npy(array)


class JSONSerializer:
    """``application/json``: arrays become nested lists; dicts and lists are sent as they are."""

    CONTENT_TYPE = content.JSON

    def serialize(self, data: Any) -> bytes:
        return content.encode_json(data)


class CSVSerializer:
    """``text/csv``: one line per row (a 1-D array is one row)."""

    CONTENT_TYPE = content.CSV

    def serialize(self, data: Any) -> bytes:
        if isinstance(data, str):
            return data.encode()
        array = content.to_numpy(data)
        return content.encode_csv(array.reshape(1, -1) if array.ndim < 2 else array)


class IdentitySerializer:
    """Bytes sent unchanged with the given Content-Type (an image, for instance)."""

    def __init__(self, content_type: str = "application/octet-stream") -> None:
        self.CONTENT_TYPE = content_type

    def serialize(self, data: bytes) -> bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"IdentitySerializer sends bytes, not {type(data).__name__}")
        return bytes(data)

