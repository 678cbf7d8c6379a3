"""The connections a load takes, as a DBA sees them: never more than the server can spare
(free slots less the reserved ones and a margin kept for everyone else), none at all when
there is none to spare (exit 75, try again later), and every one named with the load's id.

The budget tests run against a small cluster of their own (20 connection slots), whose slots
the test fills with sessions it holds open; the server is real, the CLI runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from data import PLAIN_EVENTS, SLOW_EVENTS, plain_csv
from devserver import LocalCluster
from helpers import LOADER_SESSIONS, Background, Db, Run, run_loader, start_loader, until

SMALL_MAX_CONNECTIONS = 20


class Sessions:
    """Connections the test holds open, on a loop of its own."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.loop = asyncio.new_event_loop()
        self.conns: list[asyncpg.Connection] = []

    def open(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                self.conns.append(await asyncpg.connect(self.dsn, server_settings={"application_name": "held by the test"}))

        self.loop.run_until_complete(go())

    def value(self, statement: str) -> Any:
        return self.loop.run_until_complete(self.conns[0].fetchval(statement))

    def close(self) -> None:
        async def go() -> None:
            for conn in self.conns:
                await conn.close()

        self.loop.run_until_complete(go())
        self.loop.close()


@pytest.fixture
def small_server() -> Iterator[LocalCluster]:
    cluster = LocalCluster(settings={"max_connections": str(SMALL_MAX_CONNECTIONS)}).start()
    try:
        cluster.psql("CREATE DATABASE app")
        cluster.psql(SLOW_EVENTS.format(name="events"), database="app")
        yield cluster
    finally:
        cluster.stop()


def app_dsn(server: LocalCluster) -> str:
    return server.dsn.rsplit("/", 1)[0] + "/app"


def allowance(max_connections: int, reserved: int, in_use: int) -> int:
    """The rule of loader.pressure, written out: free slots less a margin for everyone else."""
    return max_connections - reserved - in_use - max(1, math.ceil(max_connections * 0.05))


@pytest.mark.slow
@pytest.mark.own_cluster
def test_workers_are_lowered_to_the_connections_the_server_can_spare(small_server: LocalCluster, tmp_path: Path) -> None:
    dsn = app_dsn(small_server)
    rows = 200_000  # 100 batches through the slow trigger: seconds of load to watch
    csv = plain_csv(tmp_path / "e.csv", rows)
    held = 10  # the first one also samples pg_stat_activity
    sessions = Sessions(dsn)
    try:
        sessions.open(held)
        reserved = int(sessions.value("SELECT current_setting('superuser_reserved_connections')"))
        # in use when the loader asks: ours, and the loader's own session (the table lock holder)
        allowed = allowance(SMALL_MAX_CONNECTIONS, reserved, held + 1)
        assert allowed >= 2, "the test's numbers leave the loader nothing to lower to"
        proc = start_loader(
            dsn, "import", str(csv), "-t", "events", "--workers", "10", "--batch-size", "2000", "--json", cwd=tmp_path
        )
        loader_seen: list[int] = []
        clients_seen: list[int] = []

        def sample() -> bool:
            loader_seen.append(sessions.value(LOADER_SESSIONS))
            clients_seen.append(sessions.value("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))
            return proc.poll() is not None

        try:
            until(sample, timeout=300, interval=0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
        loaded = sessions.value("SELECT count(*) FROM events")
    finally:
        sessions.close()
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    assert loaded == rows
    report = json.loads(out)
    assert report["workers"] == allowed
    lowered = [line for line in stderr.splitlines() if "lowered" in line]
    assert len(lowered) == 1, stderr
    assert f"--workers 10 lowered to {allowed}" in lowered[0]
    assert len(loader_seen) > 10, "the load ended before it could be watched"
    assert max(loader_seen) <= allowed + 1, loader_seen  # the workers and the lock holder
    assert max(loader_seen) == allowed + 1, loader_seen  # ... and it did use what it was given
    margin = max(1, math.ceil(SMALL_MAX_CONNECTIONS * 0.05))
    assert max(clients_seen) <= SMALL_MAX_CONNECTIONS - reserved - margin, clients_seen


def run_with_connections_held(server: LocalCluster, tmp_path: Path, held: int, rows: int = 1000) -> tuple[Run, int, str]:
    """A load with --workers 10 while the test holds `held` of the 20 slots.
    (The run, its rows loaded, the ledger's states.)"""
    dsn = app_dsn(server)
    csv = plain_csv(tmp_path / "e.csv", rows)
    sessions = Sessions(dsn)
    try:
        sessions.open(held)
        run = run_loader(dsn, "import", str(csv), "-t", "events", "--workers", "10", "--json", cwd=tmp_path)
        loaded = sessions.value("SELECT count(*) FROM events")
        states = sessions.value("SELECT coalesce(string_agg(state, ','), '') FROM loader.loads")
    finally:
        sessions.close()
    return run, loaded, states


def run_with_no_connection_to_spare(server: LocalCluster, tmp_path: Path) -> tuple[Run, int, str]:
    """16 of the 20 slots held: 20 - 3 reserved - (16 + the loader's own session) - 1 kept free
    leaves -1."""
    assert allowance(SMALL_MAX_CONNECTIONS, 3, 16 + 1) < 1
    return run_with_connections_held(server, tmp_path, 16)


@pytest.mark.slow
@pytest.mark.own_cluster
def test_with_14_of_20_connections_taken_a_load_still_completes_on_what_is_left(
    small_server: LocalCluster, tmp_path: Path
) -> None:
    """The issue's case: 20 - 3 reserved - (14 + the loader's session) - 1 kept free = 1 worker."""
    run, loaded, states = run_with_connections_held(small_server, tmp_path, 14, rows=20_000)
    assert run.code == 0, run.stderr
    assert loaded == 20_000
    assert run.json()["workers"] == allowance(SMALL_MAX_CONNECTIONS, 3, 14 + 1) == 1
    assert [line for line in run.stderr.splitlines() if "lowered" in line][0].endswith(
        "--workers 10 lowered to 1: the server has 20 connection slots, 3 reserved, 15 in use, and 1 kept free for others"
    )
    assert states == "succeeded"


@pytest.mark.slow
@pytest.mark.own_cluster
def test_a_server_with_no_connection_to_spare_gets_no_load_now_and_a_try_again_later(
    small_server: LocalCluster, tmp_path: Path
) -> None:
    run, loaded, _ = run_with_no_connection_to_spare(small_server, tmp_path)
    assert run.code == 75, run.stderr
    assert "no connection to spare" in run.stderr
    assert loaded == 0


@pytest.mark.slow
@pytest.mark.own_cluster
def test_a_run_refused_for_want_of_connections_records_no_load(small_server: LocalCluster, tmp_path: Path) -> None:
    """The connection budget is checked before the load is planned: a run refused for want of
    connections (exit 75) leaves no load in the ledger, so `loader status` never shows one
    `running` that no process runs."""
    run, _, states = run_with_no_connection_to_spare(small_server, tmp_path)
    assert run.code == 75, run.stderr
    assert states == "", f"loader.loads says {states!r} after the run exited 75"


def test_the_load_s_sessions_are_named_with_its_load_id(db: Db, tmp_path: Path) -> None:
    rows = 60_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    run = Background(db, "import", str(csv), "-t", "events", "--workers", "2", "--max-rate", "20000", "--batch-size", "5000", "--json")
    names: dict[str, int] = {}

    def sample() -> bool:
        for name, count in db.sql(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE application_name LIKE 'loader%' GROUP BY 1"
        ):
            names[name] = max(names.get(name, 0), count)
        return not run.running()

    until(sample, timeout=120, interval=0.05)
    assert run.wait() == 0, run.stderr()
    load_id = json.loads(run.stdout())["load_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", load_id), load_id
    assert f"loader {load_id}" in names, names
    assert names[f"loader {load_id}"] == 2 + 1, names  # the workers and the lock holder
    assert set(names) <= {"loader", f"loader {load_id}"}, names
    assert load_id == db.value("SELECT load_id FROM loader.loads")
