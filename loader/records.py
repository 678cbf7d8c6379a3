"""Where a CSV record ends, how many records some bytes hold, and which one a COPY error names.

The one home of PostgreSQL's CSV record syntax, for the batcher (cutting batches) and the
slow path (cutting pieces, splitting a refused one into records, finding the reported one).

A newline ends a record unless it lies inside a quoted field. With the default escape (a
doubled quote), a newline is inside quotes exactly when an odd number of quote characters
precede it in its record, so quote parity decides, and it is counted in C (bytes.translate,
split, count, find, itertools): Python code runs per block, batch or piece, never per row.
A custom --escape needs a small scan of the lines that hold quotes (`_still_quoted`); that
path is slower, and only taken when asked for.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from .options import CsvDialect

Bytes = bytes | bytearray  # a batch's buffer, or slices of it

_LINE_BREAK = re.compile(rb"[\r\n]")

Run = tuple[int, int]  # records lo:hi


@functools.cache
def _not_quote_or_newline(quote: bytes, newline: bytes) -> bytes:
    """The bytes `translate` deletes to leave only quotes and newlines (built once per pair)."""
    return bytes(b for b in range(256) if b not in (quote[0], newline[0]))


@dataclass(frozen=True, slots=True)
class RecordSyntax:
    """A dialect's quote, escape and newline as bytes, with the record-end rules that use them.

    Built once per batcher or refused batch: the encoded characters and the translate table
    are not rebuilt per call, and whether quote parity applies is decided in one place."""

    quote: bytes
    escape: bytes
    newline: bytes  # what ends a record: LF (also for CRLF files) or CR
    _strip: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_strip", _not_quote_or_newline(self.quote, self.newline))

    @classmethod
    def of(cls, dialect: CsvDialect) -> RecordSyntax:
        return cls(dialect.quote.encode(), dialect.escape_char.encode(), dialect.newline.encode())

    @property
    def parity(self) -> bool:
        """Whether quote parity alone decides record ends: quotes inside fields are doubled."""
        return self.escape == self.quote

    # --- any escape: line by line -------------------------------------------------------------

    def line_ends(self, lines: list[bytes]) -> list[int]:
        """Indices of `lines` (split at the newline, from a record start) that end a record."""
        if self.parity:
            return _ends_doubled_quote(lines, self.quote)
        return _ends_escaped(lines, self.quote, self.escape)

    def lines_spanned(self, record: bytes | bytearray) -> int:
        """Physical lines a last record covers, whether or not it ends with a line ending."""
        return record.count(self.newline) + (0 if record.endswith(self.newline) else 1)

    def detect_newline(self, data: bytes, complete: bool) -> str | None:
        """What ends the records of `data` (which starts at a record start), by PostgreSQL's
        rule for COPY: the first line break outside quotes decides; CR followed by LF is CRLF,
        whose records end with LF too. None while `data` cannot tell yet (unless `complete`:
        then LF). This finds the newline, so `self.newline` is not consulted."""
        quote, escape = self.quote, self.escape
        pos = 0
        while (found := _LINE_BREAK.search(data, pos)) is not None:
            at = found.start()
            if escape == quote:
                quoted = data.count(quote, 0, at) % 2 == 1
            else:
                quoted = _still_quoted(data[:at], quote, escape, False)
            if not quoted:
                if data[at] == 0x0A:
                    return "\n"
                if at + 1 < len(data):
                    return "\n" if data[at + 1] == 0x0A else "\r"
                return "\r" if complete else None
            pos = at + 1
        return "\n" if complete else None

    # --- doubled quotes: whole stretches by parity, in C --------------------------------------

    def segments(self, data: bytes | bytearray) -> list[bytes] | list[bytearray]:
        """`data` (starting at a record start) stripped to its quotes and newlines, adjacent quote
        pairs dropped (they do not change whether a newline is quoted), split at the quotes left:
        the even segments are outside quotes, the odd ones inside, and each is only newlines."""
        quote = self.quote
        return data.translate(None, self._strip).replace(quote + quote, b"").split(quote)

    def records(self, segments: Sequence[bytes | bytearray], data: bytes | bytearray) -> int:
        """The records of `data`, given its `segments`: the newlines outside quotes, and one
        more for a last record without a line ending (or with a quote left open)."""
        if not data:
            return 0
        records = sum(map(len, segments[0::2]))
        terminated = len(segments) % 2 == 1 and segments[-1].endswith(self.newline) and data.endswith(self.newline)
        return records if terminated else records + 1

    @staticmethod
    def last_outside(segments: Sequence[bytes | bytearray]) -> tuple[int, int, int]:
        """(newlines up to the last newline outside quotes, records they end, the segment's index);
        (0, 0, -1) when no newline is outside quotes."""
        for index in range(len(segments) - 1 - (len(segments) - 1) % 2, -1, -2):
            if segments[index]:
                newlines = sum(map(len, segments[: index + 1]))
                records = sum(map(len, segments[0 : index + 1 : 2]))
                return newlines, records, index
        return 0, 0, -1

    def newline_end(self, data: bytes | bytearray, newlines: int, total: int) -> int:
        """Offset just past the `newlines`-th line ending of `data`, which holds `total` of them."""
        if total - newlines <= 64:  # usually 0: count back from the end
            end = len(data)
            for _ in range(total - newlines + 1):
                end = data.rfind(self.newline, 0, end)
            return end + 1
        pieces = data.split(self.newline, newlines)
        return sum(map(len, pieces[:newlines])) + newlines

    def end_of_record(self, data: bytes | bytearray, segments: Sequence[bytes | bytearray], k: int, total: int) -> tuple[int, int]:
        """(offset just past the k-th record's newline, newlines up to there); `data` holds `total`
        newlines (`segments` may describe more bytes than `data`)."""
        remaining, newlines = k, 0
        for i, segment in enumerate(segments):
            if i % 2 == 0 and remaining <= len(segment):
                newlines += remaining
                break
            if i % 2 == 0:
                remaining -= len(segment)
            newlines += len(segment)
        return self.newline_end(data, newlines, total), newlines

    def scan_record_end(self, data: bytes | bytearray, pos: int, odd: int) -> tuple[int, int]:
        """Resume a parity scan at `pos`, `odd` being the parity of the quotes from the record's
        start to `pos`: (just past the first newline at or after `pos` that is outside quotes,
        0), or (-1, the parity up to the end of `data`) when `data` holds no such newline yet,
        so that a reader can append more and resume at len(data)."""
        quote, newline = self.quote, self.newline
        while (at := data.find(newline, pos)) >= 0:
            odd ^= data.count(quote, pos, at) & 1
            pos = at + 1
            if not odd:
                return pos, 0
        return -1, odd ^ (data.count(quote, pos) & 1)

    def piece(self, data: bytes | bytearray, start: int, at: int) -> tuple[int, int, int]:
        """(end, records, line endings) of the piece of `data` from `start`, a record start, to
        the end of the first record that ends at or after byte `at` (the end of `data` if none):
        one pass over the piece's quotes finds where it ends and counts what it holds."""
        if at >= len(data):
            rest = data[start:]
            segments = self.segments(rest)
            return len(data), self.records(segments, rest), sum(map(len, segments))
        segments = self.segments(data[start:at])
        end, _ = self.scan_record_end(data, at, (len(segments) - 1) & 1)
        end = len(data) if end < 0 else end
        # The newlines outside quotes before `at` each end a record; the record going on at `at`
        # ends at `end`.
        records = sum(map(len, segments[0::2])) + 1
        return end, records, sum(map(len, segments)) + data.count(self.newline, at, end)

    def record_end(self, data: bytes | bytearray, start: int, at: int) -> int:
        """Where the first record that ends at or after byte `at` ends, records starting at
        `start`: at the first line ending after `at` that an even number of quotes since
        `start` leaves outside quotes. The end of `data` if none."""
        if at >= len(data):
            return len(data)
        end, _ = self.scan_record_end(data, at, data.count(self.quote, start, at) & 1)
        return len(data) if end < 0 else end


def _ends_doubled_quote(lines: list[bytes], quote: bytes) -> list[int]:
    """Indices of the lines that end a record, when quotes inside fields are doubled."""
    odd = map(operator.and_, map(bytes.count, lines, itertools.repeat(quote)), itertools.repeat(1))
    in_quote = itertools.accumulate(odd, operator.xor)
    return list(itertools.compress(itertools.count(), map(operator.not_, in_quote)))


def _still_quoted(line: bytes, quote: bytes, escape: bytes, in_quote: bool) -> bool:
    """Whether a quoted field is open at the end of `line`, as PostgreSQL's CSV reader sees it:
    inside quotes an odd run of escape characters makes the next quote literal."""
    pos = 0
    while True:
        if not in_quote:
            pos = line.find(quote, pos)
            if pos < 0:
                return False
            in_quote, pos = True, pos + 1
            continue
        q = line.find(quote, pos)
        if q < 0:
            return True
        e = line.find(escape, pos, q)
        if e < 0:
            in_quote, pos = False, q + 1
            continue
        run_end = e
        while line[run_end : run_end + 1] == escape:
            run_end += 1
        if run_end == q and (run_end - e) % 2 == 1:
            pos = q + 1  # an escaped quote: still inside
        else:
            pos = run_end


def _ends_escaped(lines: list[bytes], quote: bytes, escape: bytes) -> list[int]:
    """Indices of the lines that end a record, for a custom escape character."""
    ends: list[int] = []
    in_quote = False
    for i, line in enumerate(lines):
        if in_quote or quote in line:
            in_quote = _still_quoted(line, quote, escape, in_quote)
        if not in_quote:
            ends.append(i)
    return ends


# --- a refused piece, split into records ---------------------------------------------------


class Records:
    """Records of a refused piece, as offsets into their bytes (no copy per record)."""

    def __init__(self, data: Bytes, offsets: list[int], lines: list[int], newline: bytes = b"\n") -> None:
        self.data = data
        self.offsets = offsets  # record i is data[offsets[i]:offsets[i + 1]]
        self.lines = lines  # the source line where record i starts
        self.newline = newline  # what ends a record: LF (also for CRLF files) or CR

    def __len__(self) -> int:
        return len(self.lines)

    def span(self, lo: int, hi: int) -> Bytes:
        return self.data[self.offsets[lo] : self.offsets[hi]]

    def record(self, i: int) -> Bytes:
        return self.span(i, i + 1)

    def bare(self, i: int) -> Bytes:
        """Record i without its line ending (CRLF, LF or CR), as the rejects file holds it."""
        data = self.record(i)
        if data.endswith(self.newline):
            data = data[: -2 if self.newline == b"\n" and data.endswith(b"\r\n") else -1]
        return data

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

    def join(self, runs: Sequence[Run]) -> Bytes:
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


def split_records(data: Bytes, first: int, dialect: CsvDialect) -> Records:
    """The records of `data` (which starts at a record start, on source line `first`), with the
    line each starts on. Every line starts a record unless the line before it ends inside a
    quoted field; all of it in C (split, accumulate, slices), no Python step per row."""
    syntax = RecordSyntax.of(dialect)
    newline = syntax.newline
    lines = data.split(newline)
    lines.pop()  # after the last line ending: empty, or a last record without one
    line_starts = list(itertools.accumulate(map((1).__add__, map(len, lines)), initial=0))
    if syntax.parity:
        # Keep the line starts but those after a line ending inside quotes: ranges lo[i]:hi[i].
        quoted = _quoted_lines(data, line_starts, syntax.quote, newline)
        cuts = [0, *itertools.chain.from_iterable(quoted), len(lines) + 1]
        lo, hi = cuts[0::2], cuts[1::2]
        offsets = list(itertools.chain.from_iterable(map(line_starts.__getitem__, map(slice, lo, hi))))
        starts = list(itertools.chain.from_iterable(map(range, map(first.__add__, lo), map(first.__add__, hi))))
    else:
        # A custom --escape's batches are bytes (joined from the source's blocks), never a buffer.
        kept = [0, *map((1).__add__, syntax.line_ends(cast(list[bytes], lines)))]
        offsets = list(map(line_starts.__getitem__, kept))
        starts = list(map(first.__add__, kept))
    if offsets[-1] < len(data):  # no line ending, or a quote left open at the end
        offsets.append(len(data))
    else:
        starts.pop()
    return Records(data, offsets, starts, newline)


def _quoted_lines(data: Bytes, line_starts: list[int], quote: bytes, newline: bytes) -> Iterator[tuple[int, int]]:
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


# --- the line PostgreSQL reports ----------------------------------------------------------


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
    for i, line in _copy_lines(records, lo, stop):
        if line == reported:
            return i
        if line > reported:
            return None
    return None


def _copy_lines(records: Records, lo: int, stop: int) -> Iterator[tuple[int, int]]:
    """Each record of lo:stop with the line COPY reports for it when lo:stop goes as one COPY."""
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
        yield i, line
        if eol_is_lf is None and ends_lf:
            eol_is_lf = not ends_crlf


def records_at_copy_lines(data: Bytes, first: int, reported: Sequence[int], dialect: CsvDialect) -> list[tuple[int, bytes]] | None:
    """The records at `reported` (ascending), the lines a COPY of all of `data` named (which
    starts at a record start, on source line `first`): for each, the source line it starts on
    and its bytes without the line ending. None when a line names no record (in a file with LF
    line endings, only when it is past the records, or not after the line before).

    With LF line endings only, the records are found by counting line feeds and quotes in C,
    whatever the size of `data`: no Python step per row, only per reported line. Otherwise
    `data` is split into records and each one's line counted (find_copy_line's rules)."""
    syntax = RecordSyntax.of(dialect)
    if syntax.parity and syntax.newline == b"\n" and b"\r" not in data:
        return _records_at_lf_lines(data, first, reported, syntax.quote)
    records = split_records(data, first, dialect)
    at = dict((line, i) for i, line in _copy_lines(records, 0, min(len(records), max(reported, default=0))))
    found = [at.get(line) for line in reported]
    if None in found:
        return None
    return [(records.lines[i], bytes(records.bare(i))) for i in found if i is not None]


def _records_at_lf_lines(data: Bytes, first: int, reported: Sequence[int], quote: bytes) -> list[tuple[int, bytes]] | None:
    """records_at_copy_lines for data with LF line endings only and doubled quotes. COPY counts
    the first record as one line, whatever line feeds its quoted fields hold, and each later
    record as its line feeds: the record at line L > 1 ends with the (L + skew)-th line feed of
    `data`, skew being the first record's line feeds less one. One pass of `bytes.count` up to
    the last line reported, and a few steps per line. The line feed found is taken for a
    record's end, as it is for a line COPY names: the caller checks the record against what
    the server said of it."""
    first_end = RecordSyntax(quote, quote, b"\n").record_end(data, 0, 0)
    skew = data.count(b"\n", 0, first_end) - 1
    sample = min(len(data), 1 << 16)
    line_bytes = sample / max(1, data.count(b"\n", 0, sample))
    pos, seen = 0, 0  # data[:pos] holds `seen` line feeds
    found: list[tuple[int, bytes]] = []
    for line in reported:
        if line == 1:
            if found:
                return None
            found.append((first, bytes(data[:first_end]).removesuffix(b"\n")))
            continue
        n = line + skew
        if n <= seen:  # not past the record before
            return None
        end, ended = _newline_end(data, n, pos, seen, line_bytes), n  # `ended`: the line feeds up to `end`
        if end < 0:  # the last record, if it has no line ending
            ended = seen + data.count(b"\n", pos)
            if n != ended + 1 or data.endswith(b"\n"):
                return None
            end = len(data)
        start = data.rfind(b"\n", 0, end - 1) + 1
        while data.count(quote, start, end) & 1:  # a line break inside quotes: not the record's start
            if start == 0:
                return None
            start = data.rfind(b"\n", 0, start - 1) + 1
        if start < max(pos, first_end):
            return None
        found.append((first + ended - data.count(b"\n", start, end), bytes(data[start:end]).removesuffix(b"\n")))
        pos, seen = end, ended
    return found


def _newline_end(data: Bytes, n: int, pos: int, seen: int, line_bytes: float) -> int:
    """Offset just past the n-th line feed of `data`, of which `seen` (fewer than n) lie before
    `pos`; -1 if `data` holds fewer. Guessed from the average line's size, and counted in C."""
    while True:
        want = n - seen
        hi = min(len(data), pos + int(want * line_bytes) + 1)
        found = data.count(b"\n", pos, hi)
        while found >= want + 64:  # far past it: look nearer
            hi = pos + (hi - pos) // 2
            found = data.count(b"\n", pos, hi)
        if found >= want:
            end = hi
            for _ in range(found - want + 1):
                end = data.rfind(b"\n", pos, end)
            return end + 1
        if hi >= len(data):
            return -1
        pos, seen = hi, seen + found


def split_fields(record: Bytes, dialect: CsvDialect) -> list[str | None] | None:
    """The values of one record (without its line ending) as COPY (FORMAT csv) reads them, for
    doubled quotes: None for NULL (an unquoted field that is the NULL text). None when the
    record does not decode, or leaves a quoted field open (COPY refuses such a record)."""
    encoding = dialect.python_encoding
    delimiter, quote, null = (c.encode(encoding) for c in (dialect.delimiter, dialect.quote, dialect.null))
    values: list[str | None] = []
    i = 0
    while True:
        value, quoted = b"", False
        while True:  # outside quotes: up to the delimiter that ends the field, or a quote
            d, q = record.find(delimiter, i), record.find(quote, i)
            if q < 0 or 0 <= d < q:
                end = len(record) if d < 0 else d
                value += record[i:end]
                break
            value, quoted, i = value + record[i:q], True, q + 1
            while True:  # inside quotes: up to the closing quote; a doubled one is a quote
                q = record.find(quote, i)
                if q < 0:
                    return None
                value += record[i:q]
                if record[q + 1 : q + 2] != quote:
                    i = q + 1
                    break
                value, i = value + quote, q + 2
        try:
            values.append(None if not quoted and value == null else value.decode(encoding))
        except UnicodeDecodeError:
            return None
        if d < 0:
            return values
        i = d + 1


def end_marker_ends_copy(server_version: tuple[int, ...]) -> bool:
    """Whether a line of only \\. ends a CSV COPY's data: before PostgreSQL 18. (From 18 on it
    is a record like any other, refused or loaded as its values say.)"""
    return tuple(server_version[:1]) < (18,)


def holds_end_marker(data: bytes | bytearray, newline: bytes) -> bool:
    """Whether `data` may hold a line of only \\. (COPY's end-of-data marker before
    PostgreSQL 18, which ends the COPY there): a batch that does goes straight to isolation,
    where the COPY's row count finds the line. In C (find), no step per row: the search is
    for a line end followed by \\., which is rare where \\. alone is not (decimals); an
    occurrence inside a quoted field only costs that batch the fast path."""
    if b"\\" not in data:  # memchr: most batches hold no backslash at all
        return False
    ends = newline[-1:]  # what a line's start follows, CRLF included
    at = 0 if data.startswith(b"\\.") else -1
    if at < 0:
        at = data.find(ends + b"\\.")
        at = at + 1 if at >= 0 else -1
    while at >= 0:
        rest = bytes(data[at + 2 : at + 4])
        if not rest or rest.startswith(newline) or rest in (b"\r", b"\r\n"):
            return True
        at = data.find(ends + b"\\.", at + 2)
        at = at + 1 if at >= 0 else -1
    return False
