"""Differential test: the loader against psql's \\copy of one record at a time.

Hypothesis writes small CSV files over several column types (int, numeric, date,
timestamptz, boolean, text NOT NULL, a CHECK), with text that holds delimiters, doubled
quotes, LF and CRLF inside quotes, unicode, NULL (unquoted empty) next to the empty
string (""), in files with LF, CRLF or CR line endings (one kind per file), with or
without a final newline, and among them bad rows: letters in the int, an int out of range,
an impossible date, a bad timestamp, a bad boolean, NULL in the NOT NULL column, a CHECK
violation, too few or too many fields, an empty line, invalid UTF-8, a NUL byte, a line
holding only \\. (COPY's end-of-data marker), and a quote left open at the end.

The oracle is PostgreSQL itself: each record alone, in its own file, loaded by psql's
\\copy (one psql process, one \\copy per record, ON_ERROR_STOP off). A record "loads
alone" iff its \\copy succeeded. The loader, with --workers 1 and 4 and batch sizes 1, 7
and the default, must then:

* load exactly those rows (the target table and the oracle's rows are equal multisets),
* reject exactly the others, each under the line where it starts, with the SQLSTATE psql
  got, and with the record's bytes exactly as in the source (without the line ending),
* count them: rows_read == rows_loaded + rows_rejected == number of records,
* exit 0 when nothing was rejected (and write no rejects file), 3 otherwise.

A line of only \\. is, before PostgreSQL 18, the one record whose \\copy alone proves
nothing (it ends the data and loads nothing): the oracle expects it rejected as a COPY format
error (22P04), unless it is the file's last line without a line ending, which COPY reads as
data. From PostgreSQL 18 on, CSV COPY reads every such line as data, and psql's \\copy of a
file sends it as such: the oracle \\copies it like any other record. The
last test pins that a record ending otherwise than the rest of its file loads as it does
alone, whatever the batch size.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devserver import pg_binary
from helpers import Db, read_rejects, server_major

# When a property fails, Hypothesis's pytest plugin imports libcst to write a patch file, and
# libcst's import raises a DeprecationWarning, which the warnings-are-errors config turns into
# an INTERNALERROR that hides the falsifying example. Import it now, quietly.
with contextlib.suppress(ImportError), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

COLUMNS = ("id", "n", "d", "ts", "b", "t")
HEADER = ",".join(COLUMNS).encode()
SOURCE = "data.csv"
REJECTS = SOURCE + ".rejects.csv"

# A fresh pair of tables for every example (the `db` fixture is per test, not per example).
# `oracle` has the target's columns and constraints, plus the number of the record each row
# came from: psql sets oracle.rec before each \copy, and the column's default picks it up.
TABLES = """
DROP VIEW IF EXISTS oracle_rows;
DROP TABLE IF EXISTS target, oracle;
CREATE TABLE target (
    id int,
    n numeric,
    d date,
    ts timestamptz,
    b boolean,
    t text NOT NULL,
    CHECK (n > -1000)
);
CREATE TABLE oracle (
    LIKE target INCLUDING CONSTRAINTS,
    rec int NOT NULL DEFAULT current_setting('oracle.rec')::int
);
CREATE VIEW oracle_rows AS SELECT id, n, d, ts, b, t FROM oracle;
"""

PROPERTY = settings(
    max_examples=14,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- generating CSV files --------------------------------------------------------------------


def quoted(raw: bytes) -> bytes:
    return b'"' + raw.replace(b'"', b'""') + b'"'


def text_field(value: str, force_quotes: bool) -> bytes:
    """A text value as CSV: quoted when it must be (or when asked), so "" is never NULL."""
    raw = value.encode()
    if force_quotes or raw == b"" or any(c in raw for c in (b",", b'"', b"\n", b"\r")):
        return quoted(raw)
    return raw


PIECES = [",", '"', '""', "\n", "\r\n", "\r", " ", "ünïcödé ✓ 漢字 🎉", "\\backslash\\", "a,b", "x"]
TEXT = st.lists(
    st.one_of(
        st.sampled_from(PIECES),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
    ),
    max_size=4,
).map("".join)

NUMERIC = st.one_of(
    st.builds(lambda a, b: f"{a}.{b:04d}", st.integers(-999, 10**9), st.integers(0, 9999)),
    st.integers(-999, 10**15).map(str),
    st.sampled_from(["NaN", "1e3", " 42 ", "-999.999", "0", ""]),
)
DATE = st.one_of(
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["2024-02-29", "infinity", "-infinity", ""]),
)
TIMESTAMP = st.one_of(
    st.builds(
        lambda dt, tz: dt.isoformat(sep=" ") + tz,
        st.datetimes(min_value=datetime(1000, 1, 1)),
        st.sampled_from(["+00", "+05:30", "-08:00", " UTC", "+14"]),
    ),
    st.sampled_from(["infinity", ""]),
)
BOOLEAN = st.sampled_from(["t", "f", "true", "false", "yes", "no", "on", "off", "1", "0", "TRUE", ""])

BAD_KINDS = [
    "int letters",
    "int out of range",
    "bad date",
    "bad timestamp",
    "bad boolean",
    "null text",
    "check violation",
    "too few fields",
    "too many fields",
    "empty line",
    "invalid utf-8",
    "nul byte",
    "end marker",
]
END_MARKER = b"\\."


@st.composite
def good_fields(draw: st.DrawFn, number: int) -> list[bytes]:
    """One good row's fields: mostly a unique row number as id, sometimes NULLs elsewhere."""
    ident = draw(
        st.one_of(st.just(str(number)), st.just(str(number)), st.integers(-(2**31), 2**31 - 1).map(str), st.just(""))
    )
    return [
        ident.encode(),
        draw(NUMERIC).encode(),
        draw(DATE).encode(),
        draw(TIMESTAMP).encode(),
        draw(BOOLEAN).encode(),
        text_field(draw(TEXT), draw(st.booleans())),
    ]


