"""Loads through a real PgBouncer, in transaction and in session pooling, as most production
PostgreSQL is reached: exact and exactly once, one load per table at a time, and a crashed
load never keeps the table from the next run for longer than its lease.

The fixture starts Debian's pgbouncer (1.18) in front of the test server. In transaction
pooling its pool is smaller than the loader's connections, so server sessions pass from one
client to the next: a setting or a named prepared statement left on one would show up.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pooler import PgBouncer

from data import plain_csv
from helpers import Background, Db, committed_batches, until

ROWS, BATCH = 20_000, 1000

# Each batch's last row sleeps: a load of ROWS takes a few seconds, long enough to act during it.
PACED = f"""
CREATE TABLE events (id bigint PRIMARY KEY, name text);
CREATE FUNCTION pace() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id % {BATCH} = 0 THEN PERFORM pg_sleep(0.15); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER pace BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION pace();
"""


@pytest.fixture(scope="module", params=["transaction", "session"])
def bouncer(request: pytest.FixtureRequest, pg_server: Any) -> Iterator[PgBouncer]:
    mode = request.param
    started = PgBouncer(pg_server.dsn, mode, pool_size=3 if mode == "transaction" else 20).start()
    yield started
    started.stop()


@pytest.fixture
def pooled(db: Db, bouncer: PgBouncer) -> Iterator[Db]:
    """The test's database, reached through PgBouncer (SQL run here goes through it too)."""
    through = Db(bouncer.dsn(urlsplit(db.dsn).path.lstrip("/")), db.tmp)
    yield through
    through.reap()


def assert_exact(db: Db, rows: int) -> None:
    assert db.value("SELECT count(*) FROM events") == rows
    assert db.value("SELECT count(DISTINCT id) FROM events") == rows
    assert db.value("SELECT min(id) = 1 AND max(id) = $1 FROM events", rows)


def test_a_load_through_pgbouncer_is_exact_and_a_rerun_does_nothing(db: Db, pooled: Db, tmp_path: Path) -> None:
    db.sql("CREATE TABLE events (id bigint PRIMARY KEY, name text)")
    csv = plain_csv(tmp_path / "events.csv", ROWS)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(BATCH), "--workers", "4", "--json")

    first = pooled.loader(*command)
    assert first.code == 0, first.stderr
    assert first.json()["rows_loaded"] == ROWS
    assert_exact(db, ROWS)
    assert "connection pooler" in first.stderr and "--workers 4 as given" in first.stderr

    again = pooled.loader(*command)
    assert again.code == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert_exact(db, ROWS)

    status = pooled.loader("status", "--json")
    assert status.code == 0, status.stderr
    assert [(s["state"], s["rows_loaded"]) for s in status.json()] == [("succeeded", ROWS)]


def test_a_load_with_rejected_rows_through_pgbouncer_rejects_exactly_those(db: Db, pooled: Db, tmp_path: Path) -> None:
    """The slow path (savepoints, one COPY per piece) works through the pooler as directly."""
    db.sql("CREATE TABLE events (id bigint PRIMARY KEY, name text)")
    csv = tmp_path / "events.csv"
    csv.write_text("id,name\n" + "".join(f"{'x' if i % 997 == 0 else i},n{i}\n" for i in range(1, 5001)))

    run = pooled.loader("import", str(csv), "-t", "events", "--batch-size", "500", "--workers", "3", "--json")
    assert run.code == 3, run.stderr
    assert run.json()["rows_rejected"] == 5
    assert db.value("SELECT count(*) FROM events") == 4995


def test_a_second_load_of_the_table_through_pgbouncer_exits_75(db: Db, pooled: Db, tmp_path: Path) -> None:
    db.script(PACED)
    csv = plain_csv(tmp_path / "events.csv", ROWS)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(BATCH), "--workers", "2")
    first = Background(pooled, *command)
    until(lambda: committed_batches(db) >= 1)

    second = pooled.loader(*command)
    assert second.code == 75, second.stderr
    assert "another load of" in second.stderr and "is running" in second.stderr

    assert first.wait() == 0, first.stderr()
    assert_exact(db, ROWS)


def test_a_load_through_pgbouncer_leaves_no_lock_on_a_pooled_connection(db: Db, pooled: Db, tmp_path: Path) -> None:
    """The next load of the table, through the pooler or straight to the server, goes ahead
    at once: what kept other loads out ends with the load, not with a server connection."""
    db.sql("CREATE TABLE events (id bigint PRIMARY KEY, name text)")
    first = plain_csv(tmp_path / "first.csv", 1000)
    second = plain_csv(tmp_path / "second.csv", 1000, start=1001)
    third = plain_csv(tmp_path / "third.csv", 1000, start=2001)

    assert pooled.loader("import", str(first), "-t", "events").code == 0
    direct = db.loader("import", str(second), "-t", "events")
    assert direct.code == 0, direct.stderr
    again = pooled.loader("import", str(third), "-t", "events")
    assert again.code == 0, again.stderr
    assert_exact(db, 3000)


