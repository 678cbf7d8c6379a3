"""`loader import`: what a user runs, and what ends up in the table."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from data import EVENTS_DDL, EVENTS_HEADER, event_rows, write_csv
from helpers import Db


def make_events(db: Db, *names: str) -> None:
    for name in names:
        db.sql(EVENTS_DDL.format(name=name))


def test_import_loads_exactly_what_psql_copy_loads(db: Db, tmp_path: Path) -> None:
    make_events(db, "events", "twin")
    csv = write_csv(tmp_path / "events.csv", event_rows(5000), EVENTS_HEADER)
    run = db.loader("import", str(csv), "--table", "public.events", "--batch-size", "333")
    assert run.code == 0, run.stderr
    db.psql_copy("twin", csv)
    assert db.value("SELECT count(*) FROM events") == 5000
    assert db.same_rows("events", "twin")
    assert 'loaded 5,000 of 5,000 rows into "public"."events"' in run.stderr


def test_null_and_empty_string_stay_different(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int, v text)")
    csv = tmp_path / "t.csv"
    csv.write_bytes(b'id,v\n1,\n2,""\n3,"a\n""b"""\n')
    assert db.loader("import", str(csv), "-t", "t").code == 0
    rows = db.sql("SELECT id, v FROM t ORDER BY id")
    assert [(r["id"], r["v"]) for r in rows] == [(1, None), (2, ""), (3, 'a\n"b"')]


def test_custom_delimiter_null_and_encoding_match_psql_copy(db: Db, tmp_path: Path) -> None:
    make_events(db, "events", "twin")
    rows = [(i, "café ; ñ", None, "1.5", "2024-01-01 00:00:00+00", True) for i in range(1, 200)]
    csv = write_csv(tmp_path / "latin1.csv", rows, EVENTS_HEADER, delimiter=";", null="NULL", encoding="latin-1")
    run = db.loader(
        "import", str(csv), "-t", "events", "--delimiter", ";", "--null", "NULL", "--encoding", "latin-1"
    )
    assert run.code == 0, run.stderr
    db.psql_copy("twin", csv, "FORMAT csv, HEADER true, DELIMITER ';', NULL 'NULL', ENCODING 'LATIN1'")
    assert db.same_rows("events", "twin")
    assert db.value("SELECT name FROM events LIMIT 1") == "café ; ñ"


def test_backslash_escape_matches_psql_copy(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int, v text)")
    db.sql("CREATE TABLE twin (id int, v text)")
    csv = tmp_path / "esc.csv"
    csv.write_bytes(b'id,v\n1,"say \\"hi\\"\nthere"\n2,"back\\\\"\n3,"a\\b"\n4,plain\n')
    run = db.loader("import", str(csv), "-t", "t", "--escape", "\\", "--batch-size", "1")
    assert run.code == 0, run.stderr
    db.psql_copy("twin", csv, "FORMAT csv, HEADER true, ESCAPE '\\'")
    assert db.same_rows("t", "twin")
    assert db.value("SELECT count(*) FROM t") == 4


def test_a_null_marker_with_a_quote_and_a_backslash_reaches_copy_intact(db: Db, tmp_path: Path) -> None:
    """COPY's options can only be string literals: quotes and backslashes in them are quoted
    so they mean the same whatever the server's standard_conforming_strings says."""
    db.sql("CREATE TABLE t (id int, v text)")
    db.sql("CREATE TABLE twin (id int, v text)")
    csv = tmp_path / "n.csv"
    csv.write_bytes(b"id,v\n1,N'\\\n2,text\n3,N'\\\n")
    database = db.value("SELECT current_database()")
    for setting in ("on", "off"):  # this test's own database: new sessions take the setting
        db.sql(f'ALTER DATABASE "{database}" SET standard_conforming_strings = {setting}')
        run = db.loader("import", str(csv), "-t", "t", "--null", "N'\\", "--force")
        assert run.code == 0, run.stderr
    db.sql(f'ALTER DATABASE "{database}" RESET standard_conforming_strings')
    db.psql_copy("twin", csv, "FORMAT csv, HEADER true, NULL E'N\\'\\\\'")
    assert db.value("SELECT count(*) FROM t WHERE v IS NULL") == 4
    assert db.value("SELECT count(*) FROM twin WHERE v IS NULL") == 2


def test_stdin_and_gzip_sources(db: Db, tmp_path: Path) -> None:
    make_events(db, "from_stdin", "from_gzip", "twin")
    csv = write_csv(tmp_path / "e.csv", event_rows(3000), EVENTS_HEADER)
    gz = tmp_path / "e.csv.gz"
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    assert db.loader("import", "-", "-t", "from_stdin", input=csv.read_bytes()).code == 0
    assert db.loader("import", str(gz), "-t", "from_gzip").code == 0
    piped = db.loader("import", "-", "-t", "twin", input=gz.read_bytes())  # gzip on stdin too
    assert piped.code == 0, piped.stderr
    assert db.same_rows("from_stdin", "from_gzip")
    assert db.same_rows("from_stdin", "twin")
    assert db.value("SELECT count(*) FROM from_gzip") == 3000


def test_one_worker_and_eight_workers_load_the_same_table(db: Db, tmp_path: Path) -> None:
    make_events(db, "one", "eight")
    csv = write_csv(tmp_path / "e.csv", event_rows(20_000), EVENTS_HEADER)
    one = db.loader("import", str(csv), "-t", "one", "--workers", "1", "--batch-size", "700", "--json")
    eight = db.loader("import", str(csv), "-t", "eight", "--workers", "8", "--batch-size", "700", "--json")
    assert one.code == 0 and eight.code == 0, (one.stderr, eight.stderr)
    assert db.same_rows("one", "eight")
    assert one.json()["batches"] == eight.json()["batches"] == 29


