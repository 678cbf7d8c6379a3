"""The command line: parse options into frozen objects, run the library, map errors to exit codes.

No SQL and no asyncpg here; every failure the user can cause reaches this edge as a
LoaderError and leaves as one line on stderr.
"""

from __future__ import annotations

import asyncio
import csv
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.exceptions import TyperException

from . import metrics, pipeline
from .errors import EXIT_FATAL, EXIT_USAGE, LoaderError, UsageError
from .options import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_ROWS,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_WORKERS,
    CsvDialect,
    LoadOptions,
    RetryPolicy,
    check_seconds,
    check_writable,
    parse_deadline,
    parse_rate,
)
from .progress import show as show_progress
from .report import Report

EXIT_CODES = (
    "Exit codes: 0 every row loaded; 1 fatal failure; 2 usage or configuration error "
    "(nothing was loaded); 3 finished, but some rows were not loaded; 75 try again later "
    "(another load holds the table, or the deadline came; the next run resumes)."
)

app = typer.Typer(
    help="Fast, exactly-once bulk loads of CSV files into PostgreSQL.\n\n" + EXIT_CODES,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _group() -> None:
    """Fast, exactly-once bulk loads of CSV files into PostgreSQL."""


def _split_columns(value: str | None) -> tuple[str, ...] | None:
    """--columns a,b,"c,d": a CSV list, so a name may hold a comma when quoted."""
    if value is None:
        return None
    return tuple(next(csv.reader([value]), []))


def _option(*names: str, help: str, env: str, **kwargs: Any) -> Any:
    """An option that can also come from the environment (LOADER_...), shown in --help."""
    return typer.Option(*names, help=help, envvar=f"LOADER_{env}", show_envvar=True, **kwargs)


# Options shared by `import` and `retry-rejects`, defined once.
Table = Annotated[str, _option("--table", "-t", help='Target table as in SQL: schema.table, "Quoted Names" keep their case.', env="TABLE", show_default=False)]
Dsn = Annotated[Optional[str], _option("--dsn", help="PostgreSQL URL. Default: $DATABASE_URL, then libpq's PG* variables and ~/.pgpass. Keep passwords out of it: use ~/.pgpass or PGPASSWORD.", env="DSN", show_default=False)]
Header = Annotated[bool, _option("--header/--no-header", help="The first record names the columns.", env="HEADER")]
Columns = Annotated[Optional[str], _option("--columns", help="Target columns in file order, comma-separated. Default: the header's names, or with --no-header the table's columns.", env="COLUMNS", show_default=False)]
Delimiter = Annotated[str, _option("--delimiter", help="Field delimiter.", env="DELIMITER")]
Quote = Annotated[str, _option("--quote", help="Quote character.", env="QUOTE")]
Escape = Annotated[Optional[str], _option("--escape", help="Escape character inside quotes. Default: the quote (doubled quotes).", env="ESCAPE", show_default=False)]
Null = Annotated[str, _option("--null", help="Unquoted text that means NULL. Default: an unquoted empty field.", env="NULL", show_default=False)]
Encoding = Annotated[str, _option("--encoding", help="Encoding of the file.", env="ENCODING")]
Workers = Annotated[str, _option("--workers", "-w", help="Connections, and batches loading at once; or auto: adapt between 1 and --max-workers to what the server takes. Lowered to the connections the server can spare.", env="WORKERS")]
MaxWorkers = Annotated[int, _option("--max-workers", help="The most batches in flight with --workers auto.", env="MAX_WORKERS")]
BatchSize = Annotated[int, _option("--batch-size", help="Rows per batch (each batch is one transaction).", env="BATCH_SIZE")]
BatchBytes = Annotated[int, _option("--batch-bytes", help="Bytes per batch at most; a batch ends at whichever limit comes first.", env="BATCH_BYTES")]
MaxRecordBytes = Annotated[int, _option("--max-record-bytes", help="Longest record accepted, in bytes; at most 1 GiB - 1, the longest line PostgreSQL takes.", env="MAX_RECORD_BYTES")]
Retries = Annotated[int, _option("--retries", help="Retries of a batch after a transient failure (lost connection, restart, deadlock, timeout).", env="RETRIES")]
Rejects = Annotated[Optional[str], _option("--rejects", help="Where rejected rows go (CSV: line, sqlstate, message, record). Default: next to the source, SOURCE.rejects.csv (stdin: ./stdin.rejects.csv).", env="REJECTS", show_default=False)]
MaxErrors = Annotated[Optional[int], _option("--max-errors", help="Stop (exit 1) once more than this many rows were rejected. Default: no limit.", env="MAX_ERRORS", show_default=False)]
LedgerSchema = Annotated[str, _option("--ledger-schema", help="Schema of the load ledger in the target database.", env="LEDGER_SCHEMA")]
Json = Annotated[bool, _option("--json", help="Print the report as one JSON object on stdout.", env="JSON")]
LoadId = Annotated[Optional[str], _option("--load-id", help="Name the load, so that a run from stdin can resume (files resume without it).", env="LOAD_ID", show_default=False)]
Restart = Annotated[bool, _option("--restart", help="Start a new load even though an unfinished one exists (rows it committed stay in the table).", env="RESTART")]
Force = Annotated[bool, _option("--force", help="Load again a source that was fully loaded before, as a new load.", env="FORCE")]
WaitLock = Annotated[float, _option("--wait-lock", help="Seconds to wait while another load of the table runs, before exiting 75.", env="WAIT_LOCK")]
Deadline = Annotated[Optional[str], _option("--deadline", help="Start no batch after this local time (05:30) or duration (2h, 90m); then exit 75, resumable.", env="DEADLINE", show_default=False)]
MaxRate = Annotated[Optional[str], _option("--max-rate", help="Cap the pace: rows per second (20000, 20k) or bytes (20MB/s).", env="MAX_RATE", show_default=False)]
MaxReplicaLag = Annotated[Optional[float], _option("--max-replica-lag", help="Send no new batch while a streaming replica lags more than this many seconds (needs pg_monitor).", env="MAX_REPLICA_LAG", show_default=False)]
MaxLagWait = Annotated[Optional[float], _option("--max-lag-wait", help="With --max-replica-lag: seconds of waiting in all before stopping (exit 1, resumable). Default: no limit.", env="MAX_LAG_WAIT", show_default=False)]
StatementTimeout = Annotated[Optional[float], _option("--statement-timeout", help="Seconds a batch's statements may take; a timed-out batch is retried.", env="STATEMENT_TIMEOUT", show_default=False)]
LockTimeout = Annotated[Optional[float], _option("--lock-timeout", help="Seconds a batch may wait for a lock on the table; then it is retried.", env="LOCK_TIMEOUT", show_default=False)]
AppName = Annotated[str, _option("--application-name", help="application_name of the load's connections (the load id is added), as pg_stat_activity shows it.", env="APPLICATION_NAME")]
LogInterval = Annotated[float, _option("--log-interval", help="When stderr is not a terminal: seconds between progress lines.", env="LOG_INTERVAL")]
MetricsFile = Annotated[Optional[str], _option("--metrics-file", help="Write the run's metrics here at the end (Prometheus textfile for node_exporter).", env="METRICS_FILE", show_default=False)]
Verbose = Annotated[bool, _option("--verbose", "-v", help="Say what the load is doing (start, resume, retries), not only the summary.", env="VERBOSE")]


def _workers(value: str, max_workers: int) -> tuple[int, bool]:
    if value.strip().lower() == "auto":
        return max_workers, True
    try:
        return int(value), False
    except ValueError:
        raise UsageError(f"--workers {value!r}: write a number of connections, or auto") from None


def _options(
    source: str,
    *,
    table: str,
    dsn: str | None,
    header: bool,
    columns: str | None,
    delimiter: str,
    quote: str,
    escape: str | None,
    null: str,
    encoding: str,
    workers: str,
    batch_size: int,
    batch_bytes: int,
    retries: int,
    rejects: str | None,
    max_errors: int | None,
    ledger_schema: str,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_workers: int = 8,
    load_id: str | None = None,
    restart: bool = False,
    force: bool = False,
    wait_lock: float = 0.0,
    deadline: str | None = None,
    max_rate: str | None = None,
    max_replica_lag: float | None = None,
    max_lag_wait: float | None = None,
    statement_timeout: float | None = None,
    lock_timeout: float | None = None,
    application_name: str = "loader",
    **_output: object,
) -> LoadOptions:
    """The command line's values as the library's frozen options (validated there)."""
    count, auto = _workers(workers, max_workers)
    options = LoadOptions(
        source=source,
        table=table,
        dialect=CsvDialect(delimiter=delimiter, quote=quote, escape=escape, null=null, encoding=encoding, header=header),
        columns=_split_columns(columns),
        dsn=dsn,
        workers=count,
        auto_workers=auto,
        batch_rows=batch_size,
        batch_bytes=batch_bytes,
        max_record_bytes=max_record_bytes,
        retry=RetryPolicy(attempts=retries + 1),
        rejects=rejects,
        max_errors=max_errors,
        ledger_schema=ledger_schema,
        load_name=load_id,
        restart=restart,
        force=force,
        wait_lock=wait_lock,
        deadline=parse_deadline(deadline) if deadline else None,
        max_rate=parse_rate(max_rate) if max_rate else None,
        max_replica_lag=max_replica_lag,
        max_lag_wait=max_lag_wait,
        statement_timeout=statement_timeout,
        lock_timeout=lock_timeout,
        application_name=application_name,
    )
    # Only for a run that goes ahead: a refused command gets its one error line, nothing more.
    if dsn and dsn != os.environ.get("LOADER_DSN") and _has_password(dsn):
        log("loader: warning: a password in --dsn is visible in ps and shell history; use ~/.pgpass, PGPASSWORD or LOADER_DSN")
    return options


def _has_password(dsn: str) -> bool:
    try:
        return "://" in dsn and bool(urlsplit(dsn).password)
    except ValueError:  # not a URL: LoadOptions says so; this is only a warning
        return False


def _prepared(table: str, metrics_file: str | None, build: Callable[[], LoadOptions]) -> LoadOptions:
    """--metrics-file is checked before anything else (if it cannot be written, no failure can
    be reported there); a usage error found after it is recorded in it like any other outcome."""
    if metrics_file:
        check_writable(Path(metrics_file), "--metrics-file")
    try:
        return build()
    except LoaderError as exc:
        if metrics_file:
            metrics.write(Path(metrics_file), table, exc.exit_code, None, 0.0)
        raise


Job = Callable[[asyncio.Event, Callable[[Report], None]], Coroutine[Any, Any, Report]]


async def _with_signals_and_progress(job: Job, progress: bool, log_interval: float) -> Report:
    """SIGINT/SIGTERM once: stop cleanly (in-flight batches finish, the next run resumes);
    twice: exit at once (the ledger still guarantees the next run resumes exactly)."""
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()
    shown: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if interrupt.is_set():
            log(f"loader: {signal.Signals(signum).name} again: exiting now")
            os._exit(EXIT_FATAL)
        log(f"loader: {signal.Signals(signum).name}: stopping after the batches in flight (again to exit now)")
        interrupt.set()

    def on_start(report: Report) -> None:
        if progress:
            shown.append(asyncio.create_task(show_progress(report, log_interval)))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await job(interrupt, on_start)
    finally:
        for task in shown:
            task.cancel()
        await asyncio.gather(*shown, return_exceptions=True)


def _run(job: Job, json_output: bool, table: str, metrics_file: str | None = None, progress: bool = True, log_interval: float = 60.0) -> None:
    started = time.monotonic()
    report: Report | None = None
    code = EXIT_FATAL
    try:
        report = asyncio.run(_with_signals_and_progress(job, progress, log_interval))
        code = report.exit_code
    except LoaderError as exc:
        report, code = exc.report, exc.exit_code
        if exc.report is not None:
            _print_report(exc.report, json_output)
        raise
    finally:
        if metrics_file:
            metrics.write(Path(metrics_file), table, code, report, time.monotonic() - started)
    _print_report(report, json_output)
    raise typer.Exit(report.exit_code)


@app.command("import", epilog=EXIT_CODES)
def import_(
    source: Annotated[str, typer.Argument(help="CSV file to load (.gz is read transparently), or - for stdin.", show_default=False)],
    table: Table,
    dsn: Dsn = None,
    header: Header = True,
    columns: Columns = None,
    delimiter: Delimiter = ",",
    quote: Quote = '"',
    escape: Escape = None,
    null: Null = "",
    encoding: Encoding = "utf-8",
    workers: Workers = str(DEFAULT_WORKERS),
    max_workers: MaxWorkers = 8,
    batch_size: BatchSize = DEFAULT_BATCH_ROWS,
    batch_bytes: BatchBytes = DEFAULT_BATCH_BYTES,
    max_record_bytes: MaxRecordBytes = DEFAULT_MAX_RECORD_BYTES,
    retries: Retries = DEFAULT_RETRIES,
    rejects: Rejects = None,
    max_errors: MaxErrors = None,
    ledger_schema: LedgerSchema = "loader",
    load_id: LoadId = None,
    restart: Restart = False,
    force: Force = False,
    wait_lock: WaitLock = 0.0,
    deadline: Deadline = None,
    max_rate: MaxRate = None,
    max_replica_lag: MaxReplicaLag = None,
    max_lag_wait: MaxLagWait = None,
    statement_timeout: StatementTimeout = None,
    lock_timeout: LockTimeout = None,
    application_name: AppName = "loader",
    log_interval: LogInterval = 60.0,
    metrics_file: MetricsFile = None,
    json_output: Json = False,
    verbose: Verbose = False,
) -> None:
    """Load a CSV file into a PostgreSQL table, exactly once: a re-run resumes an unfinished
    load, and does nothing for a finished one."""
    _setup_logging(verbose)
    given = dict(locals())

    def build() -> LoadOptions:
        check_seconds("--log-interval", log_interval)
        return _options(**given)

    options = _prepared(table, metrics_file, build)
    _run(
        lambda interrupt, on_start: pipeline.load(options, interrupt, on_start),
        json_output, table, metrics_file, progress=True, log_interval=log_interval,
    )


@app.command("retry-rejects", epilog=EXIT_CODES)
def retry_rejects(
    rejects_file: Annotated[str, typer.Argument(help="A rejects file written by `loader import`, its records fixed.", show_default=False)],
    table: Table,
    dsn: Dsn = None,
    header: Header = True,
    columns: Columns = None,
    delimiter: Delimiter = ",",
    quote: Quote = '"',
    escape: Escape = None,
    null: Null = "",
    encoding: Encoding = "utf-8",
    workers: Workers = str(DEFAULT_WORKERS),
    batch_size: BatchSize = DEFAULT_BATCH_ROWS,
    batch_bytes: BatchBytes = DEFAULT_BATCH_BYTES,
    max_record_bytes: MaxRecordBytes = DEFAULT_MAX_RECORD_BYTES,
    retries: Retries = DEFAULT_RETRIES,
    rejects: Rejects = None,
    max_errors: MaxErrors = None,
    ledger_schema: LedgerSchema = "loader",
    wait_lock: WaitLock = 0.0,
    metrics_file: MetricsFile = None,
    json_output: Json = False,
) -> None:
    """Load the records of a rejects file (after fixing them) with the original load's options;
    rows still refused go to REJECTS_FILE.rejects.csv."""
    given = dict(locals())
    source = given.pop("rejects_file")
    _setup_logging(False)
    options = _prepared(table, metrics_file, lambda: _options(source, **given))
    _run(
        lambda interrupt, on_start: pipeline.retry_rejects(source, options, interrupt),
        json_output, table, metrics_file, progress=False,
    )


@app.command("status")
def status_(
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Only loads into this table.", show_default=False)] = None,
    dsn: Dsn = None,
    limit: Annotated[int, typer.Option(help="How many loads, newest first.")] = 20,
    ledger_schema: LedgerSchema = "loader",
    json_output: Json = False,
) -> None:
    """Show recent loads from the ledger: source, table, state, rows, started, duration."""
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    options = LoadOptions(source="-", table=table or "-", dsn=dsn, workers=1, ledger_schema=ledger_schema)
    loads = asyncio.run(pipeline.status(options, table, limit))
    if json_output:
        print(json.dumps(loads))
        return
    if not loads:
        print("no loads recorded yet", file=sys.stderr)
        return
    columns = ("started", "state", "table", "rows_loaded", "rows_rejected", "seconds", "runs", "source")
    cells = [[_cell(load[c]) for c in columns] for load in loads]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for row in [list(columns), *cells]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def _cell(value: object) -> str:
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
        return value[:19].replace("T", " ")
    return f"{value:,}" if isinstance(value, int) else str(value)


def _setup_logging(verbose: bool) -> None:
    """The library logs through `logging`; here it goes to stderr, stamped unless on a terminal.
    Warnings (workers lowered, waiting for replicas, progress lines in cron) always show; what
    the load does step by step only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    stamp = "" if sys.stderr.isatty() else "%(asctime)s "
    handler.setFormatter(logging.Formatter(stamp + "%(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    logger = logging.getLogger("loader")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    # asyncpg's pool logs reconnection trouble with tracebacks, and asyncio complains of each
    # write to a connection the server closed ("socket.send() raised exception.", by the
    # hundred): one line each, and only with --verbose.
    quiet = logging.StreamHandler(sys.stderr)
    quiet.setFormatter(_NoTraceback(stamp + "%(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    for name in ("asyncpg", "asyncio"):
        other = logging.getLogger(name)
        other.handlers[:] = [quiet] if verbose else [logging.NullHandler()]
        other.propagate = False


class _NoTraceback(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return " ".join(super().format(record).split("\n")[:1])


def log(message: str) -> None:
    """A line on stderr; with a timestamp when stderr is not a terminal (cron mail, log files)."""
    if not sys.stderr.isatty():
        message = "\n".join(f"{datetime.now().astimezone():%Y-%m-%dT%H:%M:%S%z} {line}" for line in message.splitlines())
    print(message, file=sys.stderr, flush=True)


def _print_report(report: Report, json_output: bool) -> None:
    log(report.summary())
    if json_output:
        print(json.dumps(report.to_dict()), flush=True)


def _fail(message: str, code: int) -> NoReturn:
    log(f"loader: error: {message}")
    sys.exit(code)


def _return_big_buffers_to_the_os() -> None:
    """Batches are megabytes each; glibc's default raises its mmap threshold after the first
    frees, and then keeps freed batches in the heap, so peak RSS would grow with the number of
    batches ever alive rather than those alive at once. Fix the threshold at 1 MiB, as
    MALLOC_MMAP_THRESHOLD_ would (glibc only; elsewhere nothing to do)."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: every error becomes one line on stderr and its exit code."""
    _return_big_buffers_to_the_os()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="loader", standalone_mode=False)
    except LoaderError as exc:
        _fail(exc.message, exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # the command line itself is wrong
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `loader`: the help is the answer
            print(exc.format_message(), file=sys.stderr)
            sys.exit(EXIT_USAGE)
        _fail(" ".join(exc.format_message().split()), EXIT_USAGE)
    except typer.Abort:
        _fail("interrupted", EXIT_FATAL)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_FATAL)
    except Exception as exc:  # noqa: BLE001 - the edge: one line, never a traceback
        if os.environ.get("LOADER_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (please report this)", EXIT_FATAL)
    sys.exit(code if isinstance(code, int) else 0)
