"""Where a record ends, how many there are, and which one a COPY error names: the batcher and
the slow path ask one module, and its shortcuts answer what the plain rules answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loader.isolate import _Cut
from loader.options import CsvDialect
from loader.records import (
    RecordSyntax,
    _copy_lines,
    _find_copy_line_counting,
    find_copy_line,
    records_at_copy_lines,
    split_fields,
    split_records,
)

plain = st.sampled_from([b"1,a", b"22,bb", b"3,", b'4,"x,y"', b'5,"say ""hi"""'])
with_newlines = st.sampled_from([b'6,"two\nlines"', b'7,"three\n\nlines"', b'8,"\n"'])
records = st.lists(st.one_of(plain, plain, plain, with_newlines), min_size=1, max_size=40)
# Any bytes a file may hold, well-formed or not: open quotes, CR, CRLF, no final line ending.
scraps = st.lists(st.sampled_from([b"a", b",", b'"', b'""', b"\n", b"\r", b"\r\n"]), max_size=60).map(b"".join)
DOUBLED = RecordSyntax.of(CsvDialect())


@given(records=records, last_ended=st.booleans(), data=st.data())
def test_the_record_found_for_a_reported_line_is_the_one_postgresql_counts_to(
    records: list[bytes], last_ended: bool, data: st.DataObject
) -> None:
    body = b"\n".join(records) + (b"\n" if last_ended else b"")
    split = split_records(body, 2, CsvDialect())
    assert len(split) == len(records)
    lo = data.draw(st.integers(0, len(records) - 1))
    hi = data.draw(st.integers(lo + 1, len(records)))
    reported = data.draw(st.integers(1, body.count(b"\n") + 2))
    expected = _find_copy_line_counting(split, lo, min(hi, lo + reported), reported)
    assert find_copy_line(split, lo, hi, reported) == expected


def test_in_a_file_without_quoted_newlines_the_reported_line_is_the_record() -> None:
    split = split_records(b"".join(b"%d,x\n" % i for i in range(100)), 2, CsvDialect())
    assert find_copy_line(split, 10, 60, 7) == 16
    assert find_copy_line(split, 10, 60, 51) is None  # past the piece


@given(records=records, last_ended=st.booleans(), data=st.data())
def test_a_piece_cut_by_bytes_ends_at_the_first_record_end_past_its_size(
    records: list[bytes], last_ended: bool, data: st.DataObject
) -> None:
    body = b"\n".join(records) + (b"\n" if last_ended else b"")
    ends = split_records(body, 2, CsvDialect()).offsets[1:]
    at = data.draw(st.integers(1, len(body) + 5))
    assert DOUBLED.record_end(body, 0, at) == min([end for end in ends if end > at], default=len(body))


@given(body=scraps, newline=st.sampled_from(["\n", "\r"]))
def test_records_counted_by_quote_parity_are_the_records_split(body: bytes, newline: str) -> None:
    dialect = CsvDialect(newline=newline)
    assert RecordSyntax.of(dialect).piece(body, 0, len(body))[1] == len(split_records(body, 1, dialect))


@given(body=scraps, newline=st.sampled_from(["\n", "\r"]), data=st.data())
def test_a_piece_found_in_one_pass_ends_and_counts_as_the_plain_rules_say(body: bytes, newline: str, data: st.DataObject) -> None:
    dialect = CsvDialect(newline=newline)
    syntax = RecordSyntax.of(dialect)
    start = data.draw(st.sampled_from(split_records(body, 1, dialect).offsets))
    at = data.draw(st.integers(start + 1, len(body) + 5))
    end = syntax.record_end(body, start, at)
    records = len(split_records(body[start:end], 1, dialect))
    assert syntax.piece(body, start, at) == (end, records, body.count(newline.encode(), start, end))


@given(records=st.lists(plain, min_size=1, max_size=40), last_ended=st.booleans(), data=st.data())
def test_a_piece_of_one_line_records_is_cut_by_line_endings_alone_as_by_quotes(
    records: list[bytes], last_ended: bool, data: st.DataObject
) -> None:
    body = b"\n".join(records) + (b"\n" if last_ended else b"")
    start = data.draw(st.sampled_from(split_records(body, 1, CsvDialect()).offsets[:-1]))
    at = data.draw(st.integers(start + 1, len(body) + 5))
    assert _Cut(DOUBLED, one_line=True).piece(body, start, at) == DOUBLED.piece(body, start, at)


@given(body=scraps, data=st.data())
def test_a_record_end_scan_resumed_on_more_bytes_ends_where_one_scan_does(body: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(body)))
    end, odd = DOUBLED.scan_record_end(body[:cut], 0, 0)
    if end < 0:
        end, _ = DOUBLED.scan_record_end(body, cut, odd)
    assert end == DOUBLED.scan_record_end(body, 0, 0)[0]
    first = split_records(body, 1, CsvDialect()).offsets[1:2]
    assert first == [end] if end >= 0 else first in ([], [len(body)])  # -1: no record ends yet


@given(records=records, last_ended=st.booleans(), ending=st.sampled_from(["\n", "\r\n", "\r"]), data=st.data())
def test_the_records_found_for_the_lines_of_skipped_rows_are_those_postgresql_counts_to(
    records: list[bytes], last_ended: bool, ending: str, data: st.DataObject
) -> None:
    """The lines COPY names in its notices lead to the same records whether found by counting
    bytes (LF files) or by splitting the records and counting each one's lines."""
    dialect = CsvDialect(newline="\r" if ending == "\r" else "\n")
    body = ending.encode().join(r.replace(b"\n", ending.encode()) for r in records) + (ending.encode() if last_ended else b"")
    split = split_records(body, 2, dialect)
    lines = dict(_copy_lines(split, 0, len(split)))
    chosen = sorted(data.draw(st.sets(st.sampled_from(range(len(split))))))
    expected = [(split.lines[i], bytes(split.bare(i))) for i in chosen]
    assert records_at_copy_lines(body, 2, [lines[i] for i in chosen], dialect) == expected
    assert records_at_copy_lines(body, 2, [max(lines.values()) + 1], dialect) is None


values = st.lists(st.one_of(st.none(), st.text(alphabet='ab,"\n é', max_size=6)), min_size=1, max_size=6)


@given(values=values, quote_all=st.booleans())
def test_the_fields_of_a_record_are_the_values_copy_reads(values: list[str | None], quote_all: bool) -> None:
    def field(value: str | None) -> str:
        if value is None:
            return ""
        if quote_all or not value or any(c in value for c in ',"\n'):
            return '"' + value.replace('"', '""') + '"'
        return value

    record = ",".join(map(field, values)).encode()
    assert split_fields(record, CsvDialect()) == values


def test_a_quote_inside_a_field_opens_a_quoted_part_as_copy_reads_it() -> None:
    assert split_fields(b'a"b,c"d,,"",\\N', CsvDialect()) == ["ab,cd", None, "", "\\N"]
    assert split_fields(b"1;\\N;x", CsvDialect(delimiter=";", null="\\N")) == ["1", None, "x"]
    assert split_fields(b'1,"open', CsvDialect()) is None
