"""Load modes, as a user relies on them: `--mode append` (the default) adds the file's rows;
`--mode upsert --key K` updates the rows whose key exists and inserts the others, the last row
of a key in the file winning; `--mode replace` leaves the table holding exactly the file's good
rows, switched at the end so that readers only ever see the old or the new contents, and
keeps the table's indexes, grants, views, triggers and foreign keys; `--dry-run`, in any
mode, reports what the load would do and commits nothing.

Everything is real: the CLI runs as a subprocess, kill -9 is a real signal, the concurrent
reader is a session of its own. Long runs are paced with `--max-rate`, and every wait is a
poll (`until`), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from helpers import (
    Db,
    kill_9,
    loads_in_ledger,
    one_error_line,
    read_rejects,
    until,
    until_batches,
    write_rows,
)

# --- helpers -----------------------------------------------------------------------------------




def table_rows(db: Db, statement: str) -> dict[Any, tuple[Any, ...]]:
    """The rows of a `SELECT key, value...`, by key (the key must be unique in the result)."""
    rows = db.sql(statement)
    by_key = {r[0]: tuple(r[1:]) for r in rows}
    assert len(by_key) == len(rows), "a key appears twice in the table"
    return by_key


def last_wins(rows: Sequence[Sequence[object]], base: dict[Any, tuple[Any, ...]] | None = None) -> dict[Any, tuple[Any, ...]]:
    """What an upsert of `rows` (key first) into a table holding `base` must leave: every key's
    last row in file order."""
    expected = dict(base or {})
    for row in rows:
        expected[row[0]] = tuple(row[1:])
    return expected




def ledger_counts(db: Db) -> tuple[int, int, int]:
    """(loads, batches, rejects) the ledger holds."""
    if db.value("SELECT to_regclass('loader.loads')") is None:
        return (0, 0, 0)
    return (
        int(db.value("SELECT count(*) FROM loader.loads")),
        int(db.value("SELECT count(*) FROM loader.batches")),
        int(db.value("SELECT count(*) FROM loader.rejects")),
    )


def status(db: Db) -> list[dict[str, Any]]:
    run = db.loader("status", "--json")
    assert run.code == 0, run.stderr
    loads: list[dict[str, Any]] = run.json()
    return loads


def rejects(path: Path) -> list[tuple[int, str, bytes]]:
    """(line, sqlstate, record) of each rejected row, by line."""
    return sorted(read_rejects(path)[1])








def in_one_session(db: Db, *statements: str) -> list[asyncpg.Record]:
    """Run the statements in one session (SET ROLE, planner settings); the last one's rows."""

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db.dsn)
        try:
            for statement in statements[:-1]:
                await conn.execute(statement)
            return await conn.fetch(statements[-1])
        finally:
            await conn.close()

    return asyncio.run(go())


class Reader:
    """A session of its own (not the loader's) that runs `statement` in a loop while the test
    acts: what each query returned, and how long each took. A query that waits 10 s on a lock
    is cut by statement_timeout and recorded as an error."""

    def __init__(self, dsn: str, statement: str) -> None:
        self._dsn = dsn
        self._statement = statement
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._poll()), daemon=True)
        self.seen: list[tuple[int, int]] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []

    async def _poll(self) -> None:
        try:
            conn = await asyncpg.connect(
                self._dsn, server_settings={"application_name": "modes test reader", "statement_timeout": "10s"}
            )
        except (OSError, asyncpg.PostgresError) as exc:
            self.errors.append(repr(exc))
            return
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                row = await conn.fetchrow(self._statement)
                self.latencies.append(time.monotonic() - started)
                self.seen.append((int(row[0]), int(row[1] or 0)))
                await asyncio.sleep(0.01)  # a pause between polls, to leave the CPU to the load
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.errors.append(repr(exc))
        finally:
            await conn.close()

    def __enter__(self) -> Reader:
        self._thread.start()
        until(lambda: self.seen or self.errors)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# The items table of most tests: a primary key, a CHECK, a foreign key, a column files leave out.
ITEMS = """
CREATE TABLE parents (id int PRIMARY KEY);
INSERT INTO parents SELECT generate_series(1, 10);
CREATE TABLE items (
    id int PRIMARY KEY,
    qty int NOT NULL CHECK (qty >= 0),
    parent int REFERENCES parents,
    name text,
    note text DEFAULT 'default'
);
"""
ITEMS_HEADER = "id,qty,parent,name"


def items(db: Db) -> dict[Any, tuple[Any, ...]]:
    return table_rows(db, "SELECT id, qty, parent, name, note FROM items")


# --- append, the default -------------------------------------------------------------------


