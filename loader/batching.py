"""Cutting a CSV byte stream into batches of whole records, without parsing rows.

A newline ends a record unless it lies inside a quoted field. With the default escape
(a doubled quote), a newline is inside quotes exactly when an odd number of quote
characters precede it in its record, so each line's quote count decides, and that
counting runs in C (bytes.split, bytes.count, itertools): Python code runs per block
and per batch, never per byte. A custom --escape needs a small scan of the lines that
hold quotes; that path is slower, and only taken when asked for.

Every batch carries where it came from (first line, lines, rows, byte offset), which
the error messages, the rejects file and the ledger use.
"""

from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import hashlib
import io
import itertools
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import LoaderError, UsageError
from .options import CsvDialect
from .source import Source, read_block, read_into

READ_SIZE = 1 << 20
SPARE_BUFFERS = 8
MAX_RECORD_BYTES = 64 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class Batch:
    """Whole records, byte for byte as in the source, and where they were found."""

    number: int  # 1-based, in source order
    data: bytes | bytearray  # read straight into on the fast path, and never changed after
    first_line: int  # source line (1-based, the header counts) where the first record starts
    lines: int  # physical lines spanned; more than rows when fields hold newlines
    rows: int
    offset: int  # byte offset of `data` in the (decompressed) source
    checksum: str  # of `data`; the ledger keeps it so a re-read can tell the source changed

    @property
    def last_line(self) -> int:
        return self.first_line + self.lines - 1


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


def record_end_finder(dialect: CsvDialect) -> Callable[[list[bytes]], list[int]]:
    """The function that, given lines starting at a record start, lists the lines ending a record."""
    quote = dialect.quote.encode()
    escape = dialect.escape_char.encode()
    if escape == quote:
        return lambda lines: _ends_doubled_quote(lines, quote)
    return lambda lines: _ends_escaped(lines, quote, escape)


def _lines_spanned(record: bytes, newline: bytes) -> int:
    """Physical lines a last record covers, whether or not it ends with a line ending."""
    return record.count(newline) + (0 if record.endswith(newline) else 1)


def detect_newline(data: bytes, dialect: CsvDialect, complete: bool) -> str | None:
    """What ends the records of `data` (which starts at a record start), by PostgreSQL's
    rule for COPY: the first line break outside quotes decides; CR followed by LF is CRLF,
    whose records end with LF too. None while `data` cannot tell yet (unless `complete`:
    then LF)."""
    quote, escape = dialect.quote.encode(), dialect.escape_char.encode()
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


class _Pending:
    """The records gathered for the next batch."""

    def __init__(self, offset: int, line: int) -> None:
        self.parts: list[memoryview | bytes] = []
        self.bytes = self.rows = self.lines = 0
        self.offset, self.line = offset, line

    def add(self, part: memoryview | bytes, rows: int, lines: int) -> None:
        self.parts.append(part)
        self.bytes += len(part)
        self.rows += rows
        self.lines += lines

    def take(self, number: int) -> Batch:
        data = b"".join(self.parts)
        checksum = hashlib.sha256(data).hexdigest()
        batch = Batch(number, data, self.line, self.lines, self.rows, self.offset, checksum)
        self.offset += self.bytes
        self.line += self.lines
        self.parts = []
        self.bytes = self.rows = self.lines = 0
        return batch


