"""Mistakes a user can make: each gets one clear line on stderr and its exit code, never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from devserver import PASSWORD, PASSWORD_USER
from helpers import REPO, Db
from loader.errors import UsageError


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


def running_loads(db: Db) -> int:
    """Loads the ledger shows as `running` (none when there is no ledger at all)."""
    if db.value("SELECT to_regclass('loader.loads')") is None:
        return 0
    return db.value("SELECT count(*) FROM loader.loads WHERE state = 'running'")


BAD_VALUES = [
    # (what the user did, extra args, what the message says)
    ("names a codec that is not a text encoding", ["--encoding", "rot13"], "--encoding 'rot13' is not a text encoding"),
    ("names a bytes-to-bytes codec", ["--encoding", "hex"], "--encoding 'hex' is not a text encoding"),
    ("names the codec that refuses everything", ["--encoding", "undefined"], "--encoding 'undefined' is not a text encoding"),
    ("names a codec for host names", ["--encoding", "idna"], "--encoding 'idna' is not a text encoding"),
    ("asks for batches of a terabyte", ["--batch-bytes", "1000000000000"], "--batch-bytes must be at most 1 GiB"),
    ("gives an endless statement timeout", ["--statement-timeout", "inf"], "--statement-timeout must be a finite number of seconds"),
    ("gives a statement timeout that is not a number", ["--statement-timeout", "nan"], "--statement-timeout must be a finite number of seconds"),
    ("gives a statement timeout past PostgreSQL's limit", ["--statement-timeout", "1e300"], "--statement-timeout must be at most 2147483 seconds"),
    ("gives a lock timeout just past PostgreSQL's limit", ["--lock-timeout", "2147484"], "--lock-timeout must be at most 2147483 seconds"),
    ("gives an endless lock timeout", ["--lock-timeout", "inf"], "--lock-timeout must be a finite number of seconds"),
    ("gives a replica lag that is not a number", ["--max-replica-lag", "nan"], "--max-replica-lag must be a finite number of seconds"),
    ("gives an endless lag wait", ["--max-replica-lag", "5", "--max-lag-wait", "inf"], "--max-lag-wait must be a finite number of seconds"),
    ("waits for the lock forever", ["--wait-lock", "inf"], "--wait-lock must be a finite number of seconds"),
    ("waits for the lock a nan", ["--wait-lock", "nan"], "--wait-lock must be a finite number of seconds"),
    ("logs progress never", ["--log-interval", "inf"], "--log-interval must be a finite number of seconds"),
    ("logs progress every nan", ["--log-interval", "nan"], "--log-interval must be a finite number of seconds"),
    ("allows records of 100 bytes", ["--max-record-bytes", "100"], "--max-record-bytes must be at least 1024"),
    ("allows records PostgreSQL cannot take", ["--max-record-bytes", str(1 << 30)], "--max-record-bytes must be at most 1073741823"),
    ("names the load with blanks", ["--load-name", " "], "--load-name cannot be empty"),
]


@pytest.mark.parametrize(("action", "args", "message"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_option_value_exits_2_before_loading(ready: Db, action: str, args: list[str], message: str) -> None:
    """A value the loader cannot use is refused up front: exit 2, one line naming the option,
    nothing loaded and no load left `running` in the ledger."""
    run = ready.loader("import", "good.csv", "-t", "t", *args)
    assert run.code == 2, run.stderr
    assert message in one_error_line(run.stderr)
    assert ready.value("SELECT count(*) FROM t") == 0
    assert running_loads(ready) == 0


def test_max_record_bytes_comes_from_the_command_line_or_the_environment(ready: Db, tmp_path: Path) -> None:
    """--max-record-bytes is an option of `import` and `retry-rejects`, also read from
    LOADER_MAX_RECORD_BYTES, and validated wherever it comes from."""
    run = ready.loader("import", "good.csv", "-t", "t", env={"LOADER_MAX_RECORD_BYTES": "10"})
    assert run.code == 2 and "--max-record-bytes must be at least 1024" in one_error_line(run.stderr)
    run = ready.loader("import", "good.csv", "-t", "t", "--max-record-bytes", "2048")
    assert run.code == 0, run.stderr
    (tmp_path / "fixed.csv").write_text("line,sqlstate,message,record\n1,,header,\"id,name\"\n2,22P02,bad,\"2,bob\"\n")
    run = ready.loader("retry-rejects", "fixed.csv", "-t", "t", "--max-record-bytes", "2048")
    assert run.code == 0, run.stderr
    run = ready.loader("retry-rejects", "fixed.csv", "-t", "t", "--max-record-bytes", "10")
    assert run.code == 2 and "--max-record-bytes must be at least 1024" in one_error_line(run.stderr)
    assert ready.value("SELECT count(*) FROM t") == 2


def test_retry_rejects_takes_the_options_of_import_but_naming_the_load_and_progress() -> None:
    """`retry-rejects` is a load like `import`: the same options, defaults and environment
    variables, but --load-name (the load is named after the rejects file) and --log-interval
    (it shows no progress)."""
    from typer.main import get_command

    from loader.cli import app

    commands = get_command(app).commands  # type: ignore[attr-defined]

    def options(name: str) -> dict[str, tuple[object, object]]:
        return {o: (p.default, p.envvar) for p in commands[name].params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}

    imported, retried = options("import"), options("retry-rejects")
    assert set(imported) - set(retried) == {"--load-name", "--load-id", "--log-interval"}
    assert {o: imported[o] for o in retried} == retried


def test_retry_rejects_takes_workers_auto_and_max_workers(ready: Db, tmp_path: Path) -> None:
    (tmp_path / "fixed.csv").write_text("line,sqlstate,message,record\n1,,header,\"id,name\"\n2,22P02,bad,\"2,bob\"\n")
    run = ready.loader("retry-rejects", "fixed.csv", "-t", "t", "--workers", "auto", "--max-workers", "2", "--json")
    assert run.code == 0, run.stderr
    assert run.json()["rows_loaded"] == 1
    assert ready.value("SELECT count(*) FROM t") == 1


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_status_limit_below_one_exits_2(ready: Db, limit: str) -> None:
    """`loader status --limit` counts loads to show: fewer than one is a usage error."""
    assert ready.loader("import", "good.csv", "-t", "t").code == 0
    run = ready.loader("status", "--limit", limit)
    assert run.code == 2, run.stderr
    assert "--limit must be at least 1" in one_error_line(run.stderr)


MALFORMED_DSN = "postgresql://u:Hush-Pw-314@[::1/db"


@pytest.mark.parametrize(
    ("how", "args", "env"),
    [
        ("import --dsn", ["import", "good.csv", "-t", "t", "--dsn", MALFORMED_DSN], {}),
        ("import LOADER_DSN", ["import", "good.csv", "-t", "t"], {"LOADER_DSN": MALFORMED_DSN}),
        ("status --dsn", ["status", "--dsn", MALFORMED_DSN], {}),
    ],
)
def test_malformed_dsn_exits_2_without_showing_the_password(ready: Db, how: str, args: list[str], env: dict[str, str]) -> None:
    """A --dsn that is not a URL is a usage error: one line saying why, never the password."""
    run = ready.loader(*args, env=env)
    assert run.code == 2, run.stderr
    assert "--dsn is not a valid PostgreSQL URL (Invalid IPv6 URL)" in one_error_line(run.stderr)
    assert "Hush-Pw-314" not in run.stderr + run.stdout


def test_a_usage_error_with_a_password_in_the_dsn_is_one_line(ready: Db) -> None:
    """The password warning is for a run that goes ahead; a refused command says only why."""
    dsn = with_user(ready.dsn, "u", "Hush-Pw-314")
    run = ready.loader("import", "good.csv", "-t", "t", "--workers", "0", "--dsn", dsn)
    assert run.code == 2
    assert "--workers must be at least 1" in one_error_line(run.stderr)
    assert "Hush-Pw-314" not in run.stderr


def unwritable(tmp_path: Path, kind: str) -> str:
    """A path no one, not even root, can create a file at."""
    if kind == "missing folder":
        return "/nonexistent/dir/out.csv"
    if kind == "a directory":
        (tmp_path / "adir").mkdir()
        return str(tmp_path / "adir")
    if kind == "a fifo":
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo")
    assert kind == "read-only folder"
    path = "/proc/loader-test.out"  # procfs takes no new files, even from root
    with pytest.raises(OSError):
        open(path, "w").close()
    return path


UNWRITABLE = [
    ("import", "--rejects", "missing folder"),  # passes once the pipeline calls check_writable
    ("import", "--rejects", "a directory"),  # passes once the pipeline calls check_writable
    ("import", "--metrics-file", "missing folder"),
    ("import", "--metrics-file", "a directory"),
    ("import", "--metrics-file", "read-only folder"),
    ("import", "--metrics-file", "a fifo"),
    ("retry-rejects", "--metrics-file", "read-only folder"),
]


@pytest.mark.parametrize(("command", "option", "kind"), UNWRITABLE, ids=[" ".join(c) for c in UNWRITABLE])
def test_unwritable_output_path_exits_2_before_loading(ready: Db, tmp_path: Path, command: str, option: str, kind: str) -> None:
    """Where the rejects and the metrics go is checked before any row is loaded: a path that
    cannot be written is exit 2 with one line naming the option, the table stays empty and no
    load is left `running`."""
    (tmp_path / "some_bad.csv").write_text("id,name\n1,ann\nx,bob\n")
    (tmp_path / "fixed.csv").write_text("line,sqlstate,message,record\n1,,header,\"id,name\"\n2,22P02,bad,\"2,bob\"\n")
    source = "some_bad.csv" if command == "import" else "fixed.csv"
    path = unwritable(tmp_path, kind)
    run = ready.loader(command, source, "-t", "t", option, path)
    assert run.code == 2, run.stderr
    assert f"loader: error: {option} {path}: " in one_error_line(run.stderr)
    assert ready.value("SELECT count(*) FROM t") == 0
    assert running_loads(ready) == 0


@pytest.mark.parametrize("kind", ["missing folder", "a directory", "read-only folder", "a fifo"])
def test_check_writable_refuses_a_path_the_writers_cannot_replace(tmp_path: Path, kind: str) -> None:
    """check_writable names the option and the reason, and leaves nothing behind."""
    from loader.options import check_writable

    path = Path(unwritable(tmp_path, kind))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UsageError, match=f"^--rejects {re.escape(str(path))}: "):
        check_writable(path, "--rejects")
    assert sorted(tmp_path.iterdir()) == before


def test_check_writable_accepts_a_new_or_existing_file_and_leaves_no_trace(tmp_path: Path) -> None:
    """A writable folder passes, whether the file exists yet or not, and nothing is created."""
    from loader.options import check_writable

    (tmp_path / "old.csv").write_text("keep")
    check_writable(tmp_path / "new.csv", "--rejects")
    check_writable(tmp_path / "old.csv", "--rejects")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]
    assert (tmp_path / "old.csv").read_text() == "keep"


ASYNCIO_WARNING = """
import logging, sys
from loader import cli
cli._setup_logging(sys.argv[1] == "verbose")
log = logging.getLogger("asyncio")
log.warning("socket.send() raised exception.")
try:
    raise ConnectionResetError("gone")
