"""Many small files: the new files of a set that fit in one batch load several to a
transaction, each still a load of its own in the ledger, exactly once.

What a user sees: the files load, each reported and recorded on its own; a file with a bad
row has its rejects like any other; a run killed while a group loads leaves that group's loads
interrupted, and the next run loads them exactly once; a group whose connection is cut is
tried again; a copy of a file in the set is skipped, whichever group it falls in.

The runs are real processes; a group is held where needed by a row trigger that waits on an
advisory lock the test holds (the gate), never by sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Background, Db, Gate, kill_9, read_rejects, until, write_rows

ROWS = 50
GATE = 4343
GATED_TABLE = f"""
CREATE TABLE t (id bigint PRIMARY KEY, name text);
CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NEW; END $$;
CREATE TRIGGER gate BEFORE INSERT ON t FOR EACH ROW WHEN (NEW.name <> 'part-00.csv') EXECUTE FUNCTION gate();
"""


def parts(tmp_path: Path, files: int) -> list[tuple[int, str]]:
    """`files` files of 50 rows under parts/; the rows the table must hold once all loaded."""
    (tmp_path / "parts").mkdir()
    expected = []
    for n in range(files):
        name = f"part-{n:02}.csv"
        rows = [(i, name) for i in range(n * ROWS, (n + 1) * ROWS)]
        write_rows(tmp_path / "parts" / name, "id,name", rows)
        expected.extend(rows)
    return expected


def contents(db: Db) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.sql("SELECT id, name FROM t ORDER BY id")]


def loads(db: Db) -> dict[str, tuple[str, int, int]]:
    """Each source's one load in the ledger: (state, batches, rows in them)."""
    rows = db.sql(
        "SELECT source, state, (SELECT count(*) FROM loader.batches b WHERE b.load_id = l.load_id) AS batches, "
        "(SELECT coalesce(sum(rows_loaded), 0) FROM loader.batches b WHERE b.load_id = l.load_id) AS rows "
        "FROM loader.loads l"
    )
    by_source = {r["source"].rsplit("/", 1)[-1]: (r["state"], r["batches"], r["rows"]) for r in rows}
    assert len(by_source) == len(rows), "a source has two loads"
    return by_source


@pytest.fixture
def gate(db: Db) -> Iterator[Gate]:
    """Rows inserted into t (but part-00.csv's, which loads alone first) wait until the test
    opens the gate."""
    held = Gate(db, GATE)
    yield held
    held.close()