class Batcher:
    """Reads a source block by block and yields batches of at most `batch_rows` records and,
    unless a single record is larger, at most `batch_bytes` bytes."""

    def __init__(
        self,
        source: Source,
        dialect: CsvDialect,
        batch_rows: int,
        batch_bytes: int,
        read_size: int = READ_SIZE,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self._source = source
        self._read_size = read_size
        self._max_record = max_record_bytes
        self.dialect = dialect  # with the newline of the source once known (see _start)
        self._find_ends = record_end_finder(dialect)
        self._quote = dialect.quote.encode()
        # With doubled quotes (the default), record ends are found by quote parity alone.
        self._parity = dialect.escape_char == dialect.quote
        self._nl = b"\n"
        self._not_quote_or_newline = b""
        self._strip_bom = dialect.python_encoding == "utf-8"
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes
        self._tail = b""  # bytes after the last complete record; starts at a record start
        self._offset = 0  # source offset of the tail
        self._line = 1  # source line of the tail
        self._started = False
        self._eof = False
        self._tail_scanned = False  # whether the tail, as it is, was scanned for record ends
        self._spare: collections.deque[bytearray] = collections.deque(maxlen=SPARE_BUFFERS)
        self.header: bytes | None = None

    def done(self, batch: Batch) -> None:
        """The batch's bytes will not be read again: its buffer may hold a later batch.

        A fresh buffer costs a memset and a page fault per 4 KiB, all while holding the GIL,
        just when the event loop has a batch's round trips to make; a reused one costs nothing.
        (deque's append and pop are atomic: this runs on the event loop, the reader in a thread.)"""
        if isinstance(batch.data, bytearray):
            self._spare.append(batch.data)

    def start(self) -> None:
        """Read the first bytes, dropping a UTF-8 byte order mark (its bytes still count in
        offsets), and as many as tell the source's line ending (see detect_newline)."""
        if self._started:
            return
        self._started = True
        first = b""
        while len(first) < len(_UTF8_BOM) and not self._eof:
            more = read_block(self._source, self._read_size)
            self._eof = not more
            first += more
        if self._strip_bom and first.startswith(_UTF8_BOM):
            first = first[len(_UTF8_BOM) :]
            self._offset = len(_UTF8_BOM)
        parts = [first]
        size = len(first)
        while (newline := detect_newline(b"".join(parts), self.dialect, self._eof or size > self._max_record)) is None:
            more = read_block(self._source, max(self._read_size, size))
            self._eof = not more
            parts.append(more)
            size += len(more)
        self._tail = b"".join(parts)
        self.dialect = dataclasses.replace(self.dialect, newline=newline)
        self._nl = newline.encode()
        self._not_quote_or_newline = bytes(b for b in range(256) if b not in (self._quote[0], self._nl[0]))

    def _too_long(self, quote_open: bool) -> LoaderError:
        limit = f"{self._max_record / (1 << 20):g} MiB" if self._max_record >= 1 << 20 else f"{self._max_record:,} bytes"
        why = (
            "a quote opened in it is never closed, or the file holds records that long"
            if quote_open
            else "no line ending comes within that many bytes"
        )
        return LoaderError(
            f"{self._source.name}: the record starting at line {self._line} is longer than {limit} "
            f"(--max-record-bytes): {why}; raise --max-record-bytes (up to 1 GiB) if its records are that long"
        )

    def _scan(self) -> tuple[bytes, list[bytes], list[int]] | None:
        """Read one more block onto the tail; the data, its complete lines, and which end records.
        None once the source is exhausted and the tail has been scanned."""
        self.start()
        if self._eof:
            if self._tail_scanned:
                return None
            block = b""  # the source is exhausted, but records taken off the tail left more to scan
        else:
            block = read_block(self._source, self._read_size)
            self._eof = not block
        data = self._tail + block if self._tail else block
        self._tail_scanned = True
        lines = data.split(self._nl)
        lines.pop()  # the unfinished last line stays in the tail
        ends = self._find_ends(lines)
        if not ends and len(data) > self._max_record:
            raise self._too_long(quote_open=bool(lines))
        self._tail = data
        return data, lines, ends

    def _consume(self, data: bytes, upto: int, lines: int) -> None:
        if upto:
            self._tail_scanned = False
        self._tail = data[upto:]
        self._offset += upto
        self._line += lines

    def read_header(self) -> bytes | None:
        """Take the first record off the stream, without its line ending (None for an empty file)."""
        if self._parity:
            self.start()
            end = self._record_end_after(0, 0, 0)
            if end == 0:
                return None
            record = self._tail[:end]
            self.header = record.rstrip(b"\r\n")
            self._consume(self._tail, end, _lines_spanned(record, self._nl))
            return self.header
        while (scanned := self._scan()) is not None:
            data, lines, ends = scanned
            if ends:
                end = sum(map(len, lines[: ends[0] + 1])) + ends[0] + 1
                self.header = data[:end].rstrip(b"\r\n")
                self._consume(data, end, ends[0] + 1)
                return self.header
        if self._tail:
            self.header = self._tail.rstrip(b"\r\n")
            self._consume(self._tail, len(self._tail), _lines_spanned(self._tail, self._nl))
        return self.header

    # --- the parity path: whole batches cut with a few C-level calls each ---------------------

    def _fill(self, wanted: int) -> bool:
        """Read until the tail holds `wanted` bytes; False when the source is exhausted first."""
        parts = [self._tail]
        have = len(self._tail)
        while have < wanted and not self._eof:
            block = read_block(self._source, max(self._read_size, wanted - have))
            if not block:
                self._eof = True
                break
            parts.append(block)
            have += len(block)
        if len(parts) > 1:
            self._tail = b"".join(parts)
        return have >= wanted

    def _record_end_after(self, start: int, scanned: int, quotes: int) -> int:
        """The end (just past the newline) of the first record ending at or after `scanned`, given
        that `quotes` quote characters lie in tail[start:scanned]; reads on as needed. At the end of
        the source, the end of the data (a last record without a line ending)."""
        while True:
            buf = self._tail
            newline = buf.find(self._nl, scanned)
            if newline >= 0:
                quotes += buf.count(self._quote, scanned, newline)
                scanned = newline + 1
                if quotes % 2 == 0:
                    return scanned
                continue
            quotes += buf.count(self._quote, scanned)
            scanned = len(buf)
            if len(buf) - start > self._max_record:
                raise self._too_long(quote_open=quotes % 2 == 1)
            if not self._fill(len(buf) + self._read_size):
                if len(self._tail) == scanned:
                    return scanned

    def _segments(self, data: bytes) -> list[bytes]:
        """`data` (starting at a record start) stripped to its quotes and newlines, adjacent quote
        pairs dropped (they do not change whether a newline is quoted), split at the quotes left:
        the even segments are outside quotes, the odd ones inside, and each is only newlines."""
        quote = self._quote
        return data.translate(None, self._not_quote_or_newline).replace(quote + quote, b"").split(quote)

    @staticmethod
    def _last_outside(segments: list[bytes]) -> tuple[int, int, int]:
        """(newlines up to the last newline outside quotes, records they end, the segment's index);
        (0, 0, -1) when no newline is outside quotes."""
        for index in range(len(segments) - 1 - (len(segments) - 1) % 2, -1, -2):
            if segments[index]:
                newlines = sum(map(len, segments[: index + 1]))
                records = sum(map(len, segments[0 : index + 1 : 2]))
                return newlines, records, index
        return 0, 0, -1

    def _newline_end(self, data: bytes, newlines: int, total: int) -> int:
        """Offset just past the `newlines`-th line ending of `data`, which holds `total` of them."""
        if total - newlines <= 64:  # usually 0: count back from the end
            end = len(data)
            for _ in range(total - newlines + 1):
                end = data.rfind(self._nl, 0, end)
            return end + 1
        pieces = data.split(self._nl, newlines)
        return sum(map(len, pieces[:newlines])) + newlines

    def _end_of_record(self, data: bytes, segments: list[bytes], k: int, total: int) -> tuple[int, int]:
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
        return self._newline_end(data, newlines, total), newlines

    def _next_buffer(self) -> tuple[bytearray, bytes]:
        """The tail and fresh bytes, up to `batch_bytes`, read straight into a buffer of their
        own, which becomes the batch's data: its bytes are never copied. Also the bytes read
        past the buffer (b"" once the source is exhausted: then the buffer holds all that is left)."""
        size = self._batch_bytes + 1  # the extra byte tells whether the source goes on
        tail = self._tail
        if len(tail) >= size:  # left over from a record longer than --batch-bytes
            return bytearray(tail[: size - 1]), tail[size - 1 :]
        buf = self._buffer(size)
        buf[: len(tail)] = tail
        filled = len(tail)
        with memoryview(buf) as view:
            while filled < size and not self._eof:
                got = read_into(self._source, view[filled : min(size, filled + self._read_size)])
                self._eof = not got
                filled += got
        del buf[filled:]
        self._tail = b""
        if filled < size:
            return buf, b""
        extra = bytes(buf[-1:])
        del buf[-1:]
        return buf, extra

    def _buffer(self, size: int) -> bytearray:
        """A buffer of `size` bytes: a spare one grown back (within its allocation: no copy)."""
        while self._spare:
            buf = self._spare.pop()
            if len(buf) > size:  # held a record longer than --batch-bytes
                continue
            try:
                buf[len(buf) :] = bytes(size - len(buf))
                return buf
            except BufferError:  # still viewed somewhere: leave it
                continue
        return bytearray(size)

    def _iter_parity(self) -> Iterator[Batch]:
        number = 0
        while True:
            buf, extra = self._next_buffer()
            if not buf:
                return
            segments = self._segments(buf)
            total = sum(map(len, segments))  # newlines in buf
            if not extra:  # the rest of the source fits in one batch
                end = len(buf)
                newlines, rows, _ = self._last_outside(segments)
                if newlines < total or not buf.endswith(self._nl):
                    rows += 1  # a last record without a line ending, or with a quote left open
                lines = _lines_spanned(buf, self._nl)
            else:
                newlines, rows, index = self._last_outside(segments)
                if index < 0:  # one record longer than --batch-bytes travels alone
                    self._tail = bytes(buf) + extra
                    end = self._record_end_after(0, 0, 0)  # reads on, replacing the tail
                    buf, extra = bytearray(self._tail[:end]), self._tail[end:]
                    segments, total, rows, lines = [], 0, 1, _lines_spanned(buf, self._nl)
                else:
                    end, lines = self._newline_end(buf, newlines, total), newlines
            if rows > self._batch_rows:
                end, lines = self._end_of_record(buf, segments, self._batch_rows, total)
                rows = self._batch_rows
            if end < len(buf):
                extra = bytes(buf[end:]) + extra
                del buf[end:]
            number += 1
            yield Batch(number, buf, self._line, lines, rows, self._offset, hashlib.sha256(buf).hexdigest())
            self._tail = extra
            self._offset += len(buf)
            self._line += lines

    def __iter__(self) -> Iterator[Batch]:
        self.start()
        if self._parity:
            yield from self._iter_parity()
            return
        pending = _Pending(self._offset, self._line)
        number = 0
        while (scanned := self._scan()) is not None:
            data, lines, ends = scanned
            view = memoryview(data)
            line_sums = list(itertools.accumulate(map(len, lines)))

            def end_of(line_index: int) -> int:
                return line_sums[line_index] + line_index + 1  # just past its newline

            r, cur, cur_line = 0, 0, 0
            while r < len(ends):
                room_rows = self._batch_rows - pending.rows
                room_bytes = self._batch_bytes - pending.bytes
                k = min(r + room_rows, len(ends)) - 1
                full = k - r + 1 == room_rows
                if end_of(ends[k]) - cur > room_bytes:
                    k = bisect.bisect_right(ends, cur + room_bytes, lo=r, hi=k + 1, key=end_of) - 1
                    if k < r:
                        if pending.rows:
                            number += 1
                            yield pending.take(number)
                            continue
                        k = r  # one record larger than --batch-bytes travels alone
                    full = True
                end = end_of(ends[k])
                pending.add(view[cur:end], k - r + 1, ends[k] + 1 - cur_line)
                r, cur, cur_line = k + 1, end, ends[k] + 1
                if full:
                    number += 1
                    yield pending.take(number)
            self._consume(data, cur, cur_line)
        if self._tail:  # a last record without a line ending, or with a quote left open
            if pending.rows and (pending.rows >= self._batch_rows or pending.bytes + len(self._tail) > self._batch_bytes):
                number += 1
                yield pending.take(number)
            pending.add(self._tail, 1, _lines_spanned(self._tail, self._nl))
            self._consume(self._tail, len(self._tail), 0)
        if pending.rows:
            number += 1
            yield pending.take(number)


def parse_header(record: bytes, dialect: CsvDialect, source_name: str) -> list[str]:
    """The header's field names; the only record the loader ever parses on the fast path."""
    try:
        text = record.decode(dialect.python_encoding)
    except UnicodeDecodeError:
        raise UsageError(
            f"{source_name}: line 1 (the header) is not valid {dialect.encoding}; pass the file's --encoding"
        ) from None
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=dialect.delimiter,
        quotechar=dialect.quote,
        doublequote=dialect.escape is None or dialect.escape == dialect.quote,
        escapechar=dialect.escape if dialect.escape not in (None, dialect.quote) else None,
        strict=False,
    )
    return next(reader, [])
