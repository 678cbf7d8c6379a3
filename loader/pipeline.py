"""One load, wired: source → batches → bounded queue → N workers → sink, counted in a report.

The reader runs in a thread (file reads and decompression release the GIL), one batch
ahead, and hands batches to a queue of `workers` places, so at most 2 × workers + 2
batches are in memory and the reader waits whenever the workers are busy: memory stays
flat whatever the file's size. Each worker owns one pooled connection at a time, so the server sees at most
`workers` loading connections, plus the load's own session that holds the table's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import asyncpg

from . import rejects as rejects_file
from . import sql
from .batching import Batch, Batcher, parse_header
from .errors import Interrupted, LoaderError, SourceChanged, TryAgainLater, UsageError, sqlstate
from .ledger import Ledger, lock_table
from .options import LoadOptions, check_writable
from .rejects import Reject
from .pressure import ReplicaLag, connection_budget, require_monitor
from .report import RejectNote, Report
from .retry import TOO_MANY_CONNECTIONS
from .sink import Sink, Target, check_copy, connect, open_pool, resolve_target
from .source import Source, open_source
from .throttle import ConcurrencyController, Gate, TokenBucket


log = logging.getLogger("loader")
T = TypeVar("T")

SESSION_CHECK_S = 0.5
INTERRUPT_GRACE_S = 3.0  # after SIGINT/SIGTERM or the deadline, how long batches in flight may take
REPLICA_POLL_S = 0.5


def _columns(options: LoadOptions, target: Target, header: list[str] | None) -> tuple[str, ...]:
    if options.columns is not None:
        if header is not None and len(header) != len(options.columns):
            raise UsageError(
                f"the header has {len(header)} fields but --columns names {len(options.columns)} columns"
            )
        return target.pick_columns(options.columns, "--columns")
    if header is not None:
        return target.pick_columns(header, f"the header of {options.source}")
    return target.columns


def _boundaries(options: LoadOptions) -> dict[str, object]:
    """What decides where batches are cut: the same values cut the same batches again."""
    d = options.dialect
    return {
        "delimiter": d.delimiter,
        "quote": d.quote,
        "escape": d.escape_char,
        "encoding": d.python_encoding,
        "header": d.header,
        "batch_rows": options.batch_rows,
        "batch_bytes": options.batch_bytes,
    }


def _source_name(source: Source) -> str:
    return "-" if source.is_stdin else os.path.abspath(source.name)


def _load_key(options: LoadOptions, source: Source, target: Target) -> str | None:
    """Runs of the same command on the same source and table are one load; None: not resumable."""
    if options.load_name is not None:
        identity = "name:" + options.load_name
    elif source.is_stdin:
        return None
    else:
        identity = "file:" + os.path.realpath(source.name)
    return hashlib.sha256(f"{identity}\0{target.oid}".encode()).hexdigest()[:32]


def _rejects_path(options: LoadOptions) -> Path:
    return Path(options.rejects) if options.rejects else rejects_file.default_path(options.source)


def _mtime(source: Source) -> float | None:
    return None if source.is_stdin else os.stat(source.name).st_mtime


class _ReadAhead:
    """The batcher's batches, read in a thread one ahead of the one asked for. Created before
    the load is planned, so the first batch is ready when the pool's connections are."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self._batches = iter(batcher)
        self._next: asyncio.Future[Batch | None] | None = self._read()

    def _read(self) -> asyncio.Future[Batch | None]:
        return asyncio.ensure_future(asyncio.to_thread(next, self._batches, None))

    async def get(self) -> Batch | None:
        if self._next is None:
            return None
        batch = await self._next
        self._next = self._read() if batch is not None else None
        return batch

    def cancel(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None


@dataclass
class _Plan:
    load_id: str
    committed: dict[int, asyncpg.Record]  # batches earlier runs committed: skip them after checking
    verify_only: bool = False  # the load succeeded before: only check that the source is unchanged
    nothing_to_do: str | None = None  # why this run has no work


class _Session:
    """The load's own connection, which holds the table's lock. When the server restarts under
    it, it reconnects and takes the lock again, or stops the load (exit 75) if another load
    took the table in the meantime."""

    def __init__(self, options: LoadOptions, conn: asyncpg.Connection, on_retry: Callable[[BaseException], None]) -> None:
        self.options = options
        self.conn = conn
        self.on_retry = on_retry
        self.application_name = options.application_name
        self.table: tuple[int, str] | None = None  # (oid, name) once the lock is held

    async def lock(self, table_oid: int, table: str) -> None:
        await lock_table(self.conn, table_oid, table, self.options.wait_lock)
        self.table = (table_oid, table)

    async def name(self, application_name: str) -> None:
        self.application_name = application_name
        await self.conn.execute(sql.SET_APPLICATION_NAME, application_name)

    async def get(self) -> asyncpg.Connection:
        if self.conn.is_closed():
            await self.reconnect()
        return self.conn

    async def reconnect(self) -> None:
        log.warning("loader: the load's session was lost (server restart?): reconnecting")
        self.conn = await connect(self.options, on_retry=self.on_retry)
        await self.conn.execute(sql.SET_APPLICATION_NAME, self.application_name)
        if self.table is not None:  # taken back at once, or another load got it meanwhile: exit 75
            await lock_table(self.conn, *self.table, wait=0.0)

    async def keep(self) -> None:
        """Watch the session while batches load, so the lock is taken back as soon as it can be."""
        while True:
            await asyncio.sleep(SESSION_CHECK_S)
            if self.conn.is_closed():
                await self.reconnect()

    async def close(self) -> None:
        if not self.conn.is_closed():
            await self.conn.close()


class _Load:
    """The state of one run. Its session holds the table's lock, plans the load, watches the
    replicas and closes the load in the ledger; the pool's connections only load batches."""

    def __init__(
        self, options: LoadOptions, source: Source, session: _Session, report: Report,
        on_retry: Callable[[BaseException], None],
    ) -> None:
        self.options = options
        self.source = source
        self.session = session
        self.streaming = False
        self.loaded_now: dict[int, tuple[int, int]] = {}  # batches this run committed: rows loaded, rejected
        self.report = report
        self.on_retry = on_retry
        self.ledger = Ledger(options.ledger_schema)
        self.header: bytes | None = None
        self.rejects_path = _rejects_path(options)
        self.controller: ConcurrencyController | None = None
        self.gate: Gate | None = None
        self.dialect = options.dialect  # with the source's line ending, once the batcher knows it
        self.verified: asyncio.Future[None] | None = None  # a compressed source, read through whole
        self.finished = False  # the ledger has the load's final state

    def original_line(self, line: int) -> int:
        lines = self.options.source_lines
        return lines[line - 1] if lines is not None and 0 < line <= len(lines) else line

    async def _plan(self, key: str | None, target: Target) -> _Plan:
        """New load, resumed load, or nothing to do: decided from the ledger, under the table's lock."""
        conn, options, boundaries = self.session.conn, self.options, _boundaries(self.options)
        size, mtime = self.source.size, _mtime(self.source)
        latest = await self.ledger.latest(conn, key) if key else None
        fresh = latest is None or options.restart or (latest["state"] == "succeeded" and options.force)
        if fresh:
            load_id = uuid.uuid4().hex
            await self.ledger.start(
                conn, load_id, key, target.display, _source_name(self.source), size, mtime, boundaries
            )
            return _Plan(load_id, {})
        assert latest is not None
        load_id = latest["load_id"]
        finished = latest["state"] == "succeeded"
        if finished and size is not None and (size, mtime) == (latest["source_size"], latest["source_mtime"]):
            done = f"{latest['finished_at']:%Y-%m-%d %H:%M:%S %Z}"
            return _Plan(load_id, {}, nothing_to_do=f"already loaded by load {load_id} (finished {done})")
        recorded = json.loads(await conn.fetchval(self.ledger.boundaries_sql, load_id))
        if recorded != boundaries:
            changed = ", ".join(f"{k} {recorded.get(k)!r} (now {v!r})" for k, v in boundaries.items() if recorded.get(k) != v)
            if finished:
                raise UsageError(
                    f"{self.options.source} was loaded by load {load_id} with {changed}; to check that it is "
                    "unchanged, run with those options; to load it again as a new load, pass --force"
                )
            raise UsageError(
                f"load {load_id} of {self.options.source} was started with {changed}; "
                "run with the same options to resume it (or --restart to start a new load)"
            )
        committed = await self.ledger.committed_batches(conn, load_id)
        if finished:
            return _Plan(load_id, committed, verify_only=True)
        await self.ledger.resume(conn, load_id, size, mtime)
        return _Plan(load_id, committed)

    async def _workers(self) -> int:
        """--workers, lowered to what the server can spare (see pressure.ConnectionBudget)."""
        wanted = self.options.workers
        budget = await connection_budget(self.session.conn)
        if budget.allowed < 1:
            raise TryAgainLater(f"no connection to spare for a load: {budget.describe()}")
        if wanted > budget.allowed:
            kind = "--max-workers" if self.options.auto_workers else "--workers"
            log.warning("loader: %s %d lowered to %d: %s", kind, wanted, budget.allowed, budget.describe())
            return budget.allowed
        return wanted

    async def run(self, batches: _ReadAhead, header_fields: list[str] | None, interrupt: asyncio.Event | None) -> None:
        options, report, conn = self.options, self.report, self.session.conn
        target = await resolve_target(conn, options.table)
        report.table = target.display
        columns = _columns(options, target, header_fields)
        await self.ledger.ensure(conn)
        await check_copy(conn, target, columns, options.dialect)
        if options.max_replica_lag is not None:
            await require_monitor(conn)
        workers = await self._workers()
        await self.session.lock(target.oid, target.display)
        plan = await self._plan(_load_key(options, self.source, target), target)
        report.load_id = plan.load_id
        if plan.nothing_to_do:
            report.note = plan.nothing_to_do
            return
        self.finished = plan.verify_only  # a finished load, only re-read: its state stays as it is
        try:
            await self._load(plan, target, columns, workers, batches, interrupt)
        except BaseException as exc:
            await self._close_unfinished(plan.load_id, exc)
            raise

    async def _close_unfinished(self, load_id: str, exc: BaseException) -> None:
        """Whatever stopped the run, the ledger must not go on saying `running`: the next run
        resumes either way, but `status` and the monitoring read this state."""
        if self.finished:
            return
        stopped = isinstance(exc, (Interrupted, TryAgainLater, asyncio.CancelledError))
        message = exc.message if isinstance(exc, LoaderError) else f"unexpected {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                conn = await self.session.get()
                await self.ledger.finish(conn, load_id, "interrupted" if stopped else "failed", message)
                self.finished = True

    async def _before_commit(self, batch: Batch) -> None:
        """The last word on each batch before it commits: its rows must come from the source's
        real bytes. The file is still as it was opened, and a compressed one is whole."""
        self.source.check_unchanged(f"lines {batch.first_line}-{batch.last_line}")
        if self.verified is not None:
            await asyncio.shield(self.verified)

    async def _load(
        self,
        plan: _Plan,
        target: Target,
        columns: tuple[str, ...],
        workers: int,
        batches: _ReadAhead,
        interrupt: asyncio.Event | None,
    ) -> None:
        options, report = self.options, self.report
        application_name = f"{options.application_name} {plan.load_id}"[:63]
        await self.session.name(application_name)
        report.workers = workers
        if plan.committed:
            log.info("%s: resuming load %s: %d batches were committed by earlier runs", options.source, plan.load_id, len(plan.committed))
        else:
            log.info("%s: loading into %s as load %s, %s workers", options.source, target.display, plan.load_id,
                     f"auto, at most {workers}" if options.auto_workers else workers)
        if options.auto_workers:
            self.controller = ConcurrencyController(maximum=workers, limit=min(2, workers))
        pool = await open_pool(options, workers, application_name, self.on_retry, lazy=options.auto_workers)
        error: LoaderError | None = None
        try:
            pace = (TokenBucket(options.max_rate.amount), options.max_rate.unit) if options.max_rate else None
            sink = Sink(
                pool, target, columns, self.dialect, self.ledger, plan.load_id, options.retry, self._on_batch_retry, pace,
                before_commit=self._before_commit,
            )
            self.streaming = True
            try:
                await self._stream(batches, sink, plan, interrupt, workers)
            except LoaderError as exc:
                error = exc
            report.copies = sink.copies
        finally:
            await pool.close()
        if self.controller is not None:
            report.concurrency = self.controller.summary
        conn = await self.session.get()
        if plan.verify_only and error is None:
            report.note = f"already loaded by load {plan.load_id}; the source is unchanged (verified)"
            await self.ledger.update_source(conn, plan.load_id, self.source.size, _mtime(self.source))
            return
        if isinstance(error, SourceChanged) and plan.verify_only:
            raise error
        if await conn.fetchval(self.ledger.count_rejects_sql, plan.load_id):
            await self._write_rejects(plan.load_id)
        if error is None:
            error = await self._lost_batches(conn, plan.load_id)
        if error is None and report.rows_read != report.rows_loaded + report.rows_rejected + report.rows_skipped:
            error = LoaderError(
                f"accounting mismatch: read {report.rows_read} rows, loaded {report.rows_loaded}, "
                f"rejected {report.rows_rejected}, skipped {report.rows_skipped} (a bug: please report it)"
            )
        state = "succeeded" if error is None else "interrupted" if isinstance(error, (Interrupted, TryAgainLater)) else "failed"
        await self.ledger.finish(conn, plan.load_id, state, error.message if error else None)
        self.finished = True
        if error is not None:
            raise error

    def _on_batch_retry(self, exc: BaseException) -> None:
        """A batch will be retried; "too many connections" also means: take one fewer."""
        self.on_retry(exc)
        if sqlstate(exc) == TOO_MANY_CONNECTIONS and self.gate is not None and self.gate.places > 1:
            places = self.gate.places - 1
            log.warning("loader: the server has too many connections: going on with %d batches at once", places)
            asyncio.get_running_loop().create_task(self.gate.resize(places))

    async def _lost_batches(self, conn: asyncpg.Connection, load_id: str) -> LoaderError | None:
        """Batches commit asynchronously; a server crash can lose the last ones (their rows and
        ledger rows together). Before the load's final, synchronous commit makes everything
        durable, check that every batch this run committed is still in the ledger."""
        present = await self.ledger.committed_batches(conn, load_id)
        lost = [number for number in self.loaded_now if number not in present]
        if not lost:
            return None
        rows = sum(self.loaded_now[number][0] for number in lost)
        rejected = sum(self.loaded_now[number][1] for number in lost)
        self.report.rows_loaded -= rows
        self.report.rows_rejected -= rejected
        self.report.rows_read -= rows + rejected
        return TryAgainLater(
            f"the server lost {len(lost)} committed batches ({rows:,} rows) in a crash; "
            "run the same command again to load them (the ledger knows which)"
        )

    async def _write_rejects(self, load_id: str) -> None:
        async def remapped(rows: AsyncIterator[Reject]) -> AsyncIterator[Reject]:
            async for r in rows:
                yield Reject(self.original_line(r.line), r.sqlstate, r.message, r.record)

        conn = await self.session.get()
        async with conn.transaction():
            rows = self.ledger.rejects(conn, load_id)
            await rejects_file.write(self.rejects_path, self.header, remapped(rows), self.options.dialect.python_encoding)
        self.report.rejects_file = str(self.rejects_path)

    def _changed(self, plan: _Plan, batch: Batch | None, what: str) -> SourceChanged:
        where = f"lines {batch.first_line}-{batch.last_line}" if batch else "its end"
        advice = (
            "pass --force to load it again as a new load"
            if plan.verify_only
            else "pass --restart to load it as a new load (rows the earlier runs committed stay in the table: "
            "delete them first if they must not be doubled)"
        )
        return SourceChanged(f"{self.options.source} changed since load {plan.load_id} read it: {where} {what}; {advice}")

    async def _stream(
        self, batches: _ReadAhead, sink: Sink, plan: _Plan, interrupt: asyncio.Event | None, workers: int
    ) -> None:
        options, report = self.options, self.report
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=workers)
        stop = asyncio.Event()
        stopped: list[LoaderError] = []
        gate = self.gate = Gate(self.controller.limit if self.controller else workers)
        report.concurrency_now = gate.places
        replicas_ok = asyncio.Event()
        replicas_ok.set()

        def halt(reason: LoaderError) -> None:
            if not stop.is_set():
                stopped.append(reason)
                stop.set()

        cancelled: list[bool] = []

        async def read() -> None:
            last = 0
            try:
                while not stop.is_set():
                    batch = await batches.get()
                    report.bytes_read = _position(self.source)
                    if batch is None:
                        break
                    last = batch.number
                    done = plan.committed.get(batch.number)
                    if done is not None:
                        if done["checksum"] != batch.checksum:
                            halt(self._changed(plan, batch, "differ from what was loaded"))
                            return
                        report.add_skipped(batch.rows, done["rows_loaded"], done["rows_rejected"])
                        batches.batcher.done(batch)
                        continue
                    if plan.verify_only:
                        halt(self._changed(plan, batch, "were not in it when it was loaded"))
                        return
                    await queue.put(batch)
                if not stop.is_set() and plan.committed and max(plan.committed) > last:
                    halt(self._changed(plan, None, "is shorter than what was loaded"))
            except asyncio.CancelledError:
                cancelled.append(True)  # the workers are cancelled too: nobody waits for end markers
                raise
            finally:
                if not cancelled:
                    for _ in range(workers):
                        await queue.put(None)

        async def load_one(batch: Batch) -> None:
            await replicas_ok.wait()
            await gate.acquire()
            if stop.is_set():  # stopped while this batch waited (replicas, deadline, signal)
                await gate.release()
                return
            saturated = gate.taken >= gate.places
            report.in_flight += 1
            started = time.monotonic()
            try:
                outcome = await sink.load(batch)
            finally:
                report.in_flight -= 1
                await gate.release()
            batches.batcher.done(batch)
            if self.controller is not None:
                for _ in range(outcome.retries):
                    self.controller.record(time.monotonic() - started, 0, ok=False)
                await gate.resize(self.controller.record(time.monotonic() - started, batch.rows, saturated=saturated))
                report.concurrency_now = gate.places
            notes = [RejectNote(self.original_line(r.line), r.sqlstate, r.message) for r in outcome.rejects]
            report.add_batch(batch.rows, outcome.rows_loaded, outcome.rows_rejected, notes)
            if not outcome.already:
                self.loaded_now[batch.number] = (outcome.rows_loaded, outcome.rows_rejected)
            limit = options.max_errors
            if limit is not None and report.rows_rejected > limit:
                halt(
                    LoaderError(
                        f"stopped: {report.rows_rejected} rows rejected, more than --max-errors {limit}; "
                        f"the {report.rows_loaded:,} rows of committed batches stay loaded"
                    )
                )

        async def work() -> None:
            """Load batches until the reader says stop; after a fatal error, drain without loading."""
            fatal: BaseException | None = None
            while (batch := await queue.get()) is not None:
                if fatal is not None or stop.is_set():
                    continue
                try:
                    await load_one(batch)
                except Exception as exc:  # noqa: BLE001 - kept, and raised once the queue is drained
                    fatal = exc
                    stop.set()
            if fatal is not None:
                raise fatal

        tasks = [asyncio.create_task(read()), *(asyncio.create_task(work()) for _ in range(workers))]

        async def stop_then_cancel(reason: LoaderError) -> None:
            """Stop cleanly; whatever still runs after a grace period is cancelled, which rolls
            its transaction back (the ledger keeps that exact)."""
            halt(reason)
            replicas_ok.set()
            await asyncio.sleep(INTERRUPT_GRACE_S)
            for task in tasks:
                task.cancel()

        async def watch_interrupt() -> None:
            assert interrupt is not None
            await interrupt.wait()
            await stop_then_cancel(
                Interrupted("interrupted: in-flight batches finished or rolled back; run the same command again to resume")
            )

        async def watch_deadline() -> None:
            assert options.deadline is not None
            await asyncio.sleep(max(0.0, options.deadline - time.time()))
            await stop_then_cancel(
                TryAgainLater(
                    f"the deadline {datetime.fromtimestamp(options.deadline).astimezone():%Y-%m-%d %H:%M %Z} came: "
                    "no new batch was started, and the next run resumes the load"
                )
            )

        async def watch_replicas() -> None:
            assert options.max_replica_lag is not None
            lag_meter, waited, said = ReplicaLag(), 0.0, 0.0
            while not stop.is_set():
                lag, replicas = await lag_meter.measure(await self.session.get())
                if lag > options.max_replica_lag:
                    if replicas_ok.is_set() or time.monotonic() - said > 30:
                        log.warning("loader: waiting: a replica lags %.1f s, more than --max-replica-lag %g s", lag, options.max_replica_lag)
                        said = time.monotonic()
                    replicas_ok.clear()
                    report.waiting_for_replicas = True
                    waited += REPLICA_POLL_S
                    if options.max_lag_wait is not None and waited > options.max_lag_wait:
                        halt(
                            LoaderError(
                                f"stopped: replicas lagged more than {options.max_replica_lag:g} s for longer than "
                                f"--max-lag-wait {options.max_lag_wait:g} s; the next run resumes the load"
                            )
                        )
                        replicas_ok.set()
                        return
                elif not replicas_ok.is_set():
                    log.warning("loader: replicas caught up (lag %.1f s): going on", lag)
                    replicas_ok.set()
                    report.waiting_for_replicas = False
                await asyncio.sleep(REPLICA_POLL_S)

        watchers = [asyncio.create_task(self.session.keep())] + [
            asyncio.create_task(w())
            for w, wanted in (
                (watch_interrupt, interrupt is not None),
                (watch_deadline, options.deadline is not None),
                (watch_replicas, options.max_replica_lag is not None),
            )
            if wanted
        ]
        def on_watcher_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and isinstance(task.exception(), LoaderError):
                asyncio.get_running_loop().create_task(stop_then_cancel(task.exception()))  # type: ignore[arg-type]

        for watcher in watchers:
            watcher.add_done_callback(on_watcher_done)
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for watcher in watchers:
                watcher.remove_done_callback(on_watcher_done)
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        for exc in errors:
            if not isinstance(exc, LoaderError):
                raise exc
        if errors:
            raise errors[0]
        if stopped:
            raise stopped[0]


