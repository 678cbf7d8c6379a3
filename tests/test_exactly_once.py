"""Exactly once across runs, as a cron user relies on it: whatever ends a run (kill -9, a
server restart, SIGTERM, a second run), the next run of the same command leaves the table
equal to the source, and a run after success changes nothing.

Everything is real: the CLI runs as a subprocess, signals are real signals, the server is
the session's PostgreSQL. A load is paced and stopped at exact points by triggers in the
test's database: every batch's last row (id % batch size = 0) sleeps a little, so a load
takes seconds, and passes the *batch gate*; the ledger's final UPDATE of a load passes the
*finish gate*. A gate is an advisory lock the test can hold; while it is held, the loader's
transactions wait there, uncommitted, and are seen waiting in pg_stat_activity. Every wait
is a poll (`until`), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from data import EVENTS_DDL, EVENTS_HEADER, event_rows, write_csv
from devserver import LocalCluster
from helpers import LOADER_SESSIONS, Background, Db, Run, committed_batches, until
from loader import sql

BATCH_GATE = 1
FINISH_GATE = 2


def paced_events(*, primary_key: bool, every: int, pause: float = 0.05) -> str:
    """The events table; the last row of each batch of `every` rows pauses, then passes the batch gate."""
    return f"""
    CREATE TABLE events (id bigint {'PRIMARY KEY' if primary_key else ''}, name text, note text,
                         amount numeric, at timestamptz, flag boolean);
    CREATE FUNCTION pace() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.id % {every} = 0 THEN
            PERFORM pg_advisory_xact_lock_shared(4242, {BATCH_GATE});
            PERFORM pg_sleep({pause});
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER pace BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION pace();
    """


# The ledger as an owner would create it (README: "have an owner run sql/ledger.sql"), with a
# gate before the UPDATE that marks a load finished.
LEDGER_WITH_FINISH_GATE = (
    sql.render("CREATE SCHEMA IF NOT EXISTS {schema};\n" + sql.sql_file("ledger.sql"), schema="loader")
    + f"""
    CREATE FUNCTION finish_gate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(4242, {FINISH_GATE});
        RETURN NEW;
    END $$;
    CREATE TRIGGER finish_gate BEFORE UPDATE ON loader.loads FOR EACH ROW
        WHEN (NEW.state <> 'running') EXECUTE FUNCTION finish_gate();
    """
)

AT_A_GATE = """
SELECT count(*) FROM pg_stat_activity
 WHERE application_name LIKE 'loader%' AND wait_event_type = 'Lock' AND wait_event = 'advisory'
"""

KILL_A_COPY = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
 WHERE application_name LIKE 'loader%' AND state = 'active' AND query ILIKE 'COPY%'
"""

END_LOADER_SESSIONS = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'loader%'"

# What a run waiting for the table (--wait-lock) says once, on stderr.
WAITING = "waiting for it, up to"


class Gates:
    """Advisory locks held by one session of the test; the triggers above wait on them."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None

    def _do(self, statement: str, *args: Any) -> Any:
        async def go() -> Any:
            if self._conn is None:
                self._conn = await asyncpg.connect(self._dsn)
            return await self._conn.fetchval(statement, *args)

        return self._loop.run_until_complete(go())

    def close(self, gate: int) -> None:
        self._do("SELECT pg_advisory_lock(4242, $1)", gate)

    def open_all(self) -> None:
        if self._conn is not None:
            self._do("SELECT pg_advisory_unlock_all()")

    def lost(self) -> None:
        """The server ended the gates' session (a restart), and its locks with it."""
        if self._conn is not None:
            self._conn.terminate()
            self._loop.run_until_complete(asyncio.sleep(0))  # let the transport close
            self._conn = None

    def dispose(self) -> None:
        if self._conn is not None:
            self._loop.run_until_complete(self._conn.close())
        self._loop.close()


@pytest.fixture
def gates(db: Db) -> Iterator[Gates]:
    g = Gates(db.dsn)
    try:
        yield g
    finally:
        g.dispose()


