"""The command line: parse options into frozen objects, run the library, map errors to exit codes.

No SQL and no asyncpg here; every failure the user can cause reaches this edge as a
LoaderError and leaves as one line on stderr.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from typing import Annotated, NoReturn, Optional

import typer
from typer.exceptions import TyperException

from . import pipeline
from .errors import EXIT_FATAL, EXIT_USAGE, LoaderError
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


@app.command("import", epilog=EXIT_CODES)
def import_(
    source: Annotated[str, typer.Argument(help="CSV file to load (.gz is read transparently), or - for stdin.", show_default=False)],
    table: Annotated[str, typer.Option("--table", "-t", help='Target table as in SQL: schema.table, "Quoted Names" keep their case.', show_default=False)],
    dsn: Annotated[Optional[str], typer.Option(help="PostgreSQL URL. Default: $DATABASE_URL, then libpq's PG* variables and ~/.pgpass.", show_default=False)] = None,
    header: Annotated[bool, typer.Option("--header/--no-header", help="The first record names the columns.")] = True,
    columns: Annotated[Optional[str], typer.Option(help="Target columns in file order, comma-separated. Default: the header's names, or with --no-header the table's columns.", show_default=False)] = None,
    delimiter: Annotated[str, typer.Option(help="Field delimiter.")] = ",",
    quote: Annotated[str, typer.Option(help="Quote character.")] = '"',
    escape: Annotated[Optional[str], typer.Option(help="Escape character inside quotes. Default: the quote (doubled quotes).", show_default=False)] = None,
    null: Annotated[str, typer.Option(help="Unquoted text that means NULL. Default: an unquoted empty field.", show_default=False)] = "",
    encoding: Annotated[str, typer.Option(help="Encoding of the file.")] = "utf-8",
    workers: Annotated[int, typer.Option("--workers", "-w", help="Connections, and batches loading at once.")] = DEFAULT_WORKERS,
    batch_size: Annotated[int, typer.Option(help="Rows per batch (each batch is one transaction).")] = DEFAULT_BATCH_ROWS,
    batch_bytes: Annotated[int, typer.Option(help="Bytes per batch at most; a batch ends at whichever limit comes first.")] = DEFAULT_BATCH_BYTES,
    retries: Annotated[int, typer.Option(help="Retries of a batch after a transient failure (lost connection, restart, deadlock).")] = DEFAULT_RETRIES,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
) -> None:
    """Load a CSV file into a PostgreSQL table."""
    dialect = CsvDialect(delimiter=delimiter, quote=quote, escape=escape, null=null, encoding=encoding, header=header)
    options = LoadOptions(
        source=source,
        table=table,
        dialect=dialect,
        columns=_split_columns(columns),
        dsn=dsn,
        workers=workers,
        batch_rows=batch_size,
        batch_bytes=batch_bytes,
        retry=RetryPolicy(attempts=retries + 1),
    )
    try:
        report = asyncio.run(pipeline.load(options))
    except LoaderError as exc:
        if exc.report is not None:
            _print_report(exc.report, json_output)
        raise
    _print_report(report, json_output)
    raise typer.Exit(report.exit_code)


def _print_report(report: pipeline.Report, json_output: bool) -> None:
    print(report.summary(), file=sys.stderr)
    if json_output:
        print(json.dumps(report.to_dict()))


def _fail(message: str, code: int) -> NoReturn:
    print(f"loader: error: {message}", file=sys.stderr)
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