@st.composite
def record(draw: st.DrawFn, number: int) -> bytes:
    """One record without its line ending: good most of the time (Hypothesis shrinks to good)."""
    fields = draw(good_fields(number))
    if draw(st.integers(0, 99)) < 70:
        return b",".join(fields)
    kind = draw(st.sampled_from(BAD_KINDS))
    if kind == "int letters":
        fields[0] = draw(st.sampled_from([b"12a", b"x", b"1.5", b"one"]))
    elif kind == "int out of range":
        fields[0] = b"99999999999"
    elif kind == "bad date":
        fields[2] = draw(st.sampled_from([b"2024-02-30", b"2023-02-29", b"2024-13-01", b"soon"]))
    elif kind == "bad timestamp":
        fields[3] = draw(st.sampled_from([b"2024-01-01 25:00:00+00", b"yesterday-ish", b"2024-01-32 00:00+00"]))
    elif kind == "bad boolean":
        fields[4] = b"maybe"
    elif kind == "null text":
        fields[5] = b""  # unquoted empty: NULL
    elif kind == "check violation":
        fields[1] = draw(st.sampled_from([b"-1000", b"-1000.5", b"-123456"]))
    elif kind == "too few fields":
        fields = fields[: draw(st.integers(1, len(fields) - 1))]
    elif kind == "too many fields":
        fields += draw(st.lists(st.sampled_from([b"", b"extra", b'"x,y"']), min_size=1, max_size=3))
    elif kind == "empty line":
        return b""
    elif kind == "invalid utf-8":
        bad = draw(st.sampled_from([b"\xff", b"caf\xe9", b"\xc3", b"\xed\xa0\x80"]))
        fields[5] = quoted(bad + b"\n" + draw(TEXT).encode()) if draw(st.booleans()) else b"x" + bad
    elif kind == "nul byte":
        fields[5] = quoted(b"a\x00b")
    elif kind == "end marker":
        return END_MARKER
    return b",".join(fields)


