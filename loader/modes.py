"""Load modes: how a batch's rows reach the table.

- append: COPY into the table.
- upsert: COPY into a temporary stage in the batch's own transaction (in parallel, like
  append), then merge the stage into the table with INSERT ... ON CONFLICT. Batches that may
  share a key merge one at a time, in file order (`Turns`): a key's last row in the file
  wins whatever batch holds it, and two merges never wait on each other's rows, so workers
  cannot deadlock.
- replace: load into a stage table shaped like the table (its constraints and indexes, so
  rows are refused as the table would refuse them), exactly once as an append; at the end,
  one transaction makes the table's rows the stage's and marks the load done. Readers see
  the old rows until that commit, and never wait: nothing takes more than ROW EXCLUSIVE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import sql
from .errors import LoaderError, UsageError, is_transient, server_message
from .target import Target, resolve_target


class OutOfTurn(LoaderError):
    """A batch before this one, whose keys may meet its own, failed: merging this one would
    put a later row before an earlier one. It rolls back, and the load stops on the earlier
    batch's error."""


# The lowest and the highest key of a batch's rows; NO_KEYS when none has a whole key;
# None when unknown (the key's types have no order the client reproduces).
Span = tuple[tuple[Any, ...], tuple[Any, ...]]
NO_KEYS: Span = ((), ())


def apart(a: Span | None, b: Span | None) -> bool:
    """Whether two batches cannot share a key."""
    if a == NO_KEYS or b == NO_KEYS:
        return True
    if a is None or b is None:
        return False
    return a[1] < b[0] or b[1] < a[0]


class Turns:
    """The order of merges. Batch n merges once every batch before it is either done
    (committed by an earlier run or now) or holds keys in a range apart from n's. So the
    rows of one key merge in file order, whatever batches hold them; and two merges that run
    at once share no key: neither waits on a row the other locked, so workers cannot
    deadlock. A file sorted or clustered by its key merges on every worker at once; one whose
    batches' ranges overlap merges one batch at a time, in file order.

    A batch that ends without committing (failed, cancelled, or skipped because the load
    stops) stops every later batch whose keys may meet its own: for every key, what is
    committed is a prefix of its rows in the file, so a resumed upsert still merges them in
    file order. Batch numbers start at 1 (see batching.Batch)."""

    def __init__(self, done: Iterable[int] = ()) -> None:
        self._done = set(done)
        self._next = 1  # the first batch not done
        self._spans: dict[int, Span | None] = {}  # batches not done that reached their merge
        self._failed: set[int] = set()
        self._moved = asyncio.Event()
        self._advance()

    async def wait(self, number: int, span: Span | None = None) -> None:
        """Until batch `number`, whose keys lie in `span`, may merge. A batch's keys do not
        change between attempts, so the first span it reports holds for all of them."""
        known = self._spans.get(number)
        self._spans[number] = known if known is not None else span
        self._wake()  # a batch after this one may have waited to learn its span
        while True:
            moved = self._moved
            if self._may_merge(number):
                return
            await moved.wait()

    def _may_merge(self, number: int) -> bool:
        span = self._spans[number]
        free = True
        for earlier in range(self._next, number):
            if earlier in self._done or apart(self._spans.get(earlier), span):
                continue
            if earlier in self._failed:
                raise OutOfTurn(
                    f"batch {number} was not merged: batch {earlier} before it, whose keys may be among its own, "
                    "did not go through"
                )
            free = False  # may hold one of this batch's keys: it merges first
        return free

    def leave(self, number: int, committed: bool) -> None:
        if committed:
            self._done.add(number)
            self._spans.pop(number, None)
            self._advance()
        else:
            self._failed.add(number)
        self._wake()

    def _wake(self) -> None:
        self._moved.set()  # wake every waiter, each of which looks again
        self._moved = asyncio.Event()

    def _advance(self) -> None:
        while self._next in self._done:
            self._done.discard(self._next)
            self._next += 1


