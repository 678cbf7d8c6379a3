"""Several runs of the same file set command, started at once (on several hosts, or several
times on one), split the set between them: each file is loaded by one run, exactly once; a
run that finds nothing left ends with exit 0 and says so; a run killed with -9 leaves its file
to the others, or to the next run. A load that is not the same command still waits its turn
(exit 75).

The runs are real processes. To make them meet, the table's rows wait at a gate (a row
trigger that takes a shared advisory lock the test holds) until every run holds a file; then
the gate opens and they race for the rest.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Background, Db, Gate, until, write_rows

GATE = 4242
TABLE = """
CREATE TABLE t (id bigint, name text);
CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
CREATE TRIGGER gate BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION gate();
"""
FILES = 30
ROWS = 100


def exports(tmp_path: Path) -> list[tuple[int, str]]:
    """30 files of 100 rows under exports/; the rows the table must hold once they all loaded."""
    (tmp_path / "exports").mkdir()
    expected = []
    for n in range(FILES):
        name = f"part-{n:02}.csv"
        ids = range(n * ROWS, (n + 1) * ROWS)
        write_rows(tmp_path / "exports" / name, "id,name", [(i, name) for i in ids])
        expected.extend((i, name) for i in ids)
    return expected


@pytest.fixture
def gate(db: Db) -> Iterator[Gate]:
    """Rows inserted into t wait until the test opens the gate."""
    held = Gate(db, GATE)
    yield held
    held.close()


def runs_at_the_gate(db: Db) -> int:
    """How many runs have a batch waiting at the gate (a run's sessions share its name)."""
    return int(db.value(
        "SELECT count(DISTINCT a.application_name) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.objid = $1 AND NOT l.granted", GATE,
    ))


def until_each_holds_a_file(db: Db, runs: list[Background]) -> None:
    until(lambda: runs_at_the_gate(db) == len(runs) or not all(r.running() for r in runs), timeout=60)
    ended = [r.stderr() for r in runs if not r.running()]
    assert not ended, f"a run ended before every run held a file: {[e[:300] for e in ended]}"


def contents(db: Db) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.sql("SELECT id, name FROM t ORDER BY id")]


def report(run: Background) -> dict[str, Any]:
    assert "Traceback" not in run.stderr(), run.stderr()
    parsed: dict[str, Any] = json.loads(run.stdout())
    return parsed


def loaded_by(run: Background) -> set[str]:
    return {s["source"] for s in report(run)["sources"] if s["state"] == "loaded"}


COMMAND = ("import", "exports", "-t", "t", "--workers", "2", "--json")


def test_three_runs_of_the_same_command_split_a_file_set_each_file_loaded_once(db: Db, tmp_path: Path, gate: Gate) -> None:
    """Three runs of `loader import exports -t t` started at once: all exit 0; each loads some
    of the 30 files and reports the others as loaded by another run; every file is loaded by
    exactly one of them, and every row is in the table once. Meanwhile a load that is not the
    same command (one file of the set) cannot take the table: exit 75, naming a run."""
    db.script(TABLE)
    expected = exports(tmp_path)
    runs = [Background(db, *COMMAND) for _ in range(3)]
    until_each_holds_a_file(db, runs)

    other = db.loader("import", "exports/part-29.csv", "-t", "t")
    assert other.code == 75, other.stderr
    assert "another load of" in other.stderr and "pid" in other.stderr

    gate.open()
    codes = [r.wait(timeout=120) for r in runs]
    assert codes == [0, 0, 0], [r.stderr() for r in runs]
    loaded = [loaded_by(r) for r in runs]
    assert all(loaded), loaded  # each loaded some
    assert sum(len(files) for files in loaded) == FILES, loaded  # and no file twice
    assert set().union(*loaded) == {f"exports/part-{n:02}.csv" for n in range(FILES)}
    for run, mine in zip(runs, loaded, strict=True):
        states = {s["source"]: s["state"] for s in report(run)["sources"]}
        assert {state for source, state in states.items() if source not in mine} <= {"other-run"}, states
        assert "other-run" in run.stderr()
    assert contents(db) == expected
    assert db.value("SELECT count(*) FROM loader.loads WHERE state = 'succeeded'") == FILES


