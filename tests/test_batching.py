"""Cutting a CSV byte stream into batches: what the rest of the loader (and the user) relies on.

Property tests generate small CSV files (quoted delimiters, doubled and backslash-escaped
quotes, newlines and CRLF inside fields, empty fields, unicode, mixed line endings, with or
without a final newline, a UTF-8 BOM, a header) and cut them with random read sizes and
batch limits. Every batch must hold whole records, byte for byte as in the file, in order,
and say truthfully where it came from. No database is needed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import warnings
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.batching import Batch, Batcher, parse_header
from loader.options import CsvDialect
from loader.records import split_records
from loader.source import Source

# When a property fails, Hypothesis's pytest plugin imports libcst to write a patch file, and
# libcst's import raises a DeprecationWarning (mypy_extensions.TypedDict), which the warnings-
# are-errors config turns into an INTERNALERROR that hides the falsifying example. Import it
# now, quietly, so a failure is reported as a failure.
with contextlib.suppress(ImportError), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

BOM = b"\xef\xbb\xbf"
NO_BYTE_LIMIT = 8 * 1024 * 1024

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- helpers -------------------------------------------------------------------------------


def source_of(data: bytes) -> Source:
    stream = io.BytesIO(data)
    return Source(name="test.csv", stream=stream, raw=stream, size=len(data), codec=None)


def cut(
    data: bytes,
    dialect: CsvDialect,
    *,
    batch_rows: int = 10,
    batch_bytes: int = NO_BYTE_LIMIT,
    read_size: int = 4096,
) -> tuple[bytes | None, list[Batch]]:
    """The header record (when the dialect has one) and all batches of `data`, each given
    back to the buffer pool (so its buffer is reused) once a copy of it is kept, as the
    pipeline does."""
    source = source_of(data)
    try:
        batcher = Batcher(source, dialect, batch_rows, batch_bytes, read_size=read_size)
        taken = batcher.read_header() if dialect.header else None
        batches = []
        for batch in batcher:
            batches.append(dataclasses.replace(batch, data=bytes(batch.data)))
            batcher.buffers.give_back(batch)
        return taken, batches
    finally:
        source.close()


def custom_escape(dialect: CsvDialect) -> bool:
    return dialect.escape not in (None, dialect.quote)


def python_rows(data: bytes, dialect: CsvDialect) -> list[list[str]]:
    """How Python's csv module reads `data` in this dialect (well-formed input only)."""
    reader = csv.reader(
        io.StringIO(data.decode("utf-8"), newline=""),
        delimiter=dialect.delimiter,
        quotechar=dialect.quote,
        doublequote=not custom_escape(dialect),
        escapechar=dialect.escape if custom_escape(dialect) else None,
        strict=True,
    )
    return list(reader)


def write_field(value: str, dialect: CsvDialect, force_quote: bool) -> str:
    q, esc = dialect.quote, dialect.escape_char
    if not (force_quote or any(c in value for c in (dialect.delimiter, q, esc, "\r", "\n"))):
        return value
    if esc == q:
        return q + value.replace(q, q + q) + q
    return q + value.replace(esc, esc + esc).replace(q, esc + q) + q


def write_record(fields: list[str], quoted: list[bool], dialect: CsvDialect) -> str:
    if fields == [""]:
        quoted = [True]  # an unquoted lone empty field would be an empty line
    return dialect.delimiter.join(write_field(f, dialect, q) for f, q in zip(fields, quoted, strict=True))


def reference_records(data: bytes, quote: bytes, escape: bytes) -> list[bytes]:
    return reference_scan(data, quote, escape)[0]


def reference_scan(data: bytes, quote: bytes, escape: bytes) -> tuple[list[bytes], bool]:
    """Records as PostgreSQL's CSV reader delimits them, one byte at a time: outside quotes a
    quote opens a quoted field and a newline ends the record; inside quotes an escape followed
    by a quote or an escape makes that pair literal, and a lone quote closes the field. A
    record left open at the end of the file (no newline, or a quote never closed) is the last."""
    q, e, nl = quote[0], escape[0], ord("\n")
    records: list[bytes] = []
    start, i, in_quote = 0, 0, False
    while i < len(data):
        c = data[i]
        if in_quote:
            if c == e and i + 1 < len(data) and data[i + 1] in (q, e):
                i += 2
                continue
            if c == q:
                in_quote = False
        elif c == q:
            in_quote = True
        elif c == nl:
            records.append(data[start : i + 1])
            start = i + 1
        i += 1
    if start < len(data):
        records.append(data[start:])
    return records, in_quote


