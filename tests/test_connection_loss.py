"""A connection the server ends at any moment of a batch (before its COPY, as the COPY
completes, while its data waits for a full socket, idle in the pool) costs a retry of that
batch, never the load and never a row: the server kills the backend for real, at a moment
made exact by holding the event loop still."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import asyncpg
import pytest

import loader.sink as sink_module
from helpers import Db, batches_of, sink_for
from loader.options import RetryPolicy
from loader.sink import Outcome


def terminate_blocking(dsn: str, pid: int, settle: float = 0.2) -> None:
    """Terminate a backend while this thread's event loop stands still, then wait until the
    FATAL ErrorResponse and the end of the stream are in the victim's socket."""

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(go(),))
    thread.start()
    thread.join()
    time.sleep(settle)


async def read_one_message(turns: int = 2) -> None:
    """Two loop turns: the loop reads the FATAL message (the protocol is idle, so asyncpg
    leaves it waiting for a ReadyForQuery), but not yet the end of the stream."""
    for _ in range(turns):
        await asyncio.sleep(0)


def run_batches(db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> list[Outcome]:
    """Four batches of ten rows through the real sink; the connection is killed once, at `where`."""
    db.sql("CREATE TABLE t (id int, name text)")
    csv = tmp_path / "t.csv"
    csv.write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(1, 41)))
    real_copy_rows = sink_module.copy_rows
    kills = {"left": 1}

    async def copy_then_kill(conn, statement, data, pace=None):  # type: ignore[no-untyped-def]
        pid = conn.get_server_pid()
        if where == "copy, loop busy" and kills["left"]:
            kills["left"] -= 1
            asyncio.get_running_loop().call_soon(terminate_blocking, db.dsn, pid, 0.3)
        if where.startswith("before copy") and kills["left"]:
            kills["left"] -= 1
            terminate_blocking(db.dsn, pid)
            await read_one_message(int(where[-1]))
        rows = await real_copy_rows(conn, statement, data, pace)
        if where == "after copy" and kills["left"]:
            kills["left"] -= 1
            terminate_blocking(db.dsn, pid)
            await read_one_message()
        return rows

    monkeypatch.setattr(sink_module, "copy_rows", copy_then_kill)

    async def go() -> list[Outcome]:
        outcomes: list[Outcome] = []
        async with sink_for(db.dsn, "t", ("id", "name"), csv, RetryPolicy(initial_wait=0.01)) as (pool, sink):
            for number, batch in enumerate(batches_of(csv, 10)):
                if where == "idle in the pool" and number == 1:
                    async with pool.acquire() as conn:
                        pid = conn.get_server_pid()
                    terminate_blocking(db.dsn, pid)
                    await read_one_message()
                outcomes.append(await sink.load(batch))
        return outcomes

    return asyncio.run(go())


@pytest.mark.parametrize("where", ["before copy 2", "before copy 3", "after copy", "copy, loop busy", "idle in the pool"])
def test_a_connection_killed_at_any_moment_is_a_retry(db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Each batch loads once; the killed attempt is one retry."""
    outcomes = run_batches(db, tmp_path, monkeypatch, where)
    assert [o.rows_loaded for o in outcomes] == [10, 10, 10, 10]
    assert sum(o.retries for o in outcomes) == 1
    assert db.value("SELECT count(*) FROM t") == 40
    assert db.value("SELECT count(DISTINCT id) FROM t") == 40


def test_a_connection_killed_while_the_socket_is_full_is_a_retry(db: Db, tmp_path: Path) -> None:
    """A batch above SEND_CHUNK goes in chunks; killed while asyncpg waits for the socket to
    drain, the COPY fails rather than waiting for ever, and the batch is retried."""
    db.script("""
        CREATE TABLE t (id int, pad text);
        CREATE SEQUENCE killed;
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
          IF NEW.id = 1 AND nextval('killed') = 1 THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION slow();
    """)
    csv = tmp_path / "t.csv"
    rows = 20_000
    csv.write_text("id,pad\n" + "".join(f"{i},{'x' * 1000}\n" for i in range(1, rows + 1)))  # 20 MB: more than the sockets hold

    async def go() -> list[Outcome]:
        (batch,) = batches_of(csv, rows, 1 << 30)
        async with sink_for(db.dsn, "t", ("id", "pad"), csv, RetryPolicy(initial_wait=0.01)) as (pool, sink):
            async with pool.acquire() as conn:
                pid = conn.get_server_pid()

            async def kill_while_stuck() -> None:
                await asyncio.sleep(1.0)  # the server sleeps on row 1; our socket is full by now
                killer = await asyncpg.connect(db.dsn)
                try:
                    await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
                finally:
                    await killer.close()

            kill = asyncio.ensure_future(kill_while_stuck())
            load = asyncio.ensure_future(sink.load(batch))
            done, _ = await asyncio.wait([load], timeout=30)
            if not done:
                load.cancel()
                pytest.fail("the COPY on the killed connection hung")
            await kill
            return [load.result()]

    outcomes = asyncio.run(go())
    assert [(o.rows_loaded, o.retries) for o in outcomes] == [(rows, 1)]
    assert db.value("SELECT count(DISTINCT id) FROM t") == rows
