"""The slow path: finding exactly the bad rows of a batch the server refused, loading the rest.

Only a refused batch comes here, so per-row Python work is fine. The server names the
line it choked on; every row before it was fine, so that prefix is re-sent once in one
COPY, the bad row is rejected, and the rest of the batch goes on in pieces whose size
follows the error density seen so far (small near bad rows, doubling while pieces load).
A batch with k bad rows costs about k + 1 extra COPYs, and the rows parsed in vain stay
close to the bad ones. Where the server names no line, the piece is bisected.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .batching import Batch, record_end_finder
from .errors import is_data_error, server_message, sqlstate
from .options import CsvDialect
from .rejects import Reject

MIN_PIECE = 16
COPY_FORMAT_ERROR = "22P04"  # bad_copy_file_format: field count, line endings, open quotes


@dataclass(frozen=True, slots=True)
class Record:
    line: int  # source line where the record starts
    data: bytes  # exactly as in the source, with its line ending


def split_records(batch: Batch, dialect: CsvDialect) -> list[Record]:
    lines = batch.data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a last record without a line ending
    line_ends = list(itertools.accumulate(len(line) + 1 for line in lines))
    records: list[Record] = []
    start = start_line = 0
    for end_line in record_end_finder(dialect)(lines):
        end = line_ends[end_line]
        records.append(Record(batch.first_line + start_line, batch.data[start:end]))
        start, start_line = end, end_line + 1
    if start < len(batch.data):  # no line ending, or a quote left open at the end
        records.append(Record(batch.first_line + start_line, batch.data[start:]))
    return records


def copy_line_numbers(records: Sequence[Record]) -> list[int]:
    """The line number PostgreSQL's COPY reports for each record when these records are sent
    as one COPY. It counts one per record plus the line breaks inside quoted fields, but only
    the kind its end-of-line detection expects: until the first record ends that is '\\r';
    afterwards '\\n' for files with LF endings, '\\r' for CRLF or CR ones."""
    numbers: list[int] = []
    line = 0
    eol_is_lf: bool | None = None
    for record in records:
        data = record.data
        ends_crlf = data.endswith(b"\r\n")
        ends_lf = data.endswith(b"\n")
        inner_lf = data.count(b"\n") - (1 if ends_lf else 0)
        inner_cr = data.count(b"\r") - (1 if ends_crlf else 0)
        line += 1 + (inner_lf if eol_is_lf else inner_cr)
        numbers.append(line)
        if eol_is_lf is None and ends_lf:
            eol_is_lf = not ends_crlf
    return numbers


def bad_record(records: Sequence[Record], exc: BaseException, copy_line: Callable[[BaseException], int | None]) -> int | None:
    """Index of the record the server blamed, or None when it did not say (or we cannot tell)."""
    reported = copy_line(exc)
    if reported is None:
        return None
    numbers = copy_line_numbers(records)
    try:
        return numbers.index(reported)
    except ValueError:
        return None


def _reject(record: Record, exc: BaseException) -> Reject:
    data = record.data
    data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    return Reject(record.line, sqlstate(exc) or "", server_message(exc), data)


Copy = Callable[[bytes], Awaitable[int]]


async def isolate(
    records: Sequence[Record],
    copy: Copy,
    copy_line: Callable[[BaseException], int | None],
    first_error: BaseException | None = None,
) -> tuple[int, list[Reject]]:
    """Load every good record through `copy` (each call in its own savepoint), reject the bad.

    `first_error` is the error of the COPY of all `records` that sent us here, so the first
    bad row is known without sending the batch again. Returns (rows loaded, rejects)."""
    loaded = 0
    rejects: list[Reject] = []
    settled = 0  # records loaded or rejected so far, for the error density
    piece = len(records)
    # Ranges still to load, leftmost on top: (lo, hi, the error a COPY of exactly lo:hi
    # gave, whether lo:hi is known good and goes as one COPY).
    stack: list[tuple[int, int, BaseException | None, bool]] = [(0, len(records), first_error, False)]
    while stack:
        lo, hi, error, known_good = stack.pop()
        if error is None:
            if not known_good and hi - lo > piece:
                stack.append((lo + piece, hi, None, False))
                hi = lo + piece
            try:
                loaded += await copy(b"".join(r.data for r in records[lo:hi]))
                settled += hi - lo
                if not known_good:
                    piece = min(piece * 2, len(records))
                continue
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
        bad = bad_record(records[lo:hi], error, copy_line)
        if bad is None:  # the server did not say which row: bisect
            if hi - lo == 1:
                rejects.append(_reject(records[lo], error))
                settled += 1
            else:
                mid = (lo + hi) // 2
                stack.append((mid, hi, None, False))
                stack.append((lo, mid, None, False))
            continue
        bad += lo
        if hi - lo > 1 and sqlstate(error) == COPY_FORMAT_ERROR:
            # COPY takes the line-ending style from a piece's first record, so a record that ends
            # differently is refused among others but may load alone: try it alone before rejecting.
            try:
                loaded += await copy(records[bad].data)
                error = None
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
        if error is not None:
            rejects.append(_reject(records[bad], error))
        settled += 1
        piece = max(MIN_PIECE, (settled + bad - lo) // max(1, len(rejects)))
        if bad + 1 < hi:
            stack.append((bad + 1, hi, None, False))
        if bad > lo:
            stack.append((lo, bad, None, True))
    return loaded, rejects
