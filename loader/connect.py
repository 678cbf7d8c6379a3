"""Connecting to PostgreSQL: where (the DSN), how (session settings, retries), the pool, and
what messages may say about it (never the password).

This is the one place where asyncpg's exceptions about connecting become the loader's own
errors.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

from . import sql
from .errors import PROTOCOL_VIOLATION, LoaderError, UsageError, is_transient, server_message, sqlstate
from .options import ConnectOptions
from .retry import retrying

T = TypeVar("T")


def resolve_dsn(dsn: str | None) -> str | None:
    """--dsn, else $DATABASE_URL, else None (asyncpg then reads PG* variables and .pgpass)."""
    return dsn or os.environ.get("DATABASE_URL") or None


def describe_server(dsn: str | None) -> str:
    """Where we connect, for messages: host, port and database, never the password."""
    if dsn and "://" in dsn:
        parts = urlsplit(dsn)
        host = parts.hostname or os.environ.get("PGHOST", "localhost")
        try:
            port = parts.port or os.environ.get("PGPORT", 5432)
        except ValueError:
            port = "?"
        database = parts.path.lstrip("/") or os.environ.get("PGDATABASE", "")
    else:
        host = os.environ.get("PGHOST", "localhost")
        port = os.environ.get("PGPORT", 5432)
        database = os.environ.get("PGDATABASE", "")
    return f"{host}:{port}/{database}" if database else f"{host}:{port}"


def redact(text: str, dsn: str | None) -> str:
    """Remove the DSN's password from a message, wherever a library may have echoed it."""
    if dsn and "://" in dsn:
        try:
            password = urlsplit(dsn).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "****")
    return text


def _transient_at_connect(exc: BaseException) -> bool:
    """A protocol violation at connect (a pooler refusing a startup parameter, a server that
    speaks another protocol) will be the same on every attempt: said at once, not retried."""
    return is_transient(exc) and sqlstate(exc) != PROTOCOL_VIOLATION


async def _connecting(options: ConnectOptions, connect: Callable[[str | None], Awaitable[T]], on_retry: Callable[[BaseException], None] | None) -> T:
    """Run `connect` with the load's retry policy; failures become one clear LoaderError."""
    dsn = resolve_dsn(options.dsn)
    server = describe_server(dsn)
    try:
        async for attempt in retrying(options.retry, on_retry, transient=_transient_at_connect):
            with attempt:
                return await connect(dsn)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise UsageError(f"cannot log in to {server}: {redact(server_message(exc), dsn)}") from None
    except asyncpg.InvalidCatalogNameError as exc:
        raise UsageError(f"cannot connect to {server}: {redact(server_message(exc), dsn)}") from None
    except (asyncpg.exceptions.ClientConfigurationError, ValueError) as exc:
        raise UsageError(f"invalid connection settings: {redact(str(exc), dsn)}") from None
    except asyncpg.ProtocolViolationError as exc:
        reason = redact(server_message(exc), dsn)
        hint = ""
        if "startup parameter" in reason:
            hint = (
                " (a connection pooler refuses settings sent at connect: drop them from the connection "
                "string, or list them in its ignore_startup_parameters)"
            )
        raise UsageError(f"cannot connect to {server}: {reason}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to connect is one line, said once
        reason = redact(" ".join(str(exc).split()) or type(exc).__name__, dsn)
        if is_transient(exc):
            raise LoaderError(
                f"cannot connect to PostgreSQL at {server} after {options.retry.attempts} attempts: {reason}"
            ) from None
        raise LoaderError(f"cannot connect to PostgreSQL at {server}: {reason}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def transaction_settings(options: ConnectOptions) -> dict[str, str]:
    """What each batch's transaction sets for itself (SET LOCAL, in its BEGIN): a pooler such
    as PgBouncer refuses settings as startup parameters, and in transaction pooling a session
    setting would stay on a server connection that other clients use next.

    A batch's commit need not wait for its WAL to reach the disk: the batch's rows and its
    ledger row are lost together or kept together, and the load's last commit (synchronous,
    on its own session) makes them all durable before it reports success, after checking that
    none was lost (see pipeline._Load._finish)."""
    settings = {"synchronous_commit": "off"}
    if options.statement_timeout is not None:
        settings["statement_timeout"] = f"{max(1, round(options.statement_timeout * 1000))}ms"
    if options.lock_timeout is not None:
        settings["lock_timeout"] = f"{max(1, round(options.lock_timeout * 1000))}ms"
    return settings


async def open_pool(
    options: ConnectOptions,
    size: int,
    application_name: str,
    on_retry: Callable[[BaseException], None] | None = None,
    lazy: bool = False,
    pooled: bool = False,
) -> asyncpg.Pool:
    """A pool of at most `size` connections (all opened now unless `lazy`); transient failures
    are retried, the rest explained. Idle connections of a lazy pool close after 10 s, so a
    load that lowers its concurrency gives connections back. Behind a pooler (`pooled`) no
    statement is prepared by name: its next transaction may run on another server session."""

    async def create(dsn: str | None) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            dsn,
            min_size=1 if lazy else size,
            max_size=size,
            max_inactive_connection_lifetime=10.0 if lazy else 300.0,
            timeout=15,
            server_settings={"application_name": application_name},
            statement_cache_size=0 if pooled else 100,
            reset=_nothing_to_reset,
        )

    return await _connecting(options, create, on_retry)


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """Pool connections only ever run batch transactions (which asyncpg rolls back if left
    open): no session state, no advisory locks, no LISTEN to undo. asyncpg's default reset
    would cost a round trip per batch."""


async def connect(
    options: ConnectOptions, on_retry: Callable[[BaseException], None] | None = None, direct: bool = False
) -> asyncpg.Connection:
    """One connection outside the pool, for the load's own session. It prepares statements by
    name only when it is known to be `direct` (no pooler: see is_pooled), to run them again
    in one round trip."""

    async def create(dsn: str | None) -> asyncpg.Connection:
        return await asyncpg.connect(
            dsn, timeout=15, server_settings={"application_name": options.application_name},
            statement_cache_size=100 if direct else 0,
        )

    return await _connecting(options, create, on_retry)


async def is_pooled(conn: asyncpg.Connection) -> bool:
    """Whether a connection pooler (PgBouncer, ...) stands between us and the server: the
    process id the server announced at connect is then the pooler's invention, not that of
    the server session running our statements."""
    return bool(conn.get_server_pid() != await conn.fetchval(sql.BACKEND_PID))
