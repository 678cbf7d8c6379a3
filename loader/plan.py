"""What a run does, decided from the ledger: start a new load, resume one, verify a finished
one against its source, or nothing. `decide` is the decision alone, a pure function of what
the ledger says and what the run asks; `plan` reads the ledger, decides, and records it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import asyncpg

from .batching import Batcher
from .errors import LoaderError, UsageError
from .ledger import Ledger
from .options import LoadOptions
from .source import Source, open_source
from .target import Target

log = logging.getLogger("loader")

RENEW_CHECK_S = 0.5  # while a file is read through: how often to see whether the lease is due


class Action(Enum):
    NEW = "new"  # start a load
    RESUME = "resume"  # an unfinished load: skip its committed batches (after checking them)
    VERIFY = "verify"  # a finished load whose file was touched: check it is unchanged, load nothing
    NOTHING = "nothing"  # a finished load of the same, untouched file


@dataclass(frozen=True)
class Previous:
    """The latest load of the same source into the same table, as the ledger has it."""

    load_id: str
    state: str
    source_size: int | None
    source_mtime: float | None
    finished_at: datetime | None
    boundaries: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    action: Action
    load_id: str | None = None  # the previous load's (None: a new load)
    note: str | None = None  # why there is nothing to do


def decide(
    previous: Previous | None,
    *,
    restart: bool,
    force: bool,
    size: int | None,
    mtime: float | None,
    boundaries: dict[str, Any],
    source: str,
) -> Decision:
    """New load, resumed load, verification, or nothing to do; a UsageError when the run's
    batch boundaries differ from those of the load it would resume or verify."""
    if previous is None or restart or (previous.state == "succeeded" and force):
        return Decision(Action.NEW)
    load_id = previous.load_id
    finished = previous.state == "succeeded"
    if finished and size is not None and (size, mtime) == (previous.source_size, previous.source_mtime):
        done = f"{previous.finished_at:%Y-%m-%d %H:%M:%S %Z}"
        return Decision(Action.NOTHING, load_id, f"already loaded by load {load_id} (finished {done})")
    recorded = {key: previous.boundaries.get(key) for key in boundaries}  # the ledger keeps more (see copy_options)
    if recorded != boundaries:
        changed = ", ".join(f"{k} {recorded.get(k)!r} (now {v!r})" for k, v in boundaries.items() if recorded.get(k) != v)
        if finished:
            raise UsageError(
                f"{source} was loaded by load {load_id} with {changed}; to check that it is "
                "unchanged, run with those options; to load it again as a new load, pass --force"
            )
        raise UsageError(
            f"load {load_id} of {source} was started with {changed}; "
            "run with the same options to resume it (or --restart to start a new load)"
        )
    return Decision(Action.VERIFY if finished else Action.RESUME, load_id)


@dataclass
class Plan:
    """What this run does, as recorded in the ledger."""

    load_id: str
    committed: dict[int, asyncpg.Record]  # batches earlier runs committed: skip them after checking
    verify_only: bool = False  # the load succeeded before: only check that the source is unchanged
    nothing_to_do: str | None = None  # why this run has no work
    elsewhere: str | None = None  # ... OTHER_RUN or SAME_CONTENT: another load has the source now


OTHER_RUN = "other-run"  # another run sharing the file set claimed the source (see Ledger.claim)
SAME_CONTENT = "same-content"  # a load of the same content, under another name, is under way


def boundaries(options: LoadOptions) -> dict[str, Any]:
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


def command_key(options: LoadOptions, arguments: Sequence[str]) -> str:
    """What makes runs the same command, which may share a table and split its file set:
    the same sources as given (made absolute: each host may start in another directory),
    table, options and ledger."""
    same = {
        "sources": [os.path.abspath(a) for a in arguments], "table": options.table, "create": options.create,
        "ledger": options.ledger_schema, **copy_options(options),
    }
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:32]


def copy_options(options: LoadOptions) -> dict[str, Any]:
    """What the ledger keeps of a load's options: its boundaries, and what else COPY needs to
    read its records again as it did (`loader retry-rejects` loads a rejects file with them)."""
    kept = {**boundaries(options), "null": options.dialect.null, "columns": list(options.columns or []) or None}
    return {**kept, "mode": options.mode, "key": list(options.key or []) or None, "on_conflict": options.on_conflict}


def source_name(source: Source, options: LoadOptions) -> str:
    if options.shown_as is not None:
        return options.shown_as
    return "-" if source.is_stdin else os.path.abspath(source.name)


def load_key(options: LoadOptions, source: Source, target: Target) -> str | None:
    """Runs of the same command on the same source and table are one load; None: not resumable."""
    if options.load_name is not None:
        identity = "name:" + options.load_name
    elif source.is_stdin:
        return None
    else:
        identity = "file:" + _real_path(source)
    return hashlib.sha256(f"{identity}{_mode(options)}\0{target.oid}".encode()).hexdigest()[:32]


def _real_path(source: Source) -> str:
    """The opened file's path, every symbolic link resolved: on Linux the kernel has it (one
    readlink, where os.path.realpath takes a system call per component of the path)."""
    try:
        link = os.readlink(f"/proc/self/fd/{source.raw.fileno()}")
    except (OSError, ValueError):
        link = ""
    if link.startswith("/") and not link.endswith(" (deleted)"):
        return link
    return os.path.realpath(source.name)


def _mode(options: LoadOptions) -> str:
    """Another mode is another load of the same source."""
    if options.mode == "append":
        return ""
    return f"\0{options.mode}\0{','.join(options.key or ())}\0{options.on_conflict}"


def content_key(options: LoadOptions, source: Source, target: Target) -> str | None:
    """The file's content as stored (see Source.fingerprint), with the table and the mode. A
    file renamed, moved, copied or hard-linked has the same; whether it is the same is then
    checked batch by batch (see same_batches). None when the load goes by a name
    (--load-name, stdin, a rejects file being retried)."""
    if options.load_name is not None or options.shown_as is not None:
        return None
    fingerprint = source.fingerprint()
    if fingerprint is None:
        return None
    digest = fingerprint.copy()
    digest.update(f"{_mode(options)}\0{target.oid}".encode())
    return digest.hexdigest()[:32]


def same_batches(path: str, options: LoadOptions, committed: dict[int, asyncpg.Record], whole: bool) -> bool:
    """Whether the file cuts into batches with the checksums of `committed`, the batches a
    load committed (and into no other batch, when the load was `whole`, i.e. finished).
    Reads the file through."""
    try:
        source = open_source(path)
    except LoaderError:
        return False
    try:
        batcher = Batcher.of_load(source, options)
        if options.dialect.header:
            batcher.read_header()
        count = 0
        for batch in batcher:
            count += 1
            row = committed.get(batch.number)
            if (row is None and whole) or (row is not None and row["checksum"] != batch.checksum):
                return False
            batcher.buffers.give_back(batch)
        return count >= max(committed, default=0) and (not whole or count == len(committed))
    except LoaderError:
        return False
    finally:
        source.close()


def mtime(source: Source) -> float | None:
    return None if source.is_stdin else os.stat(source.name).st_mtime


async def plan(
    conn: asyncpg.Connection,
    ledger: Ledger,
    options: LoadOptions,
    source: Source,
    target: Target,
    holder: str,
    renew: Callable[[], Awaitable[None]] | None = None,
) -> Plan:
    """Decide from the ledger, under the table's lease (`renew` keeps it while a file is read
    through), and record a new or resumed load as this run's (`holder`). A run that shares
    its file set claims the source before it loads it (see Ledger.claim); a source loaded
    and unchanged since, it skips without a claim: a re-run of a set claims nothing."""
    key = load_key(options, source, target)
    size, modified, cut = source.size, mtime(source), boundaries(options)
    content = content_key(options, source, target)
    row = await ledger.latest(conn, key, content, holder) if key or content else None
    done = _done(row, options, size, modified, cut)
    if done is not None:
        return _nothing(done, row, options)
    if options.command is not None and key is not None:
        other = await ledger.claim(conn, key, holder)
        if other is not None:
            by = "loaded by another run of this command" + (f" ({other})" if other else "")
            return Plan("", {}, nothing_to_do=by, elsewhere=OTHER_RUN)
        row = await ledger.latest(conn, key, content, holder)  # as it is once the source is this run's
    if row is not None and not row["same_path"]:  # no load of this path; one of the same content
        if row["live"]:  # told again once it has ended (see pipeline.load_set)
            by = f"the same content is being loaded from {row['source']} by load {row['load_id']}"
            return Plan(row["load_id"], {}, nothing_to_do=by, elsewhere=SAME_CONTENT)
        known = None if options.restart else await _known_content(conn, ledger, options, source, key, row, holder, renew)
        if known is not None:
            return known
        row = None
    decision = _decide(row, options, size, modified, cut)
    if decision.action is Action.NEW:
        load_id = uuid.uuid4().hex
        await ledger.start(
            conn, load_id, key, target.display, source_name(source, options), size, modified, copy_options(options), content,
            holder,
        )
        return Plan(load_id, {})
    if decision.action is Action.NOTHING:
        return _nothing(decision, row, options)
    assert decision.load_id is not None
    committed = await ledger.committed_batches(conn, decision.load_id)
    if decision.action is Action.VERIFY:
        return Plan(decision.load_id, committed, verify_only=True)
    await ledger.resume(conn, decision.load_id, size, modified, holder)
    return Plan(decision.load_id, committed)


def _nothing(decision: Decision, row: asyncpg.Record | None, options: LoadOptions) -> Plan:
    """The plan of a run with nothing to do: the load finished, by this run's command or not."""
    assert decision.load_id is not None
    if options.command is not None and row is not None and row["other_run"]:  # while this run ran
        by = f"loaded by another run of this command (load {decision.load_id})"
        return Plan(decision.load_id, {}, nothing_to_do=by, elsewhere=OTHER_RUN)
    return Plan(decision.load_id, {}, nothing_to_do=decision.note)


