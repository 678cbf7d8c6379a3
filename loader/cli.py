"""The command line: parse options into frozen objects, run the library, map errors to exit codes.

No SQL and no asyncpg here; every failure the user can cause reaches this edge as a
LoaderError and leaves as one line on stderr. What the command line says (summary, warnings,
errors) goes through `logging`, as the library's messages do (see _setup_logging).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ctypes
import dataclasses
import gc
import inspect
import json
import logging
import os
import signal
import sys
import time
import typing
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional
from urllib.parse import urlsplit

import typer
import typer.core
from typer import _click  # typer's own click, whose Context its commands take
from typer.exceptions import TyperException

from . import metrics, pipeline
from .errors import EXIT_FATAL, EXIT_USAGE, LoaderError, UsageError
from .fileset import FileSet, expand
from .options import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_ROWS,
    DEFAULT_LOG_INTERVAL,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_WORKERS,
    DEFAULT_RETRIES,
    DEFAULT_WORKERS,
    ConnectOptions,
    CsvDialect,
    LoadOptions,
    RetryPolicy,
    check_seconds,
    check_writable,
    parse_deadline,
    parse_delimiter,
    parse_rate,
)
from .progress import show as show_progress
from .report import Report, SetReport

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


def _option(*names: str, help: str, env: str | tuple[str, ...], **kwargs: Any) -> Any:
    """An option that can also come from the environment (LOADER_...), shown in --help."""
    envvar = [f"LOADER_{e}" for e in ((env,) if isinstance(env, str) else env)]
    return typer.Option(*names, help=help, envvar=envvar, show_envvar=True, **kwargs)


# Options `status` shares with the loading commands.
Dsn = Annotated[Optional[str], _option("--dsn", help="PostgreSQL URL. Default: $DATABASE_URL, then libpq's PG* variables and ~/.pgpass. Keep passwords out of it: use ~/.pgpass or PGPASSWORD.", env="DSN", show_default=False)]
LedgerSchema = Annotated[str, _option("--ledger-schema", help="Schema of the load ledger in the target database.", env="LEDGER_SCHEMA")]
Json = Annotated[bool, _option("--json", help="Print the report as one JSON object on stdout.", env="JSON")]


@dataclasses.dataclass(frozen=True)
class LoadArgs:
    """The options of a load, each declared once: flag, help, environment variable, and a
    default taken from options.py. _load_command makes them the parameters of a command."""

    table: Annotated[Optional[str], _option("--table", "-t", help='Target table as in SQL: schema.table, "Quoted Names" keep their case.', env="TABLE", show_default=False)]
    dsn: Dsn = ConnectOptions.dsn
    header: Annotated[bool, _option("--header/--no-header", help="The first record names the columns.", env="HEADER")] = CsvDialect.header
    columns: Annotated[Optional[str], _option("--columns", help="Target columns in file order, comma-separated. Default: the header's names, or with --no-header the table's columns.", env="COLUMNS", show_default=False)] = None
    delimiter: Annotated[str, _option("--delimiter", help="Field delimiter: one character, or tab (also written \\t).", env="DELIMITER")] = CsvDialect.delimiter
    quote: Annotated[str, _option("--quote", help="Quote character.", env="QUOTE")] = CsvDialect.quote
    escape: Annotated[Optional[str], _option("--escape", help="Escape character inside quotes. Default: the quote (doubled quotes).", env="ESCAPE", show_default=False)] = CsvDialect.escape
    null: Annotated[str, _option("--null", help="Unquoted text that means NULL. Default: an unquoted empty field.", env="NULL", show_default=False)] = CsvDialect.null
    encoding: Annotated[str, _option("--encoding", help="Encoding of the file.", env="ENCODING")] = CsvDialect.encoding
    mode: Annotated[str, _option("--mode", help="append rows; upsert: update rows whose --key exists, insert the others; replace: the table ends up holding the file's rows, readers see the old ones until then.", env="MODE")] = LoadOptions.mode
    key: Annotated[Optional[str], _option("--key", help="With --mode upsert: the columns a row is matched on, comma-separated (a primary key or unique index of the table).", env="KEY", show_default=False)] = None
    on_conflict: Annotated[str, _option("--on-conflict", help="With --mode upsert: update the existing row, or keep it (nothing).", env="ON_CONFLICT")] = LoadOptions.on_conflict
    create: Annotated[bool, _option("--create", help="Create the table if it does not exist, its columns named by the header, their types inferred from the data (printed).", env="CREATE")] = LoadOptions.create
    infer_rows: Annotated[Optional[int], _option("--infer-rows", help="With --create: infer the types from this many records. Default: the whole file.", env="INFER_ROWS", show_default=False)] = LoadOptions.infer_rows
    dry_run: Annotated[bool, _option("--dry-run", help="Send every batch and report what a load would do, rejects included, but commit nothing.", env="DRY_RUN")] = LoadOptions.dry_run
    copy_on_error: Annotated[bool, _option("--copy-on-error/--no-copy-on-error", help="On PostgreSQL 17 and later, COPY skips the rows whose values their columns' types refuse (ON_ERROR ignore), and the loader rejects them from the server's notices; --no-copy-on-error isolates them row by row, as on older servers. The rejects are the same.", env="COPY_ON_ERROR")] = LoadOptions.copy_on_error
    workers: Annotated[str, _option("--workers", "-w", help="Connections, and batches loading at once; or auto: adapt between 1 and --max-workers to what the server takes. Lowered to the connections the server can spare.", env="WORKERS")] = str(DEFAULT_WORKERS)
    max_workers: Annotated[int, _option("--max-workers", help="The most batches in flight with --workers auto.", env="MAX_WORKERS")] = DEFAULT_MAX_WORKERS
    batch_size: Annotated[int, _option("--batch-size", help="Rows per batch (each batch is one transaction).", env="BATCH_SIZE")] = DEFAULT_BATCH_ROWS
    batch_bytes: Annotated[int, _option("--batch-bytes", help="Bytes per batch at most; a batch ends at whichever limit comes first.", env="BATCH_BYTES")] = DEFAULT_BATCH_BYTES
    max_record_bytes: Annotated[int, _option("--max-record-bytes", help="Longest record accepted, in bytes; at most 1 GiB - 1, the longest line PostgreSQL takes.", env="MAX_RECORD_BYTES")] = DEFAULT_MAX_RECORD_BYTES
    retries: Annotated[int, _option("--retries", help="Retries of a batch after a transient failure (lost connection, restart, deadlock, timeout).", env="RETRIES")] = DEFAULT_RETRIES
    rejects: Annotated[Optional[str], _option("--rejects", help="Where rejected rows go (CSV: line, sqlstate, message, record). Default: next to the source, SOURCE.rejects.csv (stdin: ./stdin.rejects.csv).", env="REJECTS", show_default=False)] = LoadOptions.rejects
    max_errors: Annotated[Optional[int], _option("--max-errors", help="Stop (exit 1) once more than this many rows were rejected. Default: no limit.", env="MAX_ERRORS", show_default=False)] = LoadOptions.max_errors
    ledger_schema: LedgerSchema = ConnectOptions.ledger_schema
    # --load-id: the name this option had first, still taken (crontabs), as LOADER_LOAD_ID is.
    load_name: Annotated[Optional[str], _option("--load-name", "--load-id", help="Name the load, so that a run from stdin can resume (files resume without it).", env=("LOAD_NAME", "LOAD_ID"), metavar="NAME", show_default=False)] = LoadOptions.load_name
    restart: Annotated[bool, _option("--restart", help="Start a new load even though an unfinished one exists (rows it committed stay in the table).", env="RESTART")] = LoadOptions.restart
    force: Annotated[bool, _option("--force", help="Load again a source that was fully loaded before, as a new load.", env="FORCE")] = LoadOptions.force
    wait_lock: Annotated[float, _option("--wait-lock", help="Seconds to wait while another load of the table runs, before exiting 75.", env="WAIT_LOCK")] = LoadOptions.wait_lock
    lease: Annotated[float, _option("--lease", help="Seconds without a sign of life after which another load may take the table over (behind a pooler; a direct connection's end frees it at once).", env="LEASE")] = LoadOptions.lease
    deadline: Annotated[Optional[str], _option("--deadline", help="Start no batch after this local time (05:30) or duration (2h, 90m); then exit 75, resumable.", env="DEADLINE", show_default=False)] = None
    max_rate: Annotated[Optional[str], _option("--max-rate", help="Cap the pace: rows per second (20000, 20k) or bytes (20MB/s).", env="MAX_RATE", show_default=False)] = None
    max_replica_lag: Annotated[Optional[float], _option("--max-replica-lag", help="Send no new batch while a streaming replica lags more than this many seconds (needs pg_monitor).", env="MAX_REPLICA_LAG", show_default=False)] = LoadOptions.max_replica_lag
    max_lag_wait: Annotated[Optional[float], _option("--max-lag-wait", help="With --max-replica-lag: seconds of waiting in all before stopping (exit 1, resumable). Default: no limit.", env="MAX_LAG_WAIT", show_default=False)] = LoadOptions.max_lag_wait
    statement_timeout: Annotated[Optional[float], _option("--statement-timeout", help="Seconds a batch's statements may take; a timed-out batch is retried.", env="STATEMENT_TIMEOUT", show_default=False)] = ConnectOptions.statement_timeout
    lock_timeout: Annotated[Optional[float], _option("--lock-timeout", help="Seconds a batch may wait for a lock on the table; then it is retried.", env="LOCK_TIMEOUT", show_default=False)] = ConnectOptions.lock_timeout
    application_name: Annotated[str, _option("--application-name", help="application_name of the load's connections (the load id is added), as pg_stat_activity shows it.", env="APPLICATION_NAME")] = ConnectOptions.application_name
    log_interval: Annotated[float, _option("--log-interval", help="When stderr is not a terminal: seconds between progress lines.", env="LOG_INTERVAL")] = DEFAULT_LOG_INTERVAL
    metrics_file: Annotated[Optional[str], _option("--metrics-file", help="Write the run's metrics here at the end (Prometheus textfile for node_exporter).", env="METRICS_FILE", show_default=False)] = None
    json_output: Json = False
    verbose: Annotated[bool, _option("--verbose", "-v", help="Say what the load is doing (start, resume, retries), not only the summary.", env="VERBOSE")] = False


class _Command(typer.core.TyperCommand):
    """A command whose usage line names its argument as its help does (`SOURCE`), where typer
    writes a required one in braces (`{SOURCE}`)."""

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


def _load_command(name: str, *, without: tuple[str, ...] = ()) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `command(argument, args: LoadArgs)` as `loader NAME`. typer reads options from
    a signature, so the one it is given is the command's own parameters followed by the fields
    of LoadArgs, but those named in `without` (which keep their defaults) and those the command
    declares itself (its value goes to LoadArgs too)."""
    assert set(without) <= {f.name for f in dataclasses.fields(LoadArgs)}, without
    hints = typing.get_type_hints(LoadArgs, include_extras=True)
    shared = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[f.name],
            default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
        )
        for f in dataclasses.fields(LoadArgs)
        if f.name not in without
    ]

    def register(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "args"]
        rest = [p for p in shared if p.name not in {o.name for o in own}]
        fields = {f.name for f in dataclasses.fields(LoadArgs)}

        def run(**given: Any) -> None:
            args = LoadArgs(**{name: value for name, value in given.items() if name in fields})
            command(**{p.name: given[p.name] for p in own}, args=args)

        run.__signature__ = inspect.Signature([*own, *rest])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in (*own, *rest)}
        run.__name__, run.__qualname__, run.__doc__ = command.__name__, command.__qualname__, command.__doc__
        app.command(name, epilog=EXIT_CODES, cls=_Command)(run)
        return command

    return register


