"""Finding the record PostgreSQL names in a COPY error: the bisecting shortcut for LF files
answers exactly what the record-by-record count (PostgreSQL's own rule) answers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loader.isolate import ErrorRate, _find_copy_line_counting, _record_end, find_copy_line, split_records
from loader.options import CsvDialect

plain = st.sampled_from([b"1,a", b"22,bb", b"3,", b'4,"x,y"', b'5,"say ""hi"""'])
with_newlines = st.sampled_from([b'6,"two\nlines"', b'7,"three\n\nlines"', b'8,"\n"'])
records = st.lists(st.one_of(plain, plain, plain, with_newlines), min_size=1, max_size=40)


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


def test_a_batch_is_sent_whole_until_bad_rows_are_dense_enough_to_doom_it() -> None:
    rate = ErrorRate()
    assert not rate.doomed(10_000)  # nothing seen yet: try the fast path
    rate.bad, rate.rows = 1, 10_000
    assert not rate.doomed(10_000)  # one bad row per batch expected: usually worth a try
    rate.bad, rate.rows = 3, 1_000
    assert rate.doomed(1_000) and not rate.doomed(100)


@given(records=records, last_ended=st.booleans(), data=st.data())
def test_a_piece_cut_by_bytes_ends_at_the_first_record_end_past_its_size(
    records: list[bytes], last_ended: bool, data: st.DataObject
) -> None:
    body = b"\n".join(records) + (b"\n" if last_ended else b"")
    ends = split_records(body, 2, CsvDialect()).offsets[1:]
    at = data.draw(st.integers(1, len(body) + 5))
    assert _record_end(body, 0, at, b'"', b"\n") == min([end for end in ends if end > at], default=len(body))
