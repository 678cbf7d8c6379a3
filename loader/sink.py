"""The PostgreSQL side: the connection pool, the target table, and COPY of one batch.

This is the one place where asyncpg's exceptions about setup (connecting, finding the
table and its columns, checking the COPY options) become the loader's own errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

from . import sql
from .batching import Batch
from .errors import (
    LoaderError,
    MisreadRecords,
    TableReplaced,
    UsageError,
    is_data_error,
    is_transient,
    server_message,
    sqlstate,
)
from .isolate import ErrorRate, holds_end_marker, isolate, misread_message
from .ledger import Ledger
from .options import CsvDialect, LoadOptions, RetryPolicy
from .rejects import Reject
from .retry import retrying
from .throttle import TokenBucket

T = TypeVar("T")

_WRITABLE_RELKINDS = {"r": "table", "p": "partitioned table", "f": "foreign table"}
_COPY_LINE = re.compile(r"\bline (\d+)")


def resolve_dsn(dsn: str | None) -> str | None:
    """--dsn, else $DATABASE_URL, else None (asyncpg then reads PG* variables and .pgpass)."""
    return dsn or os.environ.get("DATABASE_URL") or None


def describe_server(dsn: str | None) -> str:
    """Where we connect, for messages: host, port and database, never the password."""
    if dsn and "://" in dsn:
        parts = urlsplit(dsn)
        host = parts.hostname or os.environ.get("PGHOST", "localhost")
        try:
            port = parts.port or os.environ.get("PGPORT", 5432)
        except ValueError:
            port = "?"
        database = parts.path.lstrip("/") or os.environ.get("PGDATABASE", "")
    else:
        host = os.environ.get("PGHOST", "localhost")
        port = os.environ.get("PGPORT", 5432)
        database = os.environ.get("PGDATABASE", "")
    return f"{host}:{port}/{database}" if database else f"{host}:{port}"


def redact(text: str, dsn: str | None) -> str:
    """Remove the DSN's password from a message, wherever a library may have echoed it."""
    if dsn and "://" in dsn:
        try:
            password = urlsplit(dsn).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "****")
    return text


def copy_line(exc: BaseException) -> int | None:
    """The 1-based record number within a COPY that the server blamed, from the error context."""
    match = _COPY_LINE.search(getattr(exc, "context", None) or "")
    return int(match.group(1)) if match else None


async def _connecting(options: LoadOptions, connect: Callable[[str | None], Awaitable[T]], on_retry: Callable[[BaseException], None] | None) -> T:
    """Run `connect` with the load's retry policy; failures become one clear LoaderError."""
    dsn = resolve_dsn(options.dsn)
    server = describe_server(dsn)
    try:
        async for attempt in retrying(options.retry, on_retry):
            with attempt:
                return await connect(dsn)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise UsageError(f"cannot log in to {server}: {redact(server_message(exc), dsn)}") from None
    except asyncpg.InvalidCatalogNameError as exc:
        raise UsageError(f"cannot connect to {server}: {redact(server_message(exc), dsn)}") from None
    except (asyncpg.exceptions.ClientConfigurationError, ValueError) as exc:
        raise UsageError(f"invalid connection settings: {redact(str(exc), dsn)}") from None
    except Exception as exc:
        reason = redact(" ".join(str(exc).split()) or type(exc).__name__, dsn)
        if is_transient(exc):
            raise LoaderError(
                f"cannot connect to PostgreSQL at {server} after {options.retry.attempts} attempts: {reason}"
            ) from None
        raise LoaderError(f"cannot connect to PostgreSQL at {server}: {reason}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _settings(options: LoadOptions, application_name: str | None = None) -> dict[str, str]:
    settings = {"application_name": application_name or options.application_name}
    if options.statement_timeout is not None:
        settings["statement_timeout"] = f"{max(1, round(options.statement_timeout * 1000))}ms"
    if options.lock_timeout is not None:
        settings["lock_timeout"] = f"{max(1, round(options.lock_timeout * 1000))}ms"
    return settings


async def open_pool(
    options: LoadOptions,
    size: int,
    application_name: str,
    on_retry: Callable[[BaseException], None] | None = None,
    lazy: bool = False,
) -> asyncpg.Pool:
    """A pool of at most `size` connections (all opened now unless `lazy`); transient failures
    are retried, the rest explained. Idle connections of a lazy pool close after 10 s, so a
    load that lowers its concurrency gives connections back."""

    async def create(dsn: str | None) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            dsn,
            min_size=1 if lazy else size,
            max_size=size,
            max_inactive_connection_lifetime=10.0 if lazy else 300.0,
            timeout=15,
            # A batch's commit need not wait for its WAL to reach the disk: the batch's rows and
            # its ledger row are lost together or kept together, and the load's last commit
            # (synchronous, on its own session) makes them all durable before it reports
            # success, after checking that none was lost (see pipeline._Load.run).
            server_settings={**_settings(options, application_name), "synchronous_commit": "off"},
            reset=_nothing_to_reset,
        )

    return await _connecting(options, create, on_retry)


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """Pool connections only ever run batch transactions (which asyncpg rolls back if left
    open): no session state, no advisory locks, no LISTEN to undo. asyncpg's default reset
    would cost a round trip per batch."""