def start_lines(records: list[bytes], first_line: int) -> list[int]:
    lines, line = [], first_line
    for record in records:
        lines.append(line)
        line += record.count(b"\n")
    return lines


def physical_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def check_batches(
    batches: list[Batch],
    records: list[bytes],
    *,
    first_line: int,
    first_offset: int,
    batch_rows: int,
    batch_bytes: int,
    dialect: CsvDialect,
) -> None:
    """Everything a batch promises, given the records (bytes, in order) the body holds."""
    assert b"".join(b.data for b in batches) == b"".join(records)
    assert sum(b.rows for b in batches) == len(records)
    assert [b.number for b in batches] == list(range(1, len(batches) + 1))
    assert [r for b in batches for r in split_records(b.data, b.first_line, dialect).lines] == start_lines(records, first_line)

    line, offset, taken = first_line, first_offset, 0
    for k, b in enumerate(batches):
        own = records[taken : taken + b.rows]
        assert b.data == b"".join(own), f"batch {b.number} does not hold whole records"
        taken += b.rows
        assert b.first_line == line
        assert b.offset == offset
        assert b.lines == physical_lines(b.data)
        assert b.last_line == b.first_line + b.lines - 1
        assert b.checksum == hashlib.sha256(b.data).hexdigest()
        assert 1 <= b.rows <= batch_rows
        if len(b.data) > batch_bytes:
            assert b.rows == 1, f"batch {b.number} exceeds batch_bytes with {b.rows} records"
        if k + 1 < len(batches):
            assert batches[k + 1].first_line == b.first_line + b.lines
            # a batch is closed only when it is full or the next record would not fit
            assert b.rows == batch_rows or len(b.data) + len(records[taken]) > batch_bytes
        line += physical_lines(b.data)
        offset += len(b.data)


# --- strategies -----------------------------------------------------------------------------

PIECES = ["a", "b", "Z", "0", " ", ",", ";", "\t", "|", '"', "'", "\\", "\n", "\r\n", "é", "漢字", "✓", "😀"]
text = st.lists(
    st.one_of(st.sampled_from(PIECES), st.characters(min_codepoint=32, blacklist_categories=("Cs",))),
    max_size=12,
).map("".join)
long_text = st.tuples(st.sampled_from(PIECES), st.integers(60, 300)).map(lambda t: t[0] * t[1])
field_value = st.one_of(text, text, text, text, text, text, text, text, st.just(""), long_text)

doubled_dialects = st.builds(
    lambda delimiter, quote, explicit, header: CsvDialect(delimiter, quote, quote if explicit else None, header=header),
    delimiter=st.sampled_from([",", ";", "\t", "|"]),
    quote=st.sampled_from(['"', "'"]),
    explicit=st.booleans(),  # --escape given as the quote itself: the same doubled-quote rule
    header=st.booleans(),
)
escaped_dialects = st.builds(
    CsvDialect, delimiter=st.sampled_from([",", ";", "\t"]), escape=st.just("\\"), header=st.booleans()
)
dialects = st.one_of(doubled_dialects, escaped_dialects)

limits = st.fixed_dictionaries(
    {
        "read_size": st.one_of(st.integers(1, 16), st.integers(17, 5000)),
        "batch_rows": st.integers(1, 10),
        "batch_bytes": st.one_of(st.just(NO_BYTE_LIMIT), st.integers(1024, 2048)),
    }
)


@dataclass
class CsvFile:
    dialect: CsvDialect
    data: bytes  # the whole file
    bom: bool
    header_names: list[str] | None
    header_record: bytes | None  # as written, line ending included
    records: list[bytes]  # the body's records, line endings included
    rows: list[list[str]]  # what they hold

    @property
    def body_offset(self) -> int:
        return (len(BOM) if self.bom else 0) + (len(self.header_record) if self.header_record else 0)


