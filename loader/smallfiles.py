"""A file set's small new files, several to a transaction.

Each file of a set is a load of its own in the ledger. For a small file, a load's own steps
(its plan, start, batch transaction and finish, a round trip each) cost more than its rows.
So the files of a set that are new to the ledger and fit in one batch go in groups of a
batch's worth. A group's loads are started together (committed: other runs, `status` and the
files' twins see them, as any load's), then one transaction COPYs each file of the group and
records each file's one batch and its load's end (sql.FINISH_SMALL_LOADS). The data and the
batches commit together, so exactly-once holds as for any batch: a run killed in the middle
leaves its group's loads started and empty, and the next run resumes them.

A file a group does not take goes the usual way, one load at a time (pipeline.load): a file
the ledger knows (by path or by content), one another run of the command has claimed, one
whose rows the server refused (its rejects are found as for any batch), and one that is not
small, or cannot be read.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from .batching import Batch, Batcher, parse_header
from .connect import transaction_settings
from .copywire import copy_rows, copy_statement
from .errors import LoaderError, TableReplaced, is_data_error
from .ledger import Ledger
from .options import LoadOptions
from .plan import content_key, copy_options, load_key, mtime, source_name
from .records import end_marker_ends_copy, holds_end_marker
from .report import Report
from .retry import retrying, say_retrying
from .session import ControlSession
from .sink import batch_connection, batch_transaction
from .source import open_source
from .sql import PIECE_KEEP, PIECE_SAVEPOINT, PIECE_UNDO, begin_batch
from .stop import deadline_passed
from .target import Target

log = logging.getLogger("loader")

# Files in one transaction at most. A run's first group is of one file and each next one
# doubles, up to this: what a run claims at once stays small while runs sharing a set start
# together (each gets a share), and the groups grow large once they are under way.
GROUP_FILES = 32


@dataclass
class SmallFile:
    """A file read whole into its one batch, with what the ledger knows it by."""

    number: int  # its place in the set
    path: str
    batch: Batch
    load_key: str | None
    content_key: str | None
    size: int
    mtime: float | None
    name: str  # as the ledger keeps it
    ends_clean: bytes | None  # its line ending, when its last record ends with one, outside quotes
    load_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def read_small(
    number: int,
    path: str,
    options: LoadOptions,
    target: Target,
    columns: tuple[str, ...],
    columns_of: Callable[[list[str] | None], tuple[str, ...]],
    end_marker: bool,
) -> SmallFile | None:
    """In a thread: the file in one batch, if it is one batch of the set's columns (and, where
    a line of only \\. ends a COPY, holds none); else None, and the usual load takes it."""
    try:
        source = open_source(path)
    except LoaderError:
        return None
    try:
        if source.stat is None or source.stat[0] > options.batch_bytes:
            return None
        batcher = Batcher.of_load(source, options)
        source.fingerprint()
        header = None
        if options.dialect.header:
            record = batcher.read_header()
            if record is None:
                return None
            header = parse_header(record, options.dialect, path)
        if columns_of(header) != columns:
            return None
        batches = iter(batcher)
        batch = next(batches, None)
        if batch is None or next(batches, None) is not None:
            return None
        newline, dialect = batcher.dialect.newline.encode(), options.dialect
        if end_marker and holds_end_marker(batch.data, newline):
            return None
        source.verify()  # a compressed file is whole
        source.check_unchanged(f"lines {batch.first_line}-{batch.last_line}")
        clean = dialect.escape is None and batch.data.endswith(newline) and batch.data.count(dialect.quote.encode()) % 2 == 0
        return SmallFile(
            number, path, batch, load_key(options, source, target), content_key(options, source, target),
            source.stat[0], mtime(source), source_name(source, options), newline if clean else None,
        )
    except LoaderError:
        return None
    finally:
        source.close()


class SmallFiles:
    """Groups a set's small files as they are offered, in the set's order, and loads each
    group in one transaction, up to `workers` groups at once. Files it does not take, or
    declines once it knows more (see the module's docstring), are told to the caller
    (`offer`'s answer, then `take_declined`)."""

    def __init__(
        self,
        options: LoadOptions,
        sources: Sequence[str],
        session: ControlSession,
        pool: asyncpg.Pool,
        target: Target,
        columns: tuple[str, ...],
        columns_of: Callable[[list[str] | None], tuple[str, ...]],
        workers: int,
        loaded: Callable[[int, str, Report], None],
        name: tuple[str, str],
        progress: Report,
        on_start: Callable[[Report], None] | None = None,
    ) -> None:
        self.options, self.sources, self.session, self.pool, self.target = options, sources, session, pool, target
        self.columns, self.columns_of, self.workers = columns, columns_of, workers
        self.loaded = loaded
        self.progress = progress  # the groups' rows, for progress displays (each file's report is its own)
        self._on_start = on_start  # told of `progress` when the first group loads
        self._name: tuple[str, str] | None = name  # the run's sessions' name, and the load it names, until said
        self.ledger = Ledger(options.ledger_schema)
        settings = {k: v for k, v in transaction_settings(options).items() if k != "synchronous_commit"}
        self._begin = begin_batch(target.schema, target.name, target.relkind != "f", settings)  # its commit finishes loads
        self._end_marker = end_marker_ends_copy(session.conn.get_server_version())
        self._statement = copy_statement(target.schema, target.name, columns, options.dialect)
        self._kept = copy_options(options)  # as each load's ledger row keeps them
        self._group: list[SmallFile] = []
        self._files = 1  # the next group's files at most (see GROUP_FILES)
        self._slots = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self.declined: list[tuple[int, str]] = []  # for the usual load (see take_declined)
        self._read: dict[int, SmallFile | None] = {}  # files read ahead, by their place in the set
        self._ahead: tuple[int, asyncio.Future[dict[int, SmallFile | None]]] | None = None  # being read

    async def offer(self, number: int, path: str) -> bool:
        """Take the file into a group (False: it is not one for a group, and the caller loads
        it, after the group before it has started). Raises the failure of a group loaded earlier."""
        self._raise_failure()
        if number not in self._read:
            self._read = await self._read_from(number)
        small = self._read.pop(number)
        if small is None:
            await self.flush()
            return False
        self._group.append(small)
        if self._full(self._group):
            await self._launch()
        return True

    def _full(self, group: list[SmallFile]) -> bool:
        """A group is a batch's worth (--batch-size rows, --batch-bytes), of `_files` files at most."""
        options = self.options
        return (
            len(group) >= self._files or sum(s.batch.rows for s in group) >= options.batch_rows
            or sum(len(s.batch.data) for s in group) >= options.batch_bytes
        )

    async def _read_from(self, number: int) -> dict[int, SmallFile | None]:
        """About a group's worth of files from `number` on, and the next worth read meanwhile:
        one thread hop per group, and reading overlaps loading."""
        if self._ahead is not None and self._ahead[0] == number:
            read = await self._ahead[1]
        else:
            if self._ahead is not None:
                await asyncio.gather(self._ahead[1], return_exceptions=True)
            read = await asyncio.to_thread(self._read_chunk, number)
        self._ahead = None
        last = max(read)
        if read[last] is not None and last + 1 < len(self.sources):
            self._ahead = (last + 1, asyncio.ensure_future(asyncio.to_thread(self._read_chunk, last + 1)))
        return read

    def _read_chunk(self, number: int) -> dict[int, SmallFile | None]:
        """In a thread: files from `number` on, up to a group's worth, or one that is not small."""
        read: dict[int, SmallFile | None] = {}
        group: list[SmallFile] = []
        for n in range(number, len(self.sources)):
            small = read[n] = read_small(n, self.sources[n], self.options, self.target, self.columns, self.columns_of, self._end_marker)
            if small is None:
                break
            group.append(small)
            if self._full(group):
                break
        return read

    async def flush(self) -> None:
        """Load the group being gathered."""
        if self._group:
            await self._launch()

    async def wait(self) -> None:
        """Wait for the groups in flight to commit (a group being gathered is let go: the run
        stops). Raises the failure of one."""
        self._group = []
        if self._running:
            await asyncio.wait(self._running)
        self._raise_failure()

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def take_declined(self) -> list[tuple[int, str]]:
        """The files declined so far (not told before), in the set's order."""
        declined, self.declined = sorted(self.declined), []
        return declined

    async def cancel(self) -> None:
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._ahead is not None:  # a thread cannot be stopped: its files are let go once read
            await asyncio.gather(self._ahead[1], return_exceptions=True)

    def _raise_failure(self) -> None:
        for task in [t for t in self._running if t.done()]:
            self._running.discard(task)
            task.result()

    async def _launch(self) -> None:
        group, self._group = self._group, []
        self._files = min(self._files * 2, GROUP_FILES)
        if self.options.deadline is not None and (late := deadline_passed(self.options.deadline)) is not None:
            raise late
        await self._slots.acquire()  # planned (and started in the ledger) once it can load
        try:
            new = await self._plan(group)
        except BaseException:
            self._slots.release()
            raise
        if not new:
            self._slots.release()
            return
        if self._on_start is not None:
            self._on_start(self.progress)
            self._on_start = None
        task = asyncio.create_task(self._load(new))
        task.add_done_callback(lambda _: self._slots.release())
        self._running.add(task)

    async def _plan(self, group: list[SmallFile]) -> list[SmallFile]:
        """The files of `group` that are new to the ledger (and, sharing the set, claimed by this
        run); the others are declined. Twins by path or content go one at a time."""
        new: list[SmallFile] = []
        seen: set[str] = set()
        for small in group:
            keys = {small.load_key, small.content_key} - {None}
            if not keys or keys & seen:
                self.declined.append((small.number, small.path))
                continue
            seen.update(k for k in keys if k is not None)
            new.append(small)
        async with self.session.turn():
            conn = await self.session.get()
            await self.session.renew()
            taken = await self._unknown(conn, new)
            if self.options.command is not None and taken:
                # A run sharing the set takes its new files before it loads them, then asks again:
                # another run may have loaded one meanwhile. Files some load had, it leaves
                # untaken (a re-run of the set claims nothing).
                claimed = await self.ledger.claim_many(conn, [s.load_key for s in taken if s.load_key], self.session.holder)
                taken = await self._unknown(conn, [s for s in taken if s.load_key in claimed])
            if self._name is not None and taken:  # the first group names the run's sessions
                taken[0].load_id = self._name[1]
                await self.session.name(*self._name)
                self._name = None
            if taken:  # seen from now on by other runs, status, and the twins of these files
                loads = [(s.load_id, s.load_key, s.name, s.size, s.mtime, s.content_key) for s in taken]
                await self.ledger.start_small(conn, loads, self.target.display, self._kept, self.session.holder)
        self.declined.extend((s.number, s.path) for s in new if s not in taken)
        return taken

    async def _unknown(self, conn: asyncpg.Connection, files: list[SmallFile]) -> list[SmallFile]:
        """The files no load has had, by path or content."""
        known = await self.ledger.known(conn, [(s.load_key, s.content_key) for s in files]) if files else set()
        return [s for i, s in enumerate(files) if i not in known]

    async def _load(self, group: list[SmallFile]) -> None:
        """One transaction for the group. A transient failure tries it again, unless its commit
        got through (then its loads are in the ledger)."""
        started = time.monotonic()
        refused: set[int] = set()  # files with a row the server refused: undone, and declined
        retries = 0

        def on_retry(exc: BaseException) -> None:
            nonlocal retries
            retries += 1
            self.progress.count_retry(exc)
            say_retrying(exc)

        self.progress.in_flight += 1
        try:
            async for attempt in retrying(self.options.retry, on_retry):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        async with self.session.turn():
                            conn = await self.session.get()  # the table is still this run's
                            if await self.ledger.batches_present(conn, [s.load_id for s in group]):
                                break
                    async with batch_connection(self.pool) as conn, batch_transaction(conn, self._begin):
                        await self._copy_group(conn, group, refused)
        finally:
            self.progress.in_flight -= 1
        elapsed = time.monotonic() - started
        for small in group:
            if small.number in refused:
                self.declined.append((small.number, small.path))
                continue
            rows = small.batch.rows
            report = Report(
                source=small.path, table=self.target.display, load_id=small.load_id, workers=self.workers,
                rows_read=rows, rows_loaded=rows, batches=1, copies=1, retries=retries, elapsed_s=elapsed,
                bytes_total=small.size, bytes_loaded=small.size,
            )
            retries = 0  # the group's, told once: with its first file
            self.progress.add_batch(rows, rows, 0, [])
            log.info("%s: loaded %d rows as load %s, in one transaction with %d other files", small.path, rows, small.load_id, len(group) - 1)
            self.loaded(small.number, small.path, report)

    async def _copy_group(self, conn: asyncpg.Connection, group: list[SmallFile], refused: set[int]) -> None:
        """The group's files in one COPY, when their records cannot run into each other (each
        ends with a line ending, the same, outside quotes); else, or when the server refuses
        a row or reads another number of records, each file's COPY in a savepoint, a file
        refused undone. Then the loads of the others in the ledger, in one statement."""
        files = [s for s in group if s.number not in refused]
        if len(files) > 1 and files[0].ends_clean is not None and all(s.ends_clean == files[0].ends_clean for s in files):
            if await self._copy(conn, PIECE_SAVEPOINT, b"".join(s.batch.data for s in files), sum(s.batch.rows for s in files)):
                await self._finish(conn, files)
                return
            await conn.execute(PIECE_UNDO)
        before = PIECE_SAVEPOINT  # sent with the next COPY: one round trip
        for small in files:
            if await self._copy(conn, before, small.batch.data, small.batch.rows):
                before = PIECE_KEEP
            else:
                refused.add(small.number)
                before = PIECE_UNDO
        if before == PIECE_UNDO:  # the last file was undone: out of the aborted state
            await conn.execute(PIECE_UNDO)
        await self._finish(conn, [s for s in files if s.number not in refused])

    async def _copy(self, conn: asyncpg.Connection, before: str, data: bytes | bytearray, records: int) -> bool:
        """COPY `data` after `before`: whether the server took its `records` records, no more
        and no fewer (False, in the aborted savepoint, when it refused one)."""
        try:
            return await copy_rows(conn, f"{before}; {self._statement}", data) == records
        except Exception as exc:
            if not is_data_error(exc):
                raise
            return False

    async def _finish(self, conn: asyncpg.Connection, loaded: list[SmallFile]) -> None:
        """Record each file's one batch and its load's end, in one statement."""
        target = self.target
        if not loaded:
            return
        batches = [s.batch for s in loaded]
        finished = await conn.fetchval(
            self.ledger.finish_small_sql,
            [s.load_id for s in loaded], [b.rows for b in batches], [b.first_line for b in batches],
            [b.offset for b in batches], [len(b.data) for b in batches], [b.checksum for b in batches],
            target.display, target.oid,
        )
        if finished != len(loaded):
            raise TableReplaced(
                f"{target.display} is no longer the table this load began with (it was dropped or replaced "
                f"while loading): stopped before {loaded[0].path}; the next run loads into the table of that name"
            )


def usable(options: LoadOptions) -> bool:
    """Whether a set's small files may share transactions: plain appends, each file loaded as
    one batch would be (no pace to keep, no replica to wait for, no dry run)."""
    return (
        options.mode == "append" and not options.dry_run and options.max_rate is None
        and options.max_replica_lag is None and options.load_name is None and options.source_lines is None
    )
