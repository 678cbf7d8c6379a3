"""Records end where PostgreSQL's COPY says they end, and every record is either loaded or
rejected: files with CR, CRLF or LF line endings, lines holding only \\. (COPY's end-of-data
marker), stray carriage returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import Db, read_rejects


def load(db: Db, path: Path, *args: str) -> tuple[int, dict[str, object], str]:
    run = db.loader("import", str(path), "-t", "t", "--json", *args)
    return run.code, (run.json() if run.stdout else {}), run.stderr


def rows(db: Db) -> list[tuple[object, ...]]:
    return [tuple(r) for r in db.sql("SELECT a, b FROM t ORDER BY a")]


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
    """A line of only \\. would end COPY's data there: it is rejected at its line, and the
    rows after it load, with bad rows in the same batch (the slow path) or not."""
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
    assert "\\." in marker["message"], marker


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