def rows_of_fields() -> st.SearchStrategy[tuple[list[str], list[bool]]]:
    """A row's field values, and which of them to quote even when they need not be."""
    return st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            st.lists(field_value, min_size=n, max_size=n), st.lists(st.booleans(), min_size=n, max_size=n)
        )
    )


@st.composite
def csv_files(draw: st.DrawFn, dialect_strategy: st.SearchStrategy[CsvDialect] = dialects) -> CsvFile:
    dialect = draw(dialect_strategy)
    rows = draw(st.lists(rows_of_fields(), max_size=10))
    header = draw(rows_of_fields()) if dialect.header else None
    written = ([header] if header else []) + rows
    endings = draw(st.lists(st.sampled_from(["\n", "\r\n"]), min_size=len(written), max_size=len(written)))
    final_newline = draw(st.booleans())
    texts = [write_record(f, q, dialect) + end for (f, q), end in zip(written, endings, strict=True)]
    if texts and not final_newline:
        texts[-1] = texts[-1][: -len(endings[-1])]
    encoded = [t.encode("utf-8") for t in texts]
    # Only with a header: without one, the offsets miss the BOM (see the named test below).
    bom = dialect.header and draw(st.booleans())
    return CsvFile(
        dialect=dialect,
        data=(BOM if bom else b"") + b"".join(encoded),
        bom=bom,
        header_names=header[0] if header else None,
        header_record=encoded[0] if header else None,
        records=encoded[1:] if header else encoded,
        rows=[f for f, _ in rows],
    )


# --- properties -----------------------------------------------------------------------------


@PROPERTY
@given(csv_files(), limits)
def test_batches_give_back_every_record_whole_in_order_and_say_where_they_came_from(f: CsvFile, lim: dict) -> None:
    if f.bom:  # a first read of at most the BOM's 3 bytes mishandles it (see the named tests below)
        lim = {**lim, "read_size": max(lim["read_size"], len(BOM) + 1)}
    header, batches = cut(f.data, f.dialect, **lim)

    # the header is taken off and split into its names
    if f.dialect.header:
        if f.header_record is None:
            assert header is None
        else:
            assert header == f.header_record.rstrip(b"\r\n")
            assert parse_header(header, f.dialect, "test.csv") == f.header_names

    # nothing lost, duplicated or reordered; whole records; consistent positions
    check_batches(
        batches,
        f.records,
        first_line=1 + (physical_lines(f.header_record) if f.header_record else 0),
        first_offset=f.body_offset,
        batch_rows=lim["batch_rows"],
        batch_bytes=lim["batch_bytes"],
        dialect=f.dialect,
    )

    # each batch parses alone to the same rows as the whole body does
    body = b"".join(f.records)
    assert python_rows(body, f.dialect) == f.rows
    assert [row for b in batches for row in python_rows(b.data, f.dialect)] == f.rows


@PROPERTY
@given(
    st.lists(st.sampled_from([b"a", b",", b'"', b"\\", b"\n", b"\r\n", b"\xc3\xa9"]), max_size=60).map(b"".join),
    st.sampled_from([CsvDialect(header=False), CsvDialect(escape="\\", header=False)]),
    limits,
)
def test_records_end_where_postgresql_would_end_them_even_in_malformed_input(
    data: bytes, dialect: CsvDialect, lim: dict
) -> None:
    """Arbitrary quotes, backslashes and newlines: batch boundaries and record starts match a
    byte-at-a-time reading of PostgreSQL's rule (for the custom escape and the doubled quote)."""
    _, batches = cut(data, dialect, **lim)
    records, _ = reference_scan(data, dialect.quote.encode(), dialect.escape_char.encode())
    check_batches(
        batches,
        records,
        first_line=1,
        first_offset=0,
        batch_rows=lim["batch_rows"],
        batch_bytes=lim["batch_bytes"],
        dialect=dialect,
    )


@PROPERTY
@given(csv_files(escaped_dialects), limits)
def test_backslash_escaped_quotes_and_backslashes_are_cut_like_postgresql(f: CsvFile, lim: dict) -> None:
    """Well-formed files with --escape '\\': the reference reading agrees with the generated records."""
    if f.bom:  # see test_batches_give_back_every_record_whole_in_order_and_say_where_they_came_from
        lim = {**lim, "read_size": max(lim["read_size"], len(BOM) + 1)}
    body = f.data[f.body_offset :]
    assert reference_records(body, b'"', b"\\") == f.records
    _, batches = cut(f.data, f.dialect, **lim)
    check_batches(
        batches,
        reference_records(body, b'"', b"\\"),
        first_line=1 + (physical_lines(f.header_record) if f.header_record else 0),
        first_offset=f.body_offset,
        batch_rows=lim["batch_rows"],
        batch_bytes=lim["batch_bytes"],
        dialect=f.dialect,
    )


