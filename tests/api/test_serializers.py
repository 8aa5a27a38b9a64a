"""The request and response formats of the predictor, as the SDK names them."""
from __future__ import annotations

import io

import numpy as np
import pytest

from smchainer.api import deserializers, serializers


def test_numpy_round_trip_keeps_shape_and_dtype():
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    body = serializers.NumpySerializer().serialize(data)
    back = deserializers.NumpyDeserializer().deserialize(io.BytesIO(body), "application/x-npy")
    assert back.dtype == np.float32 and np.array_equal(back, data)
    as_f64 = serializers.NumpySerializer(dtype="float64").serialize([[1, 2]])
    assert np.load(io.BytesIO(as_f64)).dtype == np.float64


def test_numpy_serializer_refuses_object_arrays():
    with pytest.raises(ValueError, match="pickle"):
        serializers.NumpySerializer().serialize(np.array([{"a": 1}], dtype=object))


def test_json_and_csv():
    assert serializers.JSONSerializer().serialize(np.array([[1.5, 2]])) == b"[[1.5, 2.0]]"
    assert serializers.JSONSerializer().serialize({"instances": [1]}) == b'{"instances": [1]}'
    assert serializers.CSVSerializer().serialize(np.array([1, 2.5])) == b"1,2.5\n"
    assert serializers.CSVSerializer().serialize([[1, 2], [3, 4]]) == b"1,2\n3,4\n"
    rows = deserializers.CSVDeserializer().deserialize(io.BytesIO(b"1,2\n3,4\n"), "text/csv")
    assert rows == [["1", "2"], ["3", "4"]]
    parsed = deserializers.JSONDeserializer().deserialize(io.BytesIO(b'{"a": [1]}'),
                                                          "application/json")
    assert parsed == {"a": [1]}
    numpy_csv = deserializers.NumpyDeserializer(accept="text/csv")
    assert numpy_csv.ACCEPT == ("text/csv",)
    assert numpy_csv.deserialize(io.BytesIO(b"1,2\n"), "text/csv").shape == (1, 2)
    with pytest.raises(ValueError, match="cannot read"):
        deserializers.NumpyDeserializer().deserialize(io.BytesIO(b"x"), "image/png")


def test_identity_serializer_sends_bytes_with_its_type():
    serializer = serializers.IdentitySerializer("image/png")
    assert serializer.CONTENT_TYPE == "image/png"
    assert serializer.serialize(b"\x89PNG") == b"\x89PNG"
    with pytest.raises(TypeError):
        serializer.serialize("text")
