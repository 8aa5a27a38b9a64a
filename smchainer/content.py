"""Media types: parsing Content-Type and Accept, and the NumPy codecs.

The one place that knows what ``application/x-npy``, ``application/json`` and
``text/csv`` bodies look like, both ways. Decoding errors are
:class:`~smchainer.errors.BadRequest` (400), unknown types
:class:`~smchainer.errors.UnsupportedMediaType` (415) or
:class:`~smchainer.errors.NotAcceptable` (406).
"""
from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from smchainer.errors import BadRequest, NotAcceptable, UnsupportedMediaType

NPY = "application/x-npy"
JSON = "application/json"
CSV = "text/csv"
#: Types the default codecs read and write, the preferred first.
NUMPY_TYPES = (JSON, NPY, CSV)
DEFAULT_CONTENT_TYPE = JSON


@dataclass(frozen=True)
class MediaTypes:
    """The media types a plugin decodes (request bodies) and encodes (responses).

    What the ``media_types`` hook returns; the server gathers every
    plugin's to expand ``type/*`` ranges and to name what is supported in
    its 415 and 406 messages.
    """

    decodes: tuple[str, ...] = ()
    encodes: tuple[str, ...] = ()

    @classmethod
    def merged(cls, parts: Iterable[MediaTypes]) -> MediaTypes:
        """All of ``parts``' types, each once, in the order given."""
        decodes: dict[str, None] = {}
        encodes: dict[str, None] = {}
        for part in parts:
            decodes.update(dict.fromkeys(part.decodes))
            encodes.update(dict.fromkeys(part.encodes))
        return cls(tuple(decodes), tuple(encodes))


#: What the built-in NumPy codecs read and write.
NUMPY_MEDIA_TYPES = MediaTypes(NUMPY_TYPES, NUMPY_TYPES)


def media_type(header: str | None, default: str = DEFAULT_CONTENT_TYPE) -> str:
    """The bare media type of a Content-Type header, lower-cased.

    Parameters such as ``; charset=utf-8`` are dropped; a missing or empty
    header gives ``default``.
    """
    if not header or not header.strip():
        return default
    return header.split(";", 1)[0].strip().lower()


def accept_ranges(header: str) -> list[tuple[str, float]]:
    """The ``(media range, q)`` pairs of an Accept header, as werkzeug parses them.

    werkzeug reads what a hand-split would get wrong (quoted parameters with
    commas, ``q`` outside [0, 1] or not a number: that range is left out); the
    order is werkzeug's (q, then specificity, then the header's). Parameters
    other than ``q`` are dropped and types lower-cased: the types served here
    carry none, so ``application/json; charset=utf-8`` accepts JSON.
    """
    from werkzeug.datastructures import MIMEAccept
    from werkzeug.http import parse_accept_header

    return [(value.split(";", 1)[0].strip().lower(), float(quality))
            for value, quality in parse_accept_header(header, MIMEAccept)]


def parse_accept(header: str | None, default: str) -> list[str]:
    """Media ranges of an Accept header, the most preferred first.

    q-values order the list and ``q=0`` ranges are dropped. ``*/*``, a
    missing header and one with no valid range stand for ``default``. Ranges
    such as ``application/*`` are kept. Raises :class:`NotAcceptable` when
    every range has ``q=0``.
    """
    if not header or not header.strip():
        return [default]
    ranges = accept_ranges(header)
    if not ranges:
        return [default]
    if all(quality == 0 for _, quality in ranges):
        raise NotAcceptable(f"Accept header {header!r} accepts nothing")
    result = [default if kind == "*/*" else kind for kind, quality in ranges if quality > 0]
    return list(dict.fromkeys(result))