headerless_dialects = dialects.map(lambda d: CsvDialect(d.delimiter, d.quote, d.escape, header=False))


@PROPERTY
@given(
    csv_files(headerless_dialects),
    text,
    st.lists(field_value, max_size=2),
    st.booleans(),
    limits,
)
def test_a_quote_left_open_at_end_of_file_is_kept_as_the_last_record(
    f: CsvFile, open_value: str, before: list[str], newline_at_end: bool, lim: dict
) -> None:
    d = f.dialect
    body = f.data[f.body_offset :]
    if body and not body.endswith(b"\n"):
        body += b"\n"
    opened = write_field(open_value, d, force_quote=True)[:-1]  # the closing quote is missing
    open_record = d.delimiter.join([*(write_field(v, d, False) for v in before), opened])
    tail = (open_record + ("\n" if newline_at_end else "")).encode()
    records = reference_records(body, d.quote.encode(), d.escape_char.encode())
    data = body + tail

    _, batches = cut(data, d, **lim)

    assert batches, "the open record was lost"
    last = batches[-1]
    assert last.data.endswith(tail)
    assert split_records(last.data, last.first_line, d).lines[-1] == 1 + body.count(b"\n")
    check_batches(
        batches,
        [*records, tail],
        first_line=1,
        first_offset=0,
        batch_rows=lim["batch_rows"],
        batch_bytes=lim["batch_bytes"],
        dialect=d,
    )


@PROPERTY
@given(
    st.lists(
        st.tuples(st.integers(0, 700), st.sampled_from(["x", '"a\nb"', '"a""b"']), st.sampled_from(["\n", "\r\n"])),
        min_size=1,
        max_size=12,
    ),
    st.data(),
    st.integers(-1, 1),
    st.one_of(st.integers(1, 12), st.just(12)),
    st.integers(1, 5000),
    st.booleans(),
)
def test_a_batch_holds_as_many_records_as_fit_in_batch_bytes_and_never_one_more(
    shapes: list[tuple[int, str, str]],
    data: st.DataObject,
    delta: int,
    batch_rows: int,
    read_size: int,
    final_newline: bool,
) -> None:
    """batch_bytes lands within a byte of where a run of records (often all of them) ends."""
    upto = data.draw(st.one_of(st.just(len(shapes)), st.integers(1, len(shapes))), label="upto")
    records = [(f"{i},{'y' * n},{field}{end}").encode() for i, (n, field, end) in enumerate(shapes)]
    if not final_newline:
        records[-1] = records[-1].rstrip(b"\r\n")
    batch_bytes = max(1024, sum(map(len, records[:upto])) + delta)
    dialect = CsvDialect(header=False)
    _, batches = cut(b"".join(records), dialect, batch_rows=batch_rows, batch_bytes=batch_bytes, read_size=read_size)
    check_batches(
        batches,
        records,
        first_line=1,
        first_offset=0,
        batch_rows=batch_rows,
        batch_bytes=batch_bytes,
        dialect=dialect,
    )


# --- named cases ----------------------------------------------------------------------------


def test_a_quoted_field_spanning_lines_stays_in_one_batch() -> None:
    data = b'id,note\n1,"first\nsecond"\n2,plain\n3,"x\r\ny"\r\n'
    header, batches = cut(data, CsvDialect(), batch_rows=1, read_size=1)
    assert header == b"id,note"
    assert [b.data for b in batches] == [b'1,"first\nsecond"\n', b"2,plain\n", b'3,"x\r\ny"\r\n']
    assert [(b.first_line, b.lines, b.rows, b.offset) for b in batches] == [(2, 2, 1, 8), (4, 1, 1, 25), (5, 2, 1, 33)]