def killed_mid_load(through: Db, db: Db, tmp_path: Path, lease: int) -> tuple[str, ...]:
    """Start a paced load of ROWS through `through` with --lease `lease`, kill -9 it once a
    few batches are committed; the command, to run again."""
    db.script(PACED)
    csv = plain_csv(tmp_path / "events.csv", ROWS)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(BATCH), "--workers", "2")
    first = through.spawn(*command, "--lease", str(lease))
    until(lambda: committed_batches(db) >= 3)
    first.send_signal(signal.SIGKILL)
    first.wait()
    return command


def test_after_kill_9_through_pgbouncer_the_next_run_waits_out_the_lease_and_resumes_exactly(
    db: Db, pooled: Db, tmp_path: Path
) -> None:
    """Through a pooler the killed load's server session lives on, so its end cannot free the
    table: its lease does, once it expires. Until then the next run exits 75 naming the load;
    after, it resumes, and the table holds every row once."""
    command = killed_mid_load(pooled, db, tmp_path, lease=4)
    partial = db.value("SELECT count(*) FROM events")
    assert 0 < partial < ROWS

    refused = pooled.loader(*command)
    assert refused.code == 75, refused.stderr
    load_id = db.value("SELECT load_id FROM loader.loads")
    assert f"another load of \"public\".\"events\" is running (load {load_id}" in refused.stderr

    resumed = pooled.loader(*command, "--wait-lock", "60", "--json")
    assert resumed.code == 0, resumed.stderr
    assert resumed.json()["rows_skipped"] == partial
    assert_exact(db, ROWS)


def test_a_killed_direct_load_frees_the_table_at_once(db: Db, tmp_path: Path) -> None:
    """Straight to the server the load's own session ends with its process: the next run
    goes ahead at once, however long the killed load's lease was."""
    command = killed_mid_load(db, db, tmp_path, lease=3600)
    resumed = db.loader(*command)
    assert resumed.code == 0, resumed.stderr
    assert_exact(db, ROWS)


def test_a_setting_the_pooler_refuses_fails_at_once_with_what_to_do(db: Db, pooled: Db, tmp_path: Path) -> None:
    """A startup parameter PgBouncer does not take (here from the URL) fails the same way on
    every attempt: one line, exit 2, no retries."""
    db.sql("CREATE TABLE events (id bigint PRIMARY KEY, name text)")
    csv = plain_csv(tmp_path / "events.csv", 10)
    dsn = pooled.dsn + "?search_path=public"
    run = pooled.loader("import", str(csv), "-t", "events", "--dsn", dsn, "--retries", "6", "-v")
    assert run.code == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, run.stderr
    assert "unsupported startup parameter: search_path" in errors[0]
    assert "ignore_startup_parameters" in errors[0]
    assert "retry" not in run.stderr.lower()


def test_an_upsert_and_a_replace_through_pgbouncer_end_as_the_file_says(db: Db, pooled: Db, tmp_path: Path) -> None:
    """Each upsert batch's temporary stage lives and dies in its own transaction, and a
    replace's switch is one transaction: both work where a server session is lent per
    transaction."""
    db.sql("CREATE TABLE events (id bigint PRIMARY KEY, name text)")
    assert pooled.loader("import", str(plain_csv(tmp_path / "base.csv", 1000)), "-t", "events").code == 0
    changes = tmp_path / "changes.csv"
    changes.write_text("id,name\n" + "".join(f"{i},new {i}\n" for i in range(501, 1501)) + "700,last\n")
    upsert = pooled.loader(
        "import", str(changes), "-t", "events", "--mode", "upsert", "--key", "id", "--workers", "4", "--batch-size", "100",
        "--json",
    )
    assert upsert.code == 0, upsert.stderr
    assert (upsert.json()["rows_inserted"], upsert.json()["rows_updated"]) == (500, 501)  # 700 twice
    assert db.value("SELECT count(*) FROM events") == 1500
    assert db.value("SELECT name FROM events WHERE id = 700") == "last"

    replace = pooled.loader("import", str(plain_csv(tmp_path / "full.csv", 300)), "-t", "events", "--mode", "replace")
    assert replace.code == 0, replace.stderr
    assert_exact(db, 300)
