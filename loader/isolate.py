"""The slow path: finding exactly the bad rows of a batch the server refused, loading the rest.

The server names the line it choked on; every row before it was fine, so that prefix goes
again with the next piece, the bad row is rejected, and the rest of the batch goes on in
pieces sized from the error density seen so far: a piece that fails has parsed about half
of itself in vain, and every piece costs a COPY, so the size that spends least is about
sqrt(2 c / (r d)) rows for a density d, a COPY's fixed cost c and a row's parse cost r
(see PIECE_FACTOR). Each bad row costs one refused COPY, and the rows parsed in vain stay
close to the bad ones.

Pieces are cut at record ends by bytes (counting quotes, in C), so the pieces that load
cost no Python work per row; only a refused piece is split into records, up to the one the
server named. Where the server names no line, or a custom --escape keeps records from being
cut by counting quotes, the records are split and the pieces bisected.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import operator
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from .batching import Batch, record_end_finder
from .errors import MisreadRecords, is_data_error, server_message, sqlstate
from .options import CsvDialect
from .rejects import Reject

MIN_PIECE = 16
# sqrt(2 c / r), measured: on the bench file with one bad row in a thousand at random places
# (PostgreSQL 15, 2 cores), factors from 6.5 to 13.5 came within noise of each other, 9 the
# best: pieces of about 285 rows. (A file with a bad row every 1,000th row misleads: some
# piece sizes line up with the period.)
PIECE_FACTOR = 9.0
COPY_FORMAT_ERROR = "22P04"  # bad_copy_file_format: field count, line endings, open quotes


Run = tuple[int, int]  # records lo:hi


class Records:
    """Records of a refused piece, as offsets into their bytes (no copy per record)."""

    def __init__(self, data: bytes, offsets: list[int], lines: list[int], newline: bytes = b"\n") -> None:
        self.data = data
        self.offsets = offsets  # record i is data[offsets[i]:offsets[i + 1]]
        self.lines = lines  # the source line where record i starts
        self.newline = newline  # what ends a record: LF (also for CRLF files) or CR

    def __len__(self) -> int:
        return len(self.lines)

    def span(self, lo: int, hi: int) -> bytes:
        return self.data[self.offsets[lo] : self.offsets[hi]]

    def record(self, i: int) -> bytes:
        return self.span(i, i + 1)

    def slice(self, lo: int, hi: int) -> Records:
        """Records lo:hi, with their own bytes."""
        offsets = list(map((-self.offsets[lo]).__add__, self.offsets[lo : hi + 1]))
        return Records(self.span(lo, hi), offsets, self.lines[lo:hi], self.newline)

    def __add__(self, other: Records) -> Records:
        if not other.lines:
            return self
        if not self.lines:
            return other
        offsets = [*self.offsets[:-1], *map(len(self.data).__add__, other.offsets)]
        return Records(self.data + other.data, offsets, self.lines + other.lines, self.newline)

    def join(self, runs: Sequence[Run]) -> bytes:
        """The bytes of the records of `runs`, in order: what one COPY of them sends."""
        if len(runs) == 1:
            return self.span(*runs[0])
        return b"".join(itertools.starmap(self.span, runs))

    def view(self, runs: Sequence[Run]) -> Records:
        """The records of `runs` as one Records, numbered from 0 as one COPY of them counts."""
        if list(runs) == [(0, len(self))]:
            return self
        return functools.reduce(operator.add, itertools.starmap(self.slice, runs), NO_RECORDS)


NO_RECORDS = Records(b"", [0], [])


def split_records(data: bytes, first: int, dialect: CsvDialect) -> Records:
    """The records of `data` (which starts at a record start, on source line `first`), with the
    line each starts on. Every line starts a record unless the line before it ends inside a
    quoted field; all of it in C (split, accumulate, slices), no Python step per row."""
    newline = dialect.newline.encode()
    lines = data.split(newline)
    lines.pop()  # after the last line ending: empty, or a last record without one
    line_starts = list(itertools.accumulate(map((1).__add__, map(len, lines)), initial=0))
    if dialect.escape_char == dialect.quote:
        # Keep the line starts but those after a line ending inside quotes: ranges lo[i]:hi[i].
        quoted = _quoted_lines(data, line_starts, dialect.quote.encode(), newline)
        cuts = [0, *itertools.chain.from_iterable(quoted), len(lines) + 1]
        lo, hi = cuts[0::2], cuts[1::2]
        offsets = list(itertools.chain.from_iterable(map(line_starts.__getitem__, map(slice, lo, hi))))
        starts = list(itertools.chain.from_iterable(map(range, map(first.__add__, lo), map(first.__add__, hi))))
    else:
        kept = [0, *map((1).__add__, record_end_finder(dialect)(lines))]
        offsets = list(map(line_starts.__getitem__, kept))
        starts = list(map(first.__add__, kept))
    if offsets[-1] < len(data):  # no line ending, or a quote left open at the end
        offsets.append(len(data))
    else:
        starts.pop()
    return Records(data, offsets, starts, newline)


def _quoted_lines(data: bytes, line_starts: list[int], quote: bytes, newline: bytes) -> Iterator[tuple[int, int]]:
    """(a + 1, b + 1) for each quoted field holding a line break, from line a to line b, when
    quotes inside fields are doubled: lines a to b - 1 end inside it. Between the quotes of
    `data` (which starts at a record start), the odd stretches are quoted."""
    parts = data.split(quote)
    after = list(itertools.accumulate(map((1).__add__, map(len, parts))))  # after[i]: just past part i's quote
    inside = itertools.compress(range(1, len(parts), 2), map(operator.contains, parts[1::2], itertools.repeat(newline)))
    for i in inside:
        a = bisect.bisect_right(line_starts, after[i - 1]) - 1
        b = bisect.bisect_right(line_starts, after[i] - 1) - 1 if i < len(parts) - 1 else len(line_starts) - 1
        yield a + 1, b + 1


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
    lf_only = records.newline == b"\n" and data.find(b"\r", offsets[lo], offsets[stop]) < 0
    if lf_only and data.endswith(b"\n", 0, offsets[stop]):
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
        else:  # CR counts, as long as the line ending is not known to be LF; the record's own does not
            line += data.count(b"\r") - (1 if ends_crlf or data.endswith(b"\r") else 0)
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
    if data.endswith(records.newline):
        data = data[: -2 if records.newline == b"\n" and data.endswith(b"\r\n") else -1]
    return Reject(records.lines[i], sqlstate(exc) or "", server_message(exc), bytes(data))


# Sends one COPY of the records in `data`, of which there are `records`: returns the rows
# loaded, and raises MisreadRecords (in the savepoint, undone) when the server took another
# number of rows, so that no record is ever counted as loaded but lost, or loaded twice.
Copy = Callable[[bytes, int], Awaitable[int]]


def holds_end_marker(data: bytes | bytearray, newline: bytes) -> bool:
    """Whether `data` may hold a line of only \\. (COPY's end-of-data marker before
    PostgreSQL 18, which ends the COPY there): a batch that does goes straight to isolation,
    where the COPY's row count finds the line. In C (find), no step per row; an occurrence
    inside a quoted field only costs that batch the fast path."""
    at = data.find(b"\\.")
    while at >= 0:
        if at == 0 or data[at - 1] == newline[0]:
            rest = bytes(data[at + 2 : at + 4])
            if not rest or rest.startswith(newline) or rest in (b"\r", b"\r\n"):
                return True
        at = data.find(b"\\.", at + 2)
    return False


def misread_message(data: bytes, rows: int, records: int) -> str:
    """Why a COPY took `rows` rows from `records` records."""
    if records == 1 and data.rstrip(b"\r\n") == b"\\.":
        return 'a line holding only \\. ends the data of a COPY, so PostgreSQL cannot load it (quote it: "\\.")'
    return (
        f"PostgreSQL read {rows} rows where the source holds {records} records: a line holding only \\. "
        "ends the data of a COPY, and a line break other than the file's own line ending splits a record"
    )


@functools.cache
def _not_quote_or_newline(quote: bytes, newline: bytes) -> bytes:
    return bytes(b for b in range(256) if b not in (quote[0], newline[0]))


def count_records(data: bytes, start: int, end: int, quote: bytes, newline: bytes) -> int:
    """The records of data[start:end] (starting at a record start, quotes inside fields
    doubled): the line endings outside quotes, and one more for a last record without one."""
    if end <= start:
        return 0
    segments = data[start:end].translate(None, _not_quote_or_newline(quote, newline)).replace(quote + quote, b"").split(quote)
    records = sum(map(len, segments[0::2]))
    terminated = len(segments) % 2 == 1 and segments[-1].endswith(newline) and data.endswith(newline, start, end)
    return records if terminated else records + 1


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
    batch: Batch,
    dialect: CsvDialect,
    copy: Copy,
    copy_line: Callable[[BaseException], int | None],
    first_error: BaseException | None = None,
    rate: ErrorRate | None = None,
) -> tuple[int, list[Reject]]:
    """Load every good record of `batch` through `copy` (each call in its own savepoint), reject
    the bad ones. Returns (rows loaded, rejects).

    `first_error` is the error of the COPY of the whole batch that sent us here, so the first
    bad row is known without sending the batch again; `rate` carries the density of bad rows
    from batch to batch. Pieces are cut at record ends by bytes, so a piece that loads costs
    no Python work per row: only the part of a refused piece up to the record the server
    names is split into records. The records before it are known good and go again with the
    next piece; the record itself is rejected."""
    rate = rate if rate is not None else ErrorRate()
    data = batch.data  # only ever sliced (copied): nothing keeps it once the batch's buffer is reused
    if dialect.escape_char != dialect.quote:  # records cannot be cut by counting quotes
        return await _resolve(split_records(data, batch.first_line, dialect), copy, copy_line, first_error, rate)
    quote, newline = dialect.quote.encode(), dialect.newline.encode()
    record_bytes = len(data) / max(1, batch.rows)
    loaded = 0
    rejects: list[Reject] = []
    carry = NO_RECORDS  # known good, split: they go with the next piece
    start, line = 0, batch.first_line  # data[start:] is not split yet, and starts on source line `line`
    end, error = len(data), first_error
    while start < len(data) or carry:
        if error is None:
            end = len(data)
            if rate.rows:
                piece = rate.piece()
                # As many known good records as a piece go alone, lest failures pile them up.
                at = start + int(piece * record_bytes)
                end = start if len(carry) >= piece else _record_end(data, start, at, quote, newline)
            try:
                rows = await copy(carry.data + data[start:end], len(carry) + count_records(data, start, end, quote, newline))
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
            else:
                loaded += rows
                rate.rows += rows - len(carry)
                carry = NO_RECORDS
                line += data.count(newline, start, end)
                start = end
                continue
        # The COPY of carry + data[start:end] failed with `error`.
        view, bad = _locate(carry, data, start, end, line, copy_line(error), len(data) / max(1, batch.lines), quote, dialect)
        if bad is None:  # the server named no record: bisect all that was sent
            piece_loaded, piece_rejects = await _resolve(view, copy, copy_line, error, rate)
            loaded += piece_loaded
            rejects += piece_rejects
            carry, error = NO_RECORDS, None
            line += data.count(newline, start, end)
            start = end
            continue
        reject = await _settle(view, bad, error, copy, rate)
        if reject is None:
            loaded += 1
        else:
            rejects.append(reject)
        rate.rows += max(0, bad + 1 - len(carry))
        if bad < len(carry):  # a record carried as good failed: the piece after it was not reached
            carry = view.slice(0, bad) + view.slice(bad + 1, len(carry))
        else:
            consumed = view.offsets[bad + 1] - len(carry.data)  # bytes of data[start:] up to the bad record's end
            carry = view.slice(0, bad)
            line += data.count(newline, start, start + consumed)
            start += consumed
        error = None
    return loaded, rejects


def _locate(
    carry: Records,
    data: bytes,
    start: int,
    end: int,
    line: int,
    reported: int | None,
    line_bytes: float,
    quote: bytes,
    dialect: CsvDialect,
) -> tuple[Records, int | None]:
    """The records of a refused COPY of carry + data[start:end], and the index of the one the
    server reported (None if it named none). Only as much of data[start:end] is split as
    the reported line needs: a guess from the average line's size, doubled until enough."""
    if reported is None:
        return carry + split_records(data[start:end], line, dialect), None
    size = max(line_bytes, reported * line_bytes * 1.25 - len(carry.data))
    while True:
        bound = _record_end(data, start, start + int(size), quote, dialect.newline.encode()) if start + size < end else end
        view = carry + split_records(data[start:bound], line, dialect)
        bad = find_copy_line(view, 0, len(view), reported)
        if bad is not None or bound >= end:
            return view, bad
        size *= 2


