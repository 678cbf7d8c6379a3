"""Bad input: every bad row is rejected with its line and reason, every good row loads."""

from __future__ import annotations

import csv
import io
import itertools
import random
from pathlib import Path

import pytest

from helpers import Db, until

TABLE = """
CREATE TABLE items (
    id int PRIMARY KEY,
    qty int NOT NULL CHECK (qty >= 0),
    day date,
    at timestamptz,
    name text
)
"""
HEADER = "id,qty,day,at,name"


def good(i: int) -> str:
    return f'{i},{i % 50},2024-01-{1 + i % 28:02d},2024-01-01 10:00:00+00,"item ""{i}""\nsecond line"'


def rejects_of(path: Path) -> list[tuple[int, str, bytes]]:
    """(line, sqlstate, record) of each rejected row; the header row is skipped."""
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("latin-1"), newline="")))
    assert rows[0] == ["line", "sqlstate", "message", "record"]
    return [(int(r[0]), r[1], r[3].encode("latin-1")) for r in rows[1:] if r[1]]


def write_lines(path: Path, records: list[bytes]) -> dict[int, bytes]:
    """Write the records after the header; returns each record's starting line."""
    starts: dict[int, bytes] = {}
    line = 2
    with open(path, "wb") as fh:
        fh.write(HEADER.encode() + b"\n")
        for record in records:
            starts[line] = record
            fh.write(record + b"\n")
            line += record.count(b"\n") + 1
    return starts


BAD_ROWS = [
    # (what is wrong, the record, the SQLSTATE the server gives)
    ("too few columns", b"{i},1,2024-01-01", "22P04"),
    ("too many columns", b"{i},1,2024-01-01,2024-01-01 00:00:00+00,x,extra", "22P04"),
    ("bad integer", b"{i},many,2024-01-01,,x", "22P02"),
    ("bad date", b"{i},1,2024-02-30,,x", "22008"),
    ("bad timestamp", b"{i},1,2024-01-01,yesterday-ish,x", "22007"),
    ("invalid utf-8", b"{i},1,2024-01-01,,caf\xe9", "22021"),
    ("check violation", b"{i},-5,2024-01-01,,x", "23514"),
    ("not null violation", b"{i},,2024-01-01,,x", "23502"),
    ("duplicate key", b"1,1,2024-01-01,,dup", "23505"),
]


