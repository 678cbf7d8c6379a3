"""The loader's exceptions, and how server errors are classified.

    LoaderError           exit 1: the load could not finish
    ├── Interrupted       exit 1: stopped by SIGINT/SIGTERM; the next run resumes
    ├── TableReplaced     exit 1: the target table was dropped or replaced under the load
    ├── SourceFailed      exit 1: one source could not be read through (I/O, a record too long, --max-errors)
    ├── UsageError        exit 2: a mistake in the command, the file or the target; nothing was loaded
    │   └── BadSource     exit 2: one source cannot be loaded as it is (missing, corrupt, its header)
    │       └── SourceChanged exit 2: the file is not what an earlier run of this load committed
    └── TryAgainLater     exit 75: not now (table locked by another load, deadline reached); resumable

In a file set, SourceFailed and BadSource end that source's load only: the others still load.

Each carries a one-line, user-facing message. They are raised where the problem is
known and turned into output only at the CLI's edge.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_REJECTS = 3
EXIT_TEMPFAIL = 75


class LoaderError(Exception):
    """A failure the user should read about; `str(err)` is the one line to print."""

    exit_code = EXIT_FATAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.report: Any = None  # what was done before the failure, when a load had started


class UsageError(LoaderError):
    """The command, the source or the target is wrong; retrying will not help."""

    exit_code = EXIT_USAGE


class TryAgainLater(LoaderError):
    """The load cannot run now but a later run will resume it (cron's EX_TEMPFAIL)."""

    exit_code = EXIT_TEMPFAIL


class BadSource(UsageError):
    """This source cannot be loaded as it is; another source of the same command may be."""


class SourceFailed(LoaderError):
    """This source could not be loaded to its end; another source of the same command may be."""


class SourceChanged(BadSource):
    """The source is not what an earlier run of the same load committed; resuming would corrupt it."""


class Interrupted(LoaderError):
    """Stopped by a signal; committed batches stay, and the next run resumes."""


class TableReplaced(LoaderError):
    """The table's name no longer means the table the load planned (dropped, or dropped and
    created again): no batch may go into another table than the one the load began with."""


# The SQLSTATEs the loader names, under PostgreSQL's condition names (its manual, appendix A).
# A class is a code's first two characters; a prefix covers every code that begins with it.
CONNECTION_EXCEPTION = "08"  # class
PROTOCOL_VIOLATION = "08P01"  # also what PgBouncer says when it refuses a startup parameter
DATA_EXCEPTION = "22"  # class
BAD_COPY_FILE_FORMAT = "22P04"  # COPY's field count, line endings, open quotes, "missing data for column"
INTEGRITY_CONSTRAINT_VIOLATION = "23"  # class
TRANSACTION_ROLLBACK = "40"  # class: serialization failure, deadlock
INSUFFICIENT_RESOURCES = "53"  # class
TOO_MANY_CONNECTIONS = "53300"
LOCK_NOT_AVAILABLE = "55P03"  # --lock-timeout: someone holds a lock on the table for now
QUERY_CANCELED = "57014"  # --statement-timeout
SERVER_UNAVAILABLE = "57P"  # prefix of operator intervention: admin or crash shutdown, cannot connect now

# SQLSTATEs that a later attempt can cure: the connection or the server, not the data.
_TRANSIENT_CLASSES = (CONNECTION_EXCEPTION, TRANSACTION_ROLLBACK, INSUFFICIENT_RESOURCES)
_TRANSIENT_PREFIXES = (SERVER_UNAVAILABLE, QUERY_CANCELED, LOCK_NOT_AVAILABLE)

# SQLSTATE classes that mean "this data is bad" (COPY's own format errors included).
_DATA_CLASSES = (DATA_EXCEPTION, INTEGRITY_CONSTRAINT_VIOLATION)


class ConnectionLost(Exception):
    """asyncpg failed on a connection the server or the network had closed (its client-side
    errors, e.g. "cannot switch to state 15; another operation (2) is in progress", after a
    FATAL read while idle): transient, like any lost connection. See sink._connection."""


class MisreadRecords(Exception):
    """PostgreSQL took another number of rows from a COPY than it was sent records: a line
    holding only \\. (COPY's end-of-data marker until PostgreSQL 18), or a line break that
    COPY reads otherwise than the file's own line ending. A data error like a refused row
    (SQLSTATE 22P04, bad COPY file format): the rows go back, and the record is found."""

    sqlstate = BAD_COPY_FILE_FORMAT


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error, None for anything else."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same work later may succeed: the connection or server, not the data."""
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in _TRANSIENT_CLASSES or state.startswith(_TRANSIENT_PREFIXES)
    # No SQLSTATE: the connection broke under us (reset, refused, closed mid-query, timed out).
    return isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            ConnectionLost,
            asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.InterfaceError,
        ),
    ) and not isinstance(exc, (asyncpg.exceptions.ClientConfigurationError, asyncpg.exceptions.DataError))