def _record_end(data: bytes, start: int, at: int, quote: bytes, newline: bytes) -> int:
    """Where the first record that ends at or after byte `at` ends, records starting at
    `start` and quotes inside fields doubled: at the first line ending after `at` that an
    even number of quotes since `start` leaves outside quotes. The end of `data` if none."""
    end = data.find(newline, at) if at < len(data) else -1
    odd = data.count(quote, start, end) & 1 if end >= 0 else 0
    while odd and end >= 0:
        after = data.find(newline, end + 1)
        odd ^= data.count(quote, end, after) & 1 if after >= 0 else 0
        end = after
    return len(data) if end < 0 else end + 1


async def _resolve(
    records: Records,
    copy: Copy,
    copy_line: Callable[[BaseException], int | None],
    first_error: BaseException | None,
    rate: ErrorRate,
) -> tuple[int, list[Reject]]:
    """Load the good `records`, reject the bad, record by record: for a refusal that names no
    record, and for a custom --escape (records cannot be cut by counting quotes).
    `first_error` is the error of a COPY of all `records`, if one was sent.

    Every COPY sends the first records still pending: those known good (they went through
    in a COPY that failed after them) and the next piece. When it fails on a named record,
    the records before it are known good, and the record is rejected; the records after it
    stay pending. A failure that names no record (a foreign key checked at the end of the
    COPY) is bisected: pieces of half the size until one record alone fails."""
    loaded = 0
    rejects: list[Reject] = []
    pending: list[Run] = [(0, len(records))]  # neither loaded nor rejected yet, in order
    known = 0  # how many of the first pending records are known good
    bisecting: tuple[int, int] | None = None  # (piece size, records left where a bad one hides)
    sent, error = pending, first_error
    while pending:
        if error is None:
            if bisecting is not None:
                unknown = min(bisecting)
            else:
                unknown = rate.piece() if rate.rows else len(records)
                if known >= unknown:  # as many as a piece: they go alone, lest failures pile them up
                    unknown = 0
            sent, rest = _cut(pending, known + unknown)
            try:
                loaded += await copy(records.join(sent), _size(sent))
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
            else:
                rate.rows += _size(sent) - known
                if bisecting is not None:
                    size, left = bisecting
                    bisecting = (size, left - _size(sent)) if left > _size(sent) else None
                pending, known = rest, 0
                continue
        # `sent`, the first records pending, failed with `error`.
        view = records.view(sent)
        reported = copy_line(error)
        bad = find_copy_line(view, 0, len(view), reported) if reported is not None else None
        if bad is None and len(view) > 1:  # the server did not say which record: bisect
            bisecting, known, error = (max(1, len(view) // 2), len(view)), 0, None
            continue
        bad = bad or 0
        reject = await _settle(view, bad, error, copy, rate)
        if reject is None:
            loaded += 1
        else:
            rejects.append(reject)
            bisecting = None
        rate.rows += max(0, bad + 1 - known)
        head, rest = _cut(pending, bad)
        pending, known, error = head + _cut(rest, 1)[1], bad, None
    return loaded, rejects


async def _settle(records: Records, bad: int, error: BaseException, copy: Copy, rate: ErrorRate) -> Reject | None:
    """Reject the record a COPY of `records` was refused at; None if it loaded alone instead.
    COPY takes the line-ending style from a piece's first record, so a record that ends
    differently is refused among others (22P04) but may load alone: it is tried alone first."""
    if len(records) > 1 and sqlstate(error) == COPY_FORMAT_ERROR:
        try:
            await copy(records.record(bad), 1)
            return None
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if not isinstance(exc, MisreadRecords):  # the server's reason says more
                error = exc
    rate.bad += 1
    return _reject(records, bad, error)


def _size(runs: list[Run]) -> int:
    return sum(hi - lo for lo, hi in runs)


def _cut(runs: list[Run], n: int) -> tuple[list[Run], list[Run]]:
    """The first n records of `runs`, and the rest."""
    for i, (lo, hi) in enumerate(runs):
        if n < hi - lo:
            head = [*runs[:i], (lo, lo + n)] if n else runs[:i]
            return head, [(lo + n, hi), *runs[i + 1 :]]
        n -= hi - lo
    return runs, []