def _precedence(media_type: str, ranges: list[tuple[str, float]]) -> tuple[float, int, int] | None:
    """``(q, specificity, position)`` of the most specific range covering ``media_type``.

    RFC 9110, 12.5.1: ``type/subtype`` over ``type/*`` over ``*/*``, whatever
    their q; so ``text/*;q=0.3, text/csv;q=0`` excludes CSV.
    """
    best: tuple[int, int, float] | None = None
    for position, (kind, quality) in enumerate(ranges):
        if kind == media_type:
            rank = 0
        elif kind.endswith("/*") and kind != "*/*" and media_type.startswith(kind[:-1]):
            rank = 1
        elif kind == "*/*":
            rank = 2
        else:
            continue
        if best is None or (rank, position) < best[:2]:
            best = (rank, position, quality)
    if best is None:
        return None
    return best[2], best[0], best[1]


def acceptable_types(header: str | None, default: str,
                     supported: Sequence[str] = NUMPY_TYPES) -> list[str]:
    """What a client accepts, best first, for the output hooks to try in turn.

    The ``supported`` types (the registered encoders', ``default`` first) the
    header accepts, each at the q of the most specific range that covers it
    (:func:`_precedence`), best q first; then the header's other concrete
    types, for an output hook that answers a type it did not declare.
    Wildcards are resolved here, so no later step can bring back a type the
    client excluded with ``q=0``. A missing header, or one with no valid
    range, gives ``default``.

    :raises NotAcceptable: when the header accepts none of these.
    """
    if not header or not header.strip():
        return [default]
    if len(header) <= _CACHED_HEADER_LENGTH:  # clients send the same few headers over and over
        return list(_cached_acceptable_types(header, default, tuple(supported)))
    return _acceptable_types(header, default, supported)


#: Accept headers up to this long have their answer kept (a few hundred of them at most).
_CACHED_HEADER_LENGTH = 256


@functools.lru_cache(maxsize=256)
def _cached_acceptable_types(header: str, default: str,
                             supported: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_acceptable_types(header, default, supported))


def _acceptable_types(header: str, default: str, supported: Sequence[str]) -> list[str]:
    ranges = accept_ranges(header)
    if not ranges:
        return [default]
    types = list(dict.fromkeys([default, *supported]))
    ranked = []
    for index, media_type in enumerate(types):
        found = _precedence(media_type, ranges)
        if found is not None and found[0] > 0:
            ranked.append(((-found[0], found[1], found[2], index), media_type))
    candidates = [media_type for _, media_type in sorted(ranked)]
    for kind, quality in ranges:
        if quality > 0 and "*" not in kind and kind not in types:
            candidates.append(kind)
    if not candidates:
        reason = ("accepts nothing" if all(q == 0 for _, q in ranges)
                  else "accepts none of the supported types")
        raise NotAcceptable(f"Accept header {header!r} {reason}; supported: "
                            f"{', '.join(dict.fromkeys(supported))}")
    return candidates


def match_media_range(media_range: str, supported: tuple[str, ...]) -> str | None:
    """The first of ``supported`` that ``media_range`` (maybe ``type/*``) covers."""
    if media_range in supported:
        return media_range
    if media_range.endswith("/*"):
        prefix = media_range[:-1]
        for candidate in supported:
            if candidate.startswith(prefix):
                return candidate
    return None


#: Distinct npy headers whose parse is kept (clients send the same few shapes).
NPY_HEADER_CACHE = 256
#: The six bytes every npy file starts with.
NPY_MAGIC = b"\x93NUMPY"