@pytest.mark.parametrize(("problem", "bad", "state"), BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_a_bad_row_is_rejected_with_its_line_and_reason(
    db: Db, tmp_path: Path, problem: str, bad: bytes, state: str, position: str
) -> None:
    db.sql(TABLE)
    records = [good(i).encode() for i in range(1, 21)]
    at = {"first": 10, "middle": 14, "last": 19}[position]  # batches of 10: rows 10..19 are the 2nd batch
    records.insert(at, bad.replace(b"{i}", b"1000"))
    starts = write_lines(tmp_path / "items.csv", records)
    bad_line = [line for line, rec in starts.items() if rec == records[at]][0]
    # One worker: batches commit in file order, so the first of two duplicate keys wins.
    run = db.loader("import", "items.csv", "-t", "items", "--batch-size", "10", "--workers", "1", "--json")
    assert run.code == 3, run.stderr
    report = run.json()
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (21, 20, 1)
    assert rejects_of(tmp_path / "items.csv.rejects.csv") == [(bad_line, state, records[at])]
    assert db.value("SELECT count(*) FROM items") == 20
    assert f"line {bad_line}: {state}" in run.stderr


def test_duplicate_keys_within_and_across_batches_are_rejected(db: Db, tmp_path: Path) -> None:
    db.sql(TABLE)
    records = [good(i).encode() for i in range(1, 31)]
    records.insert(8, good(3).encode())  # within the first batch of 10
    records += [good(5).encode(), good(25).encode()]  # across batches
    starts = write_lines(tmp_path / "items.csv", records)
    run = db.loader("import", "items.csv", "-t", "items", "--batch-size", "10", "--workers", "1")
    assert run.code == 3
    seen: set[bytes] = set()
    expected = [line for line, rec in starts.items() if rec in seen or seen.add(rec)]  # second occurrences
    assert [(r[0], r[1]) for r in rejects_of(tmp_path / "items.csv.rejects.csv")] == [(line, "23505") for line in expected]
    assert db.value("SELECT count(*) FROM items") == 30


def test_a_file_whose_every_row_is_bad_loads_nothing_and_rejects_all(db: Db, tmp_path: Path) -> None:
    db.sql(TABLE)
    write_lines(tmp_path / "items.csv", [f"{i},lots,,,x".encode() for i in range(1, 51)])
    run = db.loader("import", "items.csv", "-t", "items", "--batch-size", "7", "--json")
    assert run.code == 3
    assert (run.json()["rows_loaded"], run.json()["rows_rejected"]) == (0, 50)
    assert [r[0] for r in rejects_of(tmp_path / "items.csv.rejects.csv")] == list(range(2, 52))


def test_many_scattered_bad_rows_in_a_large_file(db: Db, tmp_path: Path) -> None:
    """200,000 rows, 0.1% bad at known lines: exactly those are rejected, all others load."""
    db.sql("CREATE TABLE big (id int PRIMARY KEY, v int)")
    rnd = random.Random(5)
    bad_ids = set(rnd.sample(range(1, 200_001), 200))
    path = tmp_path / "big.csv"
    with open(path, "w") as fh:
        fh.write("id,v\n")
        for i in range(1, 200_001):
            fh.write(f"{i},{'x' if i in bad_ids else i}\n")
    run = db.loader("import", str(path), "-t", "big", "--workers", "2", "--json")
    assert run.code == 3, run.stderr
    report = run.json()
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (200_000, 199_800, 200)
    assert sorted(r[0] for r in rejects_of(tmp_path / "big.csv.rejects.csv")) == sorted(i + 1 for i in bad_ids)
    assert db.value("SELECT count(*) FROM big") == 199_800
    assert db.value("SELECT count(*) FROM big WHERE id = ANY($1::int[])", list(bad_ids)) == 0


def test_rows_whose_foreign_key_has_no_parent_are_rejected(db: Db, tmp_path: Path) -> None:
    """Foreign keys are checked when the COPY ends, so the server names no line: the loader
    bisects to find the rows, and rejects exactly them."""
    db.sql("CREATE TABLE parents (id int PRIMARY KEY)")
    db.sql("INSERT INTO parents SELECT generate_series(1, 100)")
    db.sql("CREATE TABLE children (id int, parent int REFERENCES parents)")
    orphans = {7: 500, 93: 501, 94: 502, 250: 503}  # row -> a parent that does not exist
    path = tmp_path / "children.csv"
    path.write_text("id,parent\n" + "".join(f"{i},{orphans.get(i, 1 + i % 100)}\n" for i in range(1, 301)))
    run = db.loader("import", str(path), "-t", "children", "--batch-size", "100", "--json")
    assert run.code == 3, run.stderr
    assert (run.json()["rows_loaded"], run.json()["rows_rejected"]) == (296, 4)
    assert rejects_of(tmp_path / "children.csv.rejects.csv") == [
        (i + 1, "23503", f"{i},{parent}".encode()) for i, parent in orphans.items()
    ]
    assert db.value("SELECT count(*) FROM children WHERE parent > 100") == 0


def test_bad_rows_with_a_backslash_escape_are_rejected_at_their_lines(db: Db, tmp_path: Path) -> None:
    """With a custom --escape, quotes cannot be counted to cut records: refused batches are
    split record by record, and the bad rows are found just the same."""
    db.sql("CREATE TABLE esc (id int, v text)")
    records = [b'%d,"say \\"hi\\"\nthere"' % i for i in range(1, 301)]
    for i in (0, 41, 42, 150, 299):
        records[i] = b'x%d,"bad \\" one"' % i
    (tmp_path / "esc.csv").write_bytes(b"id,v\n" + b"".join(r + b"\n" for r in records))
    lines = itertools.accumulate((1 + r.count(b"\n") for r in records), initial=2)  # where each record starts
    starts = dict(zip(lines, records, strict=False))  # lines goes one further: past the last record
    run = db.loader("import", "esc.csv", "-t", "esc", "--escape", "\\", "--batch-size", "100", "--json")
    assert run.code == 3, run.stderr
    assert (run.json()["rows_loaded"], run.json()["rows_rejected"]) == (295, 5)
    assert [(r[0], r[1]) for r in rejects_of(tmp_path / "esc.csv.rejects.csv")] == [
        (line, "22P02") for line, rec in starts.items() if rec.startswith(b"x")
    ]
    assert db.value("SELECT count(*) FROM esc WHERE v = 'say \"hi\"' || chr(10) || 'there'") == 295


def test_a_clean_file_loads_with_one_copy_per_batch(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE clean (id int, v text)")
    path = tmp_path / "clean.csv"
    path.write_text("id,v\n" + "".join(f'{i},"v,{i}"\n' for i in range(100_000)))
    run = db.loader("import", str(path), "-t", "clean", "--batch-size", "10000", "--json")
    report = run.json()
    assert run.code == 0
    assert report["batches"] == report["copies"] == 10
    # The server agrees: every row was inserted once, none was sent twice (its counters come
    # in when the loader's backends have ended).
    until(lambda: db.value("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'clean'") == 100_000)
    assert db.value("SELECT count(*) FROM clean") == 100_000


def test_max_errors_stops_the_load_and_keeps_committed_batches(db: Db, tmp_path: Path) -> None:
    db.sql(TABLE)
    records = [(good(i) if i % 10 else f"{i},bad,,,x").encode() for i in range(1, 201)]
    write_lines(tmp_path / "items.csv", records)
    run = db.loader("import", "items.csv", "-t", "items", "--batch-size", "20", "--workers", "1", "--max-errors", "5", "--json")
    assert run.code == 1
    assert "more than --max-errors 5" in run.stderr
    report = run.json()
    assert report["rows_rejected"] == 6
    assert db.value("SELECT count(*) FROM items") == report["rows_loaded"] == 54
    assert len(rejects_of(tmp_path / "items.csv.rejects.csv")) == 6


def test_retry_rejects_loads_the_fixed_rows_and_keeps_the_still_bad_ones(db: Db, tmp_path: Path) -> None:
    db.sql(TABLE)
    records = [good(i).encode() for i in range(1, 11)]
    records[3] = b"4,four,2024-01-01,,x"
    records[6] = b'7,7,2024-13-01,,"multi\nline"'
    starts = write_lines(tmp_path / "items.csv", records)
    assert db.loader("import", "items.csv", "-t", "items").code == 3
    rejects = tmp_path / "items.csv.rejects.csv"
    fixed = rejects.read_bytes().replace(b"4,four,", b"4,4,")  # the user fixes one of the two
    rejects.write_bytes(fixed)
    run = db.loader("retry-rejects", str(rejects), "-t", "items", "--json")
    assert run.code == 3, run.stderr
    assert (run.json()["rows_loaded"], run.json()["rows_rejected"]) == (1, 1)
    still_bad = rejects_of(tmp_path / "items.csv.rejects.csv.rejects.csv")
    line_of_7 = [line for line, rec in starts.items() if rec.startswith(b"7,")][0]
    assert still_bad == [(line_of_7, "22008", records[6])]  # under its line in the original file
    assert db.value("SELECT count(*) FROM items") == 9


def test_rejects_of_stdin_go_to_the_working_directory(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int)")
    run = db.loader("import", "-", "-t", "t", input=b"id\n1\nx\n3\n")
    assert run.code == 3
    assert rejects_of(tmp_path / "stdin.rejects.csv") == [(3, "22P02", b"x")]


@pytest.fixture
def split_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte size of every piece the slow path splits into records, in order (a spy on
    the real splitter, which still does the work)."""
    import loader.isolate

    sizes: list[int] = []
    real = loader.isolate.split_records

    def counting(data: bytes, first: int, dialect: object) -> object:
        sizes.append(len(data))
        return real(data, first, dialect)  # type: ignore[arg-type]

    monkeypatch.setattr(loader.isolate, "split_records", counting)
    return sizes


def test_the_fast_path_never_parses_rows(db: Db, tmp_path: Path, split_sizes: list[int]) -> None:
    """A clean file goes to COPY as raw bytes: the row splitter of the slow path is never called.
    (Bad rows isolated row by row, as without ON_ERROR: PostgreSQL 15 and 16, --no-copy-on-error.)"""
    import asyncio

    from loader import LoadOptions, load

    db.sql("CREATE TABLE clean (id int, v text)")
    path = tmp_path / "clean.csv"
    path.write_text("id,v\n" + "".join(f'{i},"a\n""b"""\n' for i in range(50_000)))
    report = asyncio.run(load(LoadOptions(source=str(path), table="clean", dsn=db.dsn, batch_rows=5000)))
    assert (report.rows_loaded, report.batches, report.copies) == (50_000, 10, 10)
    assert split_sizes == []
    bad = tmp_path / "bad.csv"
    bad.write_text("id,v\n1,a\nx,b\n")
    assert asyncio.run(load(LoadOptions(source=str(bad), table="clean", dsn=db.dsn, copy_on_error=False))).rows_rejected == 1
    assert len(split_sizes) == 1  # the slow path, and only for the refused batch


def test_with_bad_rows_in_every_batch_only_refused_pieces_are_split_into_records(
    db: Db, tmp_path: Path, split_sizes: list[int]
) -> None:
    """One bad row in a thousand, so every batch is refused: the batches go in pieces cut by
    bytes, and only the refused pieces, up to their bad row, are split into records. (Bad rows
    isolated row by row, as without ON_ERROR: PostgreSQL 15 and 16, --no-copy-on-error.)"""
    import asyncio

    from loader import LoadOptions, load

    db.sql("CREATE TABLE dense (id int, v text)")
    bad = set(random.Random(3).sample(range(200_000), 200))
    path = tmp_path / "dense.csv"
    path.write_text("id,v\n" + "".join(f'{"x" if i in bad else i},"a\n""b"""\n' for i in range(200_000)))
    report = asyncio.run(load(LoadOptions(source=str(path), table="dense", dsn=db.dsn, batch_rows=20_000, copy_on_error=False)))
    assert (report.rows_loaded, report.rows_rejected) == (199_800, 200)
    assert db.value("SELECT count(*) FROM dense") == 199_800
    assert [r[0] for r in rejects_of(tmp_path / "dense.csv.rejects.csv")] == sorted(2 + 2 * i for i in bad)
    assert 0 < sum(split_sizes) < path.stat().st_size / 3


def test_retry_rejects_alone_takes_the_table_and_csv_options_of_the_original_load(db: Db, tmp_path: Path) -> None:
    """`loader retry-rejects FILE.rejects.csv` needs nothing else: the rejects file names its
    load, whose table, delimiter, NULL text, encoding and columns the ledger keeps. The report
    and `status` name the rejects file as the source, and a retry of the retry works alike."""
    db.sql('CREATE SCHEMA "Sales"')
    db.sql('CREATE TABLE "Sales"."Items" (id int PRIMARY KEY, qty int, note text, extra text DEFAULT \'d\')')
    source = tmp_path / "items.psv"
    source.write_bytes("1;1;café\n2;x;NIL\n3;3;thé\n4;y;b\n".encode("latin-1"))
    first = db.loader(
        "import", str(source), "-t", '"Sales"."Items"', "--no-header", "--delimiter", ";", "--null", "NIL",
        "--encoding", "latin-1", "--columns", "id,qty,note",
    )
    assert first.code == 3, first.stderr
    rejects = tmp_path / "items.psv.rejects.csv"
    fixed = rejects.read_bytes().replace(b"2;x;NIL", b"2;2;NIL").replace(b"4;y;b", b"4;z;b\xe9")
    rejects.write_bytes(fixed)

    retry = db.loader("retry-rejects", str(rejects), "--json")
    assert retry.code == 3, retry.stderr
    report = retry.json()
    assert (report["source"], report["table"]) == (str(rejects), '"Sales"."Items"')
    assert (report["rows_loaded"], report["rows_rejected"]) == (1, 1)
    assert db.value('SELECT note IS NULL AND extra = \'d\' FROM "Sales"."Items" WHERE id = 2')
    assert db.value("SELECT source FROM loader.loads ORDER BY started_at DESC LIMIT 1") == str(rejects)

    again = tmp_path / "items.psv.rejects.csv.rejects.csv"
    again.write_bytes(again.read_bytes().replace(b"4;z;b", b"4;4;b"))
    last = db.loader("retry-rejects", str(again), "--json")
    assert last.code == 0, last.stderr
    assert db.value('SELECT note FROM "Sales"."Items" WHERE id = 4') == "bé"
    assert db.value('SELECT count(*) FROM "Sales"."Items"') == 4


def test_retry_rejects_of_a_file_that_names_no_load_asks_for_the_table(db: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE t (id int)")
    rejects = tmp_path / "old.rejects.csv"
    rejects.write_text('line,sqlstate,message,record\n1,,header,"id"\n3,22P02,"bad",x\n')
    run = db.loader("retry-rejects", str(rejects))
    assert run.code == 2, run.stderr
    assert "does not name the load it comes from" in run.stderr and "pass --table" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
