"""The load ledger in the target database: which loads ran and which batches they committed.

Its batch rows are written inside each batch's own transaction (see `sink`), which is what
makes a retried batch, or a resumed load, never load a row twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from . import sql
from .errors import UsageError, is_transient, server_message
from .rejects import Reject


class Ledger:
    """The ledger tables under one schema, with their statements rendered once."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.claim_sql = sql.render(sql.CLAIM_BATCH, schema=schema)
        self._committed_sql = sql.render(sql.COMMITTED_BATCH, schema=schema)
        self._start_sql = sql.render(sql.START_LOAD, schema=schema)
        self._finish_sql = sql.render(sql.FINISH_LOAD, schema=schema)
        self._set_counts_sql = sql.render(sql.SET_BATCH_COUNTS, schema=schema)
        self._insert_reject_sql = sql.render(sql.INSERT_REJECT, schema=schema)
        self._load_rejects_sql = sql.render(sql.LOAD_REJECTS, schema=schema)

    async def ensure(self, conn: asyncpg.Connection) -> None:
        """Create the ledger if it is missing; serialised so concurrent first loads do not race."""
        last_table = sql.qualified(self.schema, "rejects")  # the last one ledger.sql creates
        if await conn.fetchval(sql.LEDGER_EXISTS, last_table):
            return
        try:
            async with conn.transaction():
                await conn.execute(sql.LEDGER_LOCK)
                if not await conn.fetchval(sql.SCHEMA_EXISTS, sql.quote_ident(self.schema)):
                    await conn.execute(sql.render(sql.CREATE_SCHEMA, schema=self.schema))
                await conn.execute(sql.render(sql.sql_file("ledger.sql"), schema=self.schema))
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            raise UsageError(
                f"cannot create the load ledger in schema {self.schema}: {server_message(exc)} "
                "(grant CREATE, or have an owner run sql/ledger.sql; see --ledger-schema)"
            ) from None

    async def start(
        self,
        conn: asyncpg.Connection,
        load_id: str,
        target: str,
        source: str,
        source_size: int | None,
        boundaries: dict[str, Any],
    ) -> None:
        await conn.execute(self._start_sql, load_id, target, source, source_size, json.dumps(boundaries))

    async def committed(self, conn: asyncpg.Connection, load_id: str, batch_no: int) -> asyncpg.Record | None:
        return await conn.fetchrow(self._committed_sql, load_id, batch_no)

    async def record_rejects(
        self, conn: asyncpg.Connection, load_id: str, batch_no: int, loaded: int, rejects: Sequence[Reject]
    ) -> None:
        """In the batch's transaction: its real counts, and its refused rows."""
        await conn.execute(self._set_counts_sql, load_id, batch_no, loaded, len(rejects))
        await conn.executemany(
            self._insert_reject_sql,
            [(load_id, batch_no, r.line, r.sqlstate, r.message, r.record) for r in rejects],
        )

    async def rejects(self, conn: asyncpg.Connection, load_id: str) -> AsyncIterator[Reject]:
        """Every row refused in this load, over all its runs, in source order (needs a transaction)."""
        async for row in conn.cursor(self._load_rejects_sql, load_id, prefetch=1000):
            yield Reject(row["line"], row["sqlstate"], row["message"], bytes(row["record"]))

    async def finish(
        self,
        conn: asyncpg.Connection,
        load_id: str,
        state: str,
        rows_read: int,
        rows_loaded: int,
        rows_rejected: int,
        message: str | None,
    ) -> None:
        await conn.execute(self._finish_sql, load_id, state, rows_read, rows_loaded, rows_rejected, message)
