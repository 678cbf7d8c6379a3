"""Fixtures: one real PostgreSQL for the whole run, a fresh database for each test.

The server comes from testcontainers (when a Docker engine answers), else LOADER_TEST_DSN,
else a throwaway local cluster (see devserver.py at the repository root). Without one the
tests fail; they are never skipped. What the tests call (Db, until, ...) is in helpers.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devserver import LocalCluster, NoServerError, start_server
from helpers import Db, query, with_database


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