async def connect(options: LoadOptions, on_retry: Callable[[BaseException], None] | None = None) -> asyncpg.Connection:
    """One connection outside the pool: it holds the table's lock for the whole load."""

    async def create(dsn: str | None) -> asyncpg.Connection:
        return await asyncpg.connect(dsn, timeout=15, server_settings=_settings(options))

    return await _connecting(options, create, on_retry)


@dataclass(frozen=True)
class Target:
    """The table rows go into, as the server resolved it."""

    oid: int
    schema: str
    name: str
    columns: tuple[str, ...]  # every column a COPY can write, in table order
    relkind: str = "r"  # pg_class.relkind: r table, p partitioned table, f foreign table

    @property
    def display(self) -> str:
        return sql.qualified(self.schema, self.name)

    def pick_columns(self, names: Sequence[str], where: str) -> tuple[str, ...]:
        """Map names from the header or --columns to the table's columns: exact match first,
        then a unique case-insensitive one (a header "ID" for a column id)."""
        by_lower: dict[str, list[str]] = {}
        for column in self.columns:
            by_lower.setdefault(column.lower(), []).append(column)
        picked: list[str] = []
        for name in names:
            if name in self.columns:
                picked.append(name)
            elif len(by_lower.get(name.lower(), [])) == 1:
                picked.append(by_lower[name.lower()][0])
            else:
                known = ", ".join(self.columns)
                raise UsageError(f"{where} names {name!r}, which is not a column of {self.display} (columns: {known})")
        duplicated = {c for c in picked if picked.count(c) > 1}
        if duplicated:
            raise UsageError(f"{where} names column {sorted(duplicated)[0]!r} more than once")
        return tuple(picked)


async def resolve_target(conn: asyncpg.Connection, table: str) -> Target:
    try:
        row = await conn.fetchrow(sql.RESOLVE_TABLE, table)
    except asyncpg.PostgresError as exc:
        raise UsageError(f"--table {table}: {server_message(exc)}") from None
    if row is None:
        raise UsageError(f"table {table} does not exist (check the name, its schema and the quotes)")
    if row["relkind"] not in _WRITABLE_RELKINDS:
        raise UsageError(f"{table} is not a table; COPY can load only tables")
    columns = await conn.fetch(sql.TABLE_COLUMNS, row["oid"])
    return Target(row["oid"], row["nspname"], row["relname"], tuple(r["attname"] for r in columns), row["relkind"])


@dataclass(frozen=True)
class Outcome:
    """What became of one batch."""

    rows_loaded: int
    rows_rejected: int
    rejects: list[Reject]  # refused now (empty when an earlier attempt or run committed it)
    already: bool = False  # committed by an earlier attempt or run; nothing was written now
    retries: int = 0  # transient failures of this batch before it went through


def copy_options(dialect: CsvDialect) -> dict[str, str]:
    """COPY's options for the dialect; HEADER is never sent (the loader takes the header off)."""
    options = {
        "format": "csv",
        "delimiter": dialect.delimiter,
        "quote": dialect.quote,
        "null": dialect.null,
        "encoding": dialect.pg_encoding,
    }
    if dialect.escape is not None:
        options["escape"] = dialect.escape
    return options


def copy_statement(target: Target, columns: Sequence[str], dialect: CsvDialect) -> str:
    return sql.copy_from_stdin(target.schema, target.name, columns, copy_options(dialect))


SEND_CHUNK = 256 * 1024
PACE_CHUNK = 64 * 1024


