"""Faults during a load, made for real: connections killed on the server, batches sent twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from data import EVENTS_HEADER, event_rows, write_csv
from helpers import Db, batches_of, sink_for, until
from loader.sink import Outcome

SLOW_EVENTS = """
CREATE TABLE events (id bigint PRIMARY KEY, name text, note text, amount numeric, at timestamptz, flag boolean);
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER slow BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow();
"""

# The server kills the loading session itself at fixed rows, once each (a sequence keeps
# counting whatever the transaction does, so the retry is not killed again): three COPYs
# mid-stream, and one batch at its COMMIT (a deferred constraint trigger).
KILL_IN_COPY = (1_500, 13_370, 26_690)
KILL_AT_COMMIT = 35_001

KILLING_EVENTS = f"""
CREATE TABLE events (id bigint PRIMARY KEY, name text, note text, amount numeric, at timestamptz, flag boolean);
{"".join(f"CREATE SEQUENCE kill_at_{i};" for i in (*KILL_IN_COPY, KILL_AT_COMMIT))}
CREATE FUNCTION die_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval(format('kill_at_%s', NEW.id)) = 1 THEN
    PERFORM pg_terminate_backend(pg_backend_pid());
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER die_in_copy BEFORE INSERT ON events FOR EACH ROW
  WHEN (NEW.id IN ({", ".join(map(str, KILL_IN_COPY))})) EXECUTE FUNCTION die_once();
CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
  WHEN (NEW.id = {KILL_AT_COMMIT}) EXECUTE FUNCTION die_once();
"""

KILLS = "SELECT count(*) FROM pg_sequences WHERE sequencename LIKE 'kill_at_%' AND last_value IS NOT NULL"


@pytest.mark.slow
def test_killed_connections_are_retried_without_losing_or_duplicating_a_row(db: Db, tmp_path: Path) -> None:
    """Connections killed during COPY and at COMMIT: each costs one retry, no row is lost or doubled."""
    db.script(KILLING_EVENTS)
    rows = 40_000
    csv = write_csv(tmp_path / "e.csv", event_rows(rows), EVENTS_HEADER)
    run = db.loader("import", str(csv), "-t", "events", "--workers", "2", "--batch-size", "500", "--json")
    assert run.code == 0, run.stderr
    assert db.value(KILLS) == 4
    report = run.json()
    assert report["retries"] == 4
    assert report["rows_loaded"] == rows
    assert db.value("SELECT count(*) FROM events") == rows
    assert db.value("SELECT count(DISTINCT id) FROM events") == rows


def test_a_batch_committed_by_an_earlier_attempt_is_not_loaded_again(db: Db, tmp_path: Path) -> None:
    """What a retry after an unknown commit outcome does: the ledger row says it is done."""
    db.sql("CREATE TABLE t (id int, name text)")
    csv = tmp_path / "t.csv"
    csv.write_text("id,name\n1,a\n2,b\n3,c\n")

    async def twice() -> tuple[Outcome, Outcome]:
        (batch,) = batches_of(csv, 10)
        async with sink_for(db.dsn, "t", ("id", "name"), csv) as (_, sink):
            return await sink.load(batch), await sink.load(batch)

    first, second = asyncio.run(twice())
    assert (first.rows_loaded, first.committed_before) == (3, False)
    assert (second.rows_loaded, second.committed_before) == (3, True)
    assert db.value("SELECT count(*) FROM t") == 3


def test_the_server_never_sees_more_connections_than_workers(db: Db, tmp_path: Path) -> None:
    db.script(SLOW_EVENTS)
    csv = write_csv(tmp_path / "e.csv", event_rows(100_000), EVENTS_HEADER)
    proc = db.spawn("import", str(csv), "-t", "events", "--workers", "3", "--batch-size", "2000")
    seen: list[int] = []

    def sample() -> bool:
        seen.append(db.value("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'loader %'"))
        return proc.poll() is not None

    until(sample, timeout=300, interval=0.05)
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert max(seen) == 3 + 1, seen  # the workers, and the session that holds the table lock
    assert db.value("SELECT count(*) FROM events") == 100_000
