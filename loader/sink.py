"""The sink: COPY of one batch, with its ledger row, in one transaction, exactly once.

The fast path is one COPY of the batch's bytes, in which PostgreSQL 17+ skips rows with bad
values (`onerror`); a refused batch goes through `isolate`.
This is the one place where asyncpg's exceptions about loading a batch become the loader's
own errors (connecting: `connect`; the target table: `target`; the wire: `copywire`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

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
from .modes import NO_KEYS, Span, Turns, Upsert
from .onerror import Skips, Unresolved, column_types
from .onerror import rejects as skipped_rejects
from .options import CsvDialect, RetryPolicy
from .records import Bytes, holds_end_marker
from .rejects import Reject
from .retry import retrying
from .target import Target
from .throttle import Pace

log = logging.getLogger("loader")


@dataclass(frozen=True)
class Outcome:
    """What became of one batch."""

    rows_loaded: int
    rows_rejected: int
    rejects: list[Reject]  # refused now (empty when an earlier attempt or run committed it)
    committed_before: bool = False  # an earlier attempt or run committed it; nothing was written now
    retries: int = 0  # transient failures of this batch before it went through
    merged: tuple[int, int] | None = None  # upsert: rows inserted, rows updated


@dataclass(frozen=True)
class Writing:
    """How batches are written, besides a COPY into the target (see modes.py)."""

    settings: Mapping[str, str] = field(default_factory=dict)  # SET LOCAL in each transaction (connect.transaction_settings)
    upsert: Upsert | None = None  # COPY into a temporary stage, merged into the table in file order
    prologue: str = ""  # more statements for each transaction's BEGIN (a temporary stage)
    lock: bool = True  # BEGIN locks the target (see sql.begin_batch)
    dry_run: bool = False  # one transaction for the whole load, a savepoint per batch, rolled back at the end
    committed: frozenset[int] = frozenset()  # batches earlier runs committed (an upsert merges after them)
    table: str | None = None  # the table's name, where messages would name the stage it loads into instead
    skip_bad_values: bool = False  # COPY ... ON_ERROR ignore (PostgreSQL 17+): see onerror.py
    end_marker: bool = True  # a line of only \. ends a COPY's data (before PostgreSQL 18)


@dataclass
class _Tally:
    """Rows an upsert merged in one attempt at a batch (pieces rolled back do not count)."""

    inserted: int = 0
    updated: int = 0


@contextlib.asynccontextmanager
async def batch_connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
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
async def batch_transaction(conn: asyncpg.Connection, begin: str) -> AsyncIterator[None]:
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
        writing: Writing = Writing(),
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._before_retry = before_retry  # may the load go on after a failed attempt (its table still its own)?
        self.target = target
        self.columns = columns
        self._ledger = ledger
        self._dialect = dialect
        self._load_id = load_id
        self._retry = retry
        self._on_retry = on_retry
        self._pace = pace
        self._before_commit = before_commit  # the last word on a batch: raising rolls it back
        self._writing = writing
        begin = sql.begin_batch(target.schema, target.name, writing.lock and target.relkind != "f", writing.settings)
        prologue = [writing.prologue] if writing.prologue else []
        if writing.upsert is not None:
            prologue.append(writing.upsert.create_stage)
            empty = sql.empty_upsert_stage() + "; "
            self._copy_statement, self._skipping_statement = (
                empty + copy_statement("pg_temp", sql.UPSERT_STAGE, columns, dialect, skip) for skip in (False, True)
            )
            self._relation = sql.UPSERT_STAGE  # as the server's notices name it
        else:
            self._copy_statement, self._skipping_statement = (
                copy_statement(target.schema, target.name, columns, dialect, skip) for skip in (False, True)
            )
            self._relation = target.name
        # Off for the rest of the load once the server refuses ON_ERROR, or its notices do not come.
        self._skip_bad_values = writing.skip_bad_values
        self._types: tuple[str, ...] | None = None  # the columns' types, once a batch had rows skipped
        self._begin = "; ".join([begin, *prologue])
        self._turns = Turns(writing.committed) if writing.upsert is not None else None
        self._shared: asyncpg.Connection | None = None  # a dry run's one connection, in its one transaction
        self.rejected: list[Reject] = []  # a dry run's rejects, which no ledger keeps
        self._newline = dialect.newline.encode()
        self.copies = 0  # COPY statements sent, for the report and the fast-path test
        self._error_rate = ErrorRate()  # bad rows among those isolated so far: sizes the pieces

    async def _copy(
        self,
        conn: asyncpg.Connection,
        batch: Batch,
        tally: _Tally,
        data: Bytes,
        records: int,
        before: str = "",
        skips: Skips | None = None,
    ) -> int:
        """COPY `data`, which holds `records` records; MisreadRecords (a data error: the
        caller's transaction or savepoint takes the rows back) when the server took another
        number of rows, so that no record is counted as loaded but lost, or loaded twice.
        With `skips`, the server skips rows with bad values (ON_ERROR) and `skips` hears of
        them: Unresolved unless each row not loaded was heard of. An upsert then merges the
        rows, in the batch's turn."""
        self.copies += 1
        if skips is None:
            rows = await copy_rows(conn, before + self._copy_statement, data, self._pace)
            if rows != records:
                raise MisreadRecords(misread_message(data, rows, records))
        else:
            conn.add_log_listener(skips.hear)
            try:
                rows = await copy_rows(conn, before + self._skipping_statement, data, self._pace)
            finally:
                conn.remove_log_listener(skips.hear)
            skips.check(rows, records)
        upsert = self._writing.upsert
        if upsert is not None and self._turns is not None:
            await self._turns.wait(batch.number, await self._span(conn, upsert, batch, records))
            merged = await conn.fetchrow(upsert.merge)
            tally.inserted += merged["inserted"]
            tally.updated += merged["updated"]
        return rows

    @staticmethod
    async def _span(conn: asyncpg.Connection, upsert: Upsert, batch: Batch, records: int) -> Span | None:
        """The staged batch's key range, when it can be known: the whole batch is staged, and
        the key's order is one the client reproduces."""
        if upsert.span is None or records != batch.rows:
            return None
        row = await conn.fetchrow(upsert.span)
        if row is None:
            return NO_KEYS
        values = tuple(row.values())
        half = len(values) // 2
        return values[:half], values[half:]

    @contextlib.asynccontextmanager
    async def _attempt(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction of its own for one attempt at a batch; in a dry run,
        the load's one connection and transaction, with a savepoint for the batch (the batches
        before it stay, as they would have been committed)."""
        if not self._writing.dry_run:
            async with batch_connection(self._pool) as conn, batch_transaction(conn, self._begin):
                yield conn
            return
        if self._shared is None:
            self._shared = await self._pool.acquire()
            await self._shared.execute(self._begin)
        conn = self._shared
        await conn.execute(sql.BATCH_SAVEPOINT)
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.execute(sql.BATCH_UNDO)
            raise
        await conn.execute(sql.BATCH_KEEP)

    async def close(self) -> None:
        """A dry run's end: everything it sent is rolled back."""
        if self._shared is not None:
            with contextlib.suppress(Exception):
                await self._shared.execute("ROLLBACK")
            await self._pool.release(self._shared)
            self._shared = None

    async def load(self, batch: Batch) -> Outcome:
        """Load one batch, retrying transient failures; rows the server refuses become rejects.

        Exactly once, even when a commit's outcome is unknown (the connection died during
        COMMIT): every attempt first claims the batch's ledger row in its own transaction.
        If an earlier attempt committed, the claim finds the row and the attempt writes
        nothing; if that attempt is still in progress on the server, the claim waits on the
        row's unique index until it commits or rolls back, and then does the right thing.

        The fast path is one COPY of the batch's bytes. On PostgreSQL 17 and later it skips
        the rows whose values their columns' types refuse, and those become rejects in the
        same transaction (see onerror.py). Only when the server refuses the data does the
        batch go, in a new transaction, through `isolate`, which loads the good rows and
        returns the bad ones, recorded in the ledger in that same transaction. Without
        ON_ERROR, once the load's bad rows are so dense that a batch would almost surely be
        refused, batches go to `isolate` at once: the refused COPY would cost the whole
        batch's transfer, and the server's work up to the first bad row, for nothing.
        """
        committed = False
        try:
            outcome = await self._load(batch)
            committed = True
            return outcome
        finally:
            if self._turns is not None:
                self._turns.leave(batch.number, committed)

    def skip(self, batch: Batch) -> None:
        """The load stops before this batch: those after it must not merge before it."""
        if self._turns is not None:
            self._turns.leave(batch.number, committed=False)

    async def _load(self, batch: Batch) -> Outcome:
        refusal: BaseException | None = None  # the error of the COPY of the whole batch, for isolate
        isolating = False  # the batch needs isolate: its COPY was refused
        try:
            async for attempt in retrying(self._retry, self._on_retry):
                with attempt:
                    retries = attempt.retry_state.attempt_number - 1
                    if retries and self._before_retry is not None:
                        await self._before_retry()
                    # With ON_ERROR, a refused COPY costs only the rows up to its first refused
                    # row, which, when such rows are dense, are few: batches always go whole first.
                    doomed = not self._skip_bad_values and self._error_rate.doomed(batch.rows)
                    if not isolating and not doomed and not (self._writing.end_marker and holds_end_marker(batch.data, self._newline)):
                        whole = await self._load_whole(batch)
                        if isinstance(whole, Outcome):
                            return dataclasses.replace(whole, retries=retries)
                        refusal, isolating = whole, True
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
        Refuses to go on when the table's name has come to mean another table. A dry run
        claims nothing: it writes nothing to the ledger."""
        if self._writing.dry_run:
            return None
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

    async def _load_whole(self, batch: Batch) -> Outcome | BaseException | None:
        """The batch in one COPY: its Outcome. When the server refused the data: the error, from
        which `isolate` knows the first bad row; or None, for isolate to start from the batch's
        start (a COPY with ON_ERROR was refused, or left skipped rows unresolved: rows before the
        one it names may have been skipped). Once the server refuses ON_ERROR itself, or its
        notices do not come, the load goes on without it."""
        if self._skip_bad_values:
            try:
                return await self._load_fast(batch, skipping=True)
            except Unresolved as exc:
                if exc.unheard and self._skip_bad_values:
                    self._skip_bad_values = False
                    log.warning(
                        "loader: warning: lines %d-%d: %s, so PostgreSQL's notices do not reach the loader "
                        "(a pooler or proxy that drops them?); bad rows are isolated row by row from now on "
                        "(--no-copy-on-error saves the attempt)", batch.first_line, batch.last_line, exc,
                    )
                return None
            except Exception as exc:
                if is_data_error(exc):
                    return None
                if not isinstance(exc, asyncpg.PostgresError) or is_transient(exc) or isinstance(exc, asyncpg.UndefinedTableError):
                    raise
                if self._skip_bad_values:  # the server refuses ON_ERROR (Citus tables do): do without
                    self._skip_bad_values = False
                    log.info("COPY ... ON_ERROR refused (%s %s): bad rows are isolated row by row", sqlstate(exc), server_message(exc))
        try:
            return await self._load_fast(batch, skipping=False)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            return exc

    async def _load_fast(self, batch: Batch, skipping: bool) -> Outcome:
        async with self._attempt() as conn:
            done = await self._claim(conn, batch)
            if done is not None:
                return done
            tally = _Tally()
            if not skipping:
                rows = await self._copy(conn, batch, tally, batch.data, batch.rows)  # misread: isolated after the rollback
                await self._before_commit(batch)
                return Outcome(rows, 0, [], merged=self._merged(tally))
            skips = Skips(self._relation)
            rows = await self._copy(conn, batch, tally, batch.data, batch.rows, skips=skips)
            rejects: list[Reject] = []
            if skips.heard:
                if self._types is None:
                    self._types = await column_types(conn, self.target.schema, self.target.name, self.columns)
                found = await skipped_rejects(conn, batch, skips, self._dialect, self.columns, self._types)
                rejects = await self._keep_rejects(conn, batch, rows, found)
            await self._before_commit(batch)
            return Outcome(rows, len(rejects), rejects, merged=self._merged(tally))

    def _merged(self, tally: _Tally) -> tuple[int, int] | None:
        return (tally.inserted, tally.updated) if self._writing.upsert is not None else None

    async def _load_isolating(self, batch: Batch, refusal: BaseException | None) -> Outcome:
        async with self._attempt() as conn:
            done = await self._claim(conn, batch)
            if done is not None:
                return done
            tally = _Tally()

            await conn.execute(sql.PIECE_SAVEPOINT)
            before = ""  # the savepoint's move after the last piece, sent with the next one

            async def copy_in_savepoint(data: Bytes, records: int, keep: bool = True) -> int:
                nonlocal before
                try:
                    rows = await self._copy(conn, batch, tally if keep else _Tally(), data, records, before)
                except Exception as exc:
                    if is_data_error(exc):  # isolate goes on after it: undo just this piece
                        before = sql.PIECE_UNDO + "; "
                    raise
                before = (sql.PIECE_KEEP if keep else sql.PIECE_UNDO) + "; "
                return rows

            loaded, rejects = await isolate(batch, self._dialect, copy_in_savepoint, copy_line, refusal, self._error_rate)
            if before.startswith(sql.PIECE_UNDO):  # the last piece failed: out of the aborted state
                await conn.execute(sql.PIECE_UNDO)
            rejects = await self._keep_rejects(conn, batch, loaded, rejects)
            await self._before_commit(batch)
            return Outcome(loaded, len(rejects), rejects, merged=self._merged(tally))

    async def _keep_rejects(self, conn: asyncpg.Connection, batch: Batch, loaded: int, rejects: list[Reject]) -> list[Reject]:
        """Record a batch's rejects in its transaction (a dry run keeps them for its rejects
        file), as they are told: in a replace, naming the table rather than its stage."""
        if loaded + len(rejects) != batch.rows:
            raise LoaderError(
                f"lines {batch.first_line}-{batch.last_line}: {loaded} rows loaded and {len(rejects)} rejected "
                f"of {batch.rows} records; rolled back (a bug: please report it)"
            )
        if self._writing.table is not None:  # a replace's stage: its messages name the table
            stage, table = f'relation "{self.target.name}"', f'relation "{self._writing.table}"'
            rejects = [dataclasses.replace(r, message=r.message.replace(stage, table)) for r in rejects]
        if self._writing.dry_run:
            self.rejected.extend(rejects)
        else:
            await self._ledger.record_rejects(conn, self._load_id, batch.number, loaded, rejects)
        return rejects
