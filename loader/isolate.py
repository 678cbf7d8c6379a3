"""The slow path: finding exactly the bad rows of a batch the server refused, loading the rest.

Only a refused batch comes here, so per-row Python work is fine. The server names the
line it choked on; every row before it was fine, so that prefix is re-sent once in one
COPY, the bad row is rejected, and the rest of the batch goes on in pieces sized from the
error density seen so far: a piece that fails has parsed about half of itself in vain, and
every piece costs a COPY, so the size that spends least is about sqrt(2 c / (r d)) rows for
a density d, a COPY's fixed cost c and a row's parse cost r (see PIECE_FACTOR).
A batch with k bad rows costs about k + 1 extra COPYs, and the rows parsed in vain stay
close to the bad ones. Where the server names no line, the piece is bisected.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .batching import Batch, record_end_finder
from .errors import is_data_error, server_message, sqlstate
from .options import CsvDialect
from .rejects import Reject

MIN_PIECE = 16
# sqrt(2 c / r) with c ≈ 0.3 ms for a COPY in a savepoint and r ≈ 3.3 µs to parse a row (here,
# PostgreSQL 15 on 2 cores): one bad row in a thousand gives pieces of about 430 rows.
PIECE_FACTOR = 13.5
COPY_FORMAT_ERROR = "22P04"  # bad_copy_file_format: field count, line endings, open quotes


class Records:
    """The records of a refused batch, as offsets into its bytes (no copy per record)."""

    def __init__(self, data: bytes, offsets: list[int], lines: list[int]) -> None:
        self.data = data
        self.offsets = offsets  # record i is data[offsets[i]:offsets[i + 1]]
        self.lines = lines  # the source line where record i starts

    def __len__(self) -> int:
        return len(self.lines)

    def span(self, lo: int, hi: int) -> bytes:
        return self.data[self.offsets[lo] : self.offsets[hi]]

    def record(self, i: int) -> bytes:
        return self.span(i, i + 1)


def split_records(batch: Batch, dialect: CsvDialect) -> Records:
    data = bytes(batch.data)  # a copy: rejects keep slices of it after the batch's buffer is reused
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a last record without a line ending
    newline_at = list(map(operator.add, itertools.accumulate(map(len, lines)), itertools.count()))
    ends = record_end_finder(dialect)(lines)
    offsets = [0, *map((1).__add__, map(newline_at.__getitem__, ends))]  # all in C: no loop per row
    starts = [batch.first_line, *map((batch.first_line + 1).__add__, ends)]
    if offsets[-1] < len(data):  # no line ending, or a quote left open at the end
        offsets.append(len(data))
    else:
        starts.pop()
    return Records(data, offsets, starts)


def find_copy_line(records: Records, lo: int, hi: int, reported: int) -> int | None:
    """Index of the record in lo:hi whose line PostgreSQL reports as `reported` when lo:hi goes
    as one COPY, or None. COPY counts one per record plus the line breaks inside quoted fields,
    but only the kind its end-of-line detection expects: until the first record ends that is
    CR; afterwards LF for files with LF endings, CR for CRLF or CR ones. Each record
    counts at least one, so only the records up to the reported one are looked at."""
    stop = min(hi, lo + reported)
    data, offsets = records.data, records.offsets
    if reported == 1:
        return lo
    if data.find(b"\r", offsets[lo], offsets[stop]) < 0 and data.endswith(b"\n", 0, offsets[stop]):
        # LF endings only: the first record counts one line, each later one its LFs, so record
        # j's line is 1 + the LFs from record lo + 1 to j's end. Start from the last record
        # that can hold the line and step back over the quoted line breaks (usually none).
        j = stop - 1
        line = 1 + data.count(b"\n", offsets[lo + 1], offsets[j + 1]) if j > lo else 1
        while line > reported and j > lo:
            line -= data.count(b"\n", offsets[j], offsets[j + 1])
            j -= 1
        return j if line == reported else None
    return _find_copy_line_counting(records, lo, stop, reported)


def _find_copy_line_counting(records: Records, lo: int, stop: int, reported: int) -> int | None:
    """find_copy_line, record by record, for any line endings."""
    line = 0
    eol_is_lf: bool | None = None
    for i in range(lo, stop):
        data = records.record(i)
        ends_crlf = data.endswith(b"\r\n")
        ends_lf = data.endswith(b"\n")
        if eol_is_lf:
            line += data.count(b"\n") - (1 if ends_lf else 0)
        else:
            line += data.count(b"\r") - (1 if ends_crlf else 0)
        line += 1
        if line == reported:
            return i
        if line > reported:
            return None
        if eol_is_lf is None and ends_lf:
            eol_is_lf = not ends_crlf
    return None


def _reject(records: Records, i: int, exc: BaseException) -> Reject:
    data = records.record(i)
    data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    return Reject(records.lines[i], sqlstate(exc) or "", server_message(exc), data)


Copy = Callable[[bytes], Awaitable[int]]


@dataclass
class ErrorRate:
    """Bad rows among the rows isolated so far in a load. It sizes the pieces: one batch alone
    holds too few bad rows to tell the density, and a guess too high costs many small COPYs."""

    bad: int = 0
    rows: int = 0

    def doomed(self, rows: int) -> bool:
        """Whether a COPY of `rows` rows would almost surely be refused: three bad rows expected
        (a batch is then clean about one time in twenty)."""
        return self.bad * rows >= 3 * self.rows > 0

    def piece(self) -> int:
        density = max(1, self.bad) / max(1, self.rows)
        return max(MIN_PIECE, int(PIECE_FACTOR / math.sqrt(density)))


async def isolate(
    records: Records,
    copy: Copy,
    copy_line: Callable[[BaseException], int | None],
    first_error: BaseException | None = None,
    rate: ErrorRate | None = None,
) -> tuple[int, list[Reject]]:
    """Load every good record through `copy` (each call in its own savepoint), reject the bad.

    `first_error` is the error of the COPY of all `records` that sent us here, so the first
    bad row is known without sending the batch again; `rate` carries the density of bad rows
    from batch to batch. Returns (rows loaded, rejects)."""
    rate = rate if rate is not None else ErrorRate()
    loaded = 0
    rejects: list[Reject] = []
    piece = rate.piece() if rate.rows else len(records)
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
                loaded += await copy(records.span(lo, hi))
                if not known_good:  # a known-good range was counted with the bad row after it
                    rate.rows += hi - lo
                continue
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
        reported = copy_line(error)
        bad = find_copy_line(records, lo, hi, reported) if reported is not None else None
        if bad is None:  # the server did not say which row: bisect
            if hi - lo == 1:
                rejects.append(_reject(records, lo, error))
                rate.bad += 1
                rate.rows += 1
            else:
                mid = (lo + hi) // 2
                stack.append((mid, hi, None, False))
                stack.append((lo, mid, None, False))
            continue
        if hi - lo > 1 and sqlstate(error) == COPY_FORMAT_ERROR:
            # COPY takes the line-ending style from a piece's first record, so a record that ends
            # differently is refused among others but may load alone: try it alone before rejecting.
            try:
                loaded += await copy(records.record(bad))
                error = None
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
        if error is not None:
            rejects.append(_reject(records, bad, error))
            rate.bad += 1
        rate.rows += bad - lo + 1
        piece = rate.piece()
        if bad + 1 < hi:
            stack.append((bad + 1, hi, None, False))
        if bad > lo:
            stack.append((lo, bad, None, True))
    return loaded, rejects
