"""Property-based fuzzing of the request decoders: a decoded array or a 400, nothing else.

Bodies are drawn from the kinds that have broken servers: npy files with
mutated headers (huge, negative, overflowing, malformed shapes, object and
odd dtypes, truncated or padded data), JSON nested deep or holding huge
numbers, CSV of any text, and plain noise. Bounded: a fixed number of
examples per kind, derandomized, so the run takes seconds and is the same
every time.
"""
from __future__ import annotations

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smchainer import content
from smchainer.errors import BadRequest

FUZZ = settings(max_examples=300, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

dimension = st.one_of(st.integers(0, 8), st.integers(-3, -1), st.integers(2**31, 2**65),
                      st.just(10**10))
shapes = st.lists(dimension, max_size=4).map(tuple)
descrs = st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|O", "<U3", "|V4", "<c8", "S2", "?",
                          "<M8[s]", "bogus"])


def npy_header(descr: str, shape: tuple, fortran: bool) -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin-1")


@st.composite
def npy_bodies(draw) -> bytes:
    header = npy_header(draw(descrs), draw(shapes), draw(st.booleans()))
    if draw(st.booleans()):  # a header cut, bent or rewritten by hand
        cut = draw(st.integers(0, len(header)))
        header = header[:cut] + draw(st.binary(max_size=16)) + header[cut:]
    return header + draw(st.binary(max_size=256))


def nested(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


json_bodies = st.one_of(
    st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.integers(),
                           st.text(max_size=5)),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                     st.text(max_size=3), inner, max_size=3),
                 max_leaves=20).map(lambda value: json.dumps(value).encode()),
    st.builds(nested, st.integers(0, 5000), st.sampled_from(["1", "", "1e400", "9" * 400,
                                                              "NaN", "-Infinity", '"x"'])
              ).map(str.encode),
    st.binary(max_size=64),
)


def valid_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def decodes_or_refuses(body: bytes, content_type: str) -> None:
    try:
        result = content.decode(body, content_type)
    except BadRequest as refusal:
        assert str(refusal)  # says why
    else:
        assert isinstance(result, np.ndarray)


@FUZZ
@given(npy_bodies())
def test_npy_bodies_decode_or_are_400s(body) -> None:
    decodes_or_refuses(body, content.NPY)


@FUZZ
@given(st.binary(max_size=512))
def test_noise_as_npy_is_a_400(body) -> None:
    decodes_or_refuses(body, content.NPY)


@FUZZ
@given(json_bodies)
def test_json_bodies_decode_or_are_400s(body) -> None:
    decodes_or_refuses(body, content.JSON)


@FUZZ
@given(st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200)))
def test_csv_bodies_decode_or_are_400s(body) -> None:
    decodes_or_refuses(body, content.CSV)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
       st.sampled_from([np.float32, np.float64, np.uint8, np.int64, np.bool_]),
       st.booleans())
def test_every_valid_npy_decodes_to_itself(shape, dtype, fortran) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.int64).astype(dtype).reshape(shape)
    if fortran:
        array = np.asfortranarray(array)
    decoded = content.decode(valid_npy(array), content.NPY)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable
