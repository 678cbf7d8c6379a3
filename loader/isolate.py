"""The slow path: finding exactly the bad rows of a batch the server refused, loading the rest.

The server names the line it choked on; every row before it was fine, so that prefix goes
again with the next piece, the bad row is rejected, and the rest of the batch goes on in
pieces sized from the error density seen so far: a piece that fails has parsed about half
of itself in vain, and every piece costs a COPY, so the size that spends least is about
sqrt(2 c / (r d)) rows for a density d, a COPY's fixed cost c and a row's parse cost r
(see PIECE_FACTOR). Each bad row costs one refused COPY, and the rows parsed in vain stay
close to the bad ones. A bad row foreseen, by a value refused twice before in its field
(see RefusedValues), costs less: it goes alone, before its piece, which leaves it out, so
that it counts for neither the density nor the pieces' size.

Pieces are cut at record ends by bytes (counting quotes, in C: see `records`), so the
pieces that load cost no Python work per row; only a refused piece is split into records,
up to the one the server named. Where the server names no line, or a custom --escape keeps
records from being cut by counting quotes, the records are split and the pieces bisected.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .batching import Batch
from .errors import BAD_COPY_FILE_FORMAT, DATA_EXCEPTION, MisreadRecords, is_data_error, refused_value, reject_message, sqlstate
from .options import CsvDialect
from .records import NO_RECORDS, Bytes, Records, RecordSyntax, Run, find_copy_line, split_records
from .rejects import Reject

MIN_PIECE = 16
# sqrt(2 c / r), measured: on the bench file with one bad row in a thousand at random places
# (PostgreSQL 15, 2 cores), factors from 6.5 to 13.5 came within noise of each other, 9 the
# best: pieces of about 285 rows. (A file with a bad row every 1,000th row misleads: some
# piece sizes line up with the period.)
PIECE_FACTOR = 9.0


def _reject(records: Records, i: int, exc: BaseException) -> Reject:
    return Reject(records.lines[i], sqlstate(exc) or "", reject_message(exc), bytes(records.bare(i)))


class Copy(Protocol):
    """Sends one COPY of the records in `data`, of which there are `records`, in a savepoint:
    returns the rows loaded, and raises MisreadRecords (in the savepoint, undone) when the
    server took another number of rows, so that no record is ever counted as loaded but
    lost, or loaded twice. With `keep` false, rows it loaded are undone all the same."""

    def __call__(self, data: Bytes, records: int, keep: bool = True) -> Awaitable[int]: ...


def misread_message(data: Bytes, rows: int, records: int) -> str:
    """Why a COPY took `rows` rows from `records` records."""
    if records == 1 and data.rstrip(b"\r\n") == b"\\.":
        return 'a line holding only \\. ends the data of a COPY, so PostgreSQL cannot load it (quote it: "\\.")'
    return (
        f"PostgreSQL read {rows} rows where the source holds {records} records: a line holding only \\. "
        "ends the data of a COPY, and a line break other than the file's own line ending splits a record"
    )


MAX_REFUSED_VALUES = 16  # looked for at once
MAX_REFUSED_ONCE = 64  # remembered until refused again
MAX_LOOKS = 4  # places a refused value is checked at, per search
# Searching costs about as much per byte as cutting pieces does: a value is searched for as
# long as it turns up once in this many bytes searched (a bad row in a thousand does: about
# one in 170 KB).
SEARCH_BUDGET = 256 * 1024


@dataclass
class _Refused:
    field: int  # which field of a record (from 0)
    value: bytes  # its bytes, unquoted
    needle: bytes  # what to search for: the value with the delimiters around it
    found: int = 0  # records found holding it
    missed: int = 0  # places the needle was, not in its field
    searched: int = 0  # bytes searched for it


class RefusedValues:
    """Values the server refused in a field, by their bytes. A type's input function gives
    the same answer to the same text, so a later record holding the same bytes in the same
    field is refused too (for that field, or an earlier one): it can go alone, rather than
    cost a refused piece and the rows parsed before it. Bad values repeat in real files
    (n/a, -, 0000-00-00); only the server says why a record is refused, so a guess never
    decides an outcome. A value is looked for once refused twice (a value of its own in each
    bad row would cost a search and save nothing), where it stands unquoted, and as long as
    it keeps turning up."""

    def __init__(self, dialect: CsvDialect) -> None:
        self._dialect = dialect
        self._encoding = dialect.python_encoding
        self._delimiter = dialect.delimiter.encode(self._encoding)
        self._syntax = RecordSyntax.of(dialect)
        self._null = dialect.null.encode(self._encoding)
        self._once: dict[tuple[int, bytes], None] = {}  # refused once, the latest last
        self._values: dict[tuple[int, bytes], _Refused] = {}  # refused twice: looked for

    def __bool__(self) -> bool:
        return bool(self._values)

    def learn(self, record: Bytes, error: BaseException) -> None:
        """Note the value `record` was refused for, when the error shows it and it is the bytes
        of exactly one of the record's fields; the second time, look for it from then on."""
        shown = refused_value(error)
        if not shown or not (sqlstate(error) or "").startswith(DATA_EXCEPTION):
            return
        try:
            value = shown.encode(self._encoding)
        except UnicodeError:
            return
        if value == self._null:  # refused quoted: where it stands unquoted, it is NULL
            return
        fields = self._fields(bytes(record))
        where = [i for i, f in enumerate(fields) if f == value]
        if len(where) != 1 or (where[0], value) in self._values:
            return
        key = (where[0], value)
        if key not in self._once:
            self._once[key] = None
            if len(self._once) > MAX_REFUSED_ONCE:
                del self._once[next(iter(self._once))]
            return
        del self._once[key]
        if len(self._values) >= MAX_REFUSED_VALUES:
            del self._values[next(iter(self._values))]
        needle = (self._delimiter if where[0] else b"") + value + (self._delimiter if where[0] < len(fields) - 1 else b"")
        self._values[key] = _Refused(where[0], value, needle)

    def first(self, data: Bytes, start: int, end: int) -> int | None:
        """Where the first line of data[start:end] holding a refused value in its field starts
        (`start` is a record start); None if none does. Whether the line starts a record, or
        is inside a quoted field, the caller tells as it cuts the piece before it."""
        first = None
        newline = self._syntax.newline
        for refused in list(self._values.values()):
            bound = end if first is None else first
            at = data.find(refused.needle, start, bound)
            looks = 0
            while at >= 0 and looks < MAX_LOOKS:
                looks += 1
                line = data.rfind(newline, start, at) + 1 or start
                line_end = data.find(newline, at)
                fields = self._fields(bytes(data[line : line_end if line_end >= 0 else len(data)].removesuffix(b"\r")))
                if len(fields) > refused.field and fields[refused.field] == refused.value:
                    refused.found += 1
                    first = bound = line
                    break
                refused.missed += 1
                at = data.find(refused.needle, at + 1, bound)
            refused.searched += bound - start
            if refused.searched > (refused.found + 1) * SEARCH_BUDGET or refused.missed > MAX_LOOKS * (refused.found + 1):
                del self._values[refused.field, refused.value]  # rare, or mostly in other fields: not worth it
        return first

    def _fields(self, record: bytes) -> list[bytes]:
        """The fields of a record, unquoted ([] if its quotes do not pair up on it)."""
        if self._syntax.quote not in record:
            return record.split(self._delimiter)
        if record.count(self._syntax.quote) % 2:
            return []
        try:
            line = record.decode(self._encoding, "surrogateescape")
            fields = next(csv.reader([line], delimiter=self._dialect.delimiter, quotechar=self._dialect.quote, strict=True))
        except (csv.Error, StopIteration):
            return []
        return [field.encode(self._encoding, "surrogateescape") for field in fields]


@dataclass
class ErrorRate:
    """Bad rows among the rows isolated so far in a load. It sizes the pieces: one batch alone
    holds too few bad rows to tell the density, and a guess too high costs many small COPYs.
    Bad rows foreseen (by a value refused twice before) cost no refused piece: they do not count
    for the pieces' size, only for whether a batch is doomed."""

    bad: int = 0
    rows: int = 0
    foreseen: int = 0
    refused: RefusedValues | None = None

    def doomed(self, rows: int) -> bool:
        """Whether a COPY of `rows` rows would almost surely be refused: three bad rows expected
        (a batch is then clean about one time in twenty)."""
        return self.bad * rows >= 3 * self.rows > 0

    def piece(self) -> int:
        density = max(1, self.bad - self.foreseen) / max(1, self.rows)
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
    syntax = RecordSyntax.of(dialect)
    if not syntax.parity:  # records cannot be cut by counting quotes
        return await _resolve(split_records(data, batch.first_line, dialect), copy, copy_line, first_error, rate)
    newline = syntax.newline
    cut = _Cut(syntax, batch.rows == batch.lines)
    if rate.refused is None:
        rate.refused = RefusedValues(dialect)
    refused = rate.refused
    record_bytes = len(data) / max(1, batch.rows)
    loaded = 0
    rejects: list[Reject] = []
    carry = NO_RECORDS  # known good, split: they go with the next piece
    start, line = 0, batch.first_line  # data[start:] is not split yet, and starts on source line `line`
    skipped: list[tuple[int, int, int]] = []  # records rejected alone, in order (those before `start` are passed by): (start, end, line endings)

    async def alone(at: int, end: int, at_line: int) -> bool:
        """Send data[at:end], a record holding a refused value, alone, its row never kept:
        whether it was rejected (else it goes with its piece)."""
        try:
            await copy(data[at:end], 1, keep=False)
            return False
        except Exception as exc:
            if not is_data_error(exc):
                raise
            rejects.append(_reject(split_records(data[at:end], at_line, dialect), 0, exc))
            rate.bad += 1
            rate.foreseen += 1
            rate.rows += 1
            return True

    async def around(at: int) -> tuple[list[Run], int, int, int]:
        """The piece from `start` to the end of the record ending at or after byte `at`, in
        parts, without the records rejected alone: those in `skipped`, and those holding a
        refused value, each sent alone first. (parts, records, end, line endings to end)."""
        parts: list[Run] = []
        records = lines = 0
        pos, k, at = start, 0, min(at, len(data))
        reach = data.find(newline, at) + 1 or len(data)  # the line holding byte `at` is in the piece: searched to its end

        def take(upto: int) -> int:
            nonlocal records, lines, pos
            end, n, spanned = cut.piece(data, pos, upto)
            if parts and parts[-1][1] == pos:
                parts[-1] = (parts[-1][0], end)
            else:
                parts.append((pos, end))
            records, lines, pos = records + n, lines + spanned, end
            return end

        while pos < at:
            while k < len(skipped) and skipped[k][0] < pos:
                k += 1
            hole = skipped[k][0] if k < len(skipped) else len(data)
            suspect = refused.first(data, pos, min(reach, hole)) if refused else None
            if suspect is None and hole >= at:
                take(at)
                break
            stop = hole if suspect is None else suspect
            if stop > pos and take(stop - 1) != stop:  # the look-alike line is inside a quoted field
                continue
            if suspect is None:
                lines, pos = lines + skipped[k][2], skipped[k][1]
                continue
            end, _, spanned = cut.piece(data, pos, pos)
            if await alone(pos, end, line + lines):
                skipped.insert(k, (pos, end, spanned))
                lines, pos = lines + spanned, end
            else:
                take(pos)
        return parts, records, pos, lines

    parts, end, error = [(0, len(data))], len(data), first_error  # the batch, refused whole with first_error
    while start < len(data) or carry:
        if error is None:
            at = len(data)
            if rate.rows:
                piece = rate.piece()
                # As many known good records as a piece go alone, lest failures pile them up.
                at = start if len(carry) >= piece else start + int(piece * record_bytes)
            parts, records, end, lines = await around(at)
            sent = carry.data + data[parts[0][0] : parts[0][1]] if len(parts) == 1 else carry.data + b"".join(data[a:b] for a, b in parts)
            try:
                rows = await copy(sent, len(carry) + records) if sent else 0
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                error = exc
            else:
                loaded += rows
                rate.rows += rows - len(carry)
                carry = NO_RECORDS
                line += lines
                start = end
                continue
        # The COPY of carry + the parts of data[start:end] failed with `error`.
        reported = copy_line(error)
        if parts == [(start, end)]:
            view, bad = _locate(carry, data, start, end, line, reported, len(data) / max(1, batch.lines), syntax, dialect)
        else:  # around records rejected alone
            view = carry
            for a, b in parts:
                view = view + split_records(data[a:b], line + data.count(newline, start, a), dialect)
            bad = find_copy_line(view, 0, len(view), reported) if reported is not None else None
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
            refused.learn(view.bare(bad), error)
        rate.rows += max(0, bad + 1 - len(carry))
        if bad < len(carry):  # a record carried as good failed: the piece after it was not reached
            carry = view.slice(0, bad) + view.slice(bad + 1, len(carry))
        else:
            after = _source_end(view, bad, len(carry), parts)  # where data[start:] goes on after the bad record
            carry = view.slice(0, bad)
            line += data.count(newline, start, after)
            start = after
        error = None
    return loaded, sorted(rejects, key=lambda reject: reject.line)  # those sent alone were told before their piece's


def _source_end(view: Records, bad: int, carried: int, parts: list[Run]) -> int:
    """The offset in the batch just past record `bad` of `view`: `carried` records, then
    those of `parts` (runs of bytes of the batch), in order."""
    offset = view.offsets[bad + 1] - view.offsets[carried]  # bytes sent from the parts up to the record's end
    for a, b in parts:
        if offset <= b - a:
            return a + offset
        offset -= b - a
    raise AssertionError("a record past the parts sent")  # pragma: no cover


@dataclass(frozen=True)
class _Cut:
    """Pieces of a batch: where one ends, and what it holds. When no record of the batch spans
    lines (the batcher counted as many lines as records), line endings alone end records:
    no pass over the quotes."""

    syntax: RecordSyntax
    one_line: bool

    def piece(self, data: Bytes, start: int, at: int) -> tuple[int, int, int]:
        """(end, records, line endings) of the piece from `start` to the end of the first
        record that ends at or after byte `at`."""
        if not self.one_line:
            return self.syntax.piece(data, start, at)
        found = data.find(self.syntax.newline, at) if at < len(data) else -1
        end = len(data) if found < 0 else found + 1
        lines = data.count(self.syntax.newline, start, end)
        unended = end > start and data[end - 1 : end] != self.syntax.newline  # the last record, without one
        return end, lines + unended, lines


def _locate(
    carry: Records,
    data: Bytes,
    start: int,
    end: int,
    line: int,
    reported: int | None,
    line_bytes: float,
    syntax: RecordSyntax,
    dialect: CsvDialect,
) -> tuple[Records, int | None]:
    """The records of a refused COPY of carry + data[start:end], and the index of the one the
    server reported (None if it named none). Only as much of data[start:end] is split as
    the reported line needs: a guess from the average line's size, doubled until enough."""
    if reported is None:
        return carry + split_records(data[start:end], line, dialect), None
    size = max(line_bytes, reported * line_bytes * 1.25 - len(carry.data))
    while True:
        bound = syntax.record_end(data, start, start + int(size)) if start + size < end else end
        view = carry + split_records(data[start:bound], line, dialect)
        bad = find_copy_line(view, 0, len(view), reported)
        if bad is not None or bound >= end:
            return view, bad
        size *= 2


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
    if len(records) > 1 and sqlstate(error) == BAD_COPY_FILE_FORMAT:
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