def test_append_is_the_default_mode_and_the_report_and_status_say_so(db: Db, tmp_path: Path) -> None:
    """Without --mode a load appends, as before; --mode append is the same. The JSON report has
    "mode": "append" and "dry_run": false, and `loader status --json` shows each load's mode."""
    db.script(ITEMS)
    first = write_rows(tmp_path / "first.csv", ITEMS_HEADER, [(i, i, 1, f"a{i}") for i in range(1, 51)])
    second = write_rows(tmp_path / "second.csv", ITEMS_HEADER, [(i, i, 1, f"b{i}") for i in range(51, 101)])

    default = db.loader("import", str(first), "-t", "items", "--json")
    assert default.code == 0, default.stderr
    assert (default.json()["mode"], default.json()["dry_run"], default.json()["rows_loaded"]) == ("append", False, 50)

    explicit = db.loader("import", str(second), "-t", "items", "--mode", "append", "--json")
    assert explicit.code == 0, explicit.stderr
    assert (explicit.json()["mode"], explicit.json()["dry_run"], explicit.json()["rows_loaded"]) == ("append", False, 50)

    assert db.value("SELECT count(*) FROM items") == 100
    assert [(s["state"], s["mode"]) for s in status(db)] == [("succeeded", "append"), ("succeeded", "append")]


# --- upsert ----------------------------------------------------------------------------------


def test_upsert_updates_existing_keys_inserts_new_ones_and_leaves_other_columns_alone(db: Db, tmp_path: Path) -> None:
    """--mode upsert --key id: rows whose id exists get every column of the file updated, the
    others are inserted; a column the file does not name keeps its value (updated rows) or
    gets its default (inserted rows). The report counts them exactly (no key repeats here),
    says "mode": "upsert", the summary says upsert, status shows the mode; a re-run does
    nothing."""
    db.script(ITEMS)
    base = [(i, i, 1, f"old {i}", f"note {i}") for i in range(1, 101)]
    write_rows(tmp_path / "base.csv", ITEMS_HEADER + ",note", base)
    assert db.loader("import", "base.csv", "-t", "items").code == 0

    changes = [(i, i + 1000, 2, f"new {i}") for i in range(51, 151)]  # 51..100 exist, 101..150 are new
    write_rows(tmp_path / "changes.csv", ITEMS_HEADER, changes)
    command = ("import", "changes.csv", "-t", "items", "--mode", "upsert", "--key", "id", "--json")
    run = db.loader(*command)
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["mode"] == "upsert" and report["dry_run"] is False
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (100, 100, 0)
    assert (report["rows_inserted"], report["rows_updated"]) == (50, 50)
    assert "upsert" in run.stderr

    expected = {i: (i, 1, f"old {i}", f"note {i}") for i in range(1, 51)}
    expected |= {i: (i + 1000, 2, f"new {i}", f"note {i}") for i in range(51, 101)}
    expected |= {i: (i + 1000, 2, f"new {i}", "default") for i in range(101, 151)}
    assert items(db) == expected
    assert [(s["state"], s["mode"]) for s in status(db)] == [("succeeded", "upsert"), ("succeeded", "append")]

    again = db.loader(*command)
    assert again.code == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert items(db) == expected


def test_upsert_on_a_composite_unique_key(db: Db, tmp_path: Path) -> None:
    """--key region,id uses a UNIQUE constraint over both columns (no primary key): a row
    matches only when both are equal."""
    db.script(
        "CREATE TABLE stock (region text NOT NULL, id int NOT NULL, qty int, UNIQUE (region, id));"
        "INSERT INTO stock VALUES ('eu', 1, 10), ('eu', 2, 20), ('us', 1, 30)"
    )
    write_rows(tmp_path / "stock.csv", "region,id,qty", [("eu", 2, 21), ("us", 2, 40), ("us", 1, 31)])
    run = db.loader("import", "stock.csv", "-t", "stock", "--mode", "upsert", "--key", "region,id", "--json")
    assert run.code == 0, run.stderr
    assert (run.json()["rows_inserted"], run.json()["rows_updated"]) == (1, 2)
    assert db.sql("SELECT region, id, qty FROM stock ORDER BY region, id") == [
        ("eu", 1, 10), ("eu", 2, 21), ("us", 1, 31), ("us", 2, 40),
    ]


