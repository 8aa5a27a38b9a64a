"""Inference requests served on the worker's event loop: the direct path.

A request through gunicorn's pool costs a hand-off to a pool thread,
gunicorn's parser (about 45 us for a plain head, measured on this project's
2-core VM), a WSGI environ, gunicorn's response object and two ``send``
calls (head, then body), each step two to three times slower right after an
inference has had the CPU and its caches. For the requests that dominate a
serving workload, small ``POST``\\ s to an inference route with a
``Content-Length``, none of that is needed: :class:`ServingWorker
<smchainer.serving.worker.ServingWorker>` reads the body on its event loop
too, hands the request straight to the inference thread and writes the
answer, head and body in one ``send``, when the inference is done.

This module decides which heads qualify (:func:`direct_head`) and writes
their answers (:func:`answer_bytes`). It is a recognizer, not a parser: it
accepts only heads whose meaning is beyond doubt, and everything else goes
to gunicorn's parser exactly as before, which stays the judge of every
malformed, unusual or ambiguous request and answers its errors:

- the request line is ``POST <route> HTTP/1.1``, the route one the app
  serves directly (no query string);
- every header is ``token: value`` with a token of RFC 9110 characters other
  than ``_`` (gunicorn drops or refuses those) and a value of visible ASCII,
  spaces and tabs; no header name appears twice;
- exactly one ``Content-Length`` of digits, at most :data:`DIRECT_BODY_BYTES`
  (and the server's payload limit, whose 413 gunicorn's path words);
- no ``Transfer-Encoding``, ``Expect``, ``Upgrade``, no forwarding or scheme
  header (gunicorn decides whom to trust for those), and ``Connection`` only
  ``keep-alive`` or ``close``;
- the request line and headers within gunicorn's own limits
  (``limit_request_line``, ``limit_request_fields``,
  ``limit_request_field_size``).

For such a head the environ keys the app reads are the ones gunicorn would
have made (``tests/serving/test_direct.py`` checks this against gunicorn's
parser over generated heads). A second full HTTP parser (such as
``httptools``) was not taken: two parsers deciding where requests end on the
same connections is the recipe for request smuggling, and the strict subset
needs none of a parser's leniency.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

#: The largest body read on the event loop; longer ones go through gunicorn's pool.
DIRECT_BODY_BYTES = 1 << 20

_TOKEN = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\x20-\x7e\t]*")
_DIGITS = re.compile(rb"[0-9]{1,19}")
#: Headers gunicorn gives a meaning beyond their value (framing, expectations,
#: protocol switches, forwarding): such requests take gunicorn's path.
_GUNICORNS = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"http2-settings",
                        b"te", b"trailer", b"forwarded", b"proxy-connection"})
_CONNECTION = {b"keep-alive": True, b"close": False}
#: What no header of an answer may hold (gunicorn refuses the same in its answers).
_BAD_FIELD = re.compile(r"[^\x20-\x7e\t]")


@dataclass(slots=True)
class DirectHead:
    """A head :func:`direct_head` accepted: what the app needs, and where the body starts."""

    path: str
    environ: dict[str, str]
    #: bytes of the request line and headers, the blank line included
    head_bytes: int
    length: int
    #: the client asked to keep the connection (no ``Connection: close``)
    keep_alive: bool
    #: :func:`time.monotonic` when the head was complete
    arrived: float = 0.0

    @property
    def total(self) -> int:
        return self.head_bytes + self.length


@dataclass(frozen=True, slots=True)
class Limits:
    """gunicorn's head limits and the server's, for :func:`direct_head`."""

    request_line: int
    fields: int
    field_size: int
    body: int
    #: header names (lower case) gunicorn reads as the scheme or trusts from forwarders
    special: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, cfg: Any, max_body: int) -> Limits:
        special = {name.lower().encode("latin-1")
                   for name in list(getattr(cfg, "secure_scheme_headers", {}) or {})}
        special |= {name.lower().replace("_", "-").encode("latin-1")
                    for name in (getattr(cfg, "forwarder_headers", None) or [])}
        return cls(cfg.limit_request_line or 1 << 20, cfg.limit_request_fields or 100,
                   cfg.limit_request_field_size or 8190, min(DIRECT_BODY_BYTES, max_body),
                   frozenset(special))


def direct_head(buffer: bytes | bytearray, routes: frozenset[bytes],
                limits: Limits) -> DirectHead | None:
    """The head at the start of ``buffer`` if it qualifies (see the module docstring); else None.

    ``buffer`` holds at least the whole head (its blank line); ``routes``
    are the paths served directly.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > limits.request_line or len(lines) - 1 > limits.fields:
        return None
    method, _, rest = request_line.partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"POST" or version != b"HTTP/1.1" or target not in routes:
        return None
    environ: dict[str, str] = {}
    length: int | None = None
    keep_alive = True
    for line in lines[1:]:
        if len(line) + 2 > limits.field_size:
            return None
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        lowered = name.lower()
        if (lowered in _GUNICORNS or lowered in limits.special
                or lowered.startswith(b"x-forwarded")):
            return None
        value = value.strip(b" \t")
        if lowered == b"content-length":
            if length is not None or not _DIGITS.fullmatch(value):
                return None
            length = int(value)
            key = "CONTENT_LENGTH"
        elif lowered == b"content-type":
            key = "CONTENT_TYPE"
        else:
            if lowered == b"connection":
                if value.lower() not in _CONNECTION:
                    return None
                keep_alive = _CONNECTION[value.lower()]
            key = "HTTP_" + name.decode("ascii").upper().replace("-", "_")
        if key in environ:
            return None
        environ[key] = value.decode("ascii")
    if length is None or length > limits.body:
        return None
    path = target.decode("ascii")
    environ.update(REQUEST_METHOD="POST", PATH_INFO=path, SERVER_PROTOCOL="HTTP/1.1")
    return DirectHead(path, environ, end + 4, length, keep_alive, time.monotonic())


