"""The ledger as a role without every privilege meets it, and `loader status` as it tells
what loads did: running, gone, finished with rows left out.

Everything goes through the real CLI against the session's PostgreSQL; a second role
(`ledger_etl`) connects with a password, as it would on a server with password auth.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from data import EVENTS_HEADER, event_rows, write_csv
from devserver import pg_binary
from helpers import REPO, Db, Run, committed_batches, until

ROLE = "ledger_etl"
ROLE_PASSWORD = "etl-Pw-271"

# Each batch of BATCH rows pauses once, in the trigger, so a load takes seconds.
BATCH = 1000
PACED_EVENTS = f"""
CREATE TABLE {{table}} (id bigint PRIMARY KEY, name text, note text, amount numeric, at timestamptz, flag boolean);
CREATE FUNCTION {{table}}_pace() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id % {BATCH} = 0 THEN PERFORM pg_sleep(0.1); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER pace BEFORE INSERT ON {{table}} FOR EACH ROW EXECUTE FUNCTION {{table}}_pace();
"""


def as_role(dsn: str) -> dict[str, str]:
    """The environment of a loader run that connects as ROLE."""
    parts = urlsplit(dsn)
    netloc = f"{ROLE}:{ROLE_PASSWORD}@{parts.hostname}:{parts.port}"
    return {"LOADER_DSN": urlunsplit(parts._replace(netloc=netloc))}


def one_error_line(run: Run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert re.search(r"loader: error: ", lines[0]), run.stderr
    assert "Traceback" not in run.stderr and "unexpected" not in run.stderr, run.stderr
    return lines[0]


def status(db: Db, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    run = db.loader("status", "--json", env=env)
    assert run.code == 0, run.stderr
    return run.json()


def grant(db: Db, *variables: str) -> subprocess.CompletedProcess[str]:
    """An owner runs sql/grants.sql with psql, as the README tells."""
    psql = pg_binary("psql")
    assert psql, "psql is needed to run sql/grants.sql"
    args = [arg for variable in variables for arg in ("-v", variable)]
    return subprocess.run(
        [psql, "-X", "-q", "-d", db.dsn, *args, "-f", str(REPO / "sql" / "grants.sql")],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def role(db: Db) -> str:
    """A login role with no privileges in the test's fresh database (CONNECT comes from PUBLIC)."""
    db.sql(
        f"DO $$ BEGIN CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    db.sql(f"ALTER ROLE {ROLE} NOSUPERUSER NOCREATEDB NOCREATEROLE LOGIN PASSWORD '{ROLE_PASSWORD}'")
    return ROLE


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, "the load ended before it could be killed"
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


# --- privileges on the ledger ---------------------------------------------------------------


def test_a_role_without_ledger_privileges_is_told_the_grants_and_loads_once_granted(
    db: Db, tmp_path: Path, role: str
) -> None:
    """A role that may insert into the table but not use an existing ledger: `import` and
    `status` exit 2 with one line naming the grants (and sql/grants.sql), nothing is loaded;
    after an owner runs sql/grants.sql for the role, the role loads and sees its loads. A role
    that can neither use nor create the ledger is told so, as before."""
    db.sql("CREATE TABLE t (id int, name text)")
    db.sql(f"GRANT INSERT ON t TO {role}")
    (tmp_path / "first.csv").write_text("id,name\n1,ann\n")
    (tmp_path / "mine.csv").write_text("id,name\n2,bob\n3,cid\n")
    env = as_role(db.dsn)

    no_ledger = db.loader("import", "mine.csv", "-t", "t", env=env)
    assert no_ledger.code == 2, no_ledger.stderr
    assert "cannot create the load ledger in schema loader" in one_error_line(no_ledger)

    assert db.loader("import", "first.csv", "-t", "t").code == 0  # the owner's load creates the ledger

    refused = db.loader("import", "mine.csv", "-t", "t", env=env)
    assert refused.code == 2, refused.stderr
    line = one_error_line(refused)
    assert f'role "{role}" lacks privileges on the load ledger (schema "loader")' in line
    assert "USAGE on the schema and SELECT, INSERT, UPDATE on its tables loads, batches, rejects" in line
    assert "sql/grants.sql" in line
    assert db.value("SELECT count(*) FROM t") == 1
    assert db.value("SELECT count(*) FROM loader.loads") == 1

    not_shown = db.loader("status", env=env)
    assert not_shown.code == 2, not_shown.stderr
    line = one_error_line(not_shown)
    assert f'role "{role}" lacks privileges on the load ledger (schema "loader")' in line
    assert "USAGE on the schema and SELECT on its tables loads, batches" in line

    granted = grant(db, f"role={role}")
    assert granted.returncode == 0, granted.stderr
    loaded = db.loader("import", "mine.csv", "-t", "t", env=env)
    assert loaded.code == 0, loaded.stderr
    assert db.value("SELECT count(*) FROM t") == 3
    assert [(x["source"].rsplit("/", 1)[-1], x["state"], x["rows_loaded"]) for x in status(db, env)] == [
        ("mine.csv", "succeeded", 2),
        ("first.csv", "succeeded", 1),
    ]
    assert grant(db, f"role={role}").returncode == 0  # idempotent


def test_grants_sql_quotes_the_role_and_the_schema(db: Db, tmp_path: Path) -> None:
    """sql/grants.sql takes any role and ledger schema name (quoted as identifiers); without a
    role it stops with an error and grants nothing."""
    odd_role, odd_schema = 'Etl "Night"', 'Led"ger X'
    db.sql(
        "DO $$ BEGIN CREATE ROLE \"Etl \"\"Night\"\"\" LOGIN PASSWORD 'night-Pw-1'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    db.sql("CREATE TABLE t (id int, name text)")
    db.sql('GRANT INSERT ON t TO "Etl ""Night"""')
    (tmp_path / "a.csv").write_text("id,name\n1,ann\n")
    (tmp_path / "b.csv").write_text("id,name\n2,bob\n")
    assert db.loader("import", "a.csv", "-t", "t", "--ledger-schema", odd_schema).code == 0

    missing = grant(db, f"schema={odd_schema}")
    assert missing.returncode != 0 and "role" in missing.stderr

    granted = grant(db, f"role={odd_role}", f"schema={odd_schema}")
    assert granted.returncode == 0, granted.stderr
    parts = urlsplit(db.dsn)
    dsn = urlunsplit(parts._replace(netloc=f"Etl%20%22Night%22:night-Pw-1@{parts.hostname}:{parts.port}"))
    run = db.loader("import", "b.csv", "-t", "t", "--ledger-schema", odd_schema, env={"LOADER_DSN": dsn})
    assert run.code == 0, run.stderr
    assert db.value("SELECT count(*) FROM t") == 2


def test_status_needs_only_to_read_the_ledger(db: Db, tmp_path: Path, role: str) -> None:
    """USAGE on the ledger's schema and SELECT on loads, batches and leases are enough for `status`,
    also for loads into tables the role cannot see; `import` still asks for the rest."""
    db.sql("CREATE SCHEMA hidden")
    db.script(PACED_EVENTS.format(table="hidden.events"))
    csv = write_csv(tmp_path / "e.csv", event_rows(20 * BATCH), EVENTS_HEADER)
    proc = db.spawn("import", str(csv), "-t", "hidden.events", "--workers", "1", "--batch-size", str(BATCH))
    until(lambda: committed_batches(db) >= 2)
    kill_9(proc)

    db.sql(f"GRANT USAGE ON SCHEMA loader TO {role}")
    db.sql(f"GRANT SELECT ON loader.loads, loader.batches, loader.leases TO {role}")
    env = as_role(db.dsn)
    until(lambda: [x["state"] for x in status(db, env)] == ["interrupted"])
    [load] = status(db, env)
    assert load["table"] == '"hidden"."events"'
    assert load["rows_loaded"] == db.value("SELECT count(*) FROM hidden.events") >= 2 * BATCH

    db.sql("CREATE TABLE t (id int)")
    db.sql(f"GRANT INSERT ON t TO {role}")
    (tmp_path / "t.csv").write_text("id\n1\n")
    refused = db.loader("import", "t.csv", "-t", "t", env=env)
    assert refused.code == 2, refused.stderr
    assert f'role "{role}" lacks privileges on the load ledger' in one_error_line(refused)
    assert db.value("SELECT count(*) FROM t") == 0


# --- what status says -----------------------------------------------------------------------


@pytest.mark.slow
def test_status_shows_a_running_load_with_its_committed_rows_and_a_killed_one_as_interrupted(
    db: Db, tmp_path: Path
) -> None:
    """While a load runs, status shows it `running` with the rows of its committed batches; once
    its process is killed (kill -9) it shows `interrupted`, with the rows it committed, even
    while another load of the same table runs; a run that resumes and finishes it shows
    `succeeded` with every row."""
    db.script(PACED_EVENTS.format(table="events"))
    rows = 30 * BATCH
    first = write_csv(tmp_path / "first.csv", event_rows(rows), EVENTS_HEADER)
    second = write_csv(tmp_path / "second.csv", event_rows(rows, start=rows + 1), EVENTS_HEADER)
    command = ("-t", "events", "--workers", "1", "--batch-size", str(BATCH))

    proc = db.spawn("import", str(first), *command)
    until(lambda: committed_batches(db) >= 3)
    [running] = status(db)
    assert proc.poll() is None, "the load ended before status was read"
    assert running["state"] == "running"
    assert running["rows_loaded"] >= 3 * BATCH and running["rows_rejected"] == 0
    kill_9(proc)

    until(lambda: status(db)[0]["state"] == "interrupted")
    [killed] = status(db)
    assert killed["rows_loaded"] == db.value("SELECT count(*) FROM events") > running["rows_loaded"] - 1

    other = db.spawn("import", str(second), *command)
    until(lambda: db.value("SELECT count(*) FROM events") > killed["rows_loaded"] + BATCH)
    newer, older = status(db)
    assert other.poll() is None, "the second load ended before status was read"
    assert (Path(newer["source"]).name, newer["state"]) == ("second.csv", "running")
    assert (older["load_id"], older["state"], older["rows_loaded"]) == (killed["load_id"], "interrupted", killed["rows_loaded"])
    kill_9(other)

    resumed = db.loader("import", str(first), *command, "--wait-lock", "30")
    assert resumed.code == 0, resumed.stderr
    states = {x["load_id"]: (x["state"], x["rows_loaded"]) for x in status(db)}
    assert states[killed["load_id"]] == ("succeeded", rows)


def test_status_shows_a_load_that_left_rows_out_as_finished_with_rejects(db: Db, tmp_path: Path) -> None:
    """A load that finished with rejected rows is not shown as `succeeded`: its state says that
    not every row was loaded, in the table and in --json."""
    db.sql("CREATE TABLE t (id int, name text)")
    (tmp_path / "bad.csv").write_text("id,name\n1,ann\nx,bob\n3,cid\n")
    (tmp_path / "good.csv").write_text("id,name\n4,dan\n")
    assert db.loader("import", "bad.csv", "-t", "t").code == 3
    assert db.loader("import", "good.csv", "-t", "t").code == 0

    good, bad = status(db)
    assert (good["state"], good["rows_loaded"], good["rows_rejected"]) == ("succeeded", 1, 0)
    assert (bad["state"], bad["rows_loaded"], bad["rows_rejected"]) == ("finished-with-rejects", 2, 1)

    text = db.loader("status")
    assert text.code == 0, text.stderr
    _, first, second = text.stdout.splitlines()
    assert first.split()[2] == "succeeded" and second.split()[2] == "finished-with-rejects"


def test_a_ledger_made_by_an_earlier_version_is_brought_up_to_date_by_the_next_load(db: Db, tmp_path: Path) -> None:
    """A ledger of an earlier version (one lease row per table, no claims, no loads' holders):
    `status` says the next load updates it (exit 2); the next load does, and loads; then
    `status` shows the loads of before and after."""
    from loader import sql

    loads = sql.sql_file("ledger.sql").split("-- One command per table at a time")[0]
    earlier = loads + """
    CREATE TABLE {schema}.leases (
        table_oid oid PRIMARY KEY, target_table text NOT NULL, holder text NOT NULL, load_id text,
        client text NOT NULL, backend_pid integer, backend_start timestamptz,
        taken_at timestamptz NOT NULL, expires_at timestamptz NOT NULL
    );"""
    db.script(sql.render("CREATE SCHEMA {schema};\n" + earlier, schema="loader"))
    db.sql(
        "INSERT INTO loader.loads (load_id, target_table, source, boundaries, state) "
        "VALUES ('0123456789abcdef0123456789abcdef', '\"public\".\"old\"', 'old.csv', '{}', 'succeeded')"
    )
    told = db.loader("status")
    assert told.code == 2, told.stderr
    assert "earlier version" in one_error_line(told) and "the next load brings it up to date" in told.stderr

    db.sql("CREATE TABLE events (id bigint PRIMARY KEY, name text, note text, amount numeric, at timestamptz, flag boolean)")
    csv = write_csv(tmp_path / "events.csv", event_rows(100), EVENTS_HEADER)
    db.sql(
        "INSERT INTO loader.leases (table_oid, target_table, holder, client, taken_at, expires_at) "
        "SELECT 'events'::regclass, 'events', 'an earlier run', 'elsewhere pid 1', now(), now()"
    )
    assert db.loader("import", str(csv), "-t", "events").code == 0
    assert [load["source"] for load in status(db)] == [str(csv), "old.csv"]
    assert db.value("SELECT holder IS NOT NULL FROM loader.loads WHERE source = $1", str(csv))
    assert db.value("SELECT count(*) FROM loader.leases WHERE table_oid = 'events'::regclass") == 1