def _decide(
    row: asyncpg.Record | None, options: LoadOptions, size: int | None, modified: float | None, cut: dict[str, Any]
) -> Decision:
    """`decide`, on the load of this path that `row` (Ledger.latest) names."""
    previous = None
    if row is not None:
        previous = Previous(
            row["load_id"], row["state"], row["source_size"], row["source_mtime"], row["finished_at"], json.loads(row["boundaries"])
        )
    return decide(
        previous, restart=options.restart, force=options.force, size=size, mtime=modified, boundaries=cut,
        source=options.shown_as or options.source,
    )


def _done(
    row: asyncpg.Record | None, options: LoadOptions, size: int | None, modified: float | None, cut: dict[str, Any]
) -> Decision | None:
    """Nothing to do, when the load of this path that `row` names finished and the file is
    unchanged since, by a run that has ended: no claim is needed. None: the usual decision
    (a run still going, sharing the set, holds the source's claim: the claim tells)."""
    if row is None or not row["same_path"] or row["by_live_run"]:
        return None
    try:
        decision = _decide(row, options, size, modified, cut)
    except UsageError:
        return None  # told once the source is this run's
    return decision if decision.action is Action.NOTHING else None


async def _known_content(
    conn: asyncpg.Connection,
    ledger: Ledger,
    options: LoadOptions,
    source: Source,
    key: str | None,
    row: asyncpg.Record,
    holder: str,
    renew: Callable[[], Awaitable[None]] | None,
) -> Plan | None:
    """A file no load knows by its path whose content a load (`row`) has, under another name
    (see content_key), is that load's: skipped if it finished (unless --force), resumed under
    its new name if not. None: a new load."""
    cut = boundaries(options)
    if {k: json.loads(row["boundaries"]).get(k) for k in cut} != cut:
        return None  # cut into other batches: their checksums cannot tell
    finished = row["state"] == "succeeded"
    if finished and options.force:
        return None
    committed = await ledger.committed_batches(conn, row["load_id"])
    reading = asyncio.ensure_future(asyncio.to_thread(same_batches, source.name, options, committed, finished))
    while not reading.done():
        await asyncio.wait({reading}, timeout=RENEW_CHECK_S)
        if renew is not None and not reading.done():
            await renew()
    if not reading.result():
        return None
    if finished:
        done = f"{row['finished_at']:%Y-%m-%d %H:%M:%S %Z}"
        return Plan(
            row["load_id"], {},
            nothing_to_do=f"the same content was loaded from {row['source']} by load {row['load_id']} (finished {done}); "
            "--force loads it again",
        )
    log.warning("loader: %s is %s under another name: resuming its load %s", options.source, row["source"], row["load_id"])
    await ledger.rename_source(conn, row["load_id"], key, source_name(source, options))
    await ledger.resume(conn, row["load_id"], source.size, mtime(source), holder)
    return Plan(row["load_id"], committed)
