"""The sink: COPY of one batch, with its ledger row, in one transaction, exactly once.

The fast path is one COPY of the batch's bytes; a refused batch goes through `isolate`.
This is the one place where asyncpg's exceptions about loading a batch become the loader's
own errors (connecting: `connect`; the target table: `target`; the wire: `copywire`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import asyncpg

from . import sql
from .batching import Batch
from .copywire import copy_line, copy_rows, copy_statement
from .errors import (
    ConnectionLost,
    LoaderError,
    MisreadRecords,
    TableReplaced,
    is_data_error,
    is_transient,
    server_message,
    sqlstate,
)
from .isolate import ErrorRate, isolate, misread_message
from .ledger import Ledger
from .options import CsvDialect, RetryPolicy
from .records import Bytes, holds_end_marker
from .rejects import Reject
from .retry import retrying
from .target import Target
from .throttle import Pace


@dataclass(frozen=True)
class Outcome:
    """What became of one batch."""

    rows_loaded: int
    rows_rejected: int
    rejects: list[Reject]  # refused now (empty when an earlier attempt or run committed it)
    committed_before: bool = False  # an earlier attempt or run committed it; nothing was written now
    retries: int = 0  # transient failures of this batch before it went through


@contextlib.asynccontextmanager
async def _connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for one attempt at a batch. When the server ends a connection just
    as a COPY completes, asyncpg reads the FATAL while idle and its next call fails on the
    client ("cannot switch to state 15; another operation (2) is in progress"), and the
    release races the connection's end: on a connection found closed once released, those
    errors are ConnectionLost (transient: the claim makes the retry safe); on a live one
    they are bugs, raised as they are."""
    conn = await pool.acquire()
    raw: asyncpg.Connection = conn._con  # the proxy forgets it once released
    completed = False
    try:
        try:
            yield conn
            completed = True
        finally:
            await pool.release(conn)
    except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
        if not raw.is_closed():
            raise
        if not completed:
            raise ConnectionLost(f"the connection to the server was lost ({type(exc).__name__}: {exc})") from exc
        # committed: only giving the dead connection back failed (the pool has dropped it)


@contextlib.asynccontextmanager
async def _transaction(conn: asyncpg.Connection, begin: str) -> AsyncIterator[None]:
    """One batch's transaction: committed when the block ends, rolled back when it raises
    (where the connection still can; a broken one is dropped by the pool, and the server
    rolls back what it had)."""
    try:
        await conn.execute(begin)
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection's proxy raises even for is_closed()
            if not conn.is_closed() and conn.is_in_transaction():
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
        pace: Pace | None = None,
        before_commit: BeforeCommit = _nothing_before_commit,
        settings: Mapping[str, str] = MappingProxyType({}),  # SET LOCAL in each batch (connect.transaction_settings)
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
        self._begin = sql.begin_batch(target.schema, target.name, target.relkind != "f", settings)
        self._newline = dialect.newline.encode()
        self._copy_statement = copy_statement(target.schema, target.name, columns, dialect)
        self.copies = 0  # COPY statements sent, for the report and the fast-path test
        self._error_rate = ErrorRate()  # bad rows among those isolated so far: sizes the pieces

    async def _copy(self, conn: asyncpg.Connection, data: Bytes, records: int, before: str = "") -> int:
        """COPY `data`, which holds `records` records; MisreadRecords (a data error: the
        caller's transaction or savepoint takes the rows back) when the server took another
        number of rows, so that no record is counted as loaded but lost, or loaded twice."""
        self.copies += 1
        rows = await copy_rows(conn, before + self._copy_statement, data, self._pace)
        if rows != records:
            raise MisreadRecords(misread_message(data, rows, records))
        return rows

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
        assert done is not None, "a batch not claimed is committed"
        return Outcome(done["rows_loaded"], done["rows_rejected"], [], committed_before=True)

    async def _load_fast(self, batch: Batch) -> Outcome:
        async with _connection(self._pool) as conn, _transaction(conn, self._begin):
            done = await self._claim(conn, batch)
            if done is not None:
                return done
            rows = await self._copy(conn, batch.data, batch.rows)  # misread: isolated after the rollback
            await self._before_commit(batch)
            return Outcome(rows, 0, [])

    async def _load_isolating(self, batch: Batch, refusal: BaseException | None) -> Outcome:
        async with _connection(self._pool) as conn, _transaction(conn, self._begin):
            done = await self._claim(conn, batch)
            if done is not None:
                return done

            await conn.execute(sql.PIECE_SAVEPOINT)
            before = ""  # the savepoint's move after the last piece, sent with the next one

            async def copy_in_savepoint(data: Bytes, records: int) -> int:
                nonlocal before
                try:
                    rows = await self._copy(conn, data, records, before)
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
