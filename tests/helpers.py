"""What the tests call: a fresh database (`Db`), the real CLI, polling, and the checks that
several test files share. The fixtures that provide them are in conftest.py.

The CLI is started in one place, `start_loader`: as a user runs it (`python -m loader`), with
DATABASE_URL pointing at the test's database. `Db.loader` runs it to the end, `Db.spawn`
leaves it running (the `db` fixture kills and reaps it at the test's end), `Background`
sends its output to files the test can read while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from devserver import pg_binary
from loader import CsvDialect, LoadOptions
from loader.batching import Batch, Batcher
from loader.connect import open_pool
from loader.ledger import Ledger
from loader.options import RetryPolicy
from loader.sink import Sink, Writing
from loader.source import open_source
from loader.target import resolve_target

REPO = Path(__file__).resolve().parent.parent

# The CLI, as a user runs it.
LOADER = (sys.executable, "-m", "loader")

# The loader's sessions on the server (their application_name starts with "loader").
LOADER_SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'loader%'"

_Stream = int | IO[Any] | None


def start_loader(
    dsn: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: _Stream = None,
    stdout: _Stream = subprocess.PIPE,
    stderr: _Stream = subprocess.PIPE,
) -> subprocess.Popen[bytes]:
    """Start the real CLI with DATABASE_URL=dsn (`env` adds or overrides variables)."""
    return subprocess.Popen(
        [*LOADER, *args],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env={**os.environ, "DATABASE_URL": dsn, **(env or {})},
        cwd=cwd,
    )


@dataclass
class Run:
    """A finished run of the CLI."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_loader(
    dsn: str, *args: str, cwd: Path, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> Run:
    """Run the real CLI to its end; killed (and the test failed) at `timeout`."""
    proc = start_loader(dsn, *args, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else None)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return Run(proc.returncode, out.decode(), err.decode())


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def query(dsn: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def server_major(dsn: str) -> int:
    """The server's PostgreSQL major version (15, 18)."""
    return int(query(dsn, "SELECT current_setting('server_version_num')::int / 10000")[0][0])


@dataclass
class Db:
    """A fresh database: run SQL in it, run the loader or psql against it."""

    dsn: str
    tmp: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def sql(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        return query(self.dsn, statement, *args)

    def script(self, statements: str) -> None:
        """Several statements at once (simple query protocol)."""

        async def go() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(statements)
            finally:
                await conn.close()

        asyncio.run(go())

    def value(self, statement: str, *args: Any) -> Any:
        rows = self.sql(statement, *args)
        return rows[0][0] if rows else None

    def loader(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> Run:
        """Run the real CLI as a user would, with DATABASE_URL pointing here, to its end."""
        return run_loader(self.dsn, *args, cwd=self.tmp, input=input, env=env, timeout=timeout)

    def spawn(
        self, *args: str, env: dict[str, str] | None = None, stdin: _Stream = None, stdout: _Stream = subprocess.PIPE,
        stderr: _Stream = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start the real CLI and leave it running; it is killed and reaped at the test's end."""
        proc = start_loader(self.dsn, *args, cwd=self.tmp, env=env, stdin=stdin, stdout=stdout, stderr=stderr)
        self.started.append(proc)
        return proc

    def reap(self) -> None:
        """Kill what `spawn` started and is still running, and reap it."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def psql_copy(self, table: str, path: Path, options: str = "FORMAT csv, HEADER true") -> None:
        """Load a file the way a user would without us: psql's \\copy."""
        psql = pg_binary("psql")
        assert psql, "psql is needed to compare with \\copy"
        subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn, "-c", f"\\copy {table} FROM '{path}' WITH ({options})"],
            check=True,
            capture_output=True,
            timeout=300,
        )

    def same_rows(self, a: str, b: str) -> bool:
        """Both tables hold exactly the same multiset of rows."""
        missing = self.value(f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) x")
        extra = self.value(f"SELECT count(*) FROM (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a}) x")
        return missing == 0 and extra == 0


class Background:
    """A loader run in the background with stdout and stderr going to files, so that the test
    can read them while it runs; reaped with the test's other processes."""

    def __init__(self, db: Db, *args: str, env: dict[str, str] | None = None) -> None:
        name = f"run{len(db.started)}"
        self.out = db.tmp / f"{name}.stdout"
        self.err = db.tmp / f"{name}.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = db.spawn(*args, env=env, stdout=out, stderr=err)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 300) -> int:
        self.proc.communicate(timeout=timeout)
        return self.proc.returncode


def until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll instead of sleeping a fixed time; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)


def stable_for(read: Callable[[], Any], seconds: float, timeout: float = 60) -> Any:
    """Poll `read` until its value has not changed for `seconds`; that value."""
    last = [read(), time.monotonic()]

    def settled() -> bool:
        value = read()
        if value != last[0]:
            last[:] = [value, time.monotonic()]
            return False
        return time.monotonic() - last[1] >= seconds

    until(settled, timeout=timeout, interval=0.2)
    return last[0]


def committed_batches(db: Db, load_id: str | None = None) -> int:
    """Batches the ledger holds (of one load, or of every load in the test's database); 0
    before the loader has created its ledger."""
    if db.value("SELECT to_regclass('loader.batches')") is None:
        return 0
    if load_id is None:
        return int(db.value("SELECT count(*) FROM loader.batches"))
    return int(db.value("SELECT count(*) FROM loader.batches WHERE load_id = $1", load_id))


def assert_ids_once(db: Db, rows: int, table: str = "events") -> None:
    """The table holds ids 1..rows, each once: none missing, none doubled."""
    assert db.value(f"SELECT count(*) FROM {table}") == rows
    assert db.value(f"SELECT count(DISTINCT id) FROM {table}") == rows
    assert db.value(f"SELECT min(id) FROM {table}") == 1
    assert db.value(f"SELECT max(id) FROM {table}") == rows


def read_rejects(path: Path) -> tuple[list[tuple[int, str, bytes]], list[tuple[int, str, bytes]]]:
    """A rejects file: (header rows, reject rows) as (line, sqlstate, raw record bytes); the
    row naming the load is left out."""
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("latin-1"), newline="")))
    assert rows[0] == ["line", "sqlstate", "message", "record"]
    header, rejects = [], []
    for r in rows[1:]:
        assert len(r) == 4, r
        if r[:3] == ["0", "", "load"]:  # the row naming the load
            continue
        entry = (int(r[0]), r[1], r[3].encode("latin-1"))
        (header if not r[1] and r[2] == "header" else rejects).append(entry)
    return header, rejects