def _workers(value: str, max_workers: int) -> tuple[int, bool]:
    if value.strip().lower() == "auto":
        return max_workers, True
    try:
        return int(value), False
    except ValueError:
        raise UsageError(f"--workers {value!r}: write a number of connections, or auto") from None


def _load_options(source: str, args: LoadArgs) -> LoadOptions:
    """The command line's values as the library's frozen options (validated there)."""
    count, auto = _workers(args.workers, args.max_workers)
    options = LoadOptions(
        source=source,
        table=args.table or "",
        dialect=CsvDialect(
            delimiter=parse_delimiter(args.delimiter), quote=args.quote, escape=args.escape, null=args.null, encoding=args.encoding, header=args.header
        ),
        columns=_split_columns(args.columns),
        dsn=args.dsn,
        workers=count,
        auto_workers=auto,
        batch_rows=args.batch_size,
        batch_bytes=args.batch_bytes,
        max_record_bytes=args.max_record_bytes,
        retry=RetryPolicy(attempts=args.retries + 1),
        rejects=args.rejects,
        max_errors=args.max_errors,
        ledger_schema=args.ledger_schema,
        load_name=args.load_name,
        restart=args.restart,
        force=args.force,
        wait_lock=args.wait_lock,
        lease=args.lease,
        mode=args.mode.strip().lower(),
        key=_split_columns(args.key),
        on_conflict=args.on_conflict.strip().lower(),
        dry_run=args.dry_run,
        copy_on_error=args.copy_on_error,
        create=args.create,
        infer_rows=args.infer_rows,
        deadline=parse_deadline(args.deadline) if args.deadline else None,
        max_rate=parse_rate(args.max_rate) if args.max_rate else None,
        max_replica_lag=args.max_replica_lag,
        max_lag_wait=args.max_lag_wait,
        statement_timeout=args.statement_timeout,
        lock_timeout=args.lock_timeout,
        application_name=args.application_name,
    )
    # Only for a run that goes ahead: a refused command gets its one error line, nothing more.
    if args.dsn and args.dsn != os.environ.get("LOADER_DSN") and _has_password(args.dsn):
        _say.warning("loader: warning: a password in --dsn is visible in ps and shell history; use ~/.pgpass, PGPASSWORD or LOADER_DSN")
    return options


