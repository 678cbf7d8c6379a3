"""One load, wired: source → batches → bounded queue → N workers → sink, counted in a report.

The reader runs in a thread (file reads and decompression release the GIL) and hands
batches to a queue of `workers` places, so at most 2 × workers batches are in memory
and the reader waits whenever the workers are busy: memory stays flat whatever the
file's size. Each worker owns one pooled connection at a time, so the server never sees
more than `workers` connections from a load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from . import rejects as rejects_file
from .batching import Batch, Batcher, parse_header
from .errors import LoaderError, UsageError
from .ledger import Ledger
from .options import LoadOptions
from .rejects import Reject
from .report import RejectNote, Report
from .sink import Sink, Target, open_pool, resolve_target
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


def _source_name(source: Source) -> str:
    return "-" if source.is_stdin else os.path.abspath(source.name)


class _Load:
    """The state of one run: options, source, pool, ledger, report."""

    def __init__(self, options: LoadOptions, source: Source, pool: asyncpg.Pool, report: Report) -> None:
        self.options = options
        self.source = source
        self.pool = pool
        self.report = report
        self.ledger = Ledger(options.ledger_schema)
        self.header: bytes | None = None
        self.rejects_path = Path(options.rejects) if options.rejects else rejects_file.default_path(options.source)

    def original_line(self, line: int) -> int:
        lines = self.options.source_lines
        return lines[line - 1] if lines is not None and 0 < line <= len(lines) else line

    async def run(self, batcher: Batcher, header_fields: list[str] | None) -> None:
        options, report = self.options, self.report
        async with self.pool.acquire() as conn:
            target = await resolve_target(conn, options.table)
            report.table = target.display
            columns = _columns(options, target, header_fields)
            await self.ledger.ensure(conn)
        sink = Sink(self.pool, target, columns, options.dialect, self.ledger, report.load_id, options.retry, report.count_retry)
        await sink.check()
        async with self.pool.acquire() as conn:
            await self.ledger.start(
                conn, report.load_id, target.display, _source_name(self.source), self.source.size, _boundaries(options)
            )
        error: LoaderError | None = None
        try:
            await self._stream(batcher, sink)
        except LoaderError as exc:
            error = exc
        report.copies = sink.copies
        if report.rows_rejected:
            await self._write_rejects()
        if error is None and report.rows_read != report.rows_loaded + report.rows_rejected:
            error = LoaderError(
                f"accounting mismatch: read {report.rows_read} rows, loaded {report.rows_loaded}, "
                f"rejected {report.rows_rejected} (a bug: please report it)"
            )
        async with self.pool.acquire() as conn:
            await self.ledger.finish(
                conn,
                report.load_id,
                "failed" if error else "succeeded",
                report.rows_read,
                report.rows_loaded,
                report.rows_rejected,
                error.message if error else None,
            )
        if error is not None:
            raise error

    async def _write_rejects(self) -> None:
        async def remapped(rows: AsyncIterator[Reject]) -> AsyncIterator[Reject]:
            async for r in rows:
                yield Reject(self.original_line(r.line), r.sqlstate, r.message, r.record)

        async with self.pool.acquire() as conn, conn.transaction():
            rows = self.ledger.rejects(conn, self.report.load_id)
            await rejects_file.write(self.rejects_path, self.header, remapped(rows), self.options.dialect.python_encoding)
        self.report.rejects_file = str(self.rejects_path)

    async def _stream(self, batcher: Batcher, sink: Sink) -> None:
        workers = self.options.workers
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=workers)
        stop = asyncio.Event()
        stopped: list[LoaderError] = []

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
                notes = [RejectNote(self.original_line(r.line), r.sqlstate, r.message) for r in outcome.rejects]
                self.report.add_batch(outcome.rows_loaded, outcome.rows_rejected, notes)
                limit = self.options.max_errors
                if limit is not None and self.report.rows_rejected > limit and not stop.is_set():
                    stop.set()
                    stopped.append(
                        LoaderError(
                            f"stopped: {self.report.rows_rejected} rows rejected, more than --max-errors {limit}; "
                            f"the {self.report.rows_loaded:,} rows of committed batches stay loaded"
                        )
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
        if stopped:
            raise stopped[0]


async def load(options: LoadOptions) -> Report:
    """Run one `loader import`; returns the report, raises LoaderError when it cannot finish
    (with the report of what was done attached as `.report`)."""
    started = time.monotonic()
    source = open_source(options.source)
    try:
        batcher = Batcher(source, options.dialect, options.batch_rows, options.batch_bytes)
        header_fields = None
        if options.dialect.header:
            record = await asyncio.to_thread(batcher.read_header)
            header_fields = parse_header(record, options.dialect, source.name) if record is not None else None
        report = Report(source=source.name, table=options.table, load_id=uuid.uuid4().hex, workers=options.workers)
        pool = await open_pool(options, on_retry=report.count_retry)
        try:
            run = _Load(options, source, pool, report)
            run.header = batcher.header
            try:
                await run.run(batcher, header_fields)
            except LoaderError as exc:
                report.elapsed_s = time.monotonic() - started
                exc.report = report if report.batches else None
                raise
        finally:
            await pool.close()
    finally:
        source.close()
    report.elapsed_s = time.monotonic() - started
    return report


async def retry_rejects(rejects_path: str, options: LoadOptions) -> Report:
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
            rejects=options.rejects or str(rejects_file.default_path(rejects_path)),
            source_lines=tuple(lines),
        )
        report = await load(derived)
    finally:
        os.unlink(tmp)
    report.source = rejects_path
    return report