class Clock:
    """A clock that moves only when the test moves it (`clock.now += seconds`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def sink_for(
    dsn: str, table: str, columns: tuple[str, ...], source: Path, retry: RetryPolicy | None = None, writing: Writing | None = None
) -> AsyncIterator[tuple[asyncpg.Pool, Sink]]:
    """The loader's own sink into `table` on a pool of one connection, with a load "load-1"
    started in the ledger: for tests that send batches one by one."""
    options = LoadOptions(source=str(source), table=table, dsn=dsn, workers=1)
    pool = await open_pool(options, 1, "loader test")
    try:
        async with pool.acquire() as conn:
            target = await resolve_target(conn, table)
            ledger = Ledger("loader")
            await ledger.ensure(conn)
            await ledger.start(conn, "load-1", None, target.display, str(source), None, None, {}, None, "test")
        yield pool, Sink(pool, target, columns, CsvDialect(), ledger, "load-1", retry or RetryPolicy(), writing=writing or Writing())
    finally:
        await pool.close()


def batches_of(path: Path, rows: int, max_bytes: int = 1 << 20) -> list[Batch]:
    """The batches the loader cuts from a CSV file with a header."""
    source = open_source(str(path))
    try:
        batcher = Batcher(source, CsvDialect(), rows, max_bytes)
        batcher.read_header()
        return list(batcher)
    finally:
        source.close()


def write_rows(path: Path, header: str, rows: Sequence[Sequence[object]]) -> Path:
    """A CSV file of simple values (no quoting needed): one record per line, line 2 the first row.
    None is written as nothing (NULL)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header + "\n")
        fh.writelines(",".join("" if v is None else str(v) for v in row) + "\n" for row in rows)
    return path


def loads_in_ledger(db: Db) -> int:
    """Loads the ledger records; 0 when there is no ledger yet."""
    if db.value("SELECT to_regclass('loader.loads')") is None:
        return 0
    return int(db.value("SELECT count(*) FROM loader.loads"))


def one_error_line(run: Run) -> str:
    """The one line on stderr, `loader: error: ...`, no traceback."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "loader: error: " in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def until_batches(db: Db, proc: subprocess.Popen[bytes], batches: int) -> None:
    """Poll until the running load has committed `batches` batches; if it ends first, fail
    with what it said."""
    until(lambda: proc.poll() is not None or committed_batches(db) >= batches)
    if proc.poll() is not None and committed_batches(db) < batches:
        _, err = proc.communicate()
        pytest.fail(f"the load ended (exit {proc.returncode}) before {batches} batches: {err.decode()[-500:]}")


def kill_9(db: Db, proc: subprocess.Popen[bytes]) -> None:
    """kill -9 the loader while it runs, then let the server end what the dead client left."""
    assert proc.poll() is None, "the load ended before it could be killed"
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    db.value("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'loader%'")
    until(lambda: db.value(LOADER_SESSIONS) == 0)


class Gate:
    """Holds rows back: a trigger taking advisory lock `key` (shared) waits while a psql
    session of the test holds it; `open` ends that session, and the rows go on."""

    def __init__(self, db: Db, key: int) -> None:
        psql = pg_binary("psql")
        assert psql, "psql holds the gate"
        self.db, self.key = db, key
        self.held = subprocess.Popen(
            [psql, "-X", "-q", "-d", db.dsn, "-c", f"SELECT pg_advisory_lock({key})", "-c", "SELECT pg_sleep(600)"],
            env={**os.environ, "PGAPPNAME": f"gate {key}"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        until(lambda: self.locks(granted=True) == 1)

    def locks(self, granted: bool) -> int:
        """The gate's lock as held (the test's), or as waited for (a transaction each)."""
        return int(self.db.value(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted = $2", self.key, granted
        ))

    def open(self) -> None:
        self.db.value("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", f"gate {self.key}")

    def close(self) -> None:
        self.open()
        self.held.wait(timeout=30)