def _has_password(dsn: str) -> bool:
    try:
        return "://" in dsn and bool(urlsplit(dsn).password)
    except ValueError:  # not a URL: LoadOptions says so; this is only a warning
        return False


def _prepared(args: LoadArgs, build: Callable[[], LoadOptions]) -> LoadOptions:
    """--metrics-file is checked before anything else (if it cannot be written, no failure can
    be reported there); a usage error found after it is recorded in it like any other outcome."""
    if args.metrics_file:
        check_writable(Path(args.metrics_file), "--metrics-file")
    try:
        return build()
    except LoaderError as exc:
        if args.metrics_file:
            metrics.write(Path(args.metrics_file), args.table or "", exc.exit_code, None, 0.0, args.mode)
        raise


Job = Callable[[asyncio.Event, Callable[[Report], None]], Coroutine[Any, Any, Report | SetReport]]


async def _with_signals_and_progress(job: Job, progress: bool, log_interval: float) -> Report | SetReport:
    """SIGINT/SIGTERM once: stop cleanly (in-flight batches finish, the next run resumes);
    twice: exit at once (the ledger still guarantees the next run resumes exactly)."""
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()
    shown: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if interrupt.is_set():
            _say.warning(f"loader: {signal.Signals(signum).name} again: exiting now")
            os._exit(EXIT_FATAL)
        _say.warning(f"loader: {signal.Signals(signum).name}: stopping after the batches in flight (again to exit now)")
        interrupt.set()

    async def show_after(earlier: asyncio.Task[None] | None, report: Report) -> None:
        if earlier is not None:  # one live line at a time
            await asyncio.gather(earlier, return_exceptions=True)
        await show_progress(report, log_interval)

    def on_start(report: Report) -> None:
        """A load begins (in a file set, each source's in turn): its progress replaces the last."""
        if progress:
            earlier = shown.pop() if shown else None
            if earlier is not None:
                earlier.cancel()
            shown.append(asyncio.create_task(show_after(earlier, report)))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await job(interrupt, on_start)
    finally:
        for task in shown:
            task.cancel()
        await asyncio.gather(*shown, return_exceptions=True)


