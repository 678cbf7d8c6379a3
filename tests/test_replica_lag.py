"""Lagging replicas, as a DBA relies on it: with --max-replica-lag a load pauses while a
streaming standby is further behind than that, and goes on once it catches up; with
--max-lag-wait it gives up (exit 1) when the wait runs out, sending no batch after that, and
the next run completes it.

The standby is real: pg_basebackup of the session's local cluster, paused and resumed with
pg_wal_replay_pause(). How lag is measured (ReplicaLag) is pure, tested with a clock the test
moves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data import SLOW_EVENTS, plain_csv
from devserver import LocalCluster, _as_postgres, _free_port, pg_binary
from helpers import Background, Clock, Db, assert_ids_once, committed_batches, stable_for, until
from loader.pressure import ReplicaLag


class Standby:
    """A streaming standby of a LocalCluster, made with pg_basebackup, run as postgres."""

    def __init__(self, primary: LocalCluster) -> None:
        self.primary = primary
        self.root = Path(tempfile.mkdtemp(prefix="loader-standby-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = _free_port()
        self.started = False

    def _run(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = pg_binary(name)
        assert binary, f"{name} not found"
        return subprocess.run(_as_postgres([binary, *args]), capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> Standby:
        backup = self._run("pg_basebackup", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "-d", self.primary.dsn, check=False)
        assert backup.returncode == 0, f"pg_basebackup failed: {backup.stderr}"
        os.chmod(self.data, 0o700)
        with open(self.data / "postgresql.auto.conf", "a", encoding="utf-8") as fh:
            fh.write(f"port = {self.port}\nunix_socket_directories = '{self.root}'\n")
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "standby.log"), "-w", "-t", "60", "start", check=False)
        assert result.returncode == 0, result.stderr + (self.root / "standby.log").read_text(errors="replace")[-2000:]
        self.started = True
        return self

    def psql(self, command: str) -> str:
        psql = pg_binary("psql")
        assert psql
        return subprocess.run(
            [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", f"postgresql://postgres@127.0.0.1:{self.port}/postgres", "-c", command],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


STREAMING = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
CAUGHT_UP = "SELECT bool_and(replay_lsn >= pg_current_wal_lsn()) FROM pg_stat_replication WHERE state = 'streaming'"


@pytest.fixture
def standby(local_cluster: LocalCluster, db: Db) -> Iterator[Standby]:
    replica = Standby(local_cluster)
    try:
        replica.start()
        until(lambda: db.value(STREAMING) >= 1, timeout=60)
        yield replica
    finally:
        try:
            if replica.started:
                replica.psql("SELECT pg_wal_replay_resume()")
        except subprocess.CalledProcessError:
            pass
        replica.stop()
        until(lambda: db.value("SELECT count(*) FROM pg_stat_replication") == 0, timeout=60)


def events_behind_a_paused_replica(db: Db, standby: Standby, tmp_path: Path, rows: int) -> Path:
    """A slow events table, a file of `rows` rows, and a standby caught up, then paused."""
    db.script(SLOW_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    until(lambda: db.value(CAUGHT_UP), timeout=60)
    standby.psql("SELECT pg_wal_replay_pause()")
    return csv


@pytest.mark.slow
@pytest.mark.own_cluster
def test_a_lagging_replica_pauses_the_load_until_it_catches_up(db: Db, standby: Standby, tmp_path: Path) -> None:
    rows = 300_000
    csv = events_behind_a_paused_replica(db, standby, tmp_path, rows)
    # paced, so that the load lasts long enough for the replica to fall more than 1 s behind
    run = Background(db, "import", str(csv), "-t", "events", "--workers", "2", "--batch-size", "5000",
                    "--max-rate", "50000", "--max-replica-lag", "1")
    until(lambda: "waiting" in run.stderr() and "replica" in run.stderr() or not run.running(), timeout=120)
    assert run.running(), f"the load ended without waiting for the paused replica:\n{run.stderr()}"
    waiting = [line for line in run.stderr().splitlines() if "waiting" in line]
    assert waiting and "--max-replica-lag 1" in waiting[0], run.stderr()
    held = stable_for(lambda: committed_batches(db), 2.0)  # the batches in flight finish, no new one starts
    assert run.running(), run.stderr()
    assert held < rows // 5000, "every batch was committed although the replica lagged"
    assert db.value("SELECT count(*) FROM events") == held * 5000

    standby.psql("SELECT pg_wal_replay_resume()")
    assert run.wait() == 0, run.stderr()
    assert "caught up" in run.stderr()
    assert_ids_once(db, rows)


@pytest.mark.slow
@pytest.mark.own_cluster
def test_max_lag_wait_stops_a_load_that_waits_too_long_and_the_next_run_completes_it(
    db: Db, standby: Standby, tmp_path: Path
) -> None:
    rows = 300_000
    db.script(SLOW_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    command = ("import", str(csv), "-t", "events", "--workers", "2", "--batch-size", "5000",
               "--max-replica-lag", "1", "--max-lag-wait", "2")
    until(lambda: db.value(CAUGHT_UP), timeout=60)
    standby.psql("SELECT pg_wal_replay_pause()")
    stopped = db.loader(*command, "--max-rate", "50000", timeout=120)  # paced: it outlasts the wait
    assert stopped.code == 1, stopped.stderr
    assert "--max-lag-wait" in stopped.stderr
    assert "loader: error:" in stopped.stderr
    assert db.value("SELECT count(*) FROM events") < rows

    standby.psql("SELECT pg_wal_replay_resume()")
    until(lambda: db.value(CAUGHT_UP), timeout=60)
    again = db.loader(*command, timeout=300)
    assert again.code == 0, again.stderr
    assert_ids_once(db, rows)


@pytest.mark.slow
@pytest.mark.own_cluster
def test_a_load_that_gives_up_on_a_lagging_replica_sends_no_more_batches(
    db: Db, standby: Standby, tmp_path: Path
) -> None:
    """When --max-lag-wait runs out, the load ends (exit 1) without committing another batch:
    the batches the workers held while they waited for the replica are not loaded."""
    rows = 300_000
    csv = events_behind_a_paused_replica(db, standby, tmp_path, rows)
    run = Background(db, "import", str(csv), "-t", "events", "--workers", "2", "--batch-size", "5000",
                    "--max-rate", "50000", "--max-replica-lag", "1", "--max-lag-wait", "4")
    until(lambda: "waiting" in run.stderr() or not run.running(), timeout=120)
    assert run.running(), run.stderr()
    held = stable_for(lambda: committed_batches(db), 1.5)
    assert run.running(), "the wait ran out before the test saw the load hold still"
    assert run.wait() == 1, run.stderr()
    assert "--max-lag-wait" in run.stderr()
    sent = committed_batches(db) - held
    assert sent == 0, f"{sent} batches were loaded after the load stopped waiting for the lagging replica"


def test_replica_lag_is_the_age_of_the_newest_primary_position_the_replica_has_replayed() -> None:
    clock = Clock()
    lag = ReplicaLag(clock=clock)
    assert lag.observe(100, 100) == 0.0  # caught up
    assert lag.observe(100, None) == 0.0  # no streaming replica
    clock.now += 0.5
    assert lag.observe(200, 100) == pytest.approx(0.5)  # stuck at the position of 0.5 s ago
    clock.now += 0.5
    assert lag.observe(300, 100) == pytest.approx(1.0)  # paused replay: the lag keeps growing
    clock.now += 0.5
    assert lag.observe(400, 200) == pytest.approx(1.0)  # replayed up to the sample of 1 s ago
    clock.now += 0.5
    assert lag.observe(400, 400) == 0.0  # caught up again
    clock.now += 5
    assert lag.observe(500, 400) == pytest.approx(5.0)

