"""Records, mini-batches, assembly and options: the rules of SageMaker's batch transform."""
from __future__ import annotations

import io

import pytest

from smchainer.errors import UsageError
from smchainer.transform import records as rec
from smchainer.transform.progress import BarReporter, Reporter, reporter_for


def test_line_split_drops_terminators_and_empty_lines_but_keeps_line_numbers():
    records = rec.split(b"1,2\r\n3,4\n\n5,6\n", rec.LINE)
    assert [(r.number, r.data) for r in records] == [(1, b"1,2"), (2, b"3,4"), (4, b"5,6")]
    assert rec.split(b"", rec.LINE) == [] and rec.split(b"", None) == []
    assert rec.split(b"no newline", rec.LINE)[0].data == b"no newline"
    whole = rec.split(b"\x93NUMPY\n\nbinary", None)
    assert len(whole) == 1 and whole[0].data == b"\x93NUMPY\n\nbinary"


def test_multi_record_fills_each_request_up_to_max_payload():
    line = b"x" * (300 * 1024 - 1)  # 300 KB with its newline: three fit in 1 MB
    records = rec.split(b"\n".join([line] * 7), rec.LINE)
    batches = rec.batches(records, rec.LINE, rec.MULTI_RECORD, 1)
    assert [(b.first, b.last, b.count) for b in batches] == [(1, 3, 3), (4, 6, 3), (7, 7, 1)]
    assert all(len(b.body) <= rec.MB for b in batches)
    assert batches[0].body == (line + b"\n") * 3  # whole lines of the file
    assert batches[0].span == "records 1-3" and batches[2].span == "record 7"
    # 0: no limit, the whole file in one request
    assert len(rec.batches(records, rec.LINE, rec.MULTI_RECORD, 0)) == 1


def test_single_record_and_a_record_over_max_payload():
    records = [rec.Record(1, b"a"), rec.Record(2, b"b" * rec.MB), rec.Record(3, b"c")]
    batches = rec.batches(records, rec.LINE, rec.SINGLE_RECORD, 1)
    assert [b.body for b in batches] == [b"a\n", b"", b"c\n"]
    assert batches[1].error is not None and "over max_payload 1 MB" in batches[1].error
    multi = rec.batches(records, rec.LINE, rec.MULTI_RECORD, 1)
    assert [(b.first, b.last, b.error is None) for b in multi] == [
        (1, 1, True), (2, 2, False), (3, 3, True)]
    # split None: the file as it is, whatever the strategy
    whole = rec.batches([rec.Record(1, b"bytes\n")], None, rec.MULTI_RECORD, 6)
    assert [b.body for b in whole] == [b"bytes\n"]


def test_assemble_with_line_ends_every_answer_with_a_newline():
    assert rec.assemble([b"1\n2", b"3\n", b""], rec.LINE) == b"1\n2\n3\n\n"
    assert rec.assemble([b"1\n2", b"3\n"], None) == b"1\n23\n"


@pytest.mark.parametrize("call, value, message", [
    (rec.split_type, "RecordIO", "'RecordIO' is not supported here: use Line, None"),
    (rec.split_type, "TFRecord", "not supported here"),
    (rec.split_type, "Lines", "split_type must be one of Line, None, not 'Lines'"),
    (rec.strategy, "Batch", "strategy must be one of SingleRecord, MultiRecord, None"),
    (rec.assemble_with, "Json", "assemble_with must be one of Line, None"),
    (rec.compression_type, "Zip", "compression_type must be one of Gzip, None"),
])
def test_bad_options_are_refused_by_name(call, value, message):
    with pytest.raises(rec.TransformOptionError, match=message) as raised:
        call(value)
    assert isinstance(raised.value, UsageError) and isinstance(raised.value, ValueError)


def test_options_take_sagemaker_spellings():
    assert rec.split_type("line") == rec.LINE and rec.split_type("None") is None
    assert rec.strategy("MULTI_RECORD") == rec.MULTI_RECORD
    assert rec.strategy("singlerecord") == rec.SINGLE_RECORD
    assert rec.whole_number("3", "n", 1) == 3 and rec.whole_number(0, "n", 0) == 0
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(rec.TransformOptionError, match="must be a whole number >= 0"):
            rec.whole_number(bad, "max_payload", 0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    assert type(reporter_for(io.StringIO())) is Reporter
    terminal = _Terminal()
    bar = reporter_for(terminal)
    assert isinstance(bar, BarReporter)

    class Job:
        done_weight, total_weight, files, inputs, requests, failed_records = 5, 10, [], [1], 3, 0

    bar.progress(Job(), force=True)
    bar.note("a line")
    text = terminal.getvalue()
    assert "[###############...............]  50%  0/1 files  3 requests" in text
    assert text.endswith("\r\x1b[2Ka line\n")  # the bar is cleared before a line
