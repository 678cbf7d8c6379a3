"""The load ledger in the target database: which loads ran and which batches they committed.

Its batch rows are written inside each batch's own transaction (see `sink`), which is what
makes a retried batch, or a resumed load, never load a row twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import sql
from .errors import TryAgainLater, UsageError, is_transient, server_message
from .rejects import Reject

log = logging.getLogger("loader")

# What a load needs on the ledger's tables (besides USAGE on its schema), and what `status` needs.
Grants = tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  # (tables, privileges on each of them), ...
LOAD_PRIVILEGES: Grants = (
    (("loads", "batches", "rejects", "leases", "claims"), ("SELECT", "INSERT", "UPDATE")),
    (("leases",), ("DELETE",)),
)
STATUS_PRIVILEGES: Grants = ((("loads", "batches", "leases"), ("SELECT",)),)


class Ledger:
    """The ledger tables under one schema, with their statements rendered once."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.claim_sql = sql.render(sql.CLAIM_BATCH, schema=schema)
        self._committed_sql = sql.render(sql.COMMITTED_BATCH, schema=schema)
        self._start_sql = sql.render(sql.START_LOAD, schema=schema)
        self._finish_sql = sql.render(sql.FINISH_LOAD, schema=schema)
        self._finish_whole_sql = sql.render(sql.FINISH_WHOLE_LOAD, schema=schema)
        self._set_counts_sql = sql.render(sql.SET_BATCH_COUNTS, schema=schema)
        self._insert_reject_sql = sql.render(sql.INSERT_REJECT, schema=schema)
        self._load_rejects_sql = sql.render(sql.LOAD_REJECTS, schema=schema)
        self._latest_sql = sql.render(sql.LATEST_LOAD, schema=schema)
        self._resume_sql = sql.render(sql.RESUME_LOAD, schema=schema)
        self._rename_source_sql = sql.render(sql.RENAME_SOURCE, schema=schema)
        self._committed_batches_sql = sql.render(sql.COMMITTED_BATCHES, schema=schema)
        self._recent_sql = sql.render(sql.RECENT_LOADS, schema=schema)
        self.count_rejects_sql = sql.render(sql.COUNT_REJECTS, schema=schema)
        self._update_source_sql = sql.render(sql.UPDATE_SOURCE, schema=schema)
        self._load_options_sql = sql.render(sql.LOAD_OPTIONS, schema=schema)
        self._take_lease_sql = sql.render(sql.TAKE_LEASE, schema=schema)
        self._renew_lease_sql = sql.render(sql.RENEW_LEASE, schema=schema)
        self._release_lease_sql = sql.render(sql.RELEASE_LEASE, schema=schema)
        self._lease_holder_sql = sql.render(sql.LEASE_HOLDER, schema=schema)
        self._claim_sql = sql.render(sql.CLAIM_SOURCE, schema=schema)
        self._claim_many_sql = sql.render(sql.CLAIM_SOURCES, schema=schema)
        self._known_sql = sql.render(sql.KNOWN_SOURCES, schema=schema)
        self._start_small_sql = sql.render(sql.START_SMALL_LOADS, schema=schema)
        self.finish_small_sql = sql.render(sql.FINISH_SMALL_LOADS, schema=schema)
        self._batches_present_sql = sql.render(sql.BATCHES_PRESENT, schema=schema)

    async def ensure(self, conn: asyncpg.Connection) -> None:
        """Create the ledger if it is missing (serialised, so concurrent first loads do not race),
        then check that this role may load through it: a UsageError naming the grants if not."""
        access = await self._access(conn, write=True)
        if not access["present"]:
            await self._create(conn)
            access = await self._access(conn, write=True)
        self._require(access, write=True)

    async def _create(self, conn: asyncpg.Connection) -> None:
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

    async def exists(self, conn: asyncpg.Connection) -> bool:
        return bool(await conn.fetchval(sql.LEDGER_EXISTS, self.schema))

    async def check_privileges(self, conn: asyncpg.Connection, write: bool) -> None:
        """A UsageError naming the grants, unless this role may load (`write`) or read the
        ledger: USAGE on its schema and, on its tables, LOAD_PRIVILEGES or STATUS_PRIVILEGES."""
        self._require(await self._access(conn, write), write)

    async def _access(self, conn: asyncpg.Connection, write: bool) -> asyncpg.Record:
        pairs = [(t, p) for tables, privileges in (LOAD_PRIVILEGES if write else STATUS_PRIVILEGES) for t in tables for p in privileges]
        return await conn.fetchrow(sql.LEDGER_PRIVILEGES, self.schema, [t for t, _ in pairs], [p for _, p in pairs])

    def _require(self, access: asyncpg.Record, write: bool) -> None:
        if access["granted"]:
            return
        role, schema = access["role"], self.schema
        grants = ", and ".join(
            f"{', '.join(privileges)} on {'its tables' if len(tables) > 1 else 'its table'} {', '.join(tables)}"
            for tables, privileges in (LOAD_PRIVILEGES if write else STATUS_PRIVILEGES)
        )
        needs = f"USAGE on the schema and {grants}"
        command = f"psql -v role={shlex.quote(role)} -v schema={shlex.quote(schema)} -f sql/grants.sql"
        raise UsageError(
            f"role {sql.quote_ident(role)} lacks privileges on the load ledger (schema {sql.quote_ident(schema)}): "
            f"{'' if write else 'status '}needs {needs}; an owner can grant them"
            f"{'' if write else ', with what a load needs,'} with sql/grants.sql ({command})"
        )

    async def start(
        self,
        conn: asyncpg.Connection,
        load_id: str,
        load_key: str | None,
        target: str,
        source: str,
        source_size: int | None,
        source_mtime: float | None,
        boundaries: dict[str, Any],
        content_key: str | None,
        holder: str,
    ) -> None:
        await conn.execute(
            self._start_sql, load_id, load_key, target, source, source_size, source_mtime, json.dumps(boundaries),
            content_key, holder,
        )

    async def load(self, conn: asyncpg.Connection, load_id: str) -> asyncpg.Record | None:
        """A load's table and the options it keeps (see plan.copy_options)."""
        return await conn.fetchrow(self._load_options_sql, load_id)

    async def latest(
        self, conn: asyncpg.Connection, load_key: str | None, content_key: str | None, holder: str
    ) -> asyncpg.Record | None:
        """The latest load of the same path, else of the same content (see sql.LATEST_LOAD)."""
        return await conn.fetchrow(self._latest_sql, load_key, content_key, holder)

    async def rename_source(self, conn: asyncpg.Connection, load_id: str, load_key: str | None, source: str) -> None:
        await conn.execute(self._rename_source_sql, load_id, load_key, source)

    async def resume(self, conn: asyncpg.Connection, load_id: str, size: int | None, mtime: float | None, holder: str) -> None:
        await conn.execute(self._resume_sql, load_id, size, mtime, holder)

    async def update_source(self, conn: asyncpg.Connection, load_id: str, size: int | None, mtime: float | None) -> None:
        """The source was verified unchanged: remember its size and mtime for the next quick check."""
        await conn.execute(self._update_source_sql, load_id, size, mtime)

    async def committed_batches(self, conn: asyncpg.Connection, load_id: str) -> dict[int, asyncpg.Record]:
        return {r["batch_no"]: r for r in await conn.fetch(self._committed_batches_sql, load_id)}

    async def recent(self, conn: asyncpg.Connection, table: str | None, limit: int) -> list[asyncpg.Record]:
        """The latest loads, newest first, as status shows them (see sql.RECENT_LOADS)."""
        access = await self._access(conn, write=False)
        if not access["present"]:
            raise UsageError(
                f"the load ledger in schema {sql.quote_ident(self.schema)} was made by an earlier version of loader: "
                "the next load brings it up to date (or have its owner run sql/ledger.sql)"
            )
        self._require(access, write=False)
        return list(await conn.fetch(self._recent_sql, table, limit))

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

    async def take_lease(self, conn: asyncpg.Connection, lease: Lease) -> bool:
        """Take the table's lease if no other command holds it; False: another's does."""
        async with conn.transaction():
            await conn.execute(sql.LEASE_LOCK, lease.table_oid)
            taken = await conn.fetchval(
                self._take_lease_sql, lease.table_oid, lease.table, lease.holder, lease.client, lease.direct,
                lease.seconds, lease.command,
            )
        return taken is not None

    async def renew_lease(self, conn: asyncpg.Connection, lease: Lease, load_id: str | None = None) -> bool:
        """Push the lease's expiry out again (and name the load it is for); False: it was lost."""
        renewed = await conn.fetchval(self._renew_lease_sql, lease.table_oid, lease.holder, lease.seconds, load_id)
        return renewed is not None

    async def release_lease(self, conn: asyncpg.Connection, lease: Lease) -> None:
        await conn.execute(self._release_lease_sql, lease.table_oid, lease.holder)

    async def lease_holder(self, conn: asyncpg.Connection, lease: Lease) -> asyncpg.Record | None:
        """The run that keeps `lease` from being taken."""
        return await conn.fetchrow(self._lease_holder_sql, lease.table_oid, lease.holder, lease.command)

    async def claim(self, conn: asyncpg.Connection, load_key: str, holder: str) -> str | None:
        """Take a source of a shared file set for this run; None: taken, else the run that is
        loading it (its host and process, or "" if it has just changed hands)."""
        row = await conn.fetchrow(self._claim_sql, load_key, holder)
        return None if row["claimed"] else str(row["client"] or "")

    async def claim_many(self, conn: asyncpg.Connection, load_keys: Sequence[str], holder: str) -> set[str]:
        """Take several sources of a shared file set at once (see claim): the keys taken."""
        rows = await conn.fetch(self._claim_many_sql, sorted(load_keys), holder)
        return {row["load_key"] for row in rows}

    async def known(self, conn: asyncpg.Connection, keys: Sequence[tuple[str | None, str | None]]) -> set[int]:
        """Which of the sources, by (load key, content key), a load has had: their indexes."""
        rows = await conn.fetch(self._known_sql, [k for k, _ in keys], [c for _, c in keys])
        return {row["i"] - 1 for row in rows}

    async def start_small(
        self, conn: asyncpg.Connection, loads: Sequence[tuple[str, str | None, str, int, float | None, str | None]],
        target: str, boundaries: dict[str, Any], holder: str,
    ) -> None:
        """Start loads of small sources (see sql.START_SMALL_LOADS): (load id, load key, source,
        size, mtime, content key) each."""
        columns = list(zip(*loads, strict=True))
        await conn.execute(self._start_small_sql, *map(list, columns), target, json.dumps(boundaries), holder)

    async def batches_present(self, conn: asyncpg.Connection, load_ids: Sequence[str]) -> int:
        """How many of these loads have a batch in the ledger."""
        return int(await conn.fetchval(self._batches_present_sql, list(load_ids)))

    async def finish(
        self,
        conn: asyncpg.Connection,
        load_id: str,
        state: str,
        message: str | None,
    ) -> None:
        await conn.execute(self._finish_sql, load_id, state, message)

    async def finish_whole(self, conn: asyncpg.Connection, load_id: str, committed_now: list[int]) -> bool:
        """Mark the load succeeded if every batch committed now is in the ledger (see
        sql.FINISH_WHOLE_LOAD); False, and nothing written, if one is not."""
        return await conn.fetchval(self._finish_whole_sql, load_id, committed_now) is not None


