"""Batches through the load: read ahead in a thread, a queue of `workers` places, and
`workers` workers each loading one batch at a time through the sink.

The reader runs in a thread (file reads and decompression release the GIL), one batch
ahead, and hands batches to the queue, so at most 2 × workers + 2 batches are in memory and
the reader waits whenever the workers are busy: memory stays flat whatever the file's size.
Each worker holds one pooled connection at a time, so the server sees at most `workers`
loading connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .batching import Batch, Batcher
from .concurrency import Concurrency
from .errors import LoaderError, SourceChanged, SourceFailed
from .modes import OutOfTurn
from .plan import Plan
from .report import RejectNote, Report
from .sink import Sink
from .stop import ReplicaWatch, Stop, Watcher

INTERRUPT_GRACE_S = 3.0  # after SIGINT/SIGTERM or the deadline, how long batches in flight may take


class ReadAhead:
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


Changed = Callable[[Batch | None, str], SourceChanged]


@dataclass
class Stream:
    """One run's batches, from the read-ahead to the sink, counted in the report."""

    batches: ReadAhead
    sink: Sink
    plan: Plan
    report: Report
    concurrency: Concurrency
    workers: int
    max_errors: int | None
    changed: Changed  # the error for a source that is not what the load committed
    position: Callable[[], int]  # bytes of the source read so far, for progress
    original_line: Callable[[int], int]  # a line of the source as the user knows it (retry-rejects)
    replicas: ReplicaWatch | None = None
    stop: Stop = field(default_factory=Stop)
    read: asyncio.Event | None = None  # set once every batch is queued (or the reading stopped)
    loaded_now: dict[int, tuple[int, int]] = field(default_factory=dict)  # committed now: rows loaded, rejected

    async def run(self, watchers: list[Watcher]) -> None:
        """Load every batch the plan leaves to load; raises the reason the load stopped early.
        Each watcher returns (or raises) a reason to stop: the batches in flight get a grace
        period, then whatever still runs is cancelled, which rolls its transaction back."""
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=self.workers)
        self._tasks = [asyncio.create_task(self._read()), *(asyncio.create_task(self._work()) for _ in range(self.workers))]
        self.report.concurrency_now = self.concurrency.places
        watching = [asyncio.create_task(self._watch(w)) for w in watchers]
        try:
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        for exc in errors:
            if not isinstance(exc, LoaderError):
                raise exc
        if errors:
            raise errors[0]
        if self.stop.reason is not None:
            raise self.stop.reason

    async def _watch(self, watcher: Watcher) -> None:
        try:
            reason = await watcher()
        except LoaderError as exc:
            reason = exc
        if reason is None:
            return
        self.stop.request(reason)
        if self.replicas is not None:
            self.replicas.ok.set()
        await asyncio.sleep(INTERRUPT_GRACE_S)
        for task in self._tasks:
            task.cancel()

    async def _read(self) -> None:
        """Queue the batches to load; check those earlier runs committed against the ledger."""
        plan, report, cancelled, last = self.plan, self.report, False, 0
        try:
            while not self.stop.requested:
                batch = await self.batches.get()
                report.bytes_read = self.position()
                if batch is None:
                    break
                last = batch.number
                done = plan.committed.get(batch.number)
                if done is not None:
                    if done["checksum"] != batch.checksum:
                        self.stop.request(self.changed(batch, "differ from what was loaded"))
                        return
                    report.add_skipped(batch.rows, done["rows_loaded"], done["rows_rejected"])
                    self.batches.batcher.buffers.give_back(batch)
                    continue
                if plan.verify_only:
                    self.stop.request(self.changed(batch, "were not in it when it was loaded"))
                    return
                await self._queue.put(batch)
            if not self.stop.requested and plan.committed and max(plan.committed) > last:
                self.stop.request(self.changed(None, "is shorter than what was loaded"))
        except asyncio.CancelledError:
            cancelled = True  # the workers are cancelled too: nobody waits for end markers
            raise
        finally:
            if self.read is not None:
                self.read.set()
            if not cancelled:
                for _ in range(self.workers):
                    await self._queue.put(None)

    async def _work(self) -> None:
        """Load batches until the reader says stop; after a fatal error, drain without loading."""
        fatal: BaseException | None = None
        while (batch := await self._queue.get()) is not None:
            if fatal is not None or self.stop.requested:
                self.sink.skip(batch)
                continue
            try:
                await self._load(batch)
            except Exception as exc:  # noqa: BLE001 - kept, and raised once the queue is drained
                fatal = exc
                self.stop.request()
        if fatal is not None:
            raise fatal

    async def _load(self, batch: Batch) -> None:
        report = self.report
        if self.replicas is not None:
            await self.replicas.ok.wait()
        async with self.concurrency.slot() as saturated:
            if self.stop.requested:  # stopped while this batch waited (replicas, deadline, signal)
                self.sink.skip(batch)
                return
            report.in_flight += 1
            started = time.monotonic()
            try:
                outcome = await self.sink.load(batch)
            except OutOfTurn:  # an earlier batch did not go through: the reason is told there
                self.batches.batcher.buffers.give_back(batch)
                return
            finally:
                report.in_flight -= 1
        self.batches.batcher.buffers.give_back(batch)
        await self.concurrency.after_batch(started, batch.rows, outcome.retries, saturated)
        report.concurrency_now = self.concurrency.places
        notes = [RejectNote(self.original_line(r.line), r.sqlstate, r.message) for r in outcome.rejects]
        report.add_batch(batch.rows, outcome.rows_loaded, outcome.rows_rejected, notes)
        report.add_merged(outcome.merged)
        if not outcome.committed_before:
            self.loaded_now[batch.number] = (outcome.rows_loaded, outcome.rows_rejected)
        if self.max_errors is not None and report.rows_rejected > self.max_errors:
            self.stop.request(
                SourceFailed(
                    f"stopped: {report.rows_rejected} rows rejected, more than --max-errors {self.max_errors}; "
                    f"the {report.rows_loaded:,} rows of committed batches stay loaded"
                )
            )