UPSERT_MISTAKES = [
    # (what the user did, table DDL, extra args, what the error line names)
    ("keys on a column with no unique index", "CREATE TABLE t (id int, name text)", ["--mode", "upsert", "--key", "id"], "id"),
    ("keys on a column with a plain index", "CREATE TABLE t (id int, name text); CREATE INDEX ON t (id)",
     ["--mode", "upsert", "--key", "id"], "id"),
    ("keys on part of a unique index", "CREATE TABLE t (id int, name text, UNIQUE (id, name))",
     ["--mode", "upsert", "--key", "id"], "id"),
    ("keys on a column that does not exist", "CREATE TABLE t (id int PRIMARY KEY, name text)",
     ["--mode", "upsert", "--key", "nope"], "nope"),
    ("forgets --key", "CREATE TABLE t (id int PRIMARY KEY, name text)", ["--mode", "upsert"], "--key"),
    ("gives --on-conflict without upsert", "CREATE TABLE t (id int PRIMARY KEY, name text)",
     ["--mode", "append", "--on-conflict", "nothing"], "--on-conflict"),
    ("names an unknown mode", "CREATE TABLE t (id int PRIMARY KEY, name text)", ["--mode", "merge"], "merge"),
]


@pytest.mark.parametrize(("action", "ddl", "args", "names"), UPSERT_MISTAKES, ids=[c[0] for c in UPSERT_MISTAKES])
def test_an_upsert_the_table_cannot_take_exits_2_before_reading_a_row(
    db: Db, tmp_path: Path, action: str, ddl: str, args: list[str], names: str
) -> None:
    """The key must be covered by a unique index or the primary key (and --key is required with
    upsert, --on-conflict only goes with it): otherwise one error line naming the problem,
    exit 2, before any row is read. Nothing is loaded, the ledger records no load, and the
    file's bad row was never met (no rejects file)."""
    db.script(ddl)
    write_rows(tmp_path / "t.csv", "id,name", [(1, "a"), ("x", "bad"), (3, "c")])
    run = db.loader("import", "t.csv", "-t", "t", *args)
    assert run.code == 2, run.stderr
    line = one_error_line(run)
    assert names in line
    if action.startswith("keys on") and names == "id":
        assert "unique" in line.lower() or "primary key" in line.lower(), line
    assert db.value("SELECT count(*) FROM t") == 0
    assert loads_in_ledger(db) == 0
    assert not (tmp_path / "t.csv.rejects.csv").exists()


def test_upsert_with_8_workers_the_last_row_of_a_key_wins_within_and_across_batches(db: Db, tmp_path: Path) -> None:
    """A key repeated in the file ends with its last row's values, deterministically, whatever
    order 8 workers commit 500-row batches in: repeated within a batch, across batches (row 10
    and row 3000), for existing keys and for new ones. The table equals, row for row, the
    base with the file applied in file order."""
    db.script("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int)")
    n = 5000
    base = [(i, f"base {i}", i) for i in range(1, n + 1)]
    write_rows(tmp_path / "base.csv", "id,name,qty", base)
    first = db.loader("import", "base.csv", "-t", "items", "--mode", "append")
    assert first.code == 0, first.stderr

    special = {10: 777, 3000: 777, 100: 888, 120: 888, 50: 7777, 6000: 7777, 200: 8888, 9000: 8888}
    pool = [k for k in range(1, 2 * n + 1) if k not in set(special.values())]  # half exist, half are new
    rnd = random.Random(11)
    rows = [(special.get(r, rnd.choice(pool)), f"row {r}", r) for r in range(1, 12_001)]
    write_rows(tmp_path / "changes.csv", "id,name,qty", rows)
    run = db.loader(
        "import", "changes.csv", "-t", "items", "--mode", "upsert", "--key", "id",
        "--workers", "8", "--batch-size", "500", "--json",
    )
    assert run.code == 0, run.stderr
    report = run.json()
    assert (report["mode"], report["rows_read"], report["rows_rejected"]) == ("upsert", 12_000, 0)
    distinct = len({r[0] for r in rows})
    assert distinct <= report["rows_inserted"] + report["rows_updated"] <= report["rows_loaded"]

    expected = last_wins(rows, {i: (f"base {i}", i) for i in range(1, n + 1)})
    assert table_rows(db, "SELECT id, name, qty FROM items") == expected
    assert db.value("SELECT name FROM items WHERE id = 777") == "row 3000"  # an existing key, batches 1 and 6
    assert db.value("SELECT name FROM items WHERE id = 888") == "row 120"  # an existing key, twice in batch 1
    assert db.value("SELECT name FROM items WHERE id = 7777") == "row 6000"  # a new key, batches 1 and 12
    assert db.value("SELECT name FROM items WHERE id = 8888") == "row 9000"  # a new key, batches 1 and 18