def test_a_run_killed_while_sharing_a_set_leaves_its_files_to_the_others_and_the_next_run_loads_nothing_twice(
    db: Db, tmp_path: Path, gate: Gate
) -> None:
    """Three runs share a set; one is killed with -9 while its files are under way. The two
    others still exit 0 with every file loaded, the killed run's files resumed by them; the
    next run of the same command loads nothing: every row is in the table once."""
    db.script(TABLE)
    expected = exports(tmp_path)
    runs = [Background(db, *COMMAND) for _ in range(3)]
    until_each_holds_a_file(db, runs)

    killed, survivors = runs[0], runs[1:]
    os.kill(killed.proc.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    gate.open()
    codes = [r.wait(timeout=120) for r in survivors]
    assert codes == [0, 0], [r.stderr() for r in survivors]
    assert contents(db) == expected

    again = db.loader(*COMMAND)
    assert again.code == 0, again.stderr
    assert {s["state"] for s in again.json()["sources"]} == {"skipped"}
    assert contents(db) == expected


def test_the_same_command_again_skips_a_loaded_set_without_taking_its_files(db: Db, tmp_path: Path) -> None:
    """Once a set is loaded, the same command skips every file without claiming it from other
    runs, whether the file would go in a group of small files or alone: the claims stay as the
    first run left them."""
    db.script("CREATE TABLE plain (id bigint, name text)")
    expected = exports(tmp_path)
    for args in ((), ("--batch-size", "50")):  # small files in groups; files of two batches alone
        first = db.loader("import", "exports", "-t", "plain", "--json", *args)
        assert first.code == 0, first.stderr
        claims = sorted(tuple(r) for r in db.sql("SELECT load_key, holder, claimed_at FROM loader.claims"))
        again = db.loader("import", "exports", "-t", "plain", "--json", *args)
        assert again.code == 0, again.stderr
        assert {s["state"] for s in again.json()["sources"]} == {"skipped"}
        assert sorted(tuple(r) for r in db.sql("SELECT load_key, holder, claimed_at FROM loader.claims")) == claims
        assert [tuple(r) for r in db.sql("SELECT id, name FROM plain ORDER BY id")] == expected
        db.script("TRUNCATE plain; TRUNCATE loader.loads, loader.batches, loader.rejects, loader.claims")


def test_runs_of_the_same_command_with_create_make_the_table_once(db: Db, tmp_path: Path) -> None:
    """Three runs of `loader import exports -t fresh --create` at once on a database without the
    table: one creates it (and says so), the others load into it; every row once."""
    expected = exports(tmp_path)
    runs = [Background(db, "import", "exports", "-t", "fresh", "--create", "--json") for _ in range(3)]
    codes = [r.wait(timeout=120) for r in runs]
    assert codes == [0, 0, 0], [r.stderr() for r in runs]
    created = [r for r in runs if "created fresh" in r.stderr()]
    assert len(created) == 1, [r.stderr() for r in runs]
    assert [tuple(r) for r in db.sql("SELECT id, name FROM fresh ORDER BY id")] == expected


def test_status_shows_every_file_a_run_is_loading_as_running(db: Db, tmp_path: Path, gate: Gate) -> None:
    """While one run has files of its set under way in two transactions, `loader status`
    shows each of them as running, not the earlier ones as interrupted."""
    db.script(TABLE.replace("FOR EACH ROW", "FOR EACH ROW WHEN (NEW.name <> 'part-00.csv')"))
    exports(tmp_path)
    run = Background(db, *COMMAND)
    until(lambda: gate.locks(granted=False) == 2 or not run.running(), timeout=60)
    assert run.running(), run.stderr()
    shown = db.loader("status", "--json")
    assert shown.code == 0, shown.stderr
    states = {load["source"].rsplit("/", 1)[-1]: load["state"] for load in shown.json()}
    assert states.pop("part-00.csv") == "succeeded", states
    assert len(states) >= 2 and set(states.values()) == {"running"}, states
    gate.open()
    assert run.wait(timeout=120) == 0, run.stderr()


def test_a_copy_in_the_same_set_is_not_loaded_while_its_twin_loads_and_is_skipped_once_it_is_done(
    db: Db, tmp_path: Path, gate: Gate
) -> None:
    """A file and a copy of it in one set: while the first one loads, the copy waits for it;
    once the first is loaded, the copy is skipped, naming it. Every row is in the table once."""
    db.script(TABLE.replace("FOR EACH ROW", "FOR EACH ROW WHEN (NEW.name = 'twin')"))
    (tmp_path / "exports").mkdir()
    write_rows(tmp_path / "exports" / "0.csv", "id,name", [(i, "first") for i in range(100, 200)])  # loads alone
    twin = write_rows(tmp_path / "exports" / "a.csv", "id,name", [(i, "twin") for i in range(100)])
    (tmp_path / "exports" / "b.csv").write_bytes(twin.read_bytes())
    run = Background(db, *COMMAND, "--verbose")
    until(lambda: "the same content is being loaded from" in run.stderr() or not run.running(), timeout=60)
    assert run.running(), run.stderr()
    gate.open()
    assert run.wait(timeout=120) == 0, run.stderr()
    states = {s["source"]: s["state"] for s in report(run)["sources"]}
    assert states == {"exports/0.csv": "loaded", "exports/a.csv": "loaded", "exports/b.csv": "skipped"}, states
    assert "the same content was loaded from" in run.stderr()
    assert db.value("SELECT count(*) FROM t") == 200
