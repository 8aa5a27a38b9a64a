"""Records and mini-batches: how one input file becomes request bodies, as SageMaker cuts it.

``SplitType``
    ``None`` (the default): the whole file is one record and one request,
    its bytes as they are. ``Line``: every line is a record. A line's
    terminator (``\\n`` or ``\\r\\n``) is not part of the record; empty lines
    are no records (a file's last newline makes none), but record numbers
    stay the file's 1-based line numbers, so that a failure names the lines
    to look at.
``BatchStrategy`` (Line split only)
    ``SingleRecord``: one record per request. ``MultiRecord``: as many
    consecutive records per request as fit in ``MaxPayloadInMB``. Every
    record of a Line-split body ends with ``\\n``, so a body is always a run
    of whole lines of the file.
``MaxPayloadInMB``
    No request body is larger. A record that alone is larger cannot be sent:
    it becomes a batch with an :attr:`Batch.error` (that record fails, the
    others go on). ``0`` means no limit (SageMaker's "chunked"): a
    MultiRecord file is then one request.

``AssembleWith`` (:func:`assemble`): ``Line`` puts the answers one after the
other, each ending with a newline (added when it lacks one); ``None``
concatenates them as they are.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from smchainer.errors import UsageError

LINE = "Line"
SINGLE_RECORD = "SingleRecord"
MULTI_RECORD = "MultiRecord"
GZIP = "Gzip"
MB = 1024 * 1024
#: SageMaker's MaxPayloadInMB when neither the job nor the container says.
DEFAULT_MAX_PAYLOAD_MB = 6


class TransformOptionError(UsageError, ValueError):
    """A bad transform option: exit 2 for the command, a ``ValueError`` for the API."""


def _choice(value: object, what: str, choices: Sequence[str],
            unsupported: Sequence[str] = ()) -> str | None:
    """``value`` as one of ``choices`` (any case), None for None/"None"/""."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return None
    for choice in choices:
        if text.lower() == choice.lower():
            return choice
    allowed = ", ".join([*choices, "None"])
    if text.lower() in (name.lower() for name in unsupported):
        raise TransformOptionError(f"{what} {text!r} is not supported here: use {allowed}")
    raise TransformOptionError(f"{what} must be one of {allowed}, not {text!r}")


def split_type(value: object) -> str | None:
    """``Line`` or None; RecordIO and TFRecord are refused by name."""
    return _choice(value, "split_type", [LINE], unsupported=["RecordIO", "TFRecord"])


def strategy(value: object) -> str | None:
    """``SingleRecord``, ``MultiRecord`` (also ``SINGLE_RECORD``/``MULTI_RECORD``) or None."""
    if isinstance(value, str):
        value = {"single_record": SINGLE_RECORD, "multi_record": MULTI_RECORD}.get(
            value.strip().lower(), value)
    return _choice(value, "strategy", [SINGLE_RECORD, MULTI_RECORD])


def assemble_with(value: object) -> str | None:
    """``Line`` or None."""
    return _choice(value, "assemble_with", [LINE])


def compression_type(value: object) -> str | None:
    """``Gzip`` or None."""
    return _choice(value, "compression_type", [GZIP])


def whole_number(value: object, what: str, minimum: int) -> int | None:
    """``value`` as an int >= ``minimum`` (None stays None); a :class:`TransformOptionError`."""
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit():
        if not (isinstance(value, float) and value.is_integer()):
            raise TransformOptionError(f"{what} must be a whole number >= {minimum}, "
                                       f"not {value!r}")
        text = str(int(value))
    number = int(text)
    if number < minimum:
        raise TransformOptionError(f"{what} must be a whole number >= {minimum}, not {value!r}")
    return number


@dataclass(frozen=True)
class Record:
    """One record: its number (the 1-based line for Line split, else 1) and its bytes."""

    number: int
    data: bytes


@dataclass
class Batch:
    """One request's worth of consecutive records, or the record that cannot be sent."""

    first: int
    last: int
    count: int
    body: bytes
    #: why this batch cannot be sent (a record over max_payload); None when it can
    error: str | None = None

    @property
    def span(self) -> str:
        """``record 3`` or ``records 3-4``."""
        return f"record {self.first}" if self.first == self.last else \
            f"records {self.first}-{self.last}"


def split(data: bytes, how: str | None) -> list[Record]:
    """The records of a file's bytes (see the module docstring); none for an empty file."""
    if not data:
        return []
    if how is None:
        return [Record(1, data)]
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line:
            records.append(Record(number, line))
    return records


def batches(records: Sequence[Record], how: str | None, batch_strategy: str,
            max_payload_mb: int) -> list[Batch]:
    """The request bodies of a file's records, in order.

    ``how`` is the split type (bodies of Line records end with a newline);
    ``max_payload_mb`` 0 means no limit.
    """
    limit = max_payload_mb * MB if max_payload_mb > 0 else None
    terminator = b"\n" if how == LINE else b""
    out: list[Batch] = []
    pending: list[Record] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if pending:
            body = b"".join(record.data + terminator for record in pending)
            out.append(Batch(pending[0].number, pending[-1].number, len(pending), body))
            pending.clear()
            size = 0

    for record in records:
        length = len(record.data) + len(terminator)
        if limit is not None and length > limit:
            flush()
            out.append(Batch(record.number, record.number, 1, b"", error=(
                f"the record is {length} bytes, over max_payload {max_payload_mb} MB "
                f"({limit} bytes): it cannot be sent")))
            continue
        if batch_strategy == SINGLE_RECORD or how is None:
            pending.append(record)
            flush()
            continue
        if limit is not None and size + length > limit:
            flush()
        pending.append(record)
        size += length
    flush()
    return out


def assemble(answers: Iterable[bytes], how: str | None) -> bytes:
    """The ``.out`` file from the answers in record order (``AssembleWith``)."""
    if how != LINE:
        return b"".join(answers)
    return b"".join(answer if answer.endswith(b"\n") else answer + b"\n" for answer in answers)