def test_doubled_quotes_and_delimiters_inside_quotes_do_not_end_a_field() -> None:
    data = b'1,"he said ""hi,\nthere"""\n2,""\n3,"""\n"""\n'
    _, batches = cut(data, CsvDialect(header=False), batch_rows=1)
    assert [b.data for b in batches] == [b'1,"he said ""hi,\nthere"""\n', b'2,""\n', b'3,"""\n"""\n']
    assert [row for b in batches for row in python_rows(b.data, CsvDialect())] == [
        ["1", 'he said "hi,\nthere"'],
        ["2", ""],
        ["3", '"\n"'],
    ]


def test_with_backslash_escape_an_escaped_quote_keeps_the_field_open() -> None:
    dialect = CsvDialect(escape="\\", header=False)
    data = b'1,"a\\"\nb"\n2,"c\\\\"\n3,"d\\\\\\"\ne"\n4,"\\x"\n'
    _, batches = cut(data, dialect, batch_rows=1, read_size=3)
    assert [b.data for b in batches] == [b'1,"a\\"\nb"\n', b'2,"c\\\\"\n', b'3,"d\\\\\\"\ne"\n', b'4,"\\x"\n']
    assert [row for b in batches for row in python_rows(b.data, dialect)] == [
        ["1", 'a"\nb'],
        ["2", "c\\"],
        ["3", 'd\\"\ne'],
        ["4", "x"],  # Python drops a backslash before an ordinary character; PostgreSQL keeps it
    ]
    assert [b.first_line for b in batches] == [1, 3, 4, 6]


def test_without_custom_escape_a_backslash_is_an_ordinary_character() -> None:
    data = b'1,"a\\"\n2,"b"\n'
    _, batches = cut(data, CsvDialect(header=False), batch_rows=1)
    assert [b.data for b in batches] == [b'1,"a\\"\n', b'2,"b"\n']


def test_a_header_with_a_newline_inside_quotes_is_removed_and_its_names_returned() -> None:
    dialect = CsvDialect()
    data = b'id,"long\nname","say ""hi"""\r\n1,2,3\r\n'
    header, batches = cut(data, dialect)
    assert header == b'id,"long\nname","say ""hi"""'
    assert parse_header(header, dialect, "test.csv") == ["id", "long\nname", 'say "hi"']
    assert [(b.data, b.first_line, b.offset) for b in batches] == [(b"1,2,3\r\n", 3, len(data) - 7)]


def test_a_utf8_bom_is_stripped_and_still_counted_in_offsets() -> None:
    data = BOM + b"name\n\xc3\xa9\n"
    header, batches = cut(data, CsvDialect())
    assert header == b"name"
    assert [(b.data, b.offset, b.first_line) for b in batches] == [(b"\xc3\xa9\n", 3 + 5, 2)]


def test_without_a_header_the_first_batch_offset_still_counts_the_stripped_bom() -> None:
    """Offsets are the file's: the stripped byte order mark still counts."""
    _, batches = cut(BOM + b"1\n", CsvDialect(header=False))
    assert [(b.data, b.offset) for b in batches] == [(b"1\n", 3)]


def test_a_bom_is_stripped_even_when_the_first_read_is_shorter_than_it() -> None:
    """The byte order mark is stripped however the reads cut it."""
    header, batches = cut(BOM + b"h\n1\n", CsvDialect(), read_size=2)
    assert (header, [b.data for b in batches]) == (b"h", [b"1\n"])


def test_a_first_read_of_exactly_the_bom_is_not_taken_for_the_end_of_the_file() -> None:
    """A first read that is only the byte order mark is not the end of the file."""
    header, batches = cut(BOM + b"h\n1\n", CsvDialect(), read_size=3)
    assert (header, [b.data for b in batches]) == (b"h", [b"1\n"])


def test_a_bom_is_data_when_the_file_is_not_utf8() -> None:
    data = BOM + b"a\n"
    _, batches = cut(data, CsvDialect(encoding="latin-1", header=False))
    assert [(b.data, b.offset) for b in batches] == [(data, 0)]


def test_a_header_only_file_yields_no_batches() -> None:
    for data in (b"a,b\n", b"a,b", b"a,b\r\n", BOM + b"a,b\n", b'"a\nb",c\n'):
        header, batches = cut(data, CsvDialect())
        assert header == data.removeprefix(BOM).rstrip(b"\r\n")
        assert batches == []


