"""One load, wired: source → batches → bounded queue → N workers → sink, counted in a report.

The reader runs in a thread (file reads and decompression release the GIL) and hands
batches to a queue of `workers` places, so at most 2 × workers batches are in memory
and the reader waits whenever the workers are busy: memory stays flat whatever the
file's size. Each worker owns one pooled connection at a time, so the server never sees
more than `workers` connections from a load.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from .batching import Batch, Batcher, parse_header, record_lines
from .errors import LoaderError, UsageError
from .ledger import Ledger
from .options import LoadOptions
from .report import Failure, Report
from .sink import Loaded, Sink, Target, open_pool, resolve_target
from .source import Source, open_source


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


async def load(options: LoadOptions) -> Report:
    """Run one `loader import`; returns the report, raises LoaderError when it cannot finish."""
    started = time.monotonic()
    source = open_source(options.source)
    try:
        batcher = Batcher(source, options.dialect, options.batch_rows, options.batch_bytes)
        header = None
        if options.dialect.header:
            record = await asyncio.to_thread(batcher.read_header)
            header = parse_header(record, options.dialect, source.name) if record is not None else None
        load_id = uuid.uuid4().hex
        report = Report(source=source.name, table=options.table, load_id=load_id, workers=options.workers)
        pool = await open_pool(options, on_retry=report.count_retry)
        try:
            async with pool.acquire() as conn:
                target = await resolve_target(conn, options.table)
                report.table = target.display
                columns = _columns(options, target, header)
                ledger = Ledger(options.ledger_schema)
                await ledger.ensure(conn)
            sink = Sink(pool, target, columns, options.dialect, ledger, load_id, options.retry, report.count_retry)
            await sink.check()
            async with pool.acquire() as conn:
                await ledger.start(conn, load_id, target.display, _source_name(source), source.size, _boundaries(options))
            error: LoaderError | None = None
            try:
                await _run(batcher, sink, report, options)
            except LoaderError as exc:
                error = exc
            report.copies = sink.copies
            report.elapsed_s = time.monotonic() - started
            state = "failed" if error else "succeeded"
            async with pool.acquire() as conn:
                await ledger.finish(
                    conn, load_id, state, report.rows_read, report.rows_loaded, report.rows_rejected,
                    error.message if error else None,
                )
            if error:
                error.report = report
                raise error
        finally:
            await pool.close()
    finally:
        source.close()
    return report


def _source_name(source: Source) -> str:
    return "-" if source.is_stdin else os.path.abspath(source.name)


async def _run(batcher: Batcher, sink: Sink, report: Report, options: LoadOptions) -> None:
    workers = options.workers
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=workers)
    stop = asyncio.Event()

    async def read() -> None:
        batches = iter(batcher)
        try:
            while not stop.is_set():
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    return
                await queue.put(batch)
        finally:
            for _ in range(workers):
                await queue.put(None)

    async def work() -> None:
        """Load batches until the reader says stop; after a fatal error, drain without loading."""
        fatal: BaseException | None = None
        while (batch := await queue.get()) is not None:
            if fatal is not None or stop.is_set():
                continue
            try:
                outcome = await sink.load(batch)
            except Exception as exc:  # noqa: BLE001 - kept, and raised once the queue is drained
                fatal = exc
                stop.set()
                continue
            if isinstance(outcome, Loaded):
                report.add_loaded(outcome.rows)
            else:
                line = None
                if outcome.record is not None:
                    starts = record_lines(batch, options.dialect)
                    line = starts[outcome.record - 1] if outcome.record <= len(starts) else None
                report.add_failure(
                    Failure(batch.first_line, batch.last_line, batch.rows, outcome.sqlstate, outcome.message, line)
                )
        if fatal is not None:
            raise fatal

    results = await asyncio.gather(read(), *(work() for _ in range(workers)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    for exc in errors:
        if not isinstance(exc, LoaderError):
            raise exc
    if errors:
        raise errors[0]