def _run(job: Job, args: LoadArgs, progress: bool) -> None:
    started = time.monotonic()
    report: Report | SetReport | None = None
    code = EXIT_FATAL
    try:
        report = asyncio.run(_with_signals_and_progress(job, progress, args.log_interval))
        code = report.exit_code
    except LoaderError as exc:
        report, code = exc.report, exc.exit_code
        if exc.report is not None:
            exc.report.stopped(exc.exit_code)  # its summary must not read as a finished load
            _print_report(exc.report, args.json_output)
        raise
    finally:
        if args.metrics_file:
            table = args.table or (report.table if report is not None else "")  # retry-rejects: the original's
            metrics.write(Path(args.metrics_file), table, code, report, time.monotonic() - started, args.mode)
    _print_report(report, args.json_output)
    raise typer.Exit(report.exit_code)


@_load_command("import")
def import_(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE...", help="CSV files to load (compressed ones are read transparently), quoted globs ('exports/*.csv.gz', 'exports/**/*.csv'), directories, or - for stdin.", show_default=False)],
    args: LoadArgs,
) -> None:
    """Load CSV files into a PostgreSQL table, each exactly once: a re-run resumes an
    unfinished load, and does nothing for a finished one."""
    _setup_logging(args.verbose)
    expanded: list[FileSet] = []  # what build() found, for the run

    def build() -> LoadOptions:
        check_seconds("--log-interval", args.log_interval)
        files = expand(sources)
        expanded.append(files)
        if files.several and args.load_name:
            raise UsageError("--load-name names the load of one source; each source of a file set is a load named by its path")
        if files.several and args.mode.strip().lower() == "replace":
            raise UsageError("--mode replace takes one source: with several, each would replace the rows of the one before")
        return _load_options(files.sources[0] if files.sources else sources[0], args)

    options = _prepared(args, build)
    files = expanded[0]
    if files.several:
        _run(lambda interrupt, on_start: pipeline.load_set(options, files, interrupt, on_start), args, progress=True)
    else:
        _run(lambda interrupt, on_start: pipeline.load(options, interrupt, on_start), args, progress=True)


