"""The load's own connection: it holds the table's lease for the whole load, plans the load,
watches the replicas and closes the load in the ledger; the pool's connections only load
batches. When the server restarts under it, it reconnects and takes the lease back, or stops
the load (exit 75) if another load took the table meanwhile.

The lease (see ledger.Lease) is a row in the ledger rather than a lock held by the session,
so that exclusion works through a connection pooler too, where "the session" is whichever
server connection the pooler lends for the next statement."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import asyncpg

from . import sql
from .connect import connect, is_pooled
from .errors import TryAgainLater, is_transient
from .ledger import Lease, Ledger, take_lease
from .options import LoadOptions
from .stop import unless_interrupted

log = logging.getLogger("loader")

SESSION_CHECK_S = 0.5
RENEWALS_PER_LEASE = 4  # a renewal may fail (a lost connection) and the lease still hold


class ControlSession:
    """`async with ControlSession(options, on_retry, interrupt) as session`: connected on entry
    (a signal meanwhile cancels it); on exit the lease is given up and the session closed."""

    def __init__(
        self,
        options: LoadOptions,
        on_retry: Callable[[BaseException], None],
        interrupt: asyncio.Event | None = None,
        waiting: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.waiting = waiting  # told the table when another load holds it (--wait-lock)
        self.on_retry = on_retry
        self.interrupt = interrupt
        self.application_name = options.application_name
        self.pooled = False  # a connection pooler stands between us and the server
        self.ledger = Ledger(options.ledger_schema)
        self.lease: Lease | None = None  # once the table is ours
        self.holder = uuid.uuid4().hex  # this run, in the ledger's leases and claims
        self._renewed = 0.0
        self._conn: asyncpg.Connection | None = None
        self._turn = asyncio.Lock()

    async def __aenter__(self) -> ControlSession:
        first = await unless_interrupted(connect(self.options, on_retry=self.on_retry), self.interrupt)
        self.pooled = await is_pooled(first)
        if self.pooled:
            self._conn = first
            return self
        # No pooler: a session that prepares its statements, which a file set's loads run again and again.
        await first.close()
        self._conn = await unless_interrupted(connect(self.options, on_retry=self.on_retry, direct=True), self.interrupt)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is None or self._conn.is_closed():
            return
        if self.lease is not None:  # else the next run waits for the session's end, or the expiry
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.ledger.release_lease(self._conn, self.lease)
        await self._conn.close()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One step of a load on this session (planning it, ending it, renewing the lease): the
        loads of a file set that overlap take turns, since a connection runs one statement at
        a time. Steps do not nest."""
        async with self._turn:
            yield

    @property
    def conn(self) -> asyncpg.Connection:
        """The connection as it is (planning runs before anything can break it)."""
        assert self._conn is not None, "use the session inside `async with`"
        return self._conn

    async def get(self) -> asyncpg.Connection:
        """The connection, reconnected (and the lease taken back) if the server ended it. A
        FATAL read while the connection was idle (a server restart) leaves it looking open,
        and its next call fails on the client: a trivial query tells, and the failure closes
        it. Callers take turns (see turn)."""
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
        """Take the table's lease, waiting up to --wait-lock while another command holds it. A
        session that holds it already (the loads of a file set, one after another) keeps it."""
        if self.lease is not None and self.lease.table_oid == table_oid:
            return
        client = f"{socket.gethostname()} pid {os.getpid()}"
        lease = Lease(table_oid, table, self.holder, client, not self.pooled, self.options.lease, self.options.command)
        await take_lease(self.conn, self.ledger, lease, self.options.wait_lock, self.waiting)
        self.lease, self._renewed = lease, time.monotonic()

    async def name(self, application_name: str, load_id: str) -> None:
        """The load is planned: its sessions and its lease say which load they are."""
        if application_name != self.application_name:  # a file set's loads share one name
            self.application_name = application_name
            await self.conn.execute(sql.SET_APPLICATION_NAME, application_name)
        if self.lease is not None:  # a dry run takes none
            await self._renew(load_id)

    async def reconnect(self) -> None:
        log.warning("loader: the load's session was lost (server restart?): reconnecting")
        self._conn = await connect(self.options, on_retry=self.on_retry, direct=not self.pooled)
        await self._conn.execute(sql.SET_APPLICATION_NAME, self.application_name)
        if self.lease is not None:  # taken back at once, or another load got it meanwhile: exit 75
            self.pooled = await is_pooled(self._conn)
            lease = dataclasses.replace(self.lease, direct=not self.pooled)  # the new session's own
            await take_lease(self._conn, self.ledger, lease, wait=0.0)
            self.lease, self._renewed = lease, time.monotonic()

    async def renew(self) -> None:
        """Renew the lease now, if it is due (a long step between batches, such as reading a
        file through before deciding, must not let it expire). Within a turn."""
        if self._renewal_due():
            await self._renew()

    def _renewal_due(self) -> bool:
        return self.lease is not None and time.monotonic() - self._renewed >= self.lease.seconds / RENEWALS_PER_LEASE

    async def _renew(self, load_id: str | None = None) -> None:
        assert self.lease is not None
        if not await self.ledger.renew_lease(self.conn, self.lease, load_id):
            raise TryAgainLater(
                f"another load took {self.lease.table} over: this one had not renewed its lease for "
                f"{self.lease.seconds:g} s (see --lease); run the same command again to resume"
            )
        self._renewed = time.monotonic()

    async def keep(self) -> None:
        """Watch the session while batches load, so the lease is taken back as soon as it can
        be, and renew the lease well before it expires. Returns only by raising (TryAgainLater
        when another load took the table)."""
        while True:
            await asyncio.sleep(SESSION_CHECK_S)
            async with self.turn():
                await self._check()

    async def _check(self) -> None:
        if self.conn.is_closed():
            await self.reconnect()
        elif self._renewal_due():
            try:
                await self._renew()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self.conn.is_closed():
                    await self.reconnect()  # else tried again at the next check
