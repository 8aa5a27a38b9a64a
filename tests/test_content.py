"""Media-type parsing and the NumPy codecs (docs/CONTRACT.md, serving defaults)."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest

from smchainer import content
from smchainer.errors import BadRequest, NotAcceptable, UnsupportedMediaType


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("text/csv; charset=utf-8", "text/csv"),
        ("Application/X-NPY", "application/x-npy"),
        (None, "application/json"),
        ("  ", "application/json"),
    ],
)
def test_media_type_drops_parameters(header, expected) -> None:
    assert content.media_type(header) == expected


def test_accept_orders_by_quality_then_position() -> None:
    header = "text/csv;q=0.5, application/x-npy, application/json;q=0.9, text/html;q=0"
    assert content.parse_accept(header, "application/json") == [
        "application/x-npy", "application/json", "text/csv", "text/html"
    ][:3]


@pytest.mark.parametrize("header", [None, "", "*/*"])
def test_accept_wildcard_or_missing_means_the_default(header) -> None:
    assert content.parse_accept(header, "text/csv") == ["text/csv"]


def test_accept_that_refuses_everything() -> None:
    with pytest.raises(NotAcceptable):
        content.parse_accept("application/json;q=0", "application/json")


@pytest.mark.parametrize(("header", "expected"), [
    # The most specific range decides, whatever its q (RFC 9110, 12.5.1).
    ("text/*;q=0.3, text/csv;q=0, application/json;q=0.1", ["application/json"]),
    ("text/*;q=0.3, application/json;q=0.5", ["application/json", "text/csv"]),
    ("*/*;q=0.1, text/csv", ["text/csv", "application/json", "application/x-npy"]),
    # A quoted comma is one parameter, not a second range; parameters other than q are ignored.
    ('application/json;a="x,y", text/csv;q=0.5', ["application/json", "text/csv"]),
    ("application/json; charset=utf-8", ["application/json"]),
    # Equal q: the more specific range, then the header's order.
    ("application/x-npy, text/csv, application/json",
     ["application/x-npy", "text/csv", "application/json"]),
    # A type no encoder declared is still passed on (a plugin's output_fn may answer it).
    ("image/png, application/json;q=0.5", ["application/json", "image/png"]),
    # No valid range at all (q out of range): as if there were no header.
    ("text/csv;q=2", ["application/json"]),
    (None, ["application/json"]),
])
def test_acceptable_types_follow_rfc_9110(header, expected) -> None:
    assert content.acceptable_types(header, content.JSON) == expected


@pytest.mark.parametrize(("header", "message"), [
    ("text/*;q=0.3, text/csv;q=0", "accepts none of the supported types"),
    ("application/json;q=0, */*;q=0", "accepts nothing"),
])
def test_excluded_types_are_not_acceptable(header, message) -> None:
    with pytest.raises(NotAcceptable, match=message) as refused:
        content.acceptable_types(header, content.JSON)
    assert "supported: application/json, application/x-npy, text/csv" in str(refused.value)


def test_npy_round_trip_keeps_dtype_and_shape() -> None:
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    body, kind = content.encode(array, "application/x-npy")
    assert kind == "application/x-npy"
    decoded = content.decode(body, "application/x-npy")
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, array)


def test_pickled_npy_is_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadRequest, match="pickled"):
        content.decode(buffer.getvalue(), "application/x-npy")


def test_json_is_float32_and_instances_are_accepted() -> None:
    assert content.decode(b"[[1, 2], [3, 4]]", "application/json").dtype == np.float32
    decoded = content.decode(b'{"instances": [[1, 2]]}', "application/json")
    np.testing.assert_array_equal(decoded, [[1, 2]])


@pytest.mark.parametrize("body", [b"[[1, 2], [3]]", b'["a", "b"]', b"{", b'{"x": 1}'])
def test_bad_json_is_a_400(body) -> None:
    with pytest.raises(BadRequest):
        content.decode(body, "application/json")


def test_single_csv_row_keeps_its_batch_dimension() -> None:
    decoded = content.decode(b"1,2,3\n", "text/csv")
    assert decoded.shape == (1, 3)
    assert content.decode(b"1,2\n3,4\n", "text/csv").shape == (2, 2)


@pytest.mark.parametrize("body", [b"1,2\n3\n", b"a,b\n", b"\n"])
def test_bad_csv_is_a_400(body) -> None:
    with pytest.raises(BadRequest):
        content.decode(body, "text/csv")


def test_unknown_content_type_is_a_415_naming_the_supported_ones() -> None:
    with pytest.raises(UnsupportedMediaType, match="application/x-npy"):
        content.decode(b"x", "application/xml")


def test_encoders() -> None:
    prediction = np.array([[0.5, 1.5]], dtype=np.float32)
    assert json.loads(content.encode(prediction, "application/json")[0]) == [[0.5, 1.5]]
    assert content.encode(prediction, "text/csv")[0] == b"0.5,1.5\n"
    assert content.encode(prediction, "application/*")[1] == "application/json"
    with pytest.raises(NotAcceptable, match="text/csv"):
        content.encode(prediction, "image/png")


NPY_LAYOUTS = [
    np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
    np.arange(12).reshape(3, 4).T,  # Fortran-ordered view
    np.asfortranarray(np.linspace(0, 1, 20).reshape(4, 5)),
    np.linspace(0, 1, 25).reshape(5, 5)[::2],  # neither C nor Fortran contiguous
    np.array(3.5),
    np.zeros((0, 3), dtype=np.uint8),
    np.array(["x\u00e9", "y"]),
    np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
    np.arange(6, dtype=">f4"),
    np.zeros(2, dtype=[("\u00e9\u540d", "<i4")]),  # a header only format 3.0 can hold
]


@pytest.mark.parametrize("array", NPY_LAYOUTS, ids=lambda a: f"{a.dtype}-{a.shape}")
def test_npy_answers_are_the_bytes_numpy_save_writes(array) -> None:
    with warnings.catch_warnings():  # NumPy says when it needs format 3.0
        warnings.simplefilter("ignore", UserWarning)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        assert content.encode_npy(array) == buffer.getvalue()
        assert content.encode_npy(array) == buffer.getvalue()  # the cached header, again


@pytest.mark.parametrize("array", NPY_LAYOUTS, ids=lambda a: f"{a.dtype}-{a.shape}")
def test_npy_bodies_decode_as_numpy_load_reads_them(array) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # NumPy says when it needs format 3.0
        warnings.simplefilter("ignore", UserWarning)
        np.save(buffer, array, allow_pickle=False)
    for _ in range(2):  # parsed, then from the header cache
        decoded = content.decode_npy(buffer.getvalue())
        expected = np.load(io.BytesIO(buffer.getvalue()), allow_pickle=False)
        assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
        np.testing.assert_array_equal(decoded, expected)
        assert decoded.flags.writeable


def npy_v3(header: bytes) -> bytes:
    padded = header + b" " * (-(12 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x03\x00" + len(padded).to_bytes(4, "little") + padded


def test_npy_format_3_headers_are_read_as_utf8_and_malformed_ones_refused() -> None:
    name = "\u540d\u524d"
    header = "{'descr': [('" + name + "', '<f4')], 'fortran_order': False, 'shape': (2,), }"
    decoded = content.decode_npy(npy_v3(header.encode()) + bytes(8))
    assert decoded.dtype.names == (name,) and decoded.shape == (2,)
    with pytest.raises(BadRequest, match="not UTF-8"):
        content.decode_npy(npy_v3(header.encode().replace(b"\xe5", b"\xff")) + bytes(8))
    outside = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), \u540d}"
    with pytest.raises(BadRequest, match="malformed header"):  # beyond ASCII outside a string
        content.decode_npy(npy_v3(outside.encode()) + bytes(8))


@pytest.mark.parametrize("body", [b"\x93NUMPY", b"\x93NUMPY\x01"])
def test_an_npy_body_cut_short_after_its_magic_says_so(body) -> None:
    with pytest.raises(BadRequest, match="cut short"):
        content.decode_npy(body)


def test_a_cached_npy_header_still_checks_each_body_length() -> None:
    body = content.encode_npy(np.zeros((2, 3), dtype=np.float32))
    content.decode_npy(body)  # the header is cached now
    with pytest.raises(BadRequest, match="holds 20 bytes"):
        content.decode_npy(body[:-4])
    with pytest.raises(BadRequest, match="holds 28 bytes"):
        content.decode_npy(body + b"\0" * 4)


def test_encoding_objects_as_npy_is_refused() -> None:
    with pytest.raises(ValueError):
        content.encode_npy(np.array([{"a": 1}], dtype=object))