# Not --load-name: the load is named after the rejects file, so that a re-run resumes it. Not
# --log-interval: no progress is shown.
@_load_command("retry-rejects", without=("load_name", "log_interval"))
def retry_rejects(
    rejects_file: Annotated[str, typer.Argument(metavar="REJECTS_FILE", help="A rejects file written by `loader import`, its records fixed.", show_default=False)],
    table: Annotated[Optional[str], _option("--table", "-t", help="Target table. Default: the original load's, with its CSV options (the rejects file names the load).", env="TABLE", show_default=False)] = None,
    *,
    args: LoadArgs,
) -> None:
    """Load the records of a rejects file (after fixing them) into the original load's table
    with its CSV options; rows still refused go to REJECTS_FILE.rejects.csv."""
    _setup_logging(args.verbose)

    def build() -> LoadOptions:
        if table:  # the command line says it all, as for import
            return _load_options(rejects_file, args)
        connect = ConnectOptions(dsn=args.dsn, ledger_schema=args.ledger_schema)
        original = asyncio.run(pipeline.original_load(rejects_file, connect))
        options = _load_options(rejects_file, dataclasses.replace(args, table=original.table))
        return dataclasses.replace(options, dialect=original.dialect, columns=original.columns)

    options = _prepared(args, build)
    _run(lambda interrupt, on_start: pipeline.retry_rejects(rejects_file, options, interrupt), args, progress=False)