def crash(db: Db, proc: subprocess.Popen[bytes], gates: Gates | None = None) -> None:
    """kill -9 the loader, then let the server finish what the dead client left: its sessions
    end (a session held at a gate would notice the dead client only once past it), gates open."""
    assert proc.poll() is None, "the load ended before it could be killed"
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    db.value(END_LOADER_SESSIONS)
    if gates is not None:
        gates.open_all()
    until(lambda: db.value(LOADER_SESSIONS) == 0)


def assert_exact(db: Db, csv: Path, rows: int) -> None:
    """The table holds the source's rows, each once: no row missing, none doubled, none altered."""
    assert db.value("SELECT count(*) FROM events") == rows
    assert db.value("SELECT count(DISTINCT id) FROM events") == rows
    db.sql("CREATE TABLE expected (LIKE events)")
    db.psql_copy("expected", csv)
    assert db.same_rows("events", "expected")


def one_line(run: Run) -> str:
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def change_one_byte(path: Path, offset: int) -> None:
    """Overwrite the first digit of the id of the record at `offset`: same size, still valid CSV."""
    data = bytearray(path.read_bytes())
    assert chr(data[offset]).isdigit(), data[offset : offset + 20]
    data[offset] = ord("9") if data[offset] != ord("9") else ord("8")
    path.write_bytes(bytes(data))


# --- 1. kill -9 at any moment --------------------------------------------------------------

