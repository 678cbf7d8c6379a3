"""What a run does, decided from the ledger: start a new load, resume one, verify a finished
one against its source, or nothing. `decide` is the decision alone, a pure function of what
the ledger says and what the run asks; `plan` reads the ledger, decides, and records it."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import asyncpg

from .errors import UsageError
from .ledger import Ledger
from .options import LoadOptions
from .source import Source
from .target import Target


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
        identity = "file:" + os.path.realpath(source.name)
    if options.mode != "append":  # another mode is another load of the same source
        identity += f"\0{options.mode}\0{','.join(options.key or ())}\0{options.on_conflict}"
    return hashlib.sha256(f"{identity}\0{target.oid}".encode()).hexdigest()[:32]


def mtime(source: Source) -> float | None:
    return None if source.is_stdin else os.stat(source.name).st_mtime


async def plan(conn: asyncpg.Connection, ledger: Ledger, options: LoadOptions, source: Source, target: Target) -> Plan:
    """Decide from the ledger, under the table's lock, and record a new or resumed load."""
    key = load_key(options, source, target)
    size, modified, cut = source.size, mtime(source), boundaries(options)
    row = await ledger.latest(conn, key) if key else None
    previous = (
        Previous(
            row["load_id"], row["state"], row["source_size"], row["source_mtime"], row["finished_at"],
            json.loads(row["boundaries"]),
        )
        if row is not None
        else None
    )
    decision = decide(
        previous, restart=options.restart, force=options.force, size=size, mtime=modified, boundaries=cut,
        source=options.shown_as or options.source,
    )
    if decision.action is Action.NEW:
        load_id = uuid.uuid4().hex
        await ledger.start(conn, load_id, key, target.display, source_name(source, options), size, modified, copy_options(options))
        return Plan(load_id, {})
    assert decision.load_id is not None
    if decision.action is Action.NOTHING:
        return Plan(decision.load_id, {}, nothing_to_do=decision.note)
    committed = await ledger.committed_batches(conn, decision.load_id)
    if decision.action is Action.VERIFY:
        return Plan(decision.load_id, committed, verify_only=True)
    await ledger.resume(conn, decision.load_id, size, modified)
    return Plan(decision.load_id, committed)