def decode_npy(body: bytes) -> np.ndarray:
    """Read an ``.npy`` body, checking its header against its length before allocating.

    The header is parsed by NumPy's own (literal-only) reader; the shape it
    declares must account for exactly the bytes that follow, so a header
    claiming 10^10 elements, a dimension of 2^64 or an object (pickled) dtype
    is a 400 before any memory is set aside, and nothing is ever unpickled.
    A header's parse is cached by its bytes (:func:`npy_header`), as the same
    bytes always parse the same: NumPy's reader compiles the header as a
    Python literal, about half of a small body's decoding.
    """
    shape, fortran_order, dtype, offset = npy_header(body[:npy_header_end(body)])
    count = 1
    for dimension in shape:
        count *= dimension
    expected = count * dtype.itemsize
    remaining = len(body) - offset
    if expected != remaining:
        raise BadRequest(
            f"npy header declares shape {list(shape)} of {dtype} ({expected} bytes), but the "
            f"body holds {remaining} bytes after it"
        )
    try:
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        # A writable copy of its own, as np.load gives: hooks may change their input in place.
        return array.reshape(shape, order="F" if fortran_order else "C").copy(order="K")
    except (ValueError, TypeError) as error:  # a dtype NumPy cannot lay out this way
        raise BadRequest(f"npy body could not be read: {error}") from None


def npy_header_end(body: bytes) -> int:
    """Where an npy body's header ends, from its length field (version 1: 2 bytes, else 4)."""
    if body[6:8] == b"\x01\x00":
        return 10 + int.from_bytes(body[8:10], "little")
    return 12 + int.from_bytes(body[8:12], "little")


@functools.lru_cache(maxsize=NPY_HEADER_CACHE)
def npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """An npy body's magic and header, read by NumPy: shape, Fortran order, dtype, data offset.

    Refuses (400) what cannot be read, pickled objects and negative
    dimensions; refusals are not cached.
    """
    stream = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError:
        if head[:6] == NPY_MAGIC:
            raise BadRequest(f"npy body is cut short: {len(head)} bytes, with no complete "
                             "version and header length after the magic") from None
        raise BadRequest(
            f"body is not an npy file: it starts with {head[:8]!r}, not the npy magic "
            "b'\\x93NUMPY'"
        ) from None
    if version == (3, 0):
        stream = io.BytesIO(_npy_v3_as_v2(head))
        np.lib.format.read_magic(stream)
    try:
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as error:  # NumPy raises ValueError, SyntaxError or TokenError here
        raise BadRequest(f"npy body has a malformed header: {error}") from None
    if dtype.hasobject:
        raise BadRequest("npy body holds pickled objects, which are never loaded")
    if any(dimension < 0 for dimension in shape):
        raise BadRequest(f"npy header declares a negative dimension: shape {list(shape)}")
    return tuple(shape), bool(fortran_order), dtype, len(head)


def _npy_v3_as_v2(head: bytes) -> bytes:
    """A version-3.0 npy header (UTF-8) as the same header in version 2.0 (Latin-1).

    NumPy's public readers read versions 1.0 and 2.0 only; 3.0 differs just
    in its encoding (UTF-8, for field names beyond Latin-1). Every character
    past ASCII becomes its escape, which means the same character inside the
    header's string literals (and a syntax error anywhere else). Header bytes
    that are not UTF-8 are a 400.
    """
    try:
        text = head[12:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"npy version 3.0 header is not UTF-8: {error}") from None
    escaped = text.encode("ascii", "backslashreplace")
    return NPY_MAGIC + b"\x02\x00" + len(escaped).to_bytes(4, "little") + escaped


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (``1e400``) is refused."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is outside the float range")
    return value


def decode_json(body: bytes) -> np.ndarray:
    """Read a JSON array of numbers (or ``{"instances": [...]}``) as float32.

    Numbers that do not fit float32 (a 400-digit integer, 1e400) and bodies
    nested too deep for the parser are 400s, not server errors.
    """
    array = _json_array(body, None)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # Rare: read again, number by number, to tell 1e400 (refused) from NaN (kept).
        array = _json_array(body, _finite_float)
    return array


