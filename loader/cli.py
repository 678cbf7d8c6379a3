"""The command line: parse options into frozen objects, run the library, map errors to exit codes.

No SQL and no asyncpg here; every failure the user can cause reaches this edge as a
LoaderError and leaves as one line on stderr.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import signal
import sys
from datetime import datetime
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.exceptions import TyperException

from . import pipeline
from .errors import EXIT_FATAL, EXIT_USAGE, LoaderError
from .report import Report
from .options import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_ROWS, DEFAULT_RETRIES, DEFAULT_WORKERS, CsvDialect, LoadOptions, RetryPolicy

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


# Options shared by `import` and `retry-rejects`, defined once.
Table = Annotated[str, typer.Option("--table", "-t", help='Target table as in SQL: schema.table, "Quoted Names" keep their case.', show_default=False)]
Dsn = Annotated[Optional[str], typer.Option(help="PostgreSQL URL. Default: $DATABASE_URL, then libpq's PG* variables and ~/.pgpass.", show_default=False)]
Header = Annotated[bool, typer.Option("--header/--no-header", help="The first record names the columns.")]
Columns = Annotated[Optional[str], typer.Option(help="Target columns in file order, comma-separated. Default: the header's names, or with --no-header the table's columns.", show_default=False)]
Delimiter = Annotated[str, typer.Option(help="Field delimiter.")]
Quote = Annotated[str, typer.Option(help="Quote character.")]
Escape = Annotated[Optional[str], typer.Option(help="Escape character inside quotes. Default: the quote (doubled quotes).", show_default=False)]
Null = Annotated[str, typer.Option(help="Unquoted text that means NULL. Default: an unquoted empty field.", show_default=False)]
Encoding = Annotated[str, typer.Option(help="Encoding of the file.")]
Workers = Annotated[int, typer.Option("--workers", "-w", help="Connections, and batches loading at once.")]
BatchSize = Annotated[int, typer.Option(help="Rows per batch (each batch is one transaction).")]
BatchBytes = Annotated[int, typer.Option(help="Bytes per batch at most; a batch ends at whichever limit comes first.")]
Retries = Annotated[int, typer.Option(help="Retries of a batch after a transient failure (lost connection, restart, deadlock).")]
Rejects = Annotated[Optional[str], typer.Option(help="Where rejected rows go (CSV: line, sqlstate, message, record). Default: next to the source, SOURCE.rejects.csv (stdin: ./stdin.rejects.csv).", show_default=False)]
MaxErrors = Annotated[Optional[int], typer.Option(help="Stop (exit 1) once more than this many rows were rejected. Default: no limit.", show_default=False)]
LedgerSchema = Annotated[str, typer.Option(help="Schema of the load ledger in the target database.")]
Json = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")]
LoadId = Annotated[Optional[str], typer.Option("--load-id", help="Name the load, so that a run from stdin can resume (files resume without it).", show_default=False)]
Restart = Annotated[bool, typer.Option("--restart", help="Start a new load even though an unfinished one exists (rows it committed stay in the table).")]
Force = Annotated[bool, typer.Option("--force", help="Load again a source that was fully loaded before, as a new load.")]
WaitLock = Annotated[float, typer.Option("--wait-lock", help="Seconds to wait while another load of the table runs, before exiting 75.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Say what the load is doing (start, resume, retries), not only the summary.")]


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
    workers: int,
    batch_size: int,
    batch_bytes: int,
    retries: int,
    rejects: str | None,
    max_errors: int | None,
    ledger_schema: str,
    load_id: str | None = None,
    restart: bool = False,
    force: bool = False,
    wait_lock: float = 0.0,
    json_output: bool = False,
    verbose: bool = False,
) -> LoadOptions:
    """The command line's values as the library's frozen options (validated there)."""
    return LoadOptions(
        source=source,
        table=table,
        dialect=CsvDialect(delimiter=delimiter, quote=quote, escape=escape, null=null, encoding=encoding, header=header),
        columns=_split_columns(columns),
        dsn=dsn,
        workers=workers,
        batch_rows=batch_size,
        batch_bytes=batch_bytes,
        retry=RetryPolicy(attempts=retries + 1),
        rejects=rejects,
        max_errors=max_errors,
        ledger_schema=ledger_schema,
        load_name=load_id,
        restart=restart,
        force=force,
        wait_lock=wait_lock,
    )


async def _with_signals(job: Callable[[asyncio.Event], Coroutine[Any, Any, Report]]) -> Report:
    """SIGINT/SIGTERM once: stop cleanly (in-flight batches finish, the next run resumes);
    twice: exit at once (the ledger still guarantees the next run resumes exactly)."""
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if interrupt.is_set():
            log(f"loader: {signal.Signals(signum).name} again: exiting now")
            os._exit(EXIT_FATAL)
        log(f"loader: {signal.Signals(signum).name}: stopping after the batches in flight (again to exit now)")
        interrupt.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    return await job(interrupt)


def _run(job: Callable[[asyncio.Event], Coroutine[Any, Any, Report]], json_output: bool) -> None:
    try:
        report = asyncio.run(_with_signals(job))
    except LoaderError as exc:
        if exc.report is not None:
            _print_report(exc.report, json_output)
        raise
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
    workers: Workers = DEFAULT_WORKERS,
    batch_size: BatchSize = DEFAULT_BATCH_ROWS,
    batch_bytes: BatchBytes = DEFAULT_BATCH_BYTES,
    retries: Retries = DEFAULT_RETRIES,
    rejects: Rejects = None,
    max_errors: MaxErrors = None,
    ledger_schema: LedgerSchema = "loader",
    load_id: LoadId = None,
    restart: Restart = False,
    force: Force = False,
    wait_lock: WaitLock = 0.0,
    json_output: Json = False,
    verbose: Verbose = False,
) -> None:
    """Load a CSV file into a PostgreSQL table, exactly once: a re-run resumes an unfinished
    load, and does nothing for a finished one."""
    options = _options(**locals())
    _setup_logging(verbose)
    _run(lambda interrupt: pipeline.load(options, interrupt), json_output)


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
    workers: Workers = DEFAULT_WORKERS,
    batch_size: BatchSize = DEFAULT_BATCH_ROWS,
    batch_bytes: BatchBytes = DEFAULT_BATCH_BYTES,
    retries: Retries = DEFAULT_RETRIES,
    rejects: Rejects = None,
    max_errors: MaxErrors = None,
    ledger_schema: LedgerSchema = "loader",
    wait_lock: WaitLock = 0.0,
    json_output: Json = False,
) -> None:
    """Load the records of a rejects file (after fixing them) with the original load's options;
    rows still refused go to REJECTS_FILE.rejects.csv."""
    given = dict(locals())
    source = given.pop("rejects_file")
    options = _options(source, **given)
    _setup_logging(False)
    _run(lambda interrupt: pipeline.retry_rejects(source, options, interrupt), json_output)


def _setup_logging(verbose: bool) -> None:
    """The library logs through `logging`; here it goes to stderr, stamped unless on a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    stamp = "" if sys.stderr.isatty() else "%(asctime)s "
    handler.setFormatter(logging.Formatter(stamp + "%(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    logger = logging.getLogger("loader")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


@app.command("status")
def status_(
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Only loads into this table.", show_default=False)] = None,
    dsn: Dsn = None,
    limit: Annotated[int, typer.Option(help="How many loads, newest first.")] = 20,
    ledger_schema: LedgerSchema = "loader",
    json_output: Json = False,
) -> None:
    """Show recent loads from the ledger: source, table, state, rows, started, duration."""
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


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: every error becomes one line on stderr and its exit code."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="loader", standalone_mode=False)
    except LoaderError as exc:
        _fail(exc.message, exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # the command line itself is wrong
        message = " ".join(exc.format_message().split())
        if not message:  # bare `loader`: the help was the answer
            sys.exit(EXIT_USAGE)
        _fail(message, EXIT_USAGE)
    except typer.Abort:
        _fail("interrupted", EXIT_FATAL)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_FATAL)
    except Exception as exc:  # noqa: BLE001 - the edge: one line, never a traceback
        if os.environ.get("LOADER_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (please report this)", EXIT_FATAL)
    sys.exit(code if isinstance(code, int) else 0)