except ConnectionResetError:
    log.error("Fatal write error on socket transport", exc_info=True)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_asyncio_log_lines_are_quiet_unless_verbose(verbose: bool) -> None:
    """asyncio's own complaints (a write to a connection the server closed) stay off stderr;
    with --verbose each is one stamped line, with no traceback."""
    proc = subprocess.run(
        [sys.executable, "-c", ASYNCIO_WARNING, "verbose" if verbose else "quiet"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    if not verbose:
        assert proc.stderr == ""
        return
    lines = proc.stderr.splitlines()
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} asyncio: "
    assert len(lines) == 2, proc.stderr
    assert re.match(stamp + r"socket\.send\(\) raised exception\.$", lines[0]), proc.stderr
    assert re.match(stamp + r"Fatal write error on socket transport$", lines[1]), proc.stderr


def test_a_transient_failure_while_the_load_prepares_exits_75_to_be_run_again(db: Db, tmp_path: Path) -> None:
    """A transient server error outside a batch (here a serialization failure raised by the
    table's statement trigger, which the load's check of the COPY meets first) is no crash:
    one line, exit 75, nothing loaded; the next run resumes."""
    db.script(
        """
        CREATE TABLE t (id int);
        CREATE FUNCTION busy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'try later' USING ERRCODE = 'serialization_failure'; END $$;
        CREATE TRIGGER busy BEFORE INSERT ON t FOR EACH STATEMENT EXECUTE FUNCTION busy();
        """
    )
    (tmp_path / "t.csv").write_text("id\n1\n")
    run = db.loader("import", "t.csv", "-t", "t")
    assert run.code == 75, run.stderr
    line = one_error_line(run.stderr)
    assert "transient failure (try later)" in line and "run the same command again" in line
    db.sql("DROP TRIGGER busy ON t")
    assert db.loader("import", "t.csv", "-t", "t").code == 0
    assert db.value("SELECT count(*) FROM t") == 1


def test_an_installation_without_its_sql_files_exits_1_and_says_so(ready: Db, tmp_path: Path) -> None:
    """A broken installation (the package without the SQL files it runs) is no transient
    failure to run again: one line naming the missing file, exit 1, nothing loaded."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "loader", site / "loader", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "loader", "import", "good.csv", "-t", "t"],
        cwd=tmp_path, env={**os.environ, "DATABASE_URL": ready.dsn, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "SQL file ledger.sql" in line and "reinstall the loader" in line, line
    assert ready.value("SELECT count(*) FROM t") == 0
