"""Mistakes a user can make: each gets one clear line on stderr and its exit code, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import Db

from loader.devserver import PASSWORD, PASSWORD_USER


def with_user(dsn: str, user: str, password: str, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    path = "/" + database if database else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def one_error_line(stderr: str) -> str:
    """The one line on stderr (stamped with the time, as stderr is not a terminal here)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} loader: error: ", lines[0]), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def ready(db: Db, tmp_path: Path) -> Db:
    db.sql("CREATE TABLE t (id int, name text)")
    (tmp_path / "good.csv").write_text("id,name\n1,ann\n")
    return db


CASES = [
    # (what the user did, extra args, exit code, what the message says)
    ("names a file that does not exist", ["missing.csv", "-t", "t"], 2, "missing.csv: no such file"),
    ("names a directory", [".", "-t", "t"], 2, "is a directory"),
    ("names a table that does not exist", ["good.csv", "-t", "public.nope"], 2, "table public.nope does not exist"),
    ("writes a table name that is not a name", ["good.csv", "-t", "a.b.c.d"], 2, "--table a.b.c.d"),
    ("names an unknown column", ["good.csv", "-t", "t", "--columns", "id,nme"], 2, "'nme', which is not a column"),
    ("gives --columns of the wrong length", ["good.csv", "-t", "t", "--columns", "id"], 2, "the header has 2 fields"),
    ("has a header that does not match", ["bad_header.csv", "-t", "t"], 2, "names 'full_name', which is not a column"),
    ("gives a two-character delimiter", ["good.csv", "-t", "t", "--delimiter", ";;"], 2, "--delimiter must be a single"),
    ("gives an unknown encoding", ["good.csv", "-t", "t", "--encoding", "klingon"], 2, "unknown --encoding 'klingon'"),
    ("has a header in another encoding", ["latin1.csv", "-t", "t"], 2, "line 1 (the header) is not valid utf-8"),
    ("asks for zero workers", ["good.csv", "-t", "t", "--workers", "0"], 2, "--workers must be at least 1"),
    ("forgets --table", ["good.csv"], 2, "Missing option '--table'"),
    ("mistypes an option", ["good.csv", "-t", "t", "--worker", "2"], 2, "No such option: --worker"),
]


@pytest.mark.parametrize(("action", "args", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_user_mistake(ready: Db, tmp_path: Path, action: str, args: list[str], code: int, message: str) -> None:
    (tmp_path / "bad_header.csv").write_text("id,full_name\n1,ann\n")
    (tmp_path / "latin1.csv").write_bytes("id,nämé\n1,ann\n".encode("latin-1"))
    run = ready.loader("import", *args)
    assert run.code == code, run.stderr
    assert message in one_error_line(run.stderr)
    assert ready.value("SELECT count(*) FROM t") == 0


def test_unreachable_server_is_retried_then_exits_1(ready: Db, tmp_path: Path) -> None:
    run = ready.loader("import", "good.csv", "-t", "t", "--retries", "2", "--dsn", "postgresql://u@127.0.0.1:1/db")
    assert run.code == 1
    line = one_error_line(run.stderr)
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/db after 3 attempts" in line


def test_bad_password_exits_2_and_never_shows_the_password(ready: Db) -> None:
    ready.sql(
        f"DO $$ BEGIN CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    wrong = with_user(ready.dsn, PASSWORD_USER, "Wr0ng-Secret-42")
    run = ready.loader("import", "good.csv", "-t", "t", env={"LOADER_DSN": wrong})
    assert run.code == 2
    line = one_error_line(run.stderr)
    assert "password authentication failed" in line
    assert "Wr0ng-Secret-42" not in run.stderr + run.stdout
    right = with_user(ready.dsn, PASSWORD_USER, PASSWORD)
    assert ready.loader("import", "good.csv", "-t", "t", env={"LOADER_DSN": right}).code == 0


def test_a_password_on_the_command_line_gets_a_warning(ready: Db) -> None:
    ready.sql(
        f"DO $$ BEGIN CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    run = ready.loader("import", "good.csv", "-t", "t", "--dsn", with_user(ready.dsn, PASSWORD_USER, PASSWORD))
    assert run.code == 0
    warnings = [line for line in run.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "~/.pgpass" in warnings[0]
    assert PASSWORD not in run.stderr


def test_missing_database_exits_2(ready: Db) -> None:
    parts = urlsplit(ready.dsn)
    run = ready.loader("import", "good.csv", "-t", "t", "--dsn", urlunsplit(parts._replace(path="/no_such_db")))
    assert run.code == 2
    assert 'database "no_such_db" does not exist' in one_error_line(run.stderr)


def test_missing_privilege_exits_2_before_loading(ready: Db) -> None:
    ready.sql("DO $$ BEGIN CREATE ROLE reader LOGIN PASSWORD 'reader-pw'; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    ready.sql("GRANT SELECT ON t TO reader")
    ready.sql("CREATE SCHEMA loader AUTHORIZATION reader")  # the ledger is allowed; the table is not
    run = ready.loader("import", "good.csv", "-t", "t", env={"LOADER_DSN": with_user(ready.dsn, "reader", "reader-pw")})
    assert run.code == 2, run.stderr
    assert "permission denied for table t" in one_error_line(run.stderr)
