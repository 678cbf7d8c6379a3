"""Cutting a CSV byte stream into batches of whole records, without parsing rows.

This module reads and buffers; where a record ends is `records`' knowledge. With doubled
quotes (the default) a whole candidate batch is cut with a few C-level calls; a custom
--escape takes the line-by-line path. Batch bytes are read straight into buffers that a
`BufferPool` lends again once a batch is done.

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
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import BadSource, SourceFailed
from .options import CsvDialect, LoadOptions
from .records import RecordSyntax
from .source import Source, read_block, read_into

READ_SIZE = 1 << 20
SPARE_BUFFERS = 8
MAX_RECORD_BYTES = 64 << 20
_UTF8_BOM = b"\xef\xbb\xbf"


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


class BufferPool:
    """Buffers of finished batches, lent to later ones.

    A fresh buffer costs a memset and a page fault per 4 KiB, all while holding the GIL,
    just when the event loop has a batch's round trips to make; a reused one costs nothing.
    `give_back` runs on the event loop and `take` in the reader thread: deque's append and
    pop are atomic."""

    def __init__(self, keep: int = SPARE_BUFFERS) -> None:
        self._spare: collections.deque[bytearray] = collections.deque(maxlen=keep)

    def give_back(self, batch: Batch) -> None:
        """The batch's bytes will not be read again: its buffer may hold a later batch."""
        if isinstance(batch.data, bytearray):
            self._spare.append(batch.data)

    def take(self, size: int) -> bytearray:
        """A buffer of `size` bytes: a spare one grown back (within its allocation: no copy)."""
        while self._spare:
            buf = self._spare.pop()
            if len(buf) >= size:  # too big (a long record, or a small file's last batch) to be grown
                continue
            try:  # growing it is also what tells that no view of it is left
                buf[len(buf) :] = bytes(size - len(buf))
                return buf
            except BufferError:  # still viewed somewhere: leave it
                continue
        return bytearray(size)


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
        self.dialect = dialect  # with the newline of the source once known (see start)
        self._syntax = RecordSyntax.of(dialect)  # likewise
        # With doubled quotes (the default), whole batches are cut by quote parity.
        self._parity = self._syntax.parity
        self._strip_bom = dialect.python_encoding == "utf-8"
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes
        self._tail = b""  # bytes after the last complete record; starts at a record start
        self._offset = 0  # source offset of the tail
        self._line = 1  # source line of the tail
        self._started = False
        self._eof = False
        self._tail_scanned = False  # whether the tail, as it is, was scanned for record ends
        self.buffers = BufferPool()  # give each batch back once its bytes are no longer read
        self.header: bytes | None = None

    @classmethod
    def of_load(cls, source: Source, options: LoadOptions) -> Batcher:
        """The batches of a load: cut where the load's options say (see plan.boundaries), the
        same for every run that reads the source, so that their checksums compare."""
        return cls(source, options.dialect, options.batch_rows, options.batch_bytes, max_record_bytes=options.max_record_bytes)

    def start(self) -> None:
        """Read the first bytes, dropping a UTF-8 byte order mark (its bytes still count in
        offsets), and as many as tell the source's line ending (see RecordSyntax.detect_newline)."""
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
        while (newline := self._syntax.detect_newline(b"".join(parts), self._eof or size > self._max_record)) is None:
            more = read_block(self._source, max(self._read_size, size))
            self._eof = not more
            parts.append(more)
            size += len(more)
        self._tail = b"".join(parts)
        self.dialect = dataclasses.replace(self.dialect, newline=newline)
        self._syntax = RecordSyntax.of(self.dialect)

    def _too_long(self, quote_open: bool) -> SourceFailed:
        limit = f"{self._max_record / (1 << 20):g} MiB" if self._max_record >= 1 << 20 else f"{self._max_record:,} bytes"
        why = (
            "a quote opened in it is never closed, or the file holds records that long"
            if quote_open
            else "no line ending comes within that many bytes"
        )
        return SourceFailed(
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
        lines = data.split(self._syntax.newline)
        lines.pop()  # the unfinished last line stays in the tail
        ends = self._syntax.line_ends(lines)
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
            end = self._first_record_end()
            if end == 0:
                return None
            record = self._tail[:end]
            self.header = record.rstrip(b"\r\n")
            self._consume(self._tail, end, self._syntax.lines_spanned(record))
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
            self._consume(self._tail, len(self._tail), self._syntax.lines_spanned(self._tail))
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

    def _first_record_end(self) -> int:
        """The end (just past the newline) of the tail's first record, reading on as needed. At
        the end of the source, the end of the data (a last record without a line ending)."""
        scanned, odd = 0, 0
        while True:
            end, odd = self._syntax.scan_record_end(self._tail, scanned, odd)
            if end >= 0:
                return end
            scanned = len(self._tail)
            if scanned > self._max_record:
                raise self._too_long(quote_open=odd == 1)
            if not self._fill(scanned + self._read_size) and len(self._tail) == scanned:
                return scanned

    def _next_buffer(self) -> tuple[bytearray, bytes]:
        """The tail and fresh bytes, up to `batch_bytes`, read straight into a buffer of their
        own, which becomes the batch's data: its bytes are never copied. Also the bytes read
        past the buffer (b"" once the source is exhausted: then the buffer holds all that is left)."""
        size = self._batch_bytes + 1  # the extra byte tells whether the source goes on
        tail = self._tail
        left = self._source.bytes_left()
        if left is not None:  # a small file's buffer is its size, not --batch-bytes (a memset and page faults)
            size = min(size, len(tail) + left + 1)
        if len(tail) >= size:  # left over from a record longer than --batch-bytes
            return bytearray(tail[: size - 1]), tail[size - 1 :]
        buf = self.buffers.take(size)
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

    def _iter_parity(self) -> Iterator[Batch]:
        """Whole batches, each cut with a few C-level calls on its buffer (see RecordSyntax)."""
        syntax = self._syntax
        number = 0
        while True:
            buf, extra = self._next_buffer()
            if not buf:
                return
            segments = syntax.segments(buf)
            total = sum(map(len, segments))  # newlines in buf
            if not extra:  # the rest of the source fits in one batch
                end = len(buf)
                rows = syntax.records(segments, buf)
                lines = syntax.lines_spanned(buf)
            else:
                newlines, rows, index = syntax.last_outside(segments)
                if index < 0:  # one record longer than --batch-bytes travels alone
                    self._tail = bytes(buf) + extra
                    end = self._first_record_end()  # reads on, replacing the tail
                    buf, extra = bytearray(self._tail[:end]), self._tail[end:]
                    segments, total, rows, lines = [], 0, 1, syntax.lines_spanned(buf)
                else:
                    end, lines = syntax.newline_end(buf, newlines, total), newlines
            if rows > self._batch_rows:
                end, lines = syntax.end_of_record(buf, segments, self._batch_rows, total)
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

            def end_of(line_index: int, line_sums: list[int] = line_sums) -> int:
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
            pending.add(self._tail, 1, self._syntax.lines_spanned(self._tail))
            self._consume(self._tail, len(self._tail), 0)
        if pending.rows:
            number += 1
            yield pending.take(number)


def parse_header(record: bytes, dialect: CsvDialect, source_name: str) -> list[str]:
    """The header's field names; the only record the loader ever parses on the fast path."""
    try:
        text = record.decode(dialect.python_encoding)
    except UnicodeDecodeError:
        raise BadSource(
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
