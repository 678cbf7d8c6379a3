"""One load, wired: source → batches → the stream of workers → sink, counted in a report.

`load` opens the source and reads its header, the control session takes the table's lock
and plans the run from the ledger (plan), the stream loads the batches (stream), and the
run ends by writing the rejects file and the load's final state in the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg

from . import onerror
from . import rejects as rejects_file
from .batching import Batch, Batcher, parse_header
from .concurrency import Concurrency
from .connect import connect, describe_server, open_pool, resolve_dsn, transaction_settings
from .errors import (
    TOO_MANY_CONNECTIONS,
    BadSource,
    Interrupted,
    LoaderError,
    SourceChanged,
    SourceFailed,
    TryAgainLater,
    UsageError,
    is_transient,
    server_message,
    sqlstate,
    transient_stop,
)
from .fileset import FileSet
from .infer import infer_types, records_of
from .ledger import Ledger
from .modes import Upsert, replace_stage_name, replace_stage_statements, stage_for_replace, switch_to_stage, upsert
from .options import ConnectOptions, CsvDialect, LoadOptions, check_writable
from .plan import OTHER_RUN, Plan, command_key, mtime, plan
from .pressure import ReplicaLag, connection_budget, require_monitor
from .progress import Waits
from .records import end_marker_ends_copy
from .rejects import REJECTS_SUFFIX, Reject
from .report import Report, SetReport, SourceOutcome
from .retry import say_retrying
from .session import ControlSession
from .sink import Sink, Writing
from .smallfiles import SmallFiles
from .smallfiles import usable as small_files_usable
from .source import Source, open_source
from .sql import MERGE_WORK_MEM, analyze
from .stop import Deadline, ReplicaWatch, Stop, Watcher, on_interrupt, unless_interrupted
from .stream import ReadAhead, Stream
from .target import Target, check_copy, create_table, resolve_target, table_exists
from .throttle import Pace, TokenBucket

log = logging.getLogger("loader")


def _columns(options: LoadOptions, target: Target, header: list[str] | None) -> tuple[str, ...]:
    if options.columns is not None:
        if header is not None and len(header) != len(options.columns):
            raise BadSource(
                f"{_shown(options)}: the header has {len(header)} fields but --columns names {len(options.columns)} columns"
            )
        return target.pick_columns(options.columns, "--columns")
    if header is not None:
        try:
            return target.pick_columns(header, f"the header of {_shown(options)}", header=True)
        except UsageError as exc:  # this file's header: another file's may be right
            raise BadSource(exc.message) from None
    return target.columns


def _stopped_state(exc: BaseException) -> str:
    """The ledger state of a load a run did not finish: interrupted when the next run is
    meant to resume it (a signal, the deadline, a lock or a file not ready), else failed."""
    return "interrupted" if isinstance(exc, (Interrupted, TryAgainLater, asyncio.CancelledError)) else "failed"


def _shown(options: LoadOptions) -> str:
    """The source as messages name it (a rejects file, not the temp file retry-rejects loads)."""
    return options.shown_as or options.source


def _rejects_path(options: LoadOptions) -> Path:
    return Path(options.rejects) if options.rejects else rejects_file.default_path(options.source)


class _Load:
    """One run of a load: set up on the control session, planned, streamed, and closed in the
    ledger. The session holds the table's lock throughout; the pool's connections only load
    batches."""

    def __init__(
        self,
        options: LoadOptions,
        source: Source,
        batcher: Batcher,
        session: ControlSession,
        report: Report,
        on_retry: Callable[[BaseException], None],
        verified: asyncio.Future[None] | None,
        shared: Shared | None = None,
        read: asyncio.Event | None = None,
    ) -> None:
        self.options = options
        self.shared = shared
        self.read = read  # set once the source is read through (or the load ends): a set's next file starts
        self.source = source
        self.header = batcher.header
        self.dialect = batcher.dialect  # with the source's line ending
        self.session = session
        self.report = report
        self.on_retry = on_retry
        self.verified = verified  # a compressed source, read through whole
        self.ledger = Ledger(options.ledger_schema)
        self.rejects_path = _rejects_path(options)
        self.streaming = False
        self.finished = False  # the ledger has the load's final state
        self.concurrency: Concurrency | None = None
        self.upsert: Upsert | None = None
        self.target: Target | None = None  # the table the load is for ...
        self.stage: Target | None = None  # ... and, in a replace, the one it loads into first
        self.rejected: list[Reject] = []  # a dry run's rejects (a load's are in the ledger)

    def original_line(self, line: int) -> int:
        lines = self.options.source_lines
        return lines[line - 1] if lines is not None and 0 < line <= len(lines) else line

    async def run(self, batches: ReadAhead, header_fields: list[str] | None, interrupt: asyncio.Event | None) -> None:
        try:
            async with self.session.turn():
                prepared = await self._prepare(header_fields)
            if prepared is None:
                return
            planned, target, columns, workers = prepared
            try:
                await self._load(planned, target, columns, workers, batches, interrupt)
            except BaseException as exc:
                with contextlib.suppress(TimeoutError):  # the other load of a set may hold the session
                    async with asyncio.timeout(5), self.session.turn():
                        await self._close_unfinished(planned.load_id, exc)
                raise
        finally:
            if self.read is not None:
                self.read.set()

    async def _prepare(self, header_fields: list[str] | None) -> tuple[Plan, Target, tuple[str, ...], int] | None:
        """Check the table and plan the load in the ledger; None when there is nothing to load."""
        options, report, conn, shared = self.options, self.report, self.session.conn, self.shared
        known = shared.target if shared is not None else None  # an earlier load of the set found it
        if shared is not None and shared.not_created:  # --create --dry-run: told once for the set
            report.note = shared.not_created
            return None
        if known is None and options.create and not await table_exists(conn, options.table):
            ddl, created = await self._create(conn, header_fields)
            if options.dry_run:
                log.warning("loader: --create --dry-run: %s does not exist; it would be created as:\n%s", options.table, ddl)
                report.note = f"dry run: {options.table} does not exist; nothing was created"
                if shared is not None:
                    shared.not_created = report.note
                return None
            if created:
                log.warning("loader: created %s:\n%s", options.table, ddl)
            else:
                log.warning("loader: %s was created meanwhile by another run: loading into it", options.table)
        target = known or await resolve_target(conn, options.table)
        report.table = target.display
        columns = _columns(options, target, header_fields)
        if shared is not None and columns in shared.checked:
            self.upsert = shared.checked[columns]
        else:
            await self._check(conn, target, columns)
            if shared is not None:
                shared.target, shared.checked[columns] = target, self.upsert
        if options.dry_run:  # one connection, one transaction, rolled back: nothing to hold or record
            workers, planned = 1, Plan(uuid.uuid4().hex, {})
        else:
            workers = await self._workers()
            await self.session.lock(target.oid, target.display)
            planned = await plan(conn, self.ledger, options, self.source, target, self.session.holder, self.session.renew)
        report.load_id = planned.load_id
        if planned.nothing_to_do:
            report.note, report.elsewhere = planned.nothing_to_do, planned.elsewhere
            log.info("%s: nothing to do: %s", _shown(options), planned.nothing_to_do)
            return None
        target.note_defaults(columns)
        self.finished = planned.verify_only  # a finished load, only re-read: its state stays as it is
        return planned, target, columns, workers

    async def _name(self, planned: Plan) -> None:
        application_name = f"{self.options.application_name} {planned.load_id}"[:63]
        if self.shared is not None:  # a file set's sessions go by its first load
            self.shared.application_name = self.shared.application_name or application_name
            application_name = self.shared.application_name
        await self.session.name(application_name, planned.load_id)

    async def _check(self, conn: asyncpg.Connection, target: Target, columns: tuple[str, ...]) -> None:
        """Before anything is read: the ledger, the table and the columns (a rolled-back COPY),
        the upsert's key, the right to watch replicas. A file set's loads of the same columns
        check once."""
        options = self.options
        if not options.dry_run:  # which leaves the ledger as it is, even absent
            await self.ledger.ensure(conn)
        await check_copy(conn, target, columns, options.dialect)
        if options.mode == "upsert":
            assert options.key is not None
            self.upsert = await upsert(conn, target, options.key, columns, update=options.on_conflict == "update")
        if options.max_replica_lag is not None:
            await require_monitor(conn)

    async def _create(self, conn: asyncpg.Connection, header_fields: list[str] | None) -> tuple[str, bool]:
        """--create: the columns the header (or --columns) names, typed from the data (see
        create_table)."""
        options = self.options
        names = list(options.columns or header_fields or [])
        if not names:
            raise UsageError("--create needs the columns' names: a header, or --columns")
        records = records_of(options.create_from or (options.source,), options.dialect, options.infer_rows)
        types = await asyncio.to_thread(infer_types, records, len(names))
        return await create_table(conn, options.table, list(zip(names, types, strict=True)), options.dry_run)

    async def _workers(self) -> int:
        """--workers, lowered to what the server can spare (see pressure.ConnectionBudget);
        asked once for a file set, whose loads share the pool."""
        if self.shared is not None:
            if self.shared.workers is None:
                self.shared.workers = await self._spare_workers()
            return self.shared.workers
        return await self._spare_workers()

    async def _spare_workers(self) -> int:
        wanted = self.options.workers
        if self.session.pooled:
            log.warning(
                "loader: connected through a connection pooler: its pool's limit cannot be read from the server; "
                "using %s %d as given", "--max-workers" if self.options.auto_workers else "--workers", wanted,
            )
            return wanted
        budget = await connection_budget(self.session.conn)
        if budget.allowed < 1:
            raise TryAgainLater(f"no connection to spare for a load: {budget.describe()}")
        if wanted > budget.allowed:
            kind = "--max-workers" if self.options.auto_workers else "--workers"
            log.warning("loader: %s %d lowered to %d: %s", kind, wanted, budget.allowed, budget.describe())
            return budget.allowed
        return wanted

    async def _load(
        self,
        planned: Plan,
        target: Target,
        columns: tuple[str, ...],
        workers: int,
        batches: ReadAhead,
        interrupt: asyncio.Event | None,
    ) -> None:
        options, report = self.options, self.report
        report.workers = workers
        if planned.committed:
            log.info("%s: resuming load %s: %d batches were committed by earlier runs", _shown(options), planned.load_id, len(planned.committed))
        else:
            log.info("%s: loading into %s as load %s, %s workers", _shown(options), target.display, planned.load_id,
                     f"auto, at most {workers}" if options.auto_workers else workers)
        self.concurrency = concurrency = Concurrency(workers, options.auto_workers)
        stop = Stop()
        replicas = self._replica_watch(stop)
        async with self.session.turn():
            await self._name(planned)
            into, writing = await self._writing(planned, target)
        shared = self.shared
        if shared is not None and shared.pool is not None:
            pool = shared.pool
        else:
            pool = await open_pool(
                options, workers, self.session.application_name, self._on_connect_retry, lazy=options.auto_workers,
                pooled=self.session.pooled,
            )
            if shared is not None:
                shared.pool = pool
        error: LoaderError | None = None
        sink: Sink | None = None
        try:
            pace = Pace(TokenBucket(options.max_rate.amount), options.max_rate.unit) if options.max_rate else None
            # A dry run cannot retry a batch: a transient failure ends its one transaction.
            retry = dataclasses.replace(options.retry, attempts=1) if options.dry_run else options.retry
            sink = Sink(
                pool, into, columns, self.dialect, self.ledger, planned.load_id, retry, self._on_batch_retry, pace,
                before_commit=self._before_commit, writing=writing, before_retry=self._hold_table,
            )
            stream = Stream(
                batches, sink, planned, report, concurrency, workers, options.max_errors,
                changed=lambda batch, what: self._changed(planned, batch, what),
                position=lambda: _position(self.source),
                original_line=self.original_line,
                replicas=replicas,
                stop=stop,
                read=self.read,
            )
            self.streaming = True
            try:
                await stream.run(self._watchers(interrupt, replicas))
            except LoaderError as exc:
                error = exc
            report.copies = sink.copies
            self.rejected = sink.rejected
        finally:
            if sink is not None:
                await sink.close()
            if shared is None:
                await pool.close()
        report.concurrency = concurrency.summary
        await self._finish(planned, error, stream.loaded_now)

    async def _writing(self, planned: Plan, target: Target) -> tuple[Target, Writing]:
        """Where batches go and how, by mode (see modes.py)."""
        options, conn = self.options, self.session.conn
        self.target = target
        settings = transaction_settings(options)
        if self.upsert is not None:
            settings.update(MERGE_WORK_MEM)
        skip_bad_values = options.copy_on_error and onerror.usable(conn.get_server_version(), self.dialect)
        if skip_bad_values:  # the server's notices of skipped rows must reach the loader
            settings.update(onerror.SETTINGS)
        writing = Writing(
            settings=settings, upsert=self.upsert, dry_run=options.dry_run,
            committed=frozenset(planned.committed), skip_bad_values=skip_bad_values,
            end_marker=end_marker_ends_copy(conn.get_server_version()),
        )
        if options.mode != "replace" or planned.verify_only:
            return target, writing
        if options.dry_run:  # a temporary stage, made in the dry run's transaction
            stage = Target(0, "pg_temp", replace_stage_name(planned.load_id), target.columns)
            prologue = await replace_stage_statements(conn, target, stage.schema, stage.name)
            return stage, dataclasses.replace(writing, prologue="; ".join(prologue), lock=False, table=target.name)
        self.stage = await stage_for_replace(conn, target, options.ledger_schema, planned.load_id)
        return self.stage, dataclasses.replace(writing, table=target.name)

    def _replica_watch(self, stop: Stop) -> ReplicaWatch | None:
        options = self.options
        if options.max_replica_lag is None:
            return None
        meter = ReplicaLag()

        async def measure() -> float:
            async with self.session.turn():
                lag, _ = await meter.measure(await self.session.get())
            return lag

        def waiting(now: bool) -> None:
            self.report.waiting_for_replicas = now

        return ReplicaWatch(options.max_replica_lag, options.max_lag_wait, measure, stop, log.warning, waiting)

    def _watchers(self, interrupt: asyncio.Event | None, replicas: ReplicaWatch | None) -> list[Watcher]:
        async def keep_session() -> LoaderError | None:
            await self.session.keep()
            return None

        watchers: list[Watcher] = [keep_session]
        if interrupt is not None:
            watchers.append(lambda: on_interrupt(interrupt))
        if self.options.deadline is not None:
            watchers.append(Deadline(self.options.deadline))
        if replicas is not None:
            watchers.append(replicas)
        return watchers

    async def _finish(self, planned: Plan, error: LoaderError | None, loaded_now: dict[int, tuple[int, int]]) -> None:
        async with self.session.turn():
            await self._end(planned, error, loaded_now)

    async def _end(self, planned: Plan, error: LoaderError | None, loaded_now: dict[int, tuple[int, int]]) -> None:
        """Write the rejects file, check that nothing was lost or miscounted, and record the
        load's final state in the ledger (its commit is the load's one synchronous commit)."""
        report = self.report
        conn = await self.session.get()
        if self.options.dry_run:
            await self._finish_dry_run(planned, error)
            return
        if planned.verify_only and error is None:
            report.note = f"already loaded by load {planned.load_id}; the source is unchanged (verified)"
            await self.ledger.update_source(conn, planned.load_id, self.source.size, mtime(self.source))
            return
        if isinstance(error, SourceChanged) and planned.verify_only:
            raise error
        # Rows rejected now or by an earlier run: a new load that rejected none has nothing to write.
        if (report.rows_rejected or planned.committed) and await conn.fetchval(self.ledger.count_rejects_sql, planned.load_id):
            await self._write_rejects(planned.load_id)
        if error is None and report.rows_read != report.rows_loaded + report.rows_rejected + report.rows_skipped:
            error = LoaderError(
                f"accounting mismatch: read {report.rows_read} rows, loaded {report.rows_loaded}, "
                f"rejected {report.rows_rejected}, skipped {report.rows_skipped} (a bug: please report it)"
            )
        if error is None and self.stage is None and await self.ledger.finish_whole(conn, planned.load_id, sorted(loaded_now)):
            self.finished = True  # the usual end: one statement checks the batches and marks it done
            return
        if error is None:
            error = await self._lost_batches(conn, planned.load_id, loaded_now)
        if error is None and self.stage is not None and self.target is not None:
            await self._switch(conn, planned, self.target, self.stage)
            return
        state = "succeeded" if error is None else _stopped_state(error)
        await self.ledger.finish(conn, planned.load_id, state, error.message if error else None)
        self.finished = True
        if error is not None:
            raise error

    async def _switch(self, conn: asyncpg.Connection, planned: Plan, target: Target, stage: Target) -> None:
        """A replace's end: in one transaction the table's rows become the stage's and the load
        is marked done, so a run stopped before it leaves the old rows, and its re-run resumes."""
        try:
            async with conn.transaction():
                await switch_to_stage(conn, target, stage)
                await self.ledger.finish(conn, planned.load_id, "succeeded", None)
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            raise LoaderError(
                f"could not replace the rows of {target.display}: {server_message(exc)}; it keeps its old rows, "
                "and the loaded rows wait for the next run of the same command"
            ) from None
        self.finished = True
        await conn.execute(analyze(target.schema, target.name))

    async def _finish_dry_run(self, planned: Plan, error: LoaderError | None) -> None:
        """Nothing was committed, nor written to the ledger: the rejects file comes from the
        rejects the run collected."""
        if self.rejected:
            async def collected() -> AsyncIterator[Reject]:
                for r in self.rejected:
                    yield r

            await self._write_rejects_file(planned.load_id, collected())
        self.finished = True
        if error is not None:
            raise error

    async def _close_unfinished(self, load_id: str, exc: BaseException) -> None:
        """Whatever stopped the run, the ledger must not go on saying `running`: the next run
        resumes either way, but `status` and the monitoring read this state. In a turn."""
        if self.finished:
            return
        message = exc.message if isinstance(exc, LoaderError) else f"unexpected {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                conn = await self.session.get()
                await self.ledger.finish(conn, load_id, _stopped_state(exc), message)
                self.finished = True

    async def _before_commit(self, batch: Batch) -> None:
        """The last word on each batch before it commits: its rows must come from the source's
        real bytes. The file is still as it was opened, and a compressed one is whole."""
        self.source.check_unchanged(f"lines {batch.first_line}-{batch.last_line}")
        if self.report.bytes_loaded is not None:  # for progress: how far into the file batches commit
            self.report.bytes_loaded = max(self.report.bytes_loaded, batch.offset + len(batch.data))
        if self.verified is not None:
            await asyncio.shield(self.verified)

    async def _hold_table(self) -> None:
        """Before a batch is tried again (its connection may have died with the server): the
        load's own session still holds the table's lease, or takes it back first (TryAgainLater
        if another load took it meanwhile). No batch loads for a load that lost its table."""
        async with self.session.turn():
            await self.session.get()

    def _on_connect_retry(self, exc: BaseException) -> None:
        """A pool connection is retried: told to the load running now (in a file set, the
        pool outlives the load that opened it)."""
        (self.shared.on_retry if self.shared is not None else self.on_retry)(exc)

    def _on_batch_retry(self, exc: BaseException) -> None:
        """A batch will be retried; "too many connections" also means: take one fewer."""
        self.on_retry(exc)
        if sqlstate(exc) == TOO_MANY_CONNECTIONS and self.concurrency is not None:
            self.concurrency.too_many_connections()

    async def _lost_batches(
        self, conn: asyncpg.Connection, load_id: str, loaded_now: dict[int, tuple[int, int]]
    ) -> LoaderError | None:
        """Batches commit asynchronously; a server crash can lose the last ones (their rows and
        ledger rows together). Before the load's final, synchronous commit makes everything
        durable, check that every batch this run committed is still in the ledger."""
        present = await self.ledger.committed_batches(conn, load_id)
        lost = [number for number in loaded_now if number not in present]
        if not lost:
            return None
        rows = sum(loaded_now[number][0] for number in lost)
        rejected = sum(loaded_now[number][1] for number in lost)
        self.report.rows_loaded -= rows
        self.report.rows_rejected -= rejected
        self.report.rows_read -= rows + rejected
        return TryAgainLater(
            f"the server lost {len(lost)} committed batches ({rows:,} rows) in a crash; "
            "run the same command again to load them (the ledger knows which)"
        )

    async def _write_rejects(self, load_id: str) -> None:
        conn = await self.session.get()
        async with conn.transaction():
            await self._write_rejects_file(load_id, self.ledger.rejects(conn, load_id))

    async def _write_rejects_file(self, load_id: str, rows: AsyncIterator[Reject]) -> None:
        """The rejects file, each row under its line in the original source."""

        async def remapped() -> AsyncIterator[Reject]:
            async for r in rows:
                yield Reject(self.original_line(r.line), r.sqlstate, r.message, r.record)

        await rejects_file.write(self.rejects_path, load_id, self.header, remapped(), self.options.dialect.python_encoding)
        self.report.rejects_file = str(self.rejects_path)

    def _changed(self, planned: Plan, batch: Batch | None, what: str) -> SourceChanged:
        where = f"lines {batch.first_line}-{batch.last_line}" if batch else "its end"
        committed = "rows it loaded" if planned.verify_only else "rows the earlier runs committed"
        again = "--force" if planned.verify_only else "--restart"
        advice = (
            f"{again} loads the whole file as a new load, and the {committed} stay in the table: rows the file "
            "still has would then be there twice (delete the old rows first, or load it with --mode replace, "
            "or --mode upsert --key ...)"
        )
        return SourceChanged(f"{_shown(self.options)} changed since load {planned.load_id} read it: {where} {what}; {advice}")


def _position(source: Source) -> int:
    try:
        return source.raw.tell()
    except (OSError, ValueError):
        return 0


class Shared:
    """What the loads of a file set share: the load's session (with the table's lease, held
    from the first load to the end of the set; loads in flight together take turns on it),
    the pool, and what the first load found out about the table."""

    def __init__(self) -> None:
        self.session: ControlSession | None = None
        self.pool: asyncpg.Pool | None = None
        self.workers: int | None = None
        self.target: Target | None = None
        self.application_name: str | None = None
        self.not_created: str | None = None  # --create --dry-run: the table is not there to load into
        self.checked: dict[tuple[str, ...], Upsert | None] = {}  # columns checked, and their upsert
        self.writable: set[Path] = set()  # rejects folders a file can be created in
        self.on_retry: Callable[[BaseException], None] = lambda exc: None  # the running load's

    @contextlib.asynccontextmanager
    async def session_for(
        self,
        options: LoadOptions,
        on_retry: Callable[[BaseException], None],
        interrupt: asyncio.Event | None,
        waiting: Callable[[str], None],
    ) -> AsyncIterator[ControlSession]:
        """The set's session, opened by its first load, told about the load running now."""
        if self.session is None:
            session = ControlSession(options, on_retry, interrupt, waiting)
            self.session = await session.__aenter__()
        self.session.on_retry, self.session.interrupt, self.session.waiting = on_retry, interrupt, waiting
        self.on_retry = on_retry
        yield self.session

    async def small_files(
        self, options: LoadOptions, sources: Sequence[str], loaded: Callable[[int, str, Report], None],
        on_start: Callable[[Report], None] | None,
    ) -> SmallFiles | None:
        """Groups for the set's small files, once its first load found the table, checked its
        columns and took the table (None until then)."""
        session, target = self.session, self.target
        if session is None or session.lease is None or target is None or not self.checked or self.workers is None:
            return None
        first = uuid.uuid4().hex  # the first small file's load, if no load of the set named its sessions
        if self.application_name is None:
            self.application_name = f"{options.application_name} {first}"[:63]
        if self.pool is None:
            self.pool = await open_pool(
                options, self.workers, self.application_name, self.on_retry, lazy=options.auto_workers, pooled=session.pooled,
            )
        columns = next(iter(self.checked))

        def columns_of(header: list[str] | None) -> tuple[str, ...]:
            return _columns(options, target, header)

        progress = Report(source="small files, several to a transaction", table=target.display, load_id="", workers=self.workers)
        return SmallFiles(
            options, sources, session, self.pool, target, columns, columns_of, self.workers, loaded,
            (self.application_name, first), progress, on_start,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.session is not None:
            await self.session.__aexit__(None, None, None)


async def load(
    options: LoadOptions,
    interrupt: asyncio.Event | None = None,
    on_start: Callable[[Report], None] | None = None,
    shared: Shared | None = None,
    read: asyncio.Event | None = None,
) -> Report:
    """Run one `loader import`; returns the report, raises LoaderError when it cannot finish
    (with the report of what was done attached as `.report`). Setting `interrupt` stops the
    load cleanly: no new batch starts, in-flight ones finish, the load is marked interrupted.
    `on_start` receives the live report (for progress displays)."""
    started = time.monotonic()
    # Found now, not after the load (a file set's folders once).
    check_writable(_rejects_path(options), "--rejects", shared.writable if shared is not None else None)
    source = open_source(options.source)
    try:
        batcher = Batcher.of_load(source, options)
        header_fields = None
        record = await asyncio.to_thread(_begin_reading, source, batcher, options.dialect.header)
        if record is not None:
            header_fields = parse_header(record, options.dialect, _shown(options))
        report = Report(
            source=_shown(options), table=options.table, load_id="", workers=options.workers, mode=options.mode,
            dry_run=options.dry_run,
        )
        if options.mode == "upsert":
            report.rows_inserted = report.rows_updated = 0
        report.bytes_total = source.size
        report.bytes_loaded = None if source.compressed else 0  # see _before_commit
        waits = Waits(report, options)  # why the load waits, for progress displays

        def on_retry(exc: BaseException) -> None:
            report.count_retry(exc)
            waits.retry(exc)
            say_retrying(exc)

        if on_start is not None:
            on_start(report)
        batches = ReadAhead(batcher)  # reads while the load connects and plans
        stop_verifying = threading.Event()
        verified = asyncio.ensure_future(asyncio.to_thread(source.verify, stop_verifying)) if source.compressed else None
        try:
            waits.connecting()
            opened = (
                ControlSession(options, on_retry, interrupt, waits.table_held)
                if shared is None
                else shared.session_for(options, on_retry, interrupt, waits.table_held)
            )
            async with opened as session:
                waits.done()
                job = _Load(options, source, batcher, session, report, on_retry, verified, shared, read)
                try:
                    await unless_interrupted(job.run(batches, header_fields, interrupt), interrupt, until=lambda: job.streaming)
                except Exception as exc:  # batches retry their own; the load's session does not
                    if not is_transient(exc):
                        raise
                    raise transient_stop(exc) from None
        except LoaderError as exc:
            report.elapsed_s = time.monotonic() - started
            exc.report = report if report.load_id and not isinstance(exc, UsageError) else None
            raise
        finally:
            batches.cancel()
            if verified is not None:
                stop_verifying.set()
                await asyncio.gather(verified, return_exceptions=True)
    finally:
        source.close()
    report.elapsed_s = time.monotonic() - started
    return report


def _begin_reading(source: Source, batcher: Batcher, header: bool) -> bytes | None:
    """In a thread: the header record (or, without one, the line ending, before any batch is
    sent), and the file's fingerprint, which the plan needs."""
    source.fingerprint()
    if header:
        return batcher.read_header()
    batcher.start()
    return None


LANES = 2  # the files of a set in flight at once: the next one starts while one ends


async def load_set(
    options: LoadOptions,
    files: FileSet,
    interrupt: asyncio.Event | None = None,
    on_start: Callable[[Report], None] | None = None,
) -> SetReport:
    """Load each file of a set as a load of its own (exactly once per file), in the set's
    order. The first file loads alone: it checks (or creates) the table for the others. Then
    each next file starts once the one before is read through, so that its first batches
    load while the last ones of the file before finish (see `lanes`).

    A source that cannot be loaded (missing, unreadable, corrupt, changed since it was
    loaded, a header the table lacks) is told by name and the others still load; any other
    failure (another load holds the table, the deadline, a signal) stops the run: no file
    starts after it, and the next run of the same command takes up what is left."""
    started = time.monotonic()
    result = SetReport(table=options.table, mode=options.mode, dry_run=options.dry_run, empty=files.empty)
    for pattern in files.empty:
        log.warning("loader: warning: %s matches no file", pattern)
    rejects = _rejects_paths(options, files.sources)
    if options.create:
        options = dataclasses.replace(options, create_from=files.sources)
    if options.mode == "append" and not (options.dry_run or options.force or options.restart):
        options = dataclasses.replace(options, command=command_key(options, files.arguments))
    # One at a time: an upsert's files merge in order, a dry run holds one transaction, and
    # --max-rate paces one load.
    lanes = LANES if options.mode == "append" and not options.dry_run and options.max_rate is None else 1
    shared = Shared()
    outcomes: dict[int, SourceOutcome] = {}
    stops: list[LoaderError] = []  # why the run stops (the first one counts)

    async def one(number: int, path: str, read: asyncio.Event) -> None:
        try:
            one_options = dataclasses.replace(options, source=path, rejects=rejects[path])
            report = await load(one_options, interrupt, on_start, shared, read)
        except (BadSource, SourceFailed) as exc:  # this source's own trouble
            message = exc.message if path in exc.message else f"{path}: {exc.message}"
            log.error("loader: error: %s", message)
            outcomes[number] = SourceOutcome(path, "failed", exc.report, message, exc.exit_code)
        except LoaderError as exc:
            log.error("loader: error: %s", exc.message)
            began = exc.report is not None and bool(exc.report.load_id)
            outcomes[number] = SourceOutcome(path, "stopped" if began else "not-started", exc.report, exc.message, exc.exit_code)
            stops.append(exc)
        else:
            result.table = report.table  # as the server names it
            state = (
                OTHER_RUN if report.elsewhere == OTHER_RUN else "skipped" if report.note
                else "loaded-with-rejects" if report.rows_rejected else "loaded"
            )
            outcomes[number] = SourceOutcome(path, state, report, None, report.exit_code)

    running: set[asyncio.Task[None]] = set()
    small: SmallFiles | None = None
    grouping = small_files_usable(options)

    def loaded_small(number: int, path: str, report: Report) -> None:
        result.table = report.table
        outcomes[number] = SourceOutcome(path, "loaded", report, None, report.exit_code)

    def stopping() -> bool:
        return bool(stops) or (interrupt is not None and interrupt.is_set())

    async def guarded(step: Awaitable[bool | None]) -> bool:
        """A step of the small files' groups; its failure stops the run (a group that did not
        commit leaves its files to the next run)."""
        try:
            return bool(await step)
        except LoaderError as exc:
            stop = exc
        except Exception as exc:
            if not is_transient(exc):
                raise
            stop = transient_stop(exc)
        log.error("loader: error: %s", stop.message)
        stops.append(stop)
        return False

    async def offer(number: int, path: str) -> bool:
        nonlocal small
        if small is None:
            small = await shared.small_files(options, files.sources, loaded_small, on_start)
        return small is not None and await small.offer(number, path)

    async def in_lanes(numbered: Sequence[tuple[int, str]]) -> None:
        """Load each file in order; once the set's first file has found the table, small new
        files go in groups (see smallfiles.py), the others the usual way."""
        nonlocal running
        for number, path in numbered:
            while len(running) >= (lanes if number > 1 else 1):
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a bug in a load is not a file's failure: it ends the run
            if stopping():
                break
            if grouping and number > 0 and await guarded(offer(number, path)):
                continue
            if stopping():
                break
            read = asyncio.Event()
            task = asyncio.create_task(one(number, path, read))
            running.add(task)
            # The next file starts once this one is read through (or ended): its last batches
            # load while the next one's first do, one file's buffers at a time, in order.
            waiting = asyncio.ensure_future(read.wait())
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        if small is not None and not stopping():
            await guarded(small.flush())

    try:
        await in_lanes(list(enumerate(files.sources)))
        # The files the groups did not take load the usual way, meanwhile, as they are told;
        # the groups in flight commit even if the run stops.
        while small is not None:
            declined = small.take_declined()
            if declined and not stopping():
                grouping = False
                await in_lanes(declined)
                continue
            if not small.busy:
                break
            await guarded(small.wait())  # then what those declined, if the run goes on
        if running:
            await asyncio.gather(*running)
        # Sources another load had at the time, once more: a run of the same command that died
        # left its source to whoever comes next, and a load of the same content has ended.
        for number, path in enumerate(files.sources):
            if stops or (interrupt is not None and interrupt.is_set()):
                break
            earlier = outcomes.get(number)
            if earlier is not None and earlier.report is not None and earlier.report.elsewhere is not None:
                await one(number, path, asyncio.Event())
                if earlier.state == OTHER_RUN and outcomes[number].state in (OTHER_RUN, "skipped"):
                    outcomes[number] = earlier  # it was (or is being) loaded by that run
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if small is not None:
            await small.cancel()
        await shared.close()
        result.elapsed_s = time.monotonic() - started
    result.sources = [outcomes.get(n) or SourceOutcome(path, "not-started") for n, path in enumerate(files.sources)]
    if stops:
        result.stopped(stops[0].exit_code)
    elif result.count("not-started"):  # a signal between two files
        result.stopped(Interrupted.exit_code)
    return result


def _rejects_paths(options: LoadOptions, sources: Sequence[str]) -> dict[str, str | None]:
    """Each source's rejects file: next to it, or in the --rejects directory under its file
    name (two sources of one name there: exit 2 before anything loads)."""
    if options.rejects is None:
        return dict.fromkeys(sources)
    if not Path(options.rejects).is_dir():
        if len(sources) > 1:
            raise UsageError(f"--rejects {options.rejects}: with several sources, name a directory (each source's rejects go there under its file name)")
        return dict.fromkeys(sources, options.rejects)
    paths: dict[str, str | None] = {}
    owners: dict[str, str] = {}
    for source in sources:
        path = str(Path(options.rejects) / (Path(source).name + REJECTS_SUFFIX))
        if path in owners:
            raise UsageError(f"--rejects {options.rejects}: {owners[path]} and {source} would both write {path}")
        owners[path] = paths[source] = path
    return paths


async def retry_rejects(rejects_path: str, options: LoadOptions, interrupt: asyncio.Event | None = None) -> Report:
    """Load the (fixed) records of a rejects file with the original load's options; rows still
    refused go to a new rejects file, reported under their original line numbers."""
    previous = rejects_file.read(Path(rejects_path))
    if options.dialect.header and previous.header is None:
        raise UsageError(
            f"{rejects_path} has no header row, so the original load had none: pass --no-header (and --columns if needed)"
        )
    lines: list[int] = []
    fd, tmp = tempfile.mkstemp(prefix="loader-retry-", suffix=".csv")
    try:
        with os.fdopen(fd, "wb") as out:
            header = [(1, previous.header)] if options.dialect.header and previous.header is not None else []
            for line, record in header + [(r.line, r.record) for r in previous.rejects]:
                out.write(record + b"\n")
                lines.extend(line + i for i in range(record.count(b"\n") + 1))
        derived = dataclasses.replace(
            options,
            source=tmp,
            load_name=options.load_name or f"retry-rejects {os.path.realpath(rejects_path)}",
            rejects=options.rejects or str(rejects_file.default_path(rejects_path)),
            source_lines=tuple(lines),
            shown_as=rejects_path,
        )
        return await load(derived, interrupt)
    finally:
        os.unlink(tmp)


@dataclasses.dataclass(frozen=True)
class Original:
    """What a load was told of its source and target, as its ledger row keeps it."""

    table: str
    dialect: CsvDialect
    columns: tuple[str, ...] | None


async def original_load(rejects_path: str, options: ConnectOptions) -> Original:
    """The table and CSV options of the load that wrote a rejects file (the file names it)."""
    load_id = rejects_file.read(Path(rejects_path)).load_id
    retell = "pass --table and the original load's CSV options"
    if load_id is None:
        raise UsageError(f"{rejects_path} does not name the load it comes from (an earlier version wrote it): {retell}")
    conn = await connect(options)
    try:
        ledger = Ledger(options.ledger_schema)
        row = await ledger.load(conn, load_id) if await ledger.exists(conn) else None
    finally:
        await conn.close()
    if row is None:
        raise UsageError(
            f"load {load_id}, which {rejects_path} comes from, is not in the ledger (schema {options.ledger_schema}) "
            f"of {describe_server(resolve_dsn(options.dsn))}: {retell}"
        )
    kept = json.loads(row["boundaries"])
    dialect = CsvDialect(
        delimiter=kept["delimiter"], quote=kept["quote"], escape=kept["escape"], null=kept.get("null", CsvDialect.null),
        encoding=kept["encoding"], header=kept["header"],
    )
    columns = kept.get("columns")
    return Original(row["target_table"], dialect, tuple(columns) if columns else None)


async def status(options: ConnectOptions, table: str | None, limit: int) -> list[dict[str, object]]:
    """Recent loads from the ledger, newest first (all tables, or the one named)."""
    conn = await connect(options)
    try:
        ledger = Ledger(options.ledger_schema)
        if not await ledger.exists(conn):
            return []
        display = None
        if table is not None:
            display = (await resolve_target(conn, table)).display
        rows = await ledger.recent(conn, display, limit)
    finally:
        await conn.close()
    return [
        {
            "load_id": r["load_id"],
            "table": r["target_table"],
            "source": r["source"],
            "state": r["state"],
            "runs": r["runs"],
            "rows_loaded": r["rows_loaded"],
            "rows_rejected": r["rows_rejected"],
            "mode": r["mode"],
            "started": r["started_at"].isoformat(),
            "finished": r["finished_at"].isoformat() if r["finished_at"] else None,
            "seconds": round(float(r["seconds"]), 1),
            "message": r["message"],
        }
        for r in rows
    ]