def test_small_files_share_transactions_and_each_is_still_a_load_of_its_own(db: Db, tmp_path: Path) -> None:
    """40 files of 50 rows: all loaded, each reported with its rows and recorded as a load of
    its own with its one batch, in far fewer transactions than files (a batch's commit time is
    its transaction's). The same command again loads nothing."""
    db.script("CREATE TABLE t (id bigint PRIMARY KEY, name text)")
    expected = parts(tmp_path, 40)
    run = db.loader("import", "parts", "-t", "t", "--json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert [(s["state"], s["rows_read"], s["rows_loaded"]) for s in report["sources"]] == [("loaded", ROWS, ROWS)] * 40
    assert contents(db) == expected
    assert loads(db) == {f"part-{n:02}.csv": ("succeeded", 1, ROWS) for n in range(40)}
    transactions = db.value("SELECT count(DISTINCT committed_at) FROM loader.batches")
    assert transactions <= 10, f"{transactions} transactions for 40 small files"

    again = db.loader("import", "parts", "-t", "t", "--json")
    assert again.code == 0, again.stderr
    assert {s["state"] for s in again.json()["sources"]} == {"skipped"}
    assert contents(db) == expected


def test_a_small_file_with_a_bad_row_has_its_rejects_and_the_others_load(db: Db, tmp_path: Path) -> None:
    """One file among 20 has a value its column refuses: that file loads without it (its
    rejects file names the line), every other file loads whole; exit 3."""
    db.script("CREATE TABLE t (id bigint PRIMARY KEY, name text)")
    expected = parts(tmp_path, 20)
    bad = tmp_path / "parts" / "part-07.csv"
    lines = bad.read_text().splitlines()
    lines[5] = "oops,part-07.csv"  # line 6 of the file; the row of id 354 is not in it
    bad.write_text("\n".join(lines) + "\n")
    run = db.loader("import", "parts", "-t", "t", "--json")
    assert run.code == 3, run.stderr
    sources = {s["source"]: s for s in run.json()["sources"]}
    assert (sources["parts/part-07.csv"]["state"], sources["parts/part-07.csv"]["rows_loaded"]) == ("loaded-with-rejects", ROWS - 1)
    assert {s["state"] for name, s in sources.items() if name != "parts/part-07.csv"} == {"loaded"}
    _, rejects = read_rejects(tmp_path / "parts" / "part-07.csv.rejects.csv")
    assert [(line, sqlstate, record) for line, sqlstate, record in rejects] == [(6, "22P02", b"oops,part-07.csv")]
    assert contents(db) == [row for row in expected if row[0] != 354]
    assert loads(db)["part-07.csv"] == ("succeeded", 1, ROWS - 1)


def test_a_run_killed_while_a_group_loads_leaves_it_to_the_next_run_exactly_once(db: Db, tmp_path: Path, gate: Gate) -> None:
    """kill -9 while groups of files wait at the gate: their loads show as interrupted, none
    of their rows is in the table, and the same command again loads every file once."""
    db.script(GATED_TABLE)
    expected = parts(tmp_path, 30)
    run = Background(db, "import", "parts", "-t", "t", "--workers", "2")
    until(lambda: gate.locks(granted=False) == 2 or not run.running(), timeout=60)
    kill_9(db, run.proc)
    shown = db.loader("status", "--json")
    assert shown.code == 0, shown.stderr
    states = {load["source"].rsplit("/", 1)[-1]: load["state"] for load in shown.json()}
    assert states.pop("part-00.csv") == "succeeded", states
    assert states and set(states.values()) == {"interrupted"}, states
    assert db.value("SELECT count(*) FROM t") == ROWS

    gate.open()
    again = db.loader("import", "parts", "-t", "t", "--json")
    assert again.code == 0, again.stderr
    assert contents(db) == expected
    assert loads(db) == {f"part-{n:02}.csv": ("succeeded", 1, ROWS) for n in range(30)}


def test_a_group_whose_connection_is_cut_is_tried_again(db: Db, tmp_path: Path, gate: Gate) -> None:
    """The server ends the connection of a group waiting at the gate: the group is tried
    again, and every file loads once; exit 0, the retry counted."""
    db.script(GATED_TABLE)
    expected = parts(tmp_path, 12)
    run = Background(db, "import", "parts", "-t", "t", "--json")
    until(lambda: gate.locks(granted=False) >= 1 or not run.running(), timeout=60)
    cut = db.value(
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l "
        "WHERE l.locktype = 'advisory' AND l.objid = $1 AND NOT l.granted", GATE,
    )
    assert cut >= 1
    gate.open()
    assert run.wait(timeout=120) == 0, run.stderr()
    report = json.loads(run.stdout())
    assert report["retries"] >= 1, run.stderr()
    assert contents(db) == expected
    assert loads(db) == {f"part-{n:02}.csv": ("succeeded", 1, ROWS) for n in range(12)}


def test_a_copy_of_a_file_in_another_group_is_skipped(db: Db, tmp_path: Path) -> None:
    """part-15.csv is a copy of part-02.csv, far enough in the set to fall in another group:
    the rows are loaded once, and the copy is skipped, naming the load of the first."""
    db.script("CREATE TABLE t (id bigint PRIMARY KEY, name text)")
    expected = parts(tmp_path, 20)
    copy = tmp_path / "parts" / "part-15.csv"
    copy.write_bytes((tmp_path / "parts" / "part-02.csv").read_bytes())
    expected = [row for row in expected if row[1] != "part-15.csv"]
    run = db.loader("import", "parts", "-t", "t", "--json")
    assert run.code == 0, run.stderr
    sources = {s["source"]: s["state"] for s in run.json()["sources"]}
    assert sources.pop("parts/part-15.csv") == "skipped", run.stderr
    assert set(sources.values()) == {"loaded"}
    assert "the same content was loaded from" in run.stderr
    assert contents(db) == expected


def test_small_files_with_other_line_endings_or_none_at_the_end_load_each_row_once(db: Db, tmp_path: Path) -> None:
    """Files whose records could run into each other's in one COPY (a last line without its
    line ending, CRLF among LF files, a quoted field with a line break) still load exactly:
    every row once, each in its own columns."""
    db.script("CREATE TABLE t (id bigint PRIMARY KEY, name text)")
    expected = parts(tmp_path, 12)
    folder = tmp_path / "parts"
    (folder / "part-03.csv").write_bytes((folder / "part-03.csv").read_bytes().rstrip(b"\n"))  # no line ending at the end
    crlf = folder / "part-05.csv"
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    quoted = folder / "part-08.csv"
    quoted.write_bytes(quoted.read_bytes().replace(b"400,part-08.csv", b'400,"part-08\nline two"'))
    expected = [(i, "part-08\nline two" if i == 400 else name) for i, name in expected]
    run = db.loader("import", "parts", "-t", "t", "--json")
    assert run.code == 0, run.stderr
    assert {s["state"] for s in run.json()["sources"]} == {"loaded"}
    assert contents(db) == expected
    assert loads(db) == {f"part-{n:02}.csv": ("succeeded", 1, ROWS) for n in range(12)}
