"""COPY on the wire: the statement, the CSV bytes sent in chunks (paced by --max-rate), and
which record the server blamed. The one module that touches asyncpg's private `_copy_in`.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable

import asyncpg

from . import sql
from .options import CsvDialect
from .throttle import Pace

SEND_CHUNK = 256 * 1024
PACE_CHUNK = 64 * 1024

_COPY_LINE = re.compile(r"\bline (\d+)")


def copy_options(dialect: CsvDialect, skip_bad_values: bool = False) -> dict[str, str]:
    """COPY's options for the dialect; HEADER is never sent (the loader takes the header off).
    `skip_bad_values` (PostgreSQL 17+): rows with a value of the wrong type are skipped, each
    told in a NOTICE with its line and column (see onerror.py)."""
    options = {
        "format": "csv",
        "delimiter": dialect.delimiter,
        "quote": dialect.quote,
        "null": dialect.null,
        "encoding": dialect.pg_encoding,
    }
    if dialect.escape is not None:
        options["escape"] = dialect.escape
    if skip_bad_values:
        options["on_error"] = "ignore"
        options["log_verbosity"] = "verbose"
    return options


@functools.lru_cache(maxsize=64)  # a file set's loads each make the same
def copy_statement(schema: str, table: str, columns: tuple[str, ...], dialect: CsvDialect, skip_bad_values: bool = False) -> str:
    return sql.copy_from_stdin(schema, table, columns, copy_options(dialect, skip_bad_values))


async def _chunks(data: bytes | bytearray, pace: Pace | None) -> AsyncIterator[memoryview]:
    """The batch in slices that fit the CPU's cache: asyncpg copies each into a message of
    that size, where one message for the whole batch would be fresh memory (page faults)
    every time. With --max-rate, each slice waits for its pace: a smooth one."""
    view = memoryview(data)
    step = SEND_CHUNK if pace is None else PACE_CHUNK
    for start in range(0, len(view), step):
        chunk = view[start : start + step]
        if pace is not None:
            await pace.take(chunk)
        yield chunk


async def copy_rows(conn: asyncpg.Connection, statement: str, data: bytes | bytearray, pace: Pace | None = None) -> int:
    """Run `statement`, a simple query ending in COPY ... FROM STDIN, with raw CSV bytes; the
    number of rows the server took.

    asyncpg's public copy_to_table writes the COPY statement itself; its `_copy_in` (stable
    since asyncpg 0.10) takes ours, so statements can ride in the same message before the
    COPY (a savepoint's move while isolating bad rows: one round trip less per piece). Like
    copy_to_table, it sends the data without waiting for the server's CopyInResponse."""
    # A small piece (isolating bad rows) goes as one message, without an async generator.
    if pace is None and len(data) <= SEND_CHUNK:  # a memoryview: asyncpg takes bytes for a path
        status = await conn._copy_in(statement, memoryview(data), None)
    else:
        status = await _unless_lost(conn, conn._copy_in(statement, _chunks(data, pace), None))
    return int(status.rsplit(" ", 1)[1])


async def _unless_lost(conn: asyncpg.Connection, copy: Awaitable[str]) -> str:
    """A COPY sent in chunks waits for a full socket to drain, and asyncpg never wakes that
    wait when the connection ends: the load would hang. Ended, it is a lost connection."""
    task = asyncio.ensure_future(copy)
    lost = False

    def on_lost(_conn: object) -> None:
        nonlocal lost
        lost = True
        task.cancel()

    conn.add_termination_listener(on_lost)
    try:
        return await task
    except (Exception, asyncio.CancelledError) as exc:
        if lost:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("the connection was closed in the middle of a COPY") from exc
        raise
    finally:
        conn.remove_termination_listener(on_lost)


def copy_line(exc: BaseException) -> int | None:
    """The 1-based record number within a COPY that the server blamed, from the error context."""
    return copy_line_of(getattr(exc, "context", None) or "")


def copy_line_of(text: str) -> int | None:
    """The line number in a COPY's error context, or in its notice of a skipped row."""
    match = _COPY_LINE.search(text)
    return int(match.group(1)) if match else None
