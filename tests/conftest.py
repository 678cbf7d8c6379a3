"""Fixtures: one real PostgreSQL for the whole run, a fresh database for each test.

The server comes from testcontainers (when a Docker engine answers), else LOADER_TEST_DSN,
else a throwaway local cluster (see devserver.py at the repository root). Without one the
tests fail; they are never skipped. LOADER_TEST_PG=15 or 18 picks the PostgreSQL version, and
the run fails if the server is another one. What the tests call (Db, until, ...) is in helpers.py.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devserver import VERSION_VARIABLE, LocalCluster, NoServerError, start_server
from helpers import Db, query, server_major, with_database

# scripts/test runs the suite on two PostgreSQL versions at once; the tests that touch no
# server (pure functions, --help, the docs) would only run twice the same way, so it sets this
# in one of the two runs, which then leaves them out (deselected, never skipped).
SERVER_TESTS_ONLY = "LOADER_TEST_SERVER_TESTS_ONLY"


def pytest_report_header() -> str:
    only = " (only the tests that use a server)" if os.environ.get(SERVER_TESTS_ONLY) == "1" else ""
    return f"PostgreSQL: {os.environ.get(VERSION_VARIABLE) or 'the installed one'} (${VERSION_VARIABLE}){only}"


def _uses_a_server(item: pytest.Item) -> bool:
    """The test, or a fixture it uses, needs PostgreSQL: the session's server, or a module
    that imports from devserver (its own cluster, the server's binaries)."""
    if "pg_server" in getattr(item, "fixturenames", ()):
        return True
    info = getattr(item, "_fixtureinfo", None)
    modules = {getattr(item, "module", None)}
    if info is not None:
        modules |= {sys.modules.get(d.func.__module__) for defs in info.name2fixturedefs.values() for d in defs}
    return any(
        getattr(value, "__module__", None) == "devserver" for module in modules if module is not None for value in vars(module).values()
    )


_left_out: list[pytest.Item] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SERVER_TESTS_ONLY) != "1":
        return
    _left_out[:] = [item for item in items if not _uses_a_server(item)]
    if _left_out:
        config.hook.pytest_deselected(items=_left_out)
        items[:] = [item for item in items if _uses_a_server(item)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing left to run here, because the other run has the tests: not a failure."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and _left_out:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    try:
        server = start_server()
    except NoServerError as exc:
        pytest.fail(f"no PostgreSQL server for the tests: {exc}", pytrace=False)
    try:
        wanted = os.environ.get(VERSION_VARIABLE)
        if wanted and str(server_major(server.dsn)) != wanted.strip():
            pytest.fail(f"{VERSION_VARIABLE}={wanted} but the server ({server.kind}) is PostgreSQL {server_major(server.dsn)}", pytrace=False)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def local_cluster(pg_server: Any) -> LocalCluster:
    """Tests that stop and start the server need one we own (mark them own_cluster)."""
    if not isinstance(pg_server, LocalCluster):
        pytest.fail("this test needs the local cluster (unset LOADER_TEST_DSN)", pytrace=False)
    return pg_server


@pytest.fixture
def db(pg_server: Any, tmp_path: Path) -> Iterator[Db]:
    """A fresh database; the loaders a test leaves running are killed before it is dropped."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg_server.dsn
    query(admin, f'CREATE DATABASE "{name}"')
    fresh = Db(with_database(admin, name), tmp_path)
    try:
        yield fresh
    finally:
        fresh.reap()
        query(admin, f'DROP DATABASE "{name}" WITH (FORCE)')