@dataclass(frozen=True)
class CsvFile:
    records: list[bytes]  # without their line endings
    endings: list[bytes]  # each record's line ending: b"\n", b"\r\n" or b"\r"; b"" only for the last
    header_ending: bytes = b"\n"

    def data(self) -> bytes:
        return HEADER + self.header_ending + b"".join(r + e for r, e in zip(self.records, self.endings, strict=True))

    def start_lines(self) -> list[int]:
        """The physical line (1-based, the header is line 1) where each record starts."""
        newline = b"\r" if self.header_ending == b"\r" else b"\n"  # what the file's lines end with
        starts, line = [], 2
        for rec in self.records:
            starts.append(line)
            line += rec.count(newline) + 1
        return starts


@st.composite
def csv_files(draw: st.DrawFn) -> CsvFile:
    """Files with one kind of line ending, LF, CRLF or CR (see the test of mixed endings below)."""
    count = draw(st.integers(1, 40))
    records = [draw(record(i + 1)) for i in range(count)]
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    endings = [eol] * count
    if draw(st.integers(0, 9)) == 0:  # a quote left open: only possible in the last record
        records[-1] = b",".join(draw(good_fields(count))[:5]) + b',"never closed' + eol + b"more"
    if records[-1] and draw(st.integers(0, 3)) == 0:
        endings[-1] = b""  # no final line ending (an empty last record would then be no record)
    return CsvFile(records, endings, eol)


# --- the oracle: psql's \copy of each record alone -------------------------------------------

_PSQL_ERROR = re.compile(r":(\d+): ERROR:\s+([0-9A-Z]{5})\s*$")


def oracle(db: Db, folder: Path, csv_file: CsvFile) -> list[str | None]:
    """For each record, None when its \\copy alone loaded it, else the SQLSTATE psql got."""
    psql = pg_binary("psql")
    assert psql, "psql is needed for the oracle"
    folder.mkdir(exist_ok=True)
    script = ["\\set VERBOSITY sqlstate"]
    copy_at: dict[int, int] = {}  # script line of a \copy -> record index
    ends_data = server_major(db.dsn) < 18  # a \. line ends CSV COPY's data; data from 18 on
    for i, rec in enumerate(csv_file.records):
        if ends_data and rec == END_MARKER and csv_file.endings[i]:  # COPY's end of data, not a row
            continue
        path = folder / f"rec{i}.csv"
        path.write_bytes(rec + csv_file.endings[i])
        script.append(f"SET oracle.rec = '{i}';")
        script.append(f"\\copy oracle ({', '.join(COLUMNS)}) FROM '{path}' WITH (FORMAT csv, ENCODING 'UTF8')")
        copy_at[len(script)] = i
    script_path = folder / "oracle.sql"
    script_path.write_text("\n".join(script) + "\n")
    proc = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=0", "-d", db.dsn, "-f", str(script_path)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    states: list[str | None] = [
        "22P04" if ends_data and rec == END_MARKER and ending else None
        for rec, ending in zip(csv_file.records, csv_file.endings, strict=True)
    ]
    for line in proc.stderr.decode(errors="replace").splitlines():
        match = _PSQL_ERROR.search(line)
        assert match and int(match.group(1)) in copy_at, f"unexpected psql output: {line!r}"
        states[copy_at[int(match.group(1))]] = match.group(2)
    loaded = {r["rec"] for r in db.sql("SELECT rec FROM oracle")}
    assert loaded == {i for i, s in enumerate(states) if s is None}, "psql's errors and rows disagree"
    assert db.value("SELECT count(*) FROM oracle") == len(loaded), "a record loaded more than one row"
    return states


# --- the property -------------------------------------------------------------------------------


