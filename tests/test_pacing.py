"""How fast and how long a load runs, as a cron user relies on it: --max-rate keeps to its
rows per second, --deadline stops a load resumably (exit 75, the ledger says interrupted)
even when the batches in flight outlast its grace period, and --workers auto completes a
load within its bounds. The CLI runs as a subprocess against the session's PostgreSQL; no
test asserts an upper bound on time (one liveness bound excepted, on a run that must end).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from data import PLAIN_EVENTS, SLOW_EVENTS, plain_csv
from helpers import Db, assert_ids_once


def test_workers_auto_completes_a_load_and_reports_its_concurrency(db: Db, tmp_path: Path) -> None:
    rows = 100_000
    db.script(SLOW_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    run = db.loader("import", str(csv), "-t", "events", "--workers", "auto", "--max-workers", "4",
                    "--batch-size", "2000", "--json")
    assert run.code == 0, run.stderr
    assert_ids_once(db, rows)
    report = run.json()
    assert report["rows_loaded"] == rows
    concurrency = report["concurrency"]
    assert set(concurrency) >= {"min", "max", "final"}, concurrency
    for key in ("min", "max", "final"):
        assert 1 <= concurrency[key] <= 4, concurrency
    assert concurrency["min"] <= concurrency["final"] <= concurrency["max"], concurrency


def test_max_rate_paces_the_load(db: Db, tmp_path: Path) -> None:
    rows = 60_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    started = time.monotonic()
    run = db.loader("import", str(csv), "-t", "events", "--max-rate", "20000", "--batch-size", "5000")
    elapsed = time.monotonic() - started
    assert run.code == 0, run.stderr
    assert elapsed >= 2.5, f"60,000 rows at 20,000 rows/s took {elapsed:.2f} s"
    assert_ids_once(db, rows)


@pytest.mark.slow
def test_a_deadline_stops_the_load_resumably(db: Db, tmp_path: Path) -> None:
    rows = 300_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    first = db.loader("import", str(csv), "-t", "events", "--batch-size", "10000", "--max-rate", "20000", "--deadline", "3s")
    assert first.code == 75, first.stderr
    assert "deadline" in first.stderr
    assert db.value("SELECT state FROM loader.loads") == "interrupted"
    assert db.value("SELECT count(*) FROM loader.loads") == 1
    loaded = db.value("SELECT count(*) FROM events")
    assert 0 < loaded < rows
    assert loaded == db.value("SELECT coalesce(sum(rows_loaded), 0) FROM loader.batches")

    again = db.loader("import", str(csv), "-t", "events", "--batch-size", "10000", "--json")
    assert again.code == 0, again.stderr
    assert_ids_once(db, rows)
    assert again.json()["rows_skipped"] == loaded
    assert db.value("SELECT state FROM loader.loads") == "succeeded"


@pytest.mark.slow
def test_a_deadline_ends_the_run_even_when_batches_in_flight_outlast_the_grace(db: Db, tmp_path: Path) -> None:
    """When the batches in flight outlast the deadline's grace period, they are cancelled and
    the run ends (exit 75) with the ledger saying `interrupted`, releasing the table's lock for
    the next run, which completes the load. It never hangs on the reader's full queue."""
    rows = 100_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    # two batches of 10,000 rows share 2,000 rows/s: each needs ~10 s, more than the 3 s grace
    command = ("import", str(csv), "-t", "events", "--batch-size", "10000")
    proc = db.spawn(*command, "--max-rate", "2000", "--deadline", "2s")
    hung = False
    try:
        _, err = proc.communicate(timeout=25)  # a liveness bound: deadline 2 s + grace 3 s, five times over
    except subprocess.TimeoutExpired:
        hung = True
        proc.kill()
        _, err = proc.communicate()
    if hung:
        state = db.value("SELECT state FROM loader.loads")  # kill -9 wrote nothing: as the hung run left it
        pytest.fail(
            f"the run was still going 25 s after a 2 s deadline (hung after the grace period), "
            f"with the ledger saying {state!r}; stderr:\n{err.decode()}",
            pytrace=False,
        )
    assert proc.returncode == 75, err.decode()
    assert db.value("SELECT state FROM loader.loads") == "interrupted"
    again = db.loader(*command)
    assert again.code == 0, again.stderr
    assert_ids_once(db, rows)