def test_upsert_of_a_file_sorted_by_its_key_merges_batches_at_once_and_the_last_row_still_wins(
    db: Db, tmp_path: Path
) -> None:
    """Batches of a file sorted by its key hold keys apart, and merge at once: while batch 2's
    merge is held up (a trigger holds it until the file's last row is in the table), the
    batches after it merge and commit. A batch whose keys may meet an earlier one's (a key at
    the end of batch 2 and again at the start of batch 3, a key repeated far apart) still
    merges after it, so the last row of a key wins. The table equals the base with the file
    applied in file order."""
    db.script(
        """
        CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);
        CREATE TABLE seen (what text, waited boolean);
        CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = 'last' THEN
                INSERT INTO seen VALUES ('last', false);
            ELSIF NEW.name = 'hold' THEN
                FOR i IN 1..600 LOOP
                    EXIT WHEN EXISTS (SELECT FROM seen WHERE what = 'last');
                    PERFORM pg_sleep(0.05);
                END LOOP;
                INSERT INTO seen VALUES ('hold', EXISTS (SELECT FROM seen WHERE what = 'last'));
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER hold BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION hold();
        """
    )
    db.sql("INSERT INTO items SELECT g, 'base ' || g FROM generate_series(1, 4000) g")
    rows = [(2000 + r, f"row {r}") for r in range(1, 10_001)]  # 2001..4000 exist, the rest are new
    rows[599] = (rows[599][0], "hold")  # batch 2
    rows[999] = (2999, "row 1000")  # the end of batch 2 ...
    rows[1000] = (2999, "row 1001")  # ... and the start of batch 3: the later wins
    rows[99] = (9000, "row 100")  # again at row 7000, batch 14
    rows[4999] = (2010, "row 5000")  # first at row 10, batch 1
    rows[-1] = (rows[-1][0], "last")
    write_rows(tmp_path / "sorted.csv", "id,name", rows)
    run = db.loader(
        "import", "sorted.csv", "-t", "items", "--mode", "upsert", "--key", "id",
        "--workers", "8", "--batch-size", "500",
    )
    assert run.code == 0, run.stderr
    assert db.sql("SELECT what, waited FROM seen ORDER BY what") == [("hold", True), ("last", False)]
    expected = last_wins(rows, {i: (f"base {i}",) for i in range(1, 4001)})
    assert table_rows(db, "SELECT id, name FROM items") == expected
    assert [db.value(f"SELECT name FROM items WHERE id = {key}") for key in (2999, 9000, 2010)] == ["row 1001", "row 7000", "row 5000"]


def test_upsert_rejects_each_row_the_merge_refuses_at_its_line_and_merges_the_rest(db: Db, tmp_path: Path) -> None:
    """A row the merge refuses (NOT NULL, CHECK, foreign key, or a bad value), whether it would
    update an existing row or insert a new one, is rejected at its line with its SQLSTATE
    (exit 3); the existing row it would have updated keeps its values; every other row merges."""
    db.script(ITEMS)
    db.sql("INSERT INTO items (id, qty, parent, name, note) SELECT i, i, 1, 'old ' || i, 'kept' FROM generate_series(1, 20) i")
    bad: dict[int, tuple[tuple[object, ...], str]] = {
        12: ((12, -1, 2, "check on update"), "23514"),
        15: ((15, 5, 99, "fk on update"), "23503"),
        30: ((30, None, 2, "not null on insert"), "23502"),
        35: ((35, "x", 2, "bad integer"), "22P02"),
        38: ((38, -3, 2, "check on insert"), "23514"),
        44: ((44, 4, 98, "fk on insert"), "23503"),
    }
    rows = [bad[i][0] if i in bad else (i, i + 100, 2, f"new {i}") for i in range(11, 51)]  # 11..20 exist, 21..50 new
    write_rows(tmp_path / "items.csv", ITEMS_HEADER, rows)
    line_of = {row[0]: 2 + i for i, row in enumerate(rows)}

    run = db.loader("import", "items.csv", "-t", "items", "--mode", "upsert", "--key", "id",
                    "--batch-size", "10", "--workers", "2", "--json")
    assert run.code == 3, run.stderr
    report = run.json()
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (40, 34, 6)
    assert (report["rows_inserted"], report["rows_updated"]) == (26, 8)
    lines = (tmp_path / "items.csv").read_bytes().split(b"\n")
    assert rejects(tmp_path / "items.csv.rejects.csv") == sorted(
        (line_of[key], state, lines[line_of[key] - 1]) for key, (_, state) in bad.items()
    )

    expected = {i: (i, 1, f"old {i}", "kept") for i in range(1, 11)}
    expected |= {i: (i + 100, 2, f"new {i}", "kept") for i in range(11, 21)}
    expected |= {i: (i + 100, 2, f"new {i}", "default") for i in range(21, 51)}
    for key in bad:
        del expected[key]
    expected |= {12: (12, 1, "old 12", "kept"), 15: (15, 1, "old 15", "kept")}  # refused updates change nothing
    assert items(db) == expected


