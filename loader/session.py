"""The load's own connection: it holds the table's lock for the whole load, plans the load,
watches the replicas and closes the load in the ledger; the pool's connections only load
batches. When the server restarts under it, it reconnects and takes the lock back, or stops
the load (exit 75) if another load took the table meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType

import asyncpg

from . import sql
from .connect import connect
from .ledger import lock_table
from .options import LoadOptions
from .stop import unless_interrupted

log = logging.getLogger("loader")

SESSION_CHECK_S = 0.5


class ControlSession:
    """`async with ControlSession(options, on_retry, interrupt) as session`: connected on entry
    (a signal meanwhile cancels it), closed on exit."""

    def __init__(
        self, options: LoadOptions, on_retry: Callable[[BaseException], None], interrupt: asyncio.Event | None = None
    ) -> None:
        self.options = options
        self.on_retry = on_retry
        self.interrupt = interrupt
        self.application_name = options.application_name
        self.table: tuple[int, str] | None = None  # (oid, name) once the lock is held
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> ControlSession:
        self._conn = await unless_interrupted(connect(self.options, on_retry=self.on_retry), self.interrupt)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    @property
    def conn(self) -> asyncpg.Connection:
        """The connection as it is (planning runs before anything can break it)."""
        assert self._conn is not None, "use the session inside `async with`"
        return self._conn

    async def get(self) -> asyncpg.Connection:
        """The connection, reconnected (and the lock taken back) if the server ended it. A
        FATAL read while the connection was idle (a server restart) leaves it looking open,
        and its next call fails on the client: a trivial query tells, and the failure closes
        it. (Callers are sequential: the replica watcher while batches load, the end after.)"""
        if not self.conn.is_closed():
            try:
                await self.conn.execute("SELECT 1")
            except Exception:
                if not self.conn.is_closed():
                    raise
        if self.conn.is_closed():
            await self.reconnect()
        return self.conn

    async def lock(self, table_oid: int, table: str) -> None:
        await lock_table(self.conn, table_oid, table, self.options.wait_lock)
        self.table = (table_oid, table)

    async def name(self, application_name: str) -> None:
        self.application_name = application_name
        await self.conn.execute(sql.SET_APPLICATION_NAME, application_name)

    async def reconnect(self) -> None:
        log.warning("loader: the load's session was lost (server restart?): reconnecting")
        self._conn = await connect(self.options, on_retry=self.on_retry)
        await self._conn.execute(sql.SET_APPLICATION_NAME, self.application_name)
        if self.table is not None:  # taken back at once, or another load got it meanwhile: exit 75
            await lock_table(self._conn, *self.table, wait=0.0)

    async def keep(self) -> None:
        """Watch the session while batches load, so the lock is taken back as soon as it can be.
        Returns only by raising (TryAgainLater when another load took the table)."""
        while True:
            await asyncio.sleep(SESSION_CHECK_S)
            if self.conn.is_closed():
                await self.reconnect()
