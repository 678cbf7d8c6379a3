"""One real PostgreSQL for the whole run, a fresh database for each test, and the real CLI.

The server comes from testcontainers (when a Docker engine answers), else LOADER_TEST_DSN,
else a throwaway local cluster (see loader.devserver). Without one the tests fail; they
are never skipped.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from loader.devserver import LocalCluster, NoServerError, pg_binary, start_server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    try:
        server = start_server()
    except NoServerError as exc:
        pytest.fail(f"no PostgreSQL server for the tests: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def local_cluster(pg_server: Any) -> LocalCluster:
    """Tests that stop and start the server need one we own."""
    if not isinstance(pg_server, LocalCluster):
        pytest.fail("this test needs the local cluster (unset LOADER_TEST_DSN)", pytrace=False)
    return pg_server


def _with_database(dsn: str, database: str) -> str:
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


@dataclass
class Db:
    """A fresh database: run SQL in it, run the loader or psql against it."""

    dsn: str
    tmp: Path

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
        """Run the real CLI as a user would, with DATABASE_URL pointing here."""
        full_env = {**os.environ, "DATABASE_URL": self.dsn, **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "loader", *args],
            input=input,
            capture_output=True,
            env=full_env,
            cwd=self.tmp,
            timeout=timeout,
        )
        return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "DATABASE_URL": self.dsn, **(env or {})}
        return subprocess.Popen(
            [sys.executable, "-m", "loader", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=self.tmp,
        )

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


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        import json

        return json.loads(self.stdout)


@pytest.fixture
def db(pg_server: Any, tmp_path: Path) -> Iterator[Db]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg_server.dsn
    query(admin, f'CREATE DATABASE "{name}"')
    yield Db(_with_database(admin, name), tmp_path)
    query(admin, f'DROP DATABASE "{name}" WITH (FORCE)')


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
