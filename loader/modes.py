"""Load modes: how a batch's rows reach the table.

- append: COPY into the table.
- upsert: COPY into a temporary stage in the batch's own transaction (in parallel, like
  append), then merge the stage into the table with INSERT ... ON CONFLICT. Merges go one at
  a time, in file order (`Turns`): a key's last row in the file wins whatever batch holds
  it, and two merges never wait on each other's rows, so workers cannot deadlock.
- replace: load into a stage table shaped like the table (its constraints and indexes, so
  rows are refused as the table would refuse them), exactly once as an append; at the end,
  one transaction makes the table's rows the stage's and marks the load done. Readers see
  the old rows until that commit, and never wait: nothing takes more than ROW EXCLUSIVE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from . import sql
from .errors import LoaderError, UsageError, is_transient, server_message
from .target import Target, resolve_target


class OutOfTurn(LoaderError):
    """A batch before this one failed: merging this one would put a later row before an
    earlier one. It rolls back, and the load stops on the earlier batch's error."""


class Turns:
    """Batches merge in file order: batch n merges once every batch before it is done, either
    committed by an earlier run (`done`) or committed now. A batch that ends without
    committing (failed, cancelled, or skipped because the load stops) stops every batch after
    it: what is committed is always a prefix of the file, so a resumed upsert still merges in
    file order. Batch numbers start at 1 (see batching.Batch)."""

    def __init__(self, done: Iterable[int] = ()) -> None:
        self._done = set(done)
        self._next = 1  # the first batch not done
        self._failed: int | None = None
        self._moved = asyncio.Event()
        self._advance()

    async def wait(self, number: int) -> None:
        while True:
            moved = self._moved
            if self._failed is not None and self._failed < number:
                raise OutOfTurn(f"batch {number} was not merged: batch {self._failed} before it did not go through")
            if self._next == number:
                return
            await moved.wait()

    def leave(self, number: int, committed: bool) -> None:
        if committed:
            self._done.add(number)
            self._advance()
        elif self._failed is None or number < self._failed:
            self._failed = number
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

    @property
    def create_stage(self) -> str:
        return sql.create_upsert_stage(self.target.schema, self.target.name, self.columns)

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
    return Upsert(target, columns, names, update, not_null)


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