@app.command("status")
def status_(
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Only loads into this table.", show_default=False)] = None,
    dsn: Dsn = ConnectOptions.dsn,
    limit: Annotated[int, typer.Option(help="How many loads, newest first.")] = 20,
    ledger_schema: LedgerSchema = ConnectOptions.ledger_schema,
    json_output: Json = False,
) -> None:
    """Show recent loads from the ledger: source, table, state, rows, started, duration."""
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    loads = asyncio.run(pipeline.status(ConnectOptions(dsn=dsn, ledger_schema=ledger_schema), table, limit))
    if json_output:
        print(json.dumps(loads))
        return
    if not loads:
        print("no loads recorded yet", file=sys.stderr)
        return
    columns = ("started", "state", "mode", "table", "rows_loaded", "rows_rejected", "seconds", "runs", "source")
    cells = [[_cell(load[c]) for c in columns] for load in loads]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for row in [list(columns), *cells]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
        return value[:19].replace("T", " ")
    return f"{value:,}" if isinstance(value, int) else str(value)


_DATE = "%Y-%m-%dT%H:%M:%S%z"
# What the command line itself says (summary, warnings, errors): shown even without --verbose.
_say = logging.getLogger("loader.cli")


def _setup_logging(verbose: bool) -> None:
    """The one logging path: the library's messages and the command line's go to stderr here,
    each line stamped with the time unless on a terminal (cron mail, log files).
    Warnings (workers lowered, waiting for replicas, progress lines in cron) and what the
    command line says always show; what the load does step by step only with --verbose."""
    stamped = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Stamped(stamped))
    logger = logging.getLogger("loader")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    _say.setLevel(logging.INFO)
    # asyncpg's pool logs reconnection trouble with tracebacks, and asyncio complains of each
    # write to a connection the server closed ("socket.send() raised exception.", by the
    # hundred): one line each, and only with --verbose.
    quiet = logging.StreamHandler(sys.stderr)
    quiet.setFormatter(_NoTraceback(("%(asctime)s " if stamped else "") + "%(name)s: %(message)s", _DATE))
    for name in ("asyncpg", "asyncio"):
        other = logging.getLogger(name)
        other.handlers[:] = [quiet] if verbose else [logging.NullHandler()]
        other.propagate = False


class _Stamped(logging.Formatter):
    """The message, every line of it stamped with the local time when `stamped`."""

    def __init__(self, stamped: bool) -> None:
        super().__init__("%(message)s", _DATE)
        self.stamped = stamped

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if not self.stamped:
            return message
        when = self.formatTime(record, self.datefmt)
        return "\n".join(f"{when} {line}" for line in message.splitlines())


class _NoTraceback(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return " ".join(super().format(record).split("\n")[:1])


def _print_report(report: Report | SetReport, json_output: bool) -> None:
    _say.info(report.summary())
    if json_output:
        print(json.dumps(report.to_dict()), flush=True)


def _fail(message: str, code: int) -> NoReturn:
    _say.error(f"loader: error: {message}")
    sys.exit(code)


def _return_big_buffers_to_the_os() -> None:
    """Batches are megabytes each; glibc's default raises its mmap threshold after the first
    frees, and then keeps freed batches in the heap, so peak RSS would grow with the number of
    batches ever alive rather than those alive at once. Fix the threshold at 1 MiB, as
    MALLOC_MMAP_THRESHOLD_ would (glibc only; elsewhere nothing to do)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: every error becomes one line on stderr and its exit code."""
    _return_big_buffers_to_the_os()
    # What the imports made lives as long as the process: full collections during the load
    # need not walk it again and again (5-7% of the client's CPU).
    gc.freeze()
    _setup_logging(verbose=False)  # a command sets it again with its --verbose
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
    except Exception as exc:
        if os.environ.get("LOADER_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (please report this)", EXIT_FATAL)
    sys.exit(code if isinstance(code, int) else 0)