@dataclass(frozen=True)
class Lease:
    """A run's claim on its target table: one command per table at a time (see sql.TAKE_LEASE).
    `direct`: the run's session is its own server session (no pooler), so its end frees the
    table at once; else only the expiry, `seconds` after the last renewal, does. `command`:
    runs of the same command share the table (see plan.command_key); None: no other run."""

    table_oid: int
    table: str
    holder: str
    client: str
    direct: bool
    seconds: float
    command: str | None = None


async def take_lease(
    conn: asyncpg.Connection, ledger: Ledger, lease: Lease, wait: float, waiting: Callable[[str], None] | None = None
) -> None:
    """Take the table's lease, waiting up to `wait` s while another load holds it (said once,
    in the log and to `waiting`); then TryAgainLater, naming that load."""
    deadline = time.monotonic() + wait
    said = False
    while not await ledger.take_lease(conn, lease):
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait:g} s" if wait else ""
            raise TryAgainLater(
                f"another load of {lease.table} is running{await _holder(conn, ledger, lease)}{waited}; "
                "try again later, or pass --wait-lock SECONDS"
            )
        if not said:
            log.warning(
                "loader: another load of %s is running%s: waiting for it, up to %g s (--wait-lock)",
                lease.table, await _holder(conn, ledger, lease), wait,
            )
            if waiting is not None:
                waiting(lease.table)
            said = True
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


async def _holder(conn: asyncpg.Connection, ledger: Ledger, lease: Lease) -> str:
    """The load that holds the table, for a message: ` (load ..., host pid N, since ...)`."""
    holder = await ledger.lease_holder(conn, lease)
    if holder is None:
        return ""
    load = f"load {holder['load_id']}, " if holder["load_id"] else ""
    return f" ({load}{holder['client']}, since {holder['taken_at']:%Y-%m-%d %H:%M:%S %Z})"