def transient_stop(exc: BaseException) -> TryAgainLater:
    """A transient failure that outlasted its retries, as the reason a run stops (exit 75)."""
    reason = server_message(exc) or type(exc).__name__
    return TryAgainLater(f"stopped by a transient failure ({reason}); run the same command again to resume")


def is_data_error(exc: BaseException) -> bool:
    """True when the server refused the rows themselves (bad value, wrong field count, constraint)."""
    state = sqlstate(exc)
    return state is not None and state[:2] in _DATA_CLASSES


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def server_message(exc: BaseException) -> str:
    """The server's message on one line, with its detail (and hint) once each, where given.
    (asyncpg's str() of an error already appends "DETAIL: ..." and "HINT: ...": the primary
    message is its first argument.)"""
    detail, hint = getattr(exc, "detail", None), getattr(exc, "hint", None)
    primary = exc.args[0] if (detail or hint) and exc.args and isinstance(exc.args[0], str) else str(exc)
    return server_text(primary, detail, hint)


def server_text(message: str, detail: str | None, hint: str | None) -> str:
    """An error's message, detail and hint as `server_message` tells them."""
    text = _one_line(message)
    if detail:
        text = f"{text} ({_one_line(detail)})"
    if hint:
        text = f"{text}; hint: {_one_line(hint)}"
    return text


# COPY's error context names the line, and the column when one value was refused:
# 'COPY t, line 4, column score: "high"', 'COPY t, line 4, column score: null input',
# 'COPY t, line 4, column score' (PostgreSQL's CopyFromErrorCallback). A trigger or a
# function called by the COPY adds lines of its own to the context, and a value may hold
# line breaks: the column's name ends at the value, or at the end of its line; the value is
# known when it ends on its line.
_COPY_COLUMN = re.compile(r'^COPY [^\n]*?, line \d+, column ([^\n]+?)(?:: "(?:([^\n]*)"$)?|: null input$|$)', re.MULTILINE)
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


def refused_column(exc: BaseException) -> str | None:
    """The column whose value a COPY refused, as the server's error context names it."""
    return _copy_context(exc, 1)


def refused_value(exc: BaseException) -> str | None:
    """The value a COPY refused in a column, as the error context shows it (in full up to 30
    characters); None where the context shows none (constraints, field counts, NULL)."""
    return _copy_context(exc, 2)


def _copy_context(exc: BaseException, group: int) -> str | None:
    context = getattr(exc, "context", None)
    match = _COPY_COLUMN.search(context) if isinstance(context, str) else None
    return match.group(group) if match else None


def reject_message(exc: BaseException) -> str:
    """Why a row was rejected: the server's message, after the column it names when it
    refused one value (`column score: invalid input syntax for type integer: "high"`).
    Only ever computed for a rejected row, never on the fast path."""
    return column_message(refused_column(exc), server_message(exc))


def column_message(column: str | None, message: str) -> str:
    """A reject's message: `message`, after the column whose value was refused, if any."""
    if column is None:
        return message
    name = column if _PLAIN_NAME.fullmatch(column) else '"' + column.replace('"', '""') + '"'
    return f"column {name}: {message}"