async def _chunks(data: bytes | bytearray, pace: tuple[TokenBucket, str] | None) -> AsyncIterator[memoryview]:
    """The batch in slices that fit the CPU's cache: asyncpg copies each into a message of
    that size, where one message for the whole batch would be fresh memory (page faults)
    every time. With --max-rate, each slice waits for the token bucket: a smooth pace."""
    view = memoryview(data)
    step = SEND_CHUNK if pace is None else PACE_CHUNK
    for start in range(0, len(view), step):
        chunk = view[start : start + step]
        if pace is not None:
            bucket, unit = pace
            await bucket.take(len(chunk) if unit == "bytes" else bytes(chunk).count(b"\n"))
        yield chunk


async def copy_rows(conn: asyncpg.Connection, statement: str, data: bytes | bytearray, pace: tuple[TokenBucket, str] | None = None) -> int:
    """Run `statement`, a simple query ending in COPY ... FROM STDIN, with raw CSV bytes; the
    number of rows the server took.

    asyncpg's public copy_to_table writes the COPY statement itself; its `_copy_in` (stable
    since asyncpg 0.10) takes ours, so statements can ride in the same message before the
    COPY (a savepoint's move while isolating bad rows: one round trip less per piece). Like
    copy_to_table, it sends the data without waiting for the server's CopyInResponse."""
    # A small piece (isolating bad rows) goes as one message, without an async generator.
    small = pace is None and len(data) <= SEND_CHUNK
    source = memoryview(data) if small else _chunks(data, pace)  # not bytes: asyncpg takes bytes for a path
    status = await conn._copy_in(statement, source, None)
    return int(status.rsplit(" ", 1)[1])


async def check_copy(conn: asyncpg.Connection, target: Target, columns: Sequence[str], dialect: CsvDialect) -> None:
    """COPY nothing in a rolled-back transaction: the table, the columns, the options and the
    privileges are all checked before the first batch, so mistakes exit 2 at once."""
    try:
        async with conn.transaction():
            await copy_rows(conn, copy_statement(target, columns, dialect), b"")
            raise _Rollback
    except _Rollback:
        pass
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        raise UsageError(f"cannot load into {target.display}: {server_message(exc)}") from None


@contextlib.asynccontextmanager
async def _transaction(conn: asyncpg.Connection, begin: str) -> AsyncIterator[None]:
    """One batch's transaction: committed when the block ends, rolled back when it raises
    (where the connection still can; a broken one is dropped by the pool, and the server
    rolls back what it had)."""
    try:
        await conn.execute(begin)
        yield
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


BeforeCommit = Callable[[Batch], Awaitable[None]]


async def _nothing_before_commit(batch: Batch) -> None:
    pass