@dataclass(frozen=True)
class Upsert:
    """The statements of an upsert into `target` of the file's `columns`, matched on `key`."""

    target: Target
    columns: tuple[str, ...]
    key: tuple[str, ...]
    update: bool
    key_not_null: bool = False  # no row can have a NULL in its key (a primary key's columns)
    key_ordered: bool = False  # the key's order is Python's on its values: batches' spans compare

    @property
    def create_stage(self) -> str:
        return sql.create_upsert_stage(self.target.schema, self.target.name, self.columns)

    @property
    def span(self) -> str | None:
        """What finds the stage's key range, when ranges can be compared (see Turns)."""
        return sql.upsert_stage_span(self.key) if self.key_ordered else None

    @property
    def merge(self) -> str:
        return sql.merge_upsert_stage(
            self.target.schema, self.target.name, self.columns, self.key, self.update, self.key_not_null
        )


async def upsert(
    conn: asyncpg.Connection, target: Target, key: Sequence[str], columns: tuple[str, ...], update: bool
) -> Upsert:
    """The upsert of the file's `columns` on --key, checked: the key among the file's columns,
    and exactly the columns of a primary key or unique index (what ON CONFLICT needs), else a
    UsageError."""
    names = target.pick_columns(key, "--key")
    missing = [name for name in names if name not in columns]
    if missing:
        raise UsageError(f"--key {', '.join(missing)}: not among the file's columns ({', '.join(columns)})")
    if not await conn.fetchval(sql.UNIQUE_KEY, target.oid, list(names)):
        raise UsageError(
            f"--key {','.join(names)}: no primary key or unique index of {target.display} has exactly these columns; "
            "an upsert matches rows on one (create it, or name its columns)"
        )
    not_null = bool(await conn.fetchval(sql.NOT_NULL, target.oid, list(names)))
    ordered = bool(await conn.fetchval(sql.KEY_ORDER_KNOWN, target.oid, list(names)))
    return Upsert(target, columns, names, update, not_null, ordered)


def replace_stage_name(load_id: str) -> str:
    return f"replace_{load_id}"


async def stage_for_replace(conn: asyncpg.Connection, target: Target, schema: str, load_id: str) -> Target:
    """The stage of a replace: made when the load starts, found again when it resumes."""
    name = replace_stage_name(load_id)
    if await conn.fetchval(sql.SCHEMA_TABLE_EXISTS, schema, name):
        return await resolve_target(conn, sql.qualified(schema, name))
    try:
        async with conn.transaction():
            for statement in await replace_stage_statements(conn, target, schema, name):
                await conn.execute(statement)
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        raise UsageError(
            f"--mode replace loads into a table of its own in schema {sql.quote_ident(schema)} first, and cannot "
            f"make it: {server_message(exc)} (grant CREATE on the schema, see --ledger-schema)"
        ) from None
    return await resolve_target(conn, sql.qualified(schema, name))


async def replace_stage_statements(conn: asyncpg.Connection, target: Target, schema: str, name: str) -> list[str]:
    """What makes a replace's stage: the table's shape, its identity columns drawing from the
    table's own sequences, and its foreign keys."""
    statements = [sql.create_replace_stage(schema, name, target.schema, target.name)]
    for row in await conn.fetch(sql.IDENTITY_SEQUENCES, target.oid):
        statements.append(sql.default_from_sequence(schema, name, row["attname"], row["sequence"]))
    for row in await conn.fetch(sql.FOREIGN_KEYS, target.oid):
        statements.append(sql.add_foreign_key(schema, name, row["conname"], row["definition"]))
    return statements


async def switch_to_stage(conn: asyncpg.Connection, target: Target, stage: Target) -> None:
    """In the caller's transaction: the table's rows become the stage's; the stage goes."""
    key = await conn.fetchval(sql.PRIMARY_KEY, target.oid)
    await conn.execute(sql.set_local(sql.MERGE_WORK_MEM))
    await conn.execute(sql.replace_from_stage(stage.schema, stage.name, target.schema, target.name, target.columns, key))
    await conn.execute(sql.drop_table(stage.schema, stage.name))