def _json_array(body: bytes, parse_float: Any) -> np.ndarray:
    try:
        data = json.loads(body, parse_float=parse_float)
    except RecursionError:
        raise BadRequest("JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if isinstance(data, dict):
        if "instances" not in data:
            raise BadRequest('JSON body must be an array, or an object with "instances"')
        data = data["instances"]
    try:
        with np.errstate(over="raise"):
            return np.asarray(data, dtype=np.float32)
    except (OverflowError, FloatingPointError):
        raise BadRequest("JSON body holds a number outside the float32 range") from None
    except RecursionError:
        raise BadRequest("JSON body is nested too deeply") from None
    except (ValueError, TypeError) as error:
        raise BadRequest(f"JSON body is not a rectangular array of numbers: {error}") from None


def decode_csv(body: bytes) -> np.ndarray:
    """Read CSV rows as a 2-D float32 array; one row stays one row."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"CSV body is not UTF-8: {error}") from None
    if not text.strip():
        raise BadRequest("CSV body is empty")
    try:
        return np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as error:
        raise BadRequest(f"CSV body is not a table of numbers: {error}") from None


_DECODERS = {NPY: decode_npy, JSON: decode_json, CSV: decode_csv}


def decode(body: bytes, content_type: str,
           supported: Sequence[str] = NUMPY_TYPES) -> np.ndarray:
    """Decode ``body`` of the bare media type ``content_type``.

    :raises UnsupportedMediaType: for a type the NumPy codecs do not read,
        naming ``supported`` (every type the server's plugins decode).
    """
    decoder = _DECODERS.get(content_type)
    if decoder is None:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {content_type!r}; supported: {', '.join(supported)}"
        )
    if not body:
        raise BadRequest("request body is empty")
    return decoder(body)


def to_numpy(prediction: Any) -> np.ndarray:
    """A prediction (Variable, CuPy or NumPy array, nested lists) as NumPy."""
    array = getattr(prediction, "array", prediction)  # a chainer.Variable
    if hasattr(array, "get"):  # a CuPy array
        array = array.get()
    return np.asarray(array)


def encode_npy(prediction: Any) -> bytes:
    """An ``.npy`` file as :func:`numpy.save` writes it; NumPy's header, cached per layout."""
    array = to_numpy(prediction)
    if not array.dtype.hasobject and (array.flags.c_contiguous or array.flags.f_contiguous):
        fortran = not array.flags.c_contiguous
        try:
            header = npy_header_for(array.dtype, array.shape, fortran)
        except (ValueError, UnicodeError):  # a header that needs format version 2 or 3
            pass
        else:
            return header + (array.T if fortran else array).tobytes()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)  # refuses objects; lays the others out
    return buffer.getvalue()


@functools.lru_cache(maxsize=NPY_HEADER_CACHE)
def npy_header_for(dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> bytes:
    """The magic and header :func:`numpy.save` writes before an array of this layout."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
        "shape": shape})
    return buffer.getvalue()


def encode_json(prediction: Any) -> bytes:
    if isinstance(prediction, (dict, list, str, int, float)) or prediction is None:
        return json.dumps(prediction).encode()
    return json.dumps(to_numpy(prediction).tolist()).encode()


def encode_csv(prediction: Any) -> bytes:
    array = to_numpy(prediction)
    if array.ndim > 2:
        array = array.reshape(array.shape[0], -1)
    buffer = io.StringIO()
    np.savetxt(buffer, array, delimiter=",", fmt="%.9g")
    return buffer.getvalue().encode()


_ENCODERS = {NPY: encode_npy, JSON: encode_json, CSV: encode_csv}


def encode(prediction: Any, accept: str,
           supported: Sequence[str] = NUMPY_TYPES) -> tuple[bytes, str]:
    """Encode ``prediction`` as the media range ``accept``; return body and type.

    :raises NotAcceptable: for a type the NumPy codecs do not write, naming
        ``supported`` (every type the server's plugins encode).
    """
    concrete = match_media_range(accept, NUMPY_TYPES)
    if concrete is None:
        raise NotAcceptable(
            f"cannot answer as {accept!r}; supported: {', '.join(supported)}"
        )
    return _ENCODERS[concrete](prediction), concrete