def test_upsert_on_conflict_nothing_keeps_existing_rows_and_inserts_new_keys_once(db: Db, tmp_path: Path) -> None:
    """--on-conflict nothing: rows whose key exists are left as they are; new keys are inserted,
    each once, even when the file repeats one (which of its rows is not pinned here)."""
    db.script(ITEMS)
    db.sql("INSERT INTO items (id, qty, parent, name) SELECT i, i, 1, 'old ' || i FROM generate_series(1, 100) i")
    before = items(db)
    rows = [(i, i + 500, 3, f"new {i}") for i in range(51, 151)]  # 51..100 exist, 101..150 are new
    rows.insert(20, (10, 999, 3, "existing key again"))
    rows.insert(70, (120, 888, 4, "new key again"))
    rows.append((130, 777, 5, "new key once more"))
    write_rows(tmp_path / "items.csv", ITEMS_HEADER, rows)

    run = db.loader("import", "items.csv", "-t", "items", "--mode", "upsert", "--key", "id", "--on-conflict", "nothing",
                    "--batch-size", "25", "--json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert (report["mode"], report["rows_rejected"], report["rows_updated"]) == ("upsert", 0, 0)
    assert report["rows_inserted"] + report["rows_updated"] <= report["rows_loaded"]

    after = items(db)
    assert {k: after[k] for k in before} == before
    assert len(after) == 150
    for key in range(101, 151):
        assert after[key] in {(r[1], r[2], r[3], "default") for r in rows if r[0] == key}, (key, after[key])


@pytest.mark.slow
def test_an_upsert_killed_mid_load_is_completed_exactly_by_the_next_run(db: Db, tmp_path: Path) -> None:
    """kill -9 in the middle of an upsert (paced with --max-rate), then the same command again:
    exit 0, and the table is exactly the old rows with the whole file merged, last row of a key
    winning, as if the first run had never been."""
    db.script("CREATE TABLE events (id bigint PRIMARY KEY, name text NOT NULL)")
    db.sql("INSERT INTO events SELECT g, 'old ' || g FROM generate_series(1, 50000) g")
    rows = [(25_000 + r, f"row {r}") for r in range(1, 100_001)]  # 25001..50000 exist, the rest are new
    rows[2] = (90_000, "row 3")  # key 90000 again at row 65000: the later wins
    rows[94_999] = (25_010, "row 95000")  # key 25010 first at row 10
    write_rows(tmp_path / "events.csv", "id,name", rows)
    command = ("import", str(tmp_path / "events.csv"), "-t", "events", "--mode", "upsert", "--key", "id",
               "--batch-size", "5000", "--max-rate", "20000")

    proc = db.spawn(*command)
    until_batches(db, proc, 2)
    kill_9(db, proc)

    rerun = db.loader(*command)
    assert rerun.code == 0, rerun.stderr
    expected = last_wins(rows, {i: (f"old {i}",) for i in range(1, 50_001)})
    assert table_rows(db, "SELECT id, name FROM events") == expected
    assert db.value("SELECT name FROM events WHERE id = 25010") == "row 95000"


# --- replace ---------------------------------------------------------------------------------


def test_replace_leaves_exactly_the_files_good_rows(db: Db, tmp_path: Path) -> None:
    """--mode replace: the table ends holding exactly the file's good rows; the old rows are
    gone, those whose keys the file repeats included (they are not duplicates of the new
    rows). Bad rows are rejected at their lines (exit 3). The report and status say
    "replace", so does the summary; a re-run does nothing."""
    db.script(ITEMS)
    write_rows(tmp_path / "old.csv", ITEMS_HEADER, [(i, i, 1, f"old {i}") for i in range(1, 301)])
    assert db.loader("import", "old.csv", "-t", "items").code == 0

    rows: list[tuple[object, ...]] = [(i, i, 2, f"new {i}") for i in range(201, 601)]  # 201..300 were in the old rows
    rows[50] = (251, "x", 2, "bad integer")  # line 52
    rows[250] = (451, -1, 2, "check")  # line 252
    write_rows(tmp_path / "new.csv", ITEMS_HEADER, rows)
    command = ("import", "new.csv", "-t", "items", "--mode", "replace", "--batch-size", "100", "--json")
    run = db.loader(*command)
    assert run.code == 3, run.stderr
    report = run.json()
    assert (report["mode"], report["dry_run"]) == ("replace", False)
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (400, 398, 2)
    assert "replace" in run.stderr
    assert [(line, state) for line, state, _ in rejects(tmp_path / "new.csv.rejects.csv")] == [(52, "22P02"), (252, "23514")]

    expected = {i: (i, 2, f"new {i}", "default") for i in range(201, 601) if i not in (251, 451)}
    assert items(db) == expected
    assert [(s["mode"], s["rows_loaded"]) for s in status(db)] == [("replace", 398), ("append", 300)]

    again = db.loader(*command)
    assert again.code == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert items(db) == expected


def test_replace_gives_a_column_the_file_leaves_out_its_default_not_the_old_rows_value(db: Db, tmp_path: Path) -> None:
    """The table ends holding exactly the file's rows, as a load into an empty table would
    leave them: a column the file does not name holds its default in every row, also in the
    rows whose key the old contents had (their old value does not survive)."""
    db.script(ITEMS)
    db.sql("INSERT INTO items (id, qty, parent, name, note) SELECT i, i, 1, 'old ' || i, 'old note' FROM generate_series(1, 100) i")
    write_rows(tmp_path / "new.csv", ITEMS_HEADER, [(i, i, 2, f"new {i}") for i in range(51, 151)])
    run = db.loader("import", "new.csv", "-t", "items", "--mode", "replace")
    assert run.code == 0, run.stderr
    assert items(db) == {i: (i, 2, f"new {i}", "default") for i in range(51, 151)}


@pytest.mark.parametrize("key", ["primary key", "no key"])
def test_replace_shows_a_concurrent_reader_only_the_whole_old_or_the_whole_new_contents(
    db: Db, tmp_path: Path, key: str
) -> None:
    """While a replace runs, the table keeps its old rows; the switch at the end is atomic and
    does not block readers: a separate session polling count(*) and sum(id) sees the complete
    old contents, then the complete new contents, never empty or partial, never old again
    after new, and no query of it takes 2 s. The same with a primary key and without one."""
    db.script(f"CREATE TABLE t (id bigint {'PRIMARY KEY' if key == 'primary key' else ''}, name text)")
    db.sql("INSERT INTO t SELECT g, 'old ' || g FROM generate_series(1, 20000) g")
    new_ids = range(30_001, 80_001)
    write_rows(tmp_path / "t.csv", "id,name", [(i, f"new {i}") for i in new_ids])
    old = (20_000, sum(range(1, 20_001)))
    new = (len(new_ids), sum(new_ids))
    probe = "SELECT count(*), sum(id) FROM t"

    with Reader(db.dsn, probe) as reader:
        proc = db.spawn("import", "t.csv", "-t", "t", "--mode", "replace", "--batch-size", "5000", "--max-rate", "20000")
        until_batches(db, proc, 2)
        assert tuple(db.sql(probe)[0]) == old  # mid-load: the old contents, whole
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        until(lambda: reader.errors or reader.seen[-1] == new)

    assert not reader.errors, reader.errors
    assert set(reader.seen) <= {old, new}, sorted(set(reader.seen) - {old, new})[:5]
    switch = reader.seen.index(new)
    assert switch > 0 and all(seen == old for seen in reader.seen[:switch])
    assert all(seen == new for seen in reader.seen[switch:]), "the reader saw the old rows again after the new"
    assert max(reader.latencies) < 2, f"a reader's query took {max(reader.latencies):.2f} s during the replace"
    assert tuple(db.sql(probe)[0]) == new


@pytest.fixture
def reading_role(db: Db) -> Iterator[str]:
    """A role of this test's own (roles are the cluster's), dropped with its privileges at the end."""
    role = "reader_" + urlsplit(db.dsn).path.lstrip("/")
    db.sql(f'CREATE ROLE "{role}"')
    try:
        yield role
    finally:
        db.script(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


def test_replace_keeps_the_tables_indexes_grants_views_triggers_and_foreign_keys(
    db: Db, tmp_path: Path, reading_role: str
) -> None:
    """After a replace the table is the same table to everything around it: its primary key
    still rejects a duplicate and its index answers with the new rows; a role granted SELECT
    can still read it; a view over it shows the new rows; its trigger fires on a later
    insert; rows of another table that reference keys the file kept stay valid, and a child
    with a missing parent is still refused."""
    db.script(f"""
        CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL);
        CREATE INDEX t_name ON t (name);
        CREATE TABLE audit (id bigint);
        CREATE FUNCTION t_audit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NULL; END $$;
        CREATE TRIGGER t_audit AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION t_audit();
        CREATE VIEW t_even AS SELECT id, name FROM t WHERE id % 2 = 0;
        CREATE TABLE child (id int PRIMARY KEY, parent bigint NOT NULL REFERENCES t);
        GRANT SELECT ON t, t_even TO "{reading_role}";
        INSERT INTO t SELECT g, 'old ' || g FROM generate_series(1, 1000) g;
        INSERT INTO child SELECT g, g FROM generate_series(1, 50) g;
    """)
    new_ids = [*range(1, 501), *range(1001, 2001)]  # keeps 1..500 (the children's parents), drops 501..1000
    write_rows(tmp_path / "t.csv", "id,name", [(i, f"new {i}") for i in new_ids])

    run = db.loader("import", "t.csv", "-t", "t", "--mode", "replace", "--batch-size", "400", "--json")
    assert run.code == 0, run.stderr
    assert run.json()["rows_loaded"] == len(new_ids)
    assert table_rows(db, "SELECT id, name FROM t") == {i: (f"new {i}",) for i in new_ids}

    # the primary key and the index
    with pytest.raises(asyncpg.UniqueViolationError):
        db.sql("INSERT INTO t VALUES (1001, 'again')")
    by_index = in_one_session(db, "SET enable_seqscan = off", "SET enable_bitmapscan = off",
                              "SELECT id FROM t WHERE name = 'new 1500'")
    assert [r["id"] for r in by_index] == [1500]
    plan = in_one_session(db, "SET enable_seqscan = off", "EXPLAIN SELECT id FROM t WHERE name = 'new 1500'")
    assert "t_name" in "\n".join(r[0] for r in plan)

    # the grant
    granted = in_one_session(db, f'SET ROLE "{reading_role}"', "SELECT count(*) FROM t")
    assert granted[0][0] == len(new_ids)

    # the view
    assert db.value("SELECT count(*) FROM t_even") == sum(1 for i in new_ids if i % 2 == 0)
    assert db.value("SELECT name FROM t_even WHERE id = 1500") == "new 1500"
    assert db.value("SELECT count(*) FROM t_even WHERE id BETWEEN 501 AND 1000") == 0

    # the trigger
    db.sql("INSERT INTO t VALUES (5000, 'later')")
    assert db.value("SELECT count(*) FROM audit WHERE id = 5000") == 1

    # the incoming foreign key
    assert db.value("SELECT count(*) FROM child c JOIN t ON t.id = c.parent") == 50
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        db.sql("INSERT INTO child VALUES (100, 777777)")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        db.sql("DELETE FROM t WHERE id = 7")
    db.sql("INSERT INTO child VALUES (101, 1500)")  # a parent only the new file has


@pytest.mark.slow
def test_a_replace_killed_mid_load_leaves_the_old_rows_and_the_next_run_replaces_exactly(db: Db, tmp_path: Path) -> None:
    """kill -9 in the middle of a replace (paced with --max-rate): the table still holds its
    old rows, untouched. The same command again exits 0 and leaves exactly the file's rows."""
    db.script("CREATE TABLE t (id bigint PRIMARY KEY, name text)")
    db.sql("INSERT INTO t SELECT g, 'old ' || g FROM generate_series(1, 30000) g")
    old = {i: (f"old {i}",) for i in range(1, 30_001)}
    new_ids = range(20_001, 120_001)
    write_rows(tmp_path / "t.csv", "id,name", [(i, f"new {i}") for i in new_ids])
    command = ("import", str(tmp_path / "t.csv"), "-t", "t", "--mode", "replace", "--batch-size", "5000", "--max-rate", "20000")

    proc = db.spawn(*command)
    until_batches(db, proc, 2)
    kill_9(db, proc)
    assert table_rows(db, "SELECT id, name FROM t") == old

    rerun = db.loader(*command)
    assert rerun.code == 0, rerun.stderr
    assert table_rows(db, "SELECT id, name FROM t") == {i: (f"new {i}",) for i in new_ids}


# --- dry run ---------------------------------------------------------------------------------


def test_a_dry_run_reports_every_reject_and_commits_nothing_then_the_real_load_is_a_first_load(db: Db, tmp_path: Path) -> None:
    """--dry-run reads the whole file and reports what the load would do: the rows that would
    load, each bad row at its line with its SQLSTATE (a bad value, a CHECK, a key an existing
    row holds, a missing parent) in the rejects file, exit 3. It commits nothing: the table is
    unchanged and `loader status` shows no load. The real load of the same file afterwards is
    a normal first load, with the same rejects."""
    db.script(ITEMS)
    db.sql("INSERT INTO items (id, qty, parent, name) VALUES (1, 1, 1, 'one'), (2, 2, 2, 'two'), (3, 3, 3, 'three')")
    before = items(db)
    rows: list[tuple[object, ...]] = [(i, i, 1 + i % 10, f"n{i}") for i in range(101, 161)]
    rows[5] = (106, "x", 1, "bad integer")  # line 7: 22P02
    rows[18] = (119, -1, 1, "check")  # line 20: 23514
    rows[31] = (2, 5, 1, "an existing row's key")  # line 33: 23505
    rows[48] = (149, 5, 99, "no such parent")  # line 50: 23503
    write_rows(tmp_path / "items.csv", ITEMS_HEADER, rows)
    command = ("import", "items.csv", "-t", "items", "--batch-size", "10", "--workers", "2", "--json")
    expected_rejects = [(7, "22P02"), (20, "23514"), (33, "23505"), (50, "23503")]

    dry = db.loader(*command, "--dry-run")
    assert dry.code == 3, dry.stderr
    report = dry.json()
    assert (report["dry_run"], report["mode"]) == (True, "append")
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (60, 56, 4)
    dry_rejects = rejects(tmp_path / "items.csv.rejects.csv")
    assert [(line, state) for line, state, _ in dry_rejects] == expected_rejects
    assert items(db) == before
    assert status(db) == []
    assert loads_in_ledger(db) == 0

    real = db.loader(*command)
    assert real.code == 3, real.stderr
    report = real.json()
    assert report["dry_run"] is False
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"], report["rows_skipped"]) == (60, 56, 4, 0)
    assert rejects(tmp_path / "items.csv.rejects.csv") == dry_rejects
    assert db.value("SELECT count(*) FROM items") == 3 + 56
    assert [(s["state"], s["mode"], s["rows_loaded"], s["rows_rejected"]) for s in status(db)] == [
        ("finished-with-rejects", "append", 56, 4)
    ]


@pytest.mark.parametrize("mode", ["upsert", "replace"])
def test_a_dry_run_in_any_mode_changes_neither_the_table_nor_the_ledger(db: Db, tmp_path: Path, mode: str) -> None:
    """--dry-run with upsert or replace, against a table and a ledger that already hold a load:
    exit 0 with the rows that would load (and, for upsert, the rows it would insert and
    update), the mode, "dry_run": true; afterwards the table,
    the ledger and `loader status` are as before, and the real load of the file then runs
    in full."""
    db.script("CREATE TABLE t (id int PRIMARY KEY, name text)")
    write_rows(tmp_path / "base.csv", "id,name", [(i, f"base {i}") for i in range(1, 101)])
    assert db.loader("import", "base.csv", "-t", "t").code == 0
    before = (table_rows(db, "SELECT id, name FROM t"), ledger_counts(db), [(s["load_id"], s["state"]) for s in status(db)])

    write_rows(tmp_path / "t.csv", "id,name", [(i, f"file {i}") for i in range(51, 151)])
    command = ("import", "t.csv", "-t", "t", "--mode", mode, "--json", *(("--key", "id") if mode == "upsert" else ()))
    dry = db.loader(*command, "--dry-run")
    assert dry.code == 0, dry.stderr
    report = dry.json()
    assert (report["mode"], report["dry_run"], report["rows_read"], report["rows_loaded"]) == (mode, True, 100, 100)
    after = (table_rows(db, "SELECT id, name FROM t"), ledger_counts(db), [(s["load_id"], s["state"]) for s in status(db)])
    assert after == before

    real = db.loader(*command)
    assert real.code == 0, real.stderr
    assert (real.json()["dry_run"], real.json()["rows_loaded"], real.json()["rows_skipped"]) == (False, 100, 0)
    if mode == "upsert":  # the dry run counted what the real upsert did
        assert (report["rows_inserted"], report["rows_updated"]) == (real.json()["rows_inserted"], real.json()["rows_updated"]) == (50, 50)
    expected = {i: (f"file {i}",) for i in range(51, 151)}
    if mode == "upsert":
        expected |= {i: (f"base {i}",) for i in range(1, 51)}
    assert table_rows(db, "SELECT id, name FROM t") == expected


def test_status_json_has_the_mode_of_every_load(db: Db, tmp_path: Path) -> None:
    """`loader status --json`: each load says how it loaded, newest first."""
    db.script("CREATE TABLE t (id int PRIMARY KEY, name text)")
    for name, mode in (("a", "append"), ("b", "upsert"), ("c", "replace")):
        write_rows(tmp_path / f"{name}.csv", "id,name", [(i, name) for i in range(1, 11)])
        run = db.loader("import", f"{name}.csv", "-t", "t", "--mode", mode, *(("--key", "id") if mode == "upsert" else ()))
        assert run.code == 0, run.stderr
    assert [(load["mode"], load["state"]) for load in status(db)] == [
        ("replace", "succeeded"), ("upsert", "succeeded"), ("append", "succeeded"),
    ]
