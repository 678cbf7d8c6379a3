"""Records end where PostgreSQL's COPY says they end, and every record is either loaded or
rejected: files with CR, CRLF or LF line endings, lines holding only \\. (COPY's end-of-data
marker), stray carriage returns.

A line of only \\. is where PostgreSQL's versions differ: before 18, CSV COPY ends its data
there (the loader finds the line by the COPY's row count and rejects it, 22P04); from 18 on,
CSV COPY reads it as data, like any other field. The tests read the server's version and
check what that version does; the suite runs on 15 and 18 (scripts/test).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import Db, read_rejects, server_major

# The loader's message for a line of only \\. that ended a COPY's data (before PostgreSQL 18).
ENDS_THE_DATA = "ends the data of a COPY"


def load(db: Db, path: Path, *args: str, table: str = "t") -> tuple[int, dict[str, object], str]:
    run = db.loader("import", str(path), "-t", table, "--json", *args)
    return run.code, (run.json() if run.stdout else {}), run.stderr


def rows(db: Db) -> list[tuple[object, ...]]:
    return [tuple(r) for r in db.sql("SELECT a, b FROM t ORDER BY a")]


def assert_marker_refused_by_an_int_column(db: Db, reject: object) -> None:
    """Why a line of only \\., where an int column's value belongs, is rejected: before
    PostgreSQL 18 it ends the COPY's data (22P04, the loader's message); from 18 on it is
    data, which the int column refuses (22P02, the server's message)."""
    assert isinstance(reject, dict)
    if server_major(db.dsn) < 18:
        assert (reject["sqlstate"], ENDS_THE_DATA in reject["message"]) == ("22P04", True), reject
    else:
        assert (reject["sqlstate"], reject["message"]) == ("22P02", 'column a: invalid input syntax for type integer: "\\."'), reject


@pytest.mark.parametrize("batch_size", ["1", "2", "50000"])
def test_a_file_with_classic_mac_line_endings_loads_every_row(db: Db, tmp_path: Path, batch_size: str) -> None:
    """CR alone ends the records of a file whose first line ends with CR, as in COPY."""
    db.sql("CREATE TABLE t (a int, b text)")
    path = tmp_path / "mac.csv"
    path.write_bytes(b'a,b\r1,x\r2,"two\rlines"\r3,"quoted\nLF"\r4,z')
    code, report, err = load(db, path, "--batch-size", batch_size)
    assert code == 0, err
    assert (report["rows_read"], report["rows_loaded"]) == (4, 4)
    assert rows(db) == [(1, "x"), (2, "two\rlines"), (3, "quoted\nLF"), (4, "z")]


def test_bad_rows_of_a_classic_mac_file_are_rejected_at_their_lines(db: Db, tmp_path: Path) -> None:
    """Line numbers count CR line endings in a CR file, for the rejects as for the batches."""
    db.sql("CREATE TABLE t (a int, b text)")
    path = tmp_path / "mac.csv"
    path.write_bytes(b'a,b\r1,x\r"2",two\rlines\rbad,y\r3,"q\rq"\rworse,z\r4,w\r')
    code, report, err = load(db, path, "--batch-size", "3")
    assert code == 3, err
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (7, 4, 3)
    _, rejects = read_rejects(path.with_name("mac.csv.rejects.csv"))
    assert [(line, record) for line, _, record in rejects] == [(4, b"lines"), (5, b"bad,y"), (8, b"worse,z")]
    assert rows(db) == [(1, "x"), (2, "two"), (3, "q\rq"), (4, "w")]


def test_a_carriage_return_inside_the_last_record_of_an_lf_file_is_one_reject(db: Db, tmp_path: Path) -> None:
    """A record is counted as loaded only when it loaded as one row: a bare CR that COPY
    would read as a line ending makes it a reject, never two rows counted as one."""
    db.sql("CREATE TABLE t (a int, b text)")
    path = tmp_path / "cr.csv"
    path.write_bytes(b"a,b\n1,x\n2,y\r3,z")
    code, report, err = load(db, path)
    assert code == 3, err
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (2, 1, 1)
    assert db.value("SELECT count(*) FROM t") == 1
    _, rejects = read_rejects(path.with_name("cr.csv.rejects.csv"))
    assert [(line, record) for line, _, record in rejects] == [(3, b"2,y\r3,z")]


@pytest.mark.parametrize("batch_size", ["1", "3", "50000"])
def test_a_line_holding_only_the_end_marker_is_rejected_and_the_rows_after_it_load(
    db: Db, tmp_path: Path, batch_size: str
) -> None:
    """A line of only \\. (ending COPY's data there before PostgreSQL 18, an int column's bad
    value from 18 on) is rejected at its line, and the rows after it load, with bad rows in the
    same batch (the slow path) or not."""
    db.sql("CREATE TABLE t (a int, b text)")
    path = tmp_path / "dot.csv"
    path.write_bytes(b"a,b\nx,bad\n1,a\n\\.\n2,b\n3,c\n")
    code, report, err = load(db, path, "--batch-size", batch_size)
    assert code == 3, err
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (5, 3, 2)
    assert rows(db) == [(1, "a"), (2, "b"), (3, "c")]
    _, rejects = read_rejects(path.with_name("dot.csv.rejects.csv"))
    assert [(line, record) for line, _, record in rejects] == [(2, b"x,bad"), (4, b"\\.")]
    (marker,) = [r for r in report["rejects"] if r["line"] == 4]  # type: ignore[union-attr]
    assert_marker_refused_by_an_int_column(db, marker)


def test_the_end_marker_without_bad_rows_around_it_is_rejected_too(db: Db, tmp_path: Path) -> None:
    """On the fast path (a clean batch) as well: a \\. line, CRLF-ended or last without a
    line ending, never ends the load early, and a quoted "\\." is data."""
    db.sql("CREATE TABLE t (a int, b text)")
    path = tmp_path / "dot.csv"
    path.write_bytes(b'a,b\r\n1,a\r\n\\.\r\n2,"\\."\r\n3,c\r\n\\.')
    code, report, err = load(db, path)
    assert code == 3, err
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (5, 3, 2)
    assert rows(db) == [(1, "a"), (2, "\\."), (3, "c")]
    _, rejects = read_rejects(path.with_name("dot.csv.rejects.csv"))
    assert [(line, record) for line, _, record in rejects] == [(3, b"\\."), (6, b"\\.")]
    by_line = {r["line"]: r for r in report["rejects"]}  # type: ignore[union-attr]
    assert_marker_refused_by_an_int_column(db, by_line[3])
    # The last line, without a line ending, is data on every version.
    assert (by_line[6]["sqlstate"], by_line[6]["message"]) == ("22P02", 'column a: invalid input syntax for type integer: "\\."')


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("batch_size", ["1", "2", "50000"])
def test_the_end_marker_is_a_value_from_postgresql_18_on_and_rejected_before(
    db: Db, tmp_path: Path, batch_size: str, eol: bytes
) -> None:
    """Into a text column: before PostgreSQL 18, a line of only \\. ends CSV COPY's data, so
    the loader rejects it (22P04) and loads the rows after it; from 18 on, CSV COPY reads it as
    the text \\., so it loads like every other row. On both, a quoted "\\." and a last line
    of \\. without a line ending are data, and no row is lost or doubled."""
    db.sql("CREATE TABLE m (v text)")
    path = tmp_path / "dot.csv"
    path.write_bytes(eol.join([b"v", b"x", b"\\.", b'"\\."', b"y", b"\\."]))
    code, report, err = load(db, path, "--batch-size", batch_size, table="m")
    values = sorted(r[0] for r in db.sql("SELECT v FROM m"))
    if server_major(db.dsn) < 18:
        assert code == 3, err
        assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (5, 4, 1)
        assert values == ["\\.", "\\.", "x", "y"]
        (marker,) = report["rejects"]  # type: ignore[misc]
        assert (marker["line"], marker["sqlstate"], ENDS_THE_DATA in marker["message"]) == (3, "22P04", True), marker
        _, rejects = read_rejects(path.with_name("dot.csv.rejects.csv"))
        assert [(line, record) for line, _, record in rejects] == [(3, b"\\.")]
    else:
        assert code == 0, err
        assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (5, 5, 0)
        assert values == ["\\.", "\\.", "\\.", "x", "y"]
        assert not path.with_name("dot.csv.rejects.csv").exists()