def check_against_oracle(db: Db, tmp_path: Path, csv_file: CsvFile, workers: int, batch_size: int | None) -> None:
    db.script(TABLES)
    (tmp_path / SOURCE).write_bytes(csv_file.data())
    rejects_path = tmp_path / REJECTS
    rejects_path.unlink(missing_ok=True)

    states = oracle(db, tmp_path / "oracle", csv_file)
    for i, rec in enumerate(csv_file.records):
        if b"\x00" in rec:
            # psql reads a \copy file with fgets and strlen, so it sends a line only up to its
            # NUL: the quoted field is left open and the server says 22P04. The loader sends
            # the bytes as they are, and the server refuses the NUL itself (22021).
            assert states[i] == "22P04"
            states[i] = "22021"
    starts = csv_file.start_lines()
    expected = sorted((starts[i], s, rec) for i, (s, rec) in enumerate(zip(states, csv_file.records, strict=True)) if s is not None)

    args = ["import", SOURCE, "-t", "target", "--workers", str(workers), "--json"]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    run = db.loader(*args)
    assert run.code == (3 if expected else 0), run.stderr
    report = run.json()
    records = len(csv_file.records)
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (
        records,
        records - len(expected),
        len(expected),
    ), run.stderr

    assert db.same_rows("target", "oracle_rows"), (
        "the loader's table differs from the rows psql loaded one by one:\n"
        f"only in the loader's: {db.sql('SELECT * FROM target EXCEPT ALL SELECT * FROM oracle_rows')}\n"
        f"only in psql's: {db.sql('SELECT * FROM oracle_rows EXCEPT ALL SELECT * FROM target')}"
    )

    if not expected:
        assert not rejects_path.exists()
        return
    header, rejects = read_rejects(rejects_path)
    assert header == [(1, "", HEADER)]
    assert sorted(rejects) == expected, run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 7, None], ids=["batch1", "batch7", "batch-default"])
@pytest.mark.parametrize("workers", [1, 4], ids=["w1", "w4"])
@PROPERTY
@given(csv_file=csv_files())
def test_loader_agrees_with_psql_copy_row_by_row(
    db: Db, tmp_path: Path, workers: int, batch_size: int | None, csv_file: CsvFile
) -> None:
    check_against_oracle(db, tmp_path, csv_file, workers, batch_size)


# --- mixed line endings ---------------------------------------------------------------------------
#
# A file whose records do not all end alike (here an LF file with one CRLF line, as a Windows
# tool appending to it would leave). Each record alone loads with psql's \copy; so it does with
# the loader, whatever --batch-size puts it among other records.


@pytest.mark.parametrize("batch_size", [1, 7, None], ids=["batch1", "batch7", "batch-default"])
@pytest.mark.parametrize("workers", [1, 4], ids=["w1", "w4"])
def test_a_record_with_another_line_ending_loads_as_it_does_alone(
    db: Db, tmp_path: Path, workers: int, batch_size: int | None
) -> None:
    csv_file = CsvFile([b"1,1,,,t,a", b"2,1,,,t,b"], [b"\n", b"\r\n"])
    check_against_oracle(db, tmp_path, csv_file, workers, batch_size)


# --- bad values that repeat -------------------------------------------------------------------
#
# A value refused once in a field is looked for in the records after it (see isolate.py's
# RefusedValues): those holding it in that field go alone. Here the same bytes also stand in
# other fields, in a record refused for an earlier field first, and on a line inside a quoted
# field; each record still loads, or is refused, as it does alone.


def repeating_bad_values(eol: bytes) -> CsvFile:
    records = []
    for i in range(1, 121):
        fields = [str(i).encode(), b"1.5", b"2024-01-01", b"2024-01-01 00:00+00", b"t", b"text %d" % i]
        if i % 10 == 3:
            fields[0] = b"one"
        elif i % 10 == 5:
            fields[4] = b"maybe"
        elif i % 10 == 7:
            fields[2] = b"soon"
        elif i % 10 == 8:
            fields[5] = (b"maybe", b"soon", b"one")[i % 3]  # the same bytes in a text field: good
        elif i % 20 == 9:
            fields[0], fields[2] = b"one", b"soon"  # refused for its first bad field
        elif i % 20 == 19:
            fields[5] = quoted(b"three\n%d,1.5,soon,,maybe,x\nlines" % i)  # the look-alike is inside quotes
        records.append(b",".join(fields))
    return CsvFile(records, [eol] * len(records), eol)


@pytest.mark.parametrize("batch_size", [7, None], ids=["batch7", "batch-default"])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_records_holding_a_value_refused_before_load_as_they_do_alone(db: Db, tmp_path: Path, eol: bytes, batch_size: int | None) -> None:
    check_against_oracle(db, tmp_path, repeating_bad_values(eol), 1, batch_size)