class Sink:
    """COPYs batches into the target, each in its own transaction with its ledger row."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        target: Target,
        columns: tuple[str, ...],
        dialect: CsvDialect,
        ledger: Ledger,
        load_id: str,
        retry: RetryPolicy,
        on_retry: Callable[[BaseException], None] | None = None,
        pace: tuple[TokenBucket, str] | None = None,
        before_commit: BeforeCommit = _nothing_before_commit,
    ) -> None:
        self._pool = pool
        self.target = target
        self.columns = columns
        self._ledger = ledger
        self._dialect = dialect
        self._load_id = load_id
        self._retry = retry
        self._on_retry = on_retry
        self._pace = pace
        self._before_commit = before_commit  # the last word on a batch: raising rolls it back
        self._begin = sql.begin_batch(target.schema, target.name, lockable=target.relkind != "f")
        self._newline = dialect.newline.encode()
        self._copy_statement = copy_statement(target, columns, dialect)
        self.copies = 0  # COPY statements sent, for the report and the fast-path test
        self._error_rate = ErrorRate()  # bad rows among those isolated so far: sizes the pieces

    async def _copy(self, conn: asyncpg.Connection, data: bytes | bytearray, before: str = "") -> int:
        self.copies += 1
        return await copy_rows(conn, before + self._copy_statement, data, self._pace)

    async def load(self, batch: Batch) -> Outcome:
        """Load one batch, retrying transient failures; rows the server refuses become rejects.

        Exactly once, even when a commit's outcome is unknown (the connection died during
        COMMIT): every attempt first claims the batch's ledger row in its own transaction.
        If an earlier attempt committed, the claim finds the row and the attempt writes
        nothing; if that attempt is still in progress on the server, the claim waits on the
        row's unique index until it commits or rolls back, and then does the right thing.

        The fast path is one COPY of the batch's bytes. Only when the server refuses the data
        does the batch go, in a new transaction, through `isolate`, which loads the good rows
        and returns the bad ones, recorded in the ledger in that same transaction. Once the
        load's bad rows are so dense that a batch would almost surely be refused, batches go
        to `isolate` at once: the refused COPY would cost the whole batch's transfer, and the
        server's work up to the first bad row, for nothing.
        """
        refusal: BaseException | None = None
        try:
            async for attempt in retrying(self._retry, self._on_retry):
                with attempt:
                    retries = attempt.retry_state.attempt_number - 1
                    fast = not self._error_rate.doomed(batch.rows) and not holds_end_marker(batch.data, self._newline)
                    if refusal is None and fast:
                        try:
                            return dataclasses.replace(await self._load_fast(batch), retries=retries)
                        except Exception as exc:
                            if not is_data_error(exc):
                                raise
                            refusal = exc
                    return dataclasses.replace(await self._load_isolating(batch, refusal), retries=retries)
        except LoaderError:
            raise
        except asyncpg.UndefinedTableError:  # the name no longer names a table
            raise self._replaced(batch) from None
        except Exception as exc:
            where = f"lines {batch.first_line}-{batch.last_line}"
            if is_transient(exc):
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise LoaderError(f"{where}: gave up after {self._retry.attempts} attempts: {reason}") from exc
            if isinstance(exc, asyncpg.PostgresError):
                raise LoaderError(f"{where}: {sqlstate(exc)} {server_message(exc)}") from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _replaced(self, batch: Batch) -> TableReplaced:
        return TableReplaced(
            f"{self.target.display} is no longer the table this load began with (it was dropped or replaced "
            f"while loading): stopped before lines {batch.first_line}-{batch.last_line}; the batches committed "
            "before went into the table as it was, and the next run loads into the table of that name as a new load"
        )

    async def _claim(self, conn: asyncpg.Connection, batch: Batch) -> Outcome | None:
        """Claim the batch's ledger row; an Outcome when an earlier attempt or run already did.
        Refuses to go on when the table's name has come to mean another table."""
        row = await conn.fetchrow(
            self._ledger.claim_sql,
            self._load_id,
            batch.number,
            batch.first_line,
            batch.offset,
            len(batch.data),
            batch.rows,
            batch.checksum,
            self.target.display,
            self.target.oid,
        )
        if not row["same_table"]:
            raise self._replaced(batch)
        if row["claimed"]:
            return None
        done = await self._ledger.committed(conn, self._load_id, batch.number)
        return Outcome(done["rows_loaded"], done["rows_rejected"], [], already=True)

    async def _load_fast(self, batch: Batch) -> Outcome:
        async with self._pool.acquire() as conn, _transaction(conn, self._begin):
            done = await self._claim(conn, batch)
            if done is not None:
                return done
            rows = await self._copy(conn, batch.data)
            if rows != batch.rows:  # the transaction rolls back, and the batch goes to isolation
                raise MisreadRecords(misread_message(bytes(batch.data), rows, batch.rows))
            await self._before_commit(batch)
            return Outcome(rows, 0, [])

    async def _load_isolating(self, batch: Batch, refusal: BaseException | None) -> Outcome:
        async with self._pool.acquire() as conn, _transaction(conn, self._begin):
            done = await self._claim(conn, batch)
            if done is not None:
                return done

            await conn.execute(sql.PIECE_SAVEPOINT)
            before = ""  # the savepoint's move after the last piece, sent with the next one

            async def copy_in_savepoint(data: bytes, records: int) -> int:
                nonlocal before
                try:
                    rows = await self._copy(conn, data, before)
                    if rows != records:
                        raise MisreadRecords(misread_message(data, rows, records))
                except Exception as exc:
                    if is_data_error(exc):  # isolate goes on after it: undo just this piece
                        before = sql.PIECE_UNDO + "; "
                    raise
                before = sql.PIECE_KEEP + "; "
                return rows

            loaded, rejects = await isolate(batch, self._dialect, copy_in_savepoint, copy_line, refusal, self._error_rate)
            if before.startswith(sql.PIECE_UNDO):  # the last piece failed: out of the aborted state
                await conn.execute(sql.PIECE_UNDO)
            if loaded + len(rejects) != batch.rows:
                raise LoaderError(
                    f"lines {batch.first_line}-{batch.last_line}: {loaded} rows loaded and {len(rejects)} rejected "
                    f"of {batch.rows} records; rolled back (a bug: please report it)"
                )
            await self._ledger.record_rejects(conn, self._load_id, batch.number, loaded, rejects)
            await self._before_commit(batch)
            return Outcome(loaded, len(rejects), rejects)


class _Rollback(Exception):
    pass