async def _unless_interrupted(
    job: Awaitable[T], interrupt: asyncio.Event | None, until: Callable[[], bool] = lambda: False
) -> T:
    """Await `job`; a signal that comes before it finishes (or before `until()` is true) cancels
    it. Connecting, waiting for the table and planning are cancelled so; once batches flow, the
    load stops itself cleanly (see _Load._stream)."""
    task = asyncio.ensure_future(job)
    while interrupt is not None and not task.done() and not until():
        waiter = asyncio.ensure_future(interrupt.wait())
        await asyncio.wait({task, waiter}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if interrupt.is_set() and not until() and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise Interrupted("interrupted before loading began; nothing was loaded")
    return await task


def _position(source: Source) -> int:
    try:
        return source.raw.tell()
    except (OSError, ValueError):
        return 0


async def load(
    options: LoadOptions,
    interrupt: asyncio.Event | None = None,
    on_start: Callable[[Report], None] | None = None,
) -> Report:
    """Run one `loader import`; returns the report, raises LoaderError when it cannot finish
    (with the report of what was done attached as `.report`). Setting `interrupt` stops the
    load cleanly: no new batch starts, in-flight ones finish, the load is marked interrupted.
    `on_start` receives the live report (for progress displays)."""
    started = time.monotonic()
    check_writable(_rejects_path(options), "--rejects")  # found now, not after the load
    source = open_source(options.source)
    try:
        batcher = Batcher(
            source, options.dialect, options.batch_rows, options.batch_bytes, max_record_bytes=options.max_record_bytes
        )
        header_fields = None
        if options.dialect.header:
            record = await asyncio.to_thread(batcher.read_header)
            header_fields = parse_header(record, options.dialect, source.name) if record is not None else None
        else:
            await asyncio.to_thread(batcher.start)  # the line ending, before any batch is sent
        report = Report(source=source.name, table=options.table, load_id="", workers=options.workers)
        report.bytes_total = source.size

        def on_retry(exc: BaseException) -> None:
            report.count_retry(exc)
            log.info("retrying after a transient failure: %s", " ".join(str(exc).split()) or type(exc).__name__)

        if on_start is not None:
            on_start(report)
        batches = _ReadAhead(batcher)  # reads while the load connects and plans
        stop_verifying = threading.Event()
        verified = asyncio.ensure_future(asyncio.to_thread(source.verify, stop_verifying)) if source.compressed else None
        try:
            session = _Session(options, await _unless_interrupted(connect(options, on_retry=on_retry), interrupt), on_retry)
            try:
                run = _Load(options, source, session, report, on_retry)
                run.header = batcher.header
                run.dialect = batcher.dialect
                run.verified = verified
                await _unless_interrupted(run.run(batches, header_fields, interrupt), interrupt, until=lambda: run.streaming)
            except LoaderError as exc:
                report.elapsed_s = time.monotonic() - started
                exc.report = report if report.load_id and not isinstance(exc, UsageError) else None
                raise
            finally:
                await session.close()
        finally:
            batches.cancel()
            if verified is not None:
                stop_verifying.set()
                await asyncio.gather(verified, return_exceptions=True)
    finally:
        source.close()
    report.elapsed_s = time.monotonic() - started
    return report


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
            for line, record in ([(1, previous.header)] if options.dialect.header else []) + [
                (r.line, r.record) for r in previous.rejects
            ]:
                out.write(record + b"\n")
                lines.extend(line + i for i in range(record.count(b"\n") + 1))
        derived = dataclasses.replace(
            options,
            source=tmp,
            load_name=options.load_name or f"retry-rejects {os.path.realpath(rejects_path)}",
            rejects=options.rejects or str(rejects_file.default_path(rejects_path)),
            source_lines=tuple(lines),
        )
        report = await load(derived, interrupt)
    finally:
        os.unlink(tmp)
    report.source = rejects_path
    return report


async def status(options: LoadOptions, table: str | None, limit: int) -> list[dict[str, object]]:
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
            "started": r["started_at"].isoformat(),
            "finished": r["finished_at"].isoformat() if r["finished_at"] else None,
            "seconds": round(float(r["seconds"]), 1),
            "message": r["message"],
        }
        for r in rows
    ]