# 60 batches: enough moments to kill at; each batch's last row pauses, so the batches, not
# their size, make the load last.
CRASH_ROWS = 120_000
CRASH_BATCH = 2000
CRASH_BATCHES = CRASH_ROWS // CRASH_BATCH


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("crash") / "events.csv", event_rows(CRASH_ROWS), EVENTS_HEADER)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before_the_first_commit", "mid_load", "after_the_last_batch", "during_a_retry"])
def test_a_run_killed_at_any_moment_is_completed_exactly_by_the_next_run(
    db: Db, big_csv: Path, gates: Gates, moment: str
) -> None:
    db.script(paced_events(primary_key=True, every=CRASH_BATCH))
    command = ("import", str(big_csv), "-t", "events", "--batch-size", str(CRASH_BATCH), "--workers", "2", "--json")
    if moment == "before_the_first_commit":
        gates.close(BATCH_GATE)
    if moment == "after_the_last_batch":
        db.script(LEDGER_WITH_FINISH_GATE)
        gates.close(FINISH_GATE)

    proc = db.spawn(*command)
    if moment == "before_the_first_commit":
        until(lambda: db.value(AT_A_GATE) == 2)  # both workers' COPYs sent, neither committed
    elif moment == "mid_load":
        until(lambda: committed_batches(db) >= CRASH_BATCHES // 2)
    elif moment == "after_the_last_batch":
        until(lambda: committed_batches(db) == CRASH_BATCHES and db.value(AT_A_GATE) == 1)  # the finish, held
    else:
        until(lambda: committed_batches(db) >= CRASH_BATCHES // 3)
        until(lambda: db.value(KILL_A_COPY) >= 1)  # a batch's connection dies: the loader retries it
    crash(db, proc, gates)

    done = committed_batches(db)
    killed = db.sql("SELECT load_id, state FROM loader.loads")
    assert [r["state"] for r in killed] == ["running"]  # kill -9 wrote nothing more
    if moment == "before_the_first_commit":
        assert done == 0
    elif moment == "after_the_last_batch":
        assert done == CRASH_BATCHES
    else:
        assert 0 < done < CRASH_BATCHES

    rerun = db.loader(*command)
    assert rerun.code == 0, rerun.stderr
    report = rerun.json()
    assert report["load_id"] == killed[0]["load_id"]  # the same load, resumed
    assert report["rows_skipped"] == done * CRASH_BATCH
    assert report["rows_loaded"] == CRASH_ROWS - done * CRASH_BATCH
    assert report["rows_read"] == CRASH_ROWS
    if done:
        assert "loaded by an earlier run" in rerun.stderr
    resumed = db.sql("SELECT state, runs, rows_loaded FROM loader.loads")
    assert [tuple(r) for r in resumed] == [("succeeded", 2, CRASH_ROWS)]
    assert_exact(db, big_csv, CRASH_ROWS)


# --- 2. the server restarts mid-load -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.own_cluster
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_server_restart_mid_load_loses_and_doubles_nothing(
    db: Db, local_cluster: LocalCluster, tmp_path: Path, gates: Gates, mode: str
) -> None:
    """A server restart mid-load, fast (sessions ended, then a checkpoint) or immediate (a crash,
    then recovery from the WAL), is a transient failure: the batches in flight roll back and
    are retried through new connections, and the same run completes the load (exit 0), every
    row once. The restart comes while both workers wait at the batch gate, after a CHECKPOINT:
    every batch committed so far is durable, so the crash cannot lose one (were it to, the run
    would exit 75 for the next run to reload it)."""
    rows, batch = 100_000, 2000
    db.script(paced_events(primary_key=True, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(batch), "--workers", "2", "--retries", "10", "--json")
    proc = db.spawn(*command)
    until(lambda: committed_batches(db) >= rows // batch // 3)
    gates.close(BATCH_GATE)
    until(lambda: db.value(AT_A_GATE) == 2)  # both workers' batches sent, neither committed: nothing commits now
    db.script("CHECKPOINT")  # the batches committed asynchronously so far are on disk
    assert proc.poll() is None, "the load ended before the restart"
    local_cluster.stop_server(mode)
    gates.lost()
    local_cluster.start_server()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    again = db.loader(*command)
    assert again.code == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert db.value("SELECT count(*) FROM loader.loads") == 1
    assert_exact(db, csv, rows)


def test_batches_a_crash_took_back_after_their_commit_are_found_before_the_load_is_marked_done(
    db: Db, tmp_path: Path, gates: Gates
) -> None:
    """Batches commit asynchronously, so a crash can take back the last ones: their rows and
    their ledger rows together. Before the load's final, synchronous commit, the loader checks
    that every batch it committed is still in the ledger; one that is not makes the run exit
    75, the load is not marked done, and the next run loads that batch again: every row once.
    (The crash is played by deleting a committed batch's rows and ledger row mid-load.)"""
    rows, batch = 10_000, 1000
    db.script(paced_events(primary_key=True, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(batch), "--workers", "1")
    proc = db.spawn(*command)
    until(lambda: committed_batches(db) >= 3)
    gates.close(BATCH_GATE)
    until(lambda: db.value(AT_A_GATE) == 1)
    db.script(
        "DELETE FROM events WHERE id BETWEEN 1001 AND 2000; DELETE FROM loader.batches WHERE batch_no = 2"
    )
    gates.open_all()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err.decode()
    assert "lost 1 committed batches (1,000 rows)" in err.decode()
    assert db.value("SELECT state FROM loader.loads") != "succeeded"
    again = db.loader(*command)
    assert again.code == 0, again.stderr
    assert_exact(db, csv, rows)


# --- 3. a re-run after success ---------------------------------------------------------------


def test_a_rerun_after_success_does_nothing_verifies_a_touched_file_and_refuses_a_changed_one(
    db: Db, tmp_path: Path
) -> None:
    rows = 10_000
    db.sql(EVENTS_DDL.format(name="events"))  # no primary key: a second load would double every row
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", "1000")

    first = db.loader(*command)
    assert first.code == 0, first.stderr
    assert db.value("SELECT count(*) FROM events") == rows

    second = db.loader(*command)
    assert second.code == 0, second.stderr
    assert "nothing to do" in one_line(second)
    assert db.value("SELECT count(*) FROM events") == rows

    os.utime(csv)  # touch: a new mtime, the same bytes
    third = db.loader(*command)
    assert third.code == 0, third.stderr
    assert "verified" in one_line(third)
    assert db.value("SELECT count(*) FROM events") == rows

    change_one_byte(csv, db.value("SELECT byte_offset FROM loader.batches WHERE batch_no = 5"))
    changed = db.loader(*command)
    assert changed.code == 2, changed.stderr
    assert "--force loads the whole file as a new load" in one_line(changed)
    assert "twice" in one_line(changed)  # what --force would do to the rows already loaded
    assert db.value("SELECT count(*) FROM events") == rows
    assert db.value("SELECT state FROM loader.loads") == "succeeded"

    forced = db.loader(*command, "--force", "--json")
    assert forced.code == 0, forced.stderr
    assert forced.json()["rows_loaded"] == rows
    assert db.value("SELECT count(*) FROM events") == 2 * rows
    assert db.value("SELECT count(*) FROM loader.loads WHERE state = 'succeeded'") == 2


# --- 4. a changed file during an unfinished load --------------------------------------------


@pytest.mark.slow
def test_a_file_changed_under_an_unfinished_load_is_refused_until_restart(
    db: Db, tmp_path: Path
) -> None:
    rows, batch = 100_000, 2000
    db.script(paced_events(primary_key=False, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(batch))
    proc = db.spawn(*command)
    until(lambda: committed_batches(db) >= rows // batch // 3)
    crash(db, proc)
    partial = db.value("SELECT count(*) FROM events")
    assert partial == committed_batches(db) * batch

    first_committed = db.sql("SELECT byte_offset, first_line FROM loader.batches ORDER BY batch_no LIMIT 1")[0]
    change_one_byte(csv, first_committed["byte_offset"])
    refused = db.loader(*command)
    assert refused.code == 2, refused.stderr
    message = one_line(refused)
    assert "--restart" in message and "changed" in message
    assert db.value("SELECT count(*) FROM events") == partial

    restarted = db.loader(*command, "--restart", "--json")
    assert restarted.code == 0, restarted.stderr
    assert restarted.json()["rows_loaded"] == rows
    # Documented: rows the earlier runs committed stay; the new load adds the whole file.
    assert db.value("SELECT count(*) FROM events") == partial + rows


# --- 5. two runs at once ---------------------------------------------------------------------


def test_a_second_run_while_one_is_loading_exits_75_or_waits_and_finds_nothing_to_do(
    db: Db, tmp_path: Path, gates: Gates
) -> None:
    rows, batch = 20_000, 2000
    db.script(paced_events(primary_key=True, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(batch))
    gates.close(BATCH_GATE)
    first = db.spawn(*command)
    until(lambda: db.value(AT_A_GATE) >= 1)  # the first run holds the table and is loading

    second = db.loader(*command)
    assert second.code == 75, second.stderr
    assert "another load" in one_line(second) and "is running" in second.stderr

    waiting = Background(db, *command, "--wait-lock", "120")
    until(lambda: WAITING in waiting.stderr() or not waiting.running())
    assert waiting.running(), waiting.stderr()
    gates.open_all()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()
    assert waiting.wait(timeout=300) == 0, waiting.stderr()
    assert "nothing to do" in waiting.stderr()
    assert db.value("SELECT count(*) FROM loader.loads") == 1
    assert_exact(db, csv, rows)


# --- 6. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_mid_load_stops_within_seconds_and_the_next_run_resumes(db: Db, tmp_path: Path) -> None:
    rows, batch = 100_000, 2000
    db.script(paced_events(primary_key=True, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(batch), "--json")
    proc = db.spawn(*command)
    until(lambda: committed_batches(db) >= 5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - signalled
    assert proc.returncode == 1, err.decode()
    assert elapsed < 5, f"exited {elapsed:.1f} s after SIGTERM"
    assert "interrupted" in err.decode()
    assert db.value("SELECT state FROM loader.loads") == "interrupted"
    done = committed_batches(db)
    assert 0 < done < rows // batch

    rerun = db.loader(*command)
    assert rerun.code == 0, rerun.stderr
    assert rerun.json()["rows_skipped"] == done * batch
    assert db.value("SELECT state FROM loader.loads") == "succeeded"
    assert_exact(db, csv, rows)


# --- 7. standard input -----------------------------------------------------------------------


@pytest.mark.slow
def test_stdin_resumes_by_load_id_and_anonymous_stdin_loads_again(db: Db, tmp_path: Path) -> None:
    rows, batch = 100_000, 2000
    db.script(paced_events(primary_key=True, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", "-", "-t", "events", "--load-id", "nightly", "--batch-size", str(batch), "--json")
    with open(csv, "rb") as stdin:
        proc = db.spawn(*command, stdin=stdin)
        until(lambda: committed_batches(db) >= rows // batch // 3)
        crash(db, proc)
    done = committed_batches(db)
    rerun = db.loader(*command, input=csv.read_bytes())
    assert rerun.code == 0, rerun.stderr
    assert rerun.json()["rows_skipped"] == done * batch > 0
    assert_exact(db, csv, rows)

    # Without --load-id, stdin cannot be recognised: each run is a new load (documented).
    db.sql(EVENTS_DDL.format(name="plain"))
    small = write_csv(tmp_path / "small.csv", event_rows(1000), EVENTS_HEADER)
    runs = [db.loader("import", "-", "-t", "plain", "--json", input=small.read_bytes()) for _ in range(2)]
    assert [r.code for r in runs] == [0, 0], [r.stderr for r in runs]
    assert runs[0].json()["load_id"] != runs[1].json()["load_id"]
    assert db.value("SELECT count(*) FROM plain") == 2000


# --- 8. status -------------------------------------------------------------------------------


def test_status_lists_loads_newest_first(db: Db, tmp_path: Path) -> None:
    for name, n in (("older", 300), ("newer", 700)):
        db.sql(EVENTS_DDL.format(name=name))
        csv = write_csv(tmp_path / f"{name}.csv", event_rows(n), EVENTS_HEADER)
        assert db.loader("import", str(csv), "-t", name).code == 0

    listed = db.loader("status", "--json")
    assert listed.code == 0, listed.stderr
    loads = json.loads(listed.stdout)
    assert [(x["table"], x["state"], x["rows_loaded"]) for x in loads] == [
        ('"public"."newer"', "succeeded", 700),
        ('"public"."older"', "succeeded", 300),
    ]

    text = db.loader("status")
    assert text.code == 0, text.stderr
    header, *lines = text.stdout.splitlines()
    assert header.split()[:2] == ["started", "state"]
    assert len(lines) == 2
    assert "succeeded" in lines[0] and '"public"."newer"' in lines[0] and "700" in lines[0]
    assert '"public"."older"' in lines[1] and "300" in lines[1]


# --- 9. a server restart, seen from the whole load --------------------------------------------

LOCK_WAITS = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'loader%' AND wait_event_type = 'Lock'"


def restart_mid_load(db: Db, local_cluster: LocalCluster, csv: Path) -> subprocess.Popen[bytes]:
    """A load of 10 batches, paced to take a few seconds; the server restarts after the third."""
    db.script(paced_events(primary_key=True, every=2000, pause=0.2))
    write_csv(csv, event_rows(20_000), EVENTS_HEADER)
    proc = db.spawn("import", str(csv), "-t", "events", "--batch-size", "2000", "--retries", "10")
    until(lambda: committed_batches(db) >= 3)
    assert proc.poll() is None, "the load ended before the restart"
    local_cluster.restart("fast")
    return proc


@pytest.mark.slow
@pytest.mark.own_cluster
def test_a_server_restart_mid_load_is_survived_through_the_retries(
    db: Db, local_cluster: LocalCluster, tmp_path: Path
) -> None:
    """README: a restart is a transient failure, retried. The workers reconnect and commit every
    batch, and so does the load's own session (table lock, plan, closing the load): the run
    exits 0 and the ledger says `succeeded`."""
    proc = restart_mid_load(db, local_cluster, tmp_path / "events.csv")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-500:]
    assert db.value("SELECT state FROM loader.loads") == "succeeded"


@pytest.mark.slow
@pytest.mark.own_cluster
def test_a_server_restart_mid_load_puts_no_traceback_on_stderr(
    db: Db, local_cluster: LocalCluster, tmp_path: Path
) -> None:
    """stderr is what cron mails, and the README promises one line, never a traceback: the
    reconnects after a restart (asyncpg's pool restoring its connections included) write none."""
    proc = restart_mid_load(db, local_cluster, tmp_path / "events.csv")
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.own_cluster
def test_after_a_server_restart_the_running_load_still_keeps_a_second_run_out(
    db: Db, local_cluster: LocalCluster, tmp_path: Path, gates: Gates
) -> None:
    """README: the load holds the table "for its whole duration", a server
    restart included: the load's own session reconnects and takes its lease back, so
    a second run started while the first loads through new connections exits 75."""
    rows, batch = 20_000, 2000
    db.script(paced_events(primary_key=True, every=batch))
    csv = write_csv(tmp_path / "events.csv", event_rows(rows), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", str(batch), "--retries", "10")
    first = db.spawn(*command)
    until(lambda: committed_batches(db) >= 2)
    local_cluster.restart("fast")
    gates.close(BATCH_GATE)
    until(lambda: db.value(AT_A_GATE) == 2)  # the first run is loading again, through new connections
    second = db.spawn(*command)
    # the second run is refused; were it let in, its workers would queue behind the first's
    until(lambda: second.poll() is not None or db.value(LOCK_WAITS) >= 3)
    gates.open_all()
    first.communicate(timeout=300)
    _, second_err = second.communicate(timeout=300)
    assert_exact(db, csv, rows)  # the batch claims still keep the rows exact
    assert second.returncode == 75, (
        "a second run was let in while the first was still loading: " + second_err.decode()[-500:]
    )


def test_sigterm_while_waiting_for_the_table_stops_the_run_within_seconds(
    db: Db, tmp_path: Path, gates: Gates
) -> None:
    """README: SIGTERM stops the run and exits 1, also while it waits for the table's lock
    (--wait-lock): within seconds, not when the lock comes or the wait runs out."""
    db.script(paced_events(primary_key=True, every=2000))
    csv = write_csv(tmp_path / "events.csv", event_rows(10_000), EVENTS_HEADER)
    command = ("import", str(csv), "-t", "events", "--batch-size", "2000")
    gates.close(BATCH_GATE)
    db.spawn(*command)
    until(lambda: db.value(AT_A_GATE) >= 1)
    waiting = Background(db, *command, "--wait-lock", "600")
    until(lambda: WAITING in waiting.stderr() or not waiting.running())
    waiting.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    until(lambda: not waiting.running() or time.monotonic() > deadline, timeout=60)
    assert not waiting.running(), "still waiting for the table lock 5 s after SIGTERM (--wait-lock 600)"
    assert waiting.wait() == 1, waiting.stderr()


def test_a_touched_file_verifies_with_exit_0_like_an_untouched_one(db: Db, tmp_path: Path) -> None:
    """README: "A re-run of a load that finished does nothing and says so (exit 0)", also when
    the load rejected a row and the file was touched since: the re-run verifies the file, says
    "nothing to do ... (verified)" and exits 0, the rejects counted once, by the run that made
    them."""
    db.sql("CREATE TABLE t (id int, v text)")
    csv = tmp_path / "t.csv"
    csv.write_text("id,v\n1,a\nx,b\n3,c\n")
    assert db.loader("import", str(csv), "-t", "t").code == 3
    untouched = db.loader("import", str(csv), "-t", "t")
    assert "nothing to do" in untouched.stderr and untouched.code == 0
    os.utime(csv)
    touched = db.loader("import", str(csv), "-t", "t")
    assert "nothing to do" in touched.stderr and "verified" in touched.stderr
    assert db.value("SELECT count(*) FROM t") == 2
    assert touched.code == 0, touched.stderr