#: Heads a :class:`Recognizer` keeps its answer for, and the longest it keeps.
CACHED_HEADS = 256
CACHED_HEAD_BYTES = 2048
_UNSEEN = object()


class Recognizer:
    """:func:`direct_head` for one server's routes and limits, answering repeated heads at once.

    A client sends the same head over and over (the same headers, and the
    same length for same-sized inputs), and each exact head always gets the
    same answer: it is kept, for at most :data:`CACHED_HEADS` heads of at most
    :data:`CACHED_HEAD_BYTES` (then forgotten all at once), so a repeated head
    costs one dictionary lookup instead of a line-by-line check. Every
    request gets its own environ and arrival time.
    """

    def __init__(self, routes: frozenset[bytes], limits: Limits) -> None:
        self.routes = routes
        self.limits = limits
        self._seen: dict[bytes, DirectHead | None] = {}

    def __call__(self, buffer: bytes | bytearray) -> DirectHead | None:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        key = bytes(buffer[:end])
        known = self._seen.get(key, _UNSEEN)
        if known is _UNSEEN:
            known = direct_head(buffer, self.routes, self.limits)
            if len(key) <= CACHED_HEAD_BYTES:
                if len(self._seen) >= CACHED_HEADS:
                    self._seen.clear()
                self._seen[key] = known
        if known is None:
            return None
        assert isinstance(known, DirectHead)
        return DirectHead(known.path, dict(known.environ), known.head_bytes, known.length,
                          known.keep_alive, time.monotonic())


_date = (0, "")


def http_date() -> str:
    """Now as an HTTP date (RFC 9110 5.6.7), formatted once a second."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, formatdate(second, usegmt=True))
    return _date[1]


def answer_bytes(status_line: str, headers: list[tuple[str, str]], body: bytes,
                 keep_alive: bool) -> bytes:
    """An HTTP/1.1 answer, head and body.

    Beside the app's headers only ``Date`` (RFC 9110 asks it of a server with
    a clock) and ``Connection: close`` when the connection ends: HTTP/1.1
    keeps connections open unless told otherwise, and every header is one
    more for each client to parse.

    :raises ValueError: for a header name or value with a control or non-ASCII
        character (a ``Content-Type`` from a user's ``output_fn``, say).
    """
    for name, value in headers:
        if _BAD_FIELD.search(name) or _BAD_FIELD.search(value) or ":" in name:
            raise ValueError(f"the answer's header {name!r}: {value!r} is not plain ASCII text")
    head = [f"HTTP/1.1 {status_line}\r\nDate: {http_date()}\r\n"]
    if not keep_alive:
        head.append("Connection: close\r\n")
    head.extend(f"{name}: {value}\r\n" for name, value in headers)
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body