def test_an_empty_file_has_no_header_and_no_batches() -> None:
    for data in (b"", BOM):
        assert cut(data, CsvDialect()) == (None, [])
        assert cut(data, CsvDialect(header=False)) == (None, [])


def test_a_last_record_without_a_newline_is_kept() -> None:
    _, batches = cut(b"h\n1\n2", CsvDialect(), batch_rows=5, read_size=1)
    assert [(b.data, b.rows, b.first_line, b.lines) for b in batches] == [(b"1\n2", 2, 2, 2)]


def test_an_unterminated_quote_at_end_of_file_is_one_last_record() -> None:
    data = b'h\n1\n2,"open\nstill open'
    _, batches = cut(data, CsvDialect(), batch_rows=1, read_size=2)
    assert [(b.data, b.rows, b.first_line, b.lines) for b in batches] == [
        (b"1\n", 1, 2, 1),
        (b'2,"open\nstill open', 1, 3, 2),
    ]


def test_an_unterminated_quote_ending_in_a_newline_spans_only_its_own_lines() -> None:
    """An open record that ends with a line break spans its own lines, not one past the end."""
    _, batches = cut(b'1,"open\n', CsvDialect(header=False))
    assert [(b.data, b.rows, b.first_line, b.lines) for b in batches] == [(b'1,"open\n', 1, 1, 1)]


def test_a_record_larger_than_batch_bytes_travels_alone() -> None:
    big = b'2,"' + b"x" * 1500 + b'"\n'
    data = b"1,a\n" + big + b"3,b\n4,c\n"
    _, batches = cut(data, CsvDialect(header=False), batch_rows=10, batch_bytes=1024, read_size=100)
    assert [b.data for b in batches] == [b"1,a\n", big, b"3,b\n4,c\n"]
    assert [b.rows for b in batches] == [1, 1, 2]


def test_batch_rows_limits_each_batch() -> None:
    data = b"".join(b"%d\n" % i for i in range(7))
    _, batches = cut(data, CsvDialect(header=False), batch_rows=3, read_size=5)
    assert [b.rows for b in batches] == [3, 3, 1]
    assert [b.first_line for b in batches] == [1, 4, 7]
    assert [b.offset for b in batches] == [0, 6, 12]


def test_each_record_of_a_batch_is_found_on_its_starting_line() -> None:
    data = b'h\n1,"a\nb\nc"\n2,x\n3,"\r\n"\r\n4,y\n'
    _, batches = cut(data, CsvDialect(), batch_rows=10)
    assert len(batches) == 1
    assert split_records(batches[0].data, batches[0].first_line, CsvDialect()).lines == [2, 5, 6, 8]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"bb", b",", b'"', b'""', b"\n", b"\r\n", b"x" * 700]), max_size=120).map(b"".join),
    st.integers(1, 6),
    st.sampled_from([1024, 1500, 8 << 20]),
    st.integers(1, 300),
)
def test_the_fast_cutter_cuts_exactly_where_the_line_by_line_cutter_does(
    data: bytes, batch_rows: int, batch_bytes: int, read_size: int
) -> None:
    """Doubled quotes take the fast path (quote parity over whole blocks); it must agree with the
    line-by-line path, batch for batch, on any input, malformed or not."""

    def cut_with(parity: bool) -> list[tuple[bytes, int, int, int, int]]:
        stream = io.BytesIO(data)
        batcher = Batcher(Source("x", stream, stream, len(data), False), CsvDialect(header=False), batch_rows, batch_bytes, read_size)
        batcher._parity = parity
        return [(b.data, b.first_line, b.lines, b.rows, b.offset) for b in batcher]

    assert cut_with(True) == cut_with(False)


def test_a_batch_given_back_lends_its_buffer_to_a_later_batch() -> None:
    data = b"".join(b"%d,some text\n" % i for i in range(1000))
    batcher = Batcher(source_of(data), CsvDialect(header=False), batch_rows=10**6, batch_bytes=1024, read_size=64)
    batches = iter(batcher)
    first = next(batches)
    buffer, first_bytes = first.data, bytes(first.data)
    batcher.buffers.give_back(first)
    second = next(batches)
    assert second.data is buffer
    assert first_bytes + bytes(second.data) == data[: len(first_bytes) + len(second.data)]