def test_json_report_counts_rows_and_batches(db: Db, tmp_path: Path) -> None:
    make_events(db, "events")
    csv = write_csv(tmp_path / "e.csv", event_rows(1000), EVENTS_HEADER)
    run = db.loader("import", str(csv), "-t", "events", "--batch-size", "300", "--json")
    report = run.json()
    assert run.code == 0
    assert report["rows_read"] == report["rows_loaded"] == 1000
    assert report["rows_rejected"] == 0
    assert report["batches"] == report["copies"] == 4
    assert report["retries"] == 0
    assert report["elapsed_s"] > 0
    assert report["exit_code"] == 0


def test_names_with_quotes_spaces_semicolons_and_capitals(db: Db, tmp_path: Path) -> None:
    db.sql('CREATE SCHEMA "Sales 2024"')
    db.sql('CREATE TABLE "Sales 2024"."Events; DROP TABLE x" ("Id" int, "Full Name" text, "we""ird;col" text)')
    csv = tmp_path / "names.csv"
    csv.write_text('Id,Full Name,"we""ird;col"\n1,Ann,x\n2,Bob,y\n')
    run = db.loader("import", str(csv), "--table", '"Sales 2024"."Events; DROP TABLE x"')
    assert run.code == 0, run.stderr
    rows = db.sql('SELECT "Full Name", "we""ird;col" FROM "Sales 2024"."Events; DROP TABLE x" ORDER BY "Id"')
    assert [tuple(r) for r in rows] == [("Ann", "x"), ("Bob", "y")]


def test_header_names_match_columns_in_any_order_and_case(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int, name text, extra text DEFAULT 'd')")
    csv = tmp_path / "t.csv"
    csv.write_text("NAME,ID\nann,1\nbob,2\n")
    assert db.loader("import", str(csv), "-t", "t").code == 0
    assert [tuple(r) for r in db.sql("SELECT id, name, extra FROM t ORDER BY id")] == [(1, "ann", "d"), (2, "bob", "d")]


def test_no_header_uses_table_columns_and_columns_option_picks_them(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int, name text)")
    plain = tmp_path / "plain.csv"
    plain.write_text("1,ann\n2,bob\n")
    assert db.loader("import", str(plain), "-t", "t", "--no-header").code == 0
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("carl,3\n")
    assert db.loader("import", str(swapped), "-t", "t", "--no-header", "--columns", "name,id").code == 0
    assert [tuple(r) for r in db.sql("SELECT id, name FROM t ORDER BY id")] == [(1, "ann"), (2, "bob"), (3, "carl")]


def test_a_bad_row_is_rejected_and_the_rest_of_its_batch_loads(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int, v text)")
    lines = ["id,v"] + [f"{i},v{i}" for i in range(1, 101)]
    lines[42] = "oops,bad"  # line 43 of the file
    csv = tmp_path / "bad.csv"
    csv.write_text("\n".join(lines) + "\n")
    run = db.loader("import", str(csv), "-t", "t", "--batch-size", "10", "--json")
    assert run.code == 3
    report = run.json()
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (100, 99, 1)
    assert db.value("SELECT count(*) FROM t") == 99
    assert "line 43: 22P02 column id: invalid input syntax for type integer" in run.stderr
    assert (tmp_path / "bad.csv.rejects.csv").read_bytes().splitlines()[3].startswith(b'43,22P02,"column id: invalid input')


def test_an_empty_file_loads_nothing_and_succeeds(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int)")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("id\n")
    for path in (empty, header_only):
        run = db.loader("import", str(path), "-t", "t", "--json")
        assert run.code == 0, run.stderr
        assert run.json()["rows_read"] == 0


def test_load_name_and_its_older_spelling_load_id_name_the_same_load(db: Db, tmp_path: Path) -> None:
    """--load-name names a load, so that a run from stdin is recognised again; --load-id and
    LOADER_LOAD_ID, its first spelling, still name the same load (existing crontabs)."""
    make_events(db, "events")
    data = write_csv(tmp_path / "e.csv", event_rows(1000), EVENTS_HEADER).read_bytes()
    command = ("import", "-", "-t", "events", "--json")
    runs = [
        db.loader(*command, "--load-name", "nightly", input=data),
        db.loader(*command, "--load-id", "nightly", input=data),
        db.loader(*command, input=data, env={"LOADER_LOAD_NAME": "nightly"}),
        db.loader(*command, input=data, env={"LOADER_LOAD_ID": "nightly"}),
    ]
    assert [r.code for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
    assert len({r.json()["load_id"] for r in runs}) == 1
    assert [r.json()["rows_loaded"] for r in runs] == [1000, 0, 0, 0]
    assert db.value("SELECT count(*) FROM events") == 1000


@pytest.mark.parametrize("encoding", ["WIN1252", "win-1252", "cp1252"])
def test_encoding_is_accepted_as_postgresql_or_python_names_it(db: Db, tmp_path: Path, encoding: str) -> None:
    """--encoding WIN1252 (PostgreSQL's name) means the same as cp1252 (Python's)."""
    db.sql("CREATE TABLE t (id int, v text)")
    (tmp_path / "w.csv").write_bytes("id,v\n1,caf\u00e9 \u20ac\n".encode("cp1252"))
    run = db.loader("import", "w.csv", "-t", "t", "--encoding", encoding)
    assert run.code == 0, run.stderr
    assert db.value("SELECT v FROM t") == "caf\u00e9 \u20ac"
