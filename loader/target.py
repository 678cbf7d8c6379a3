"""The target table: what the server resolves the name to, its columns, and a dry-run COPY
that proves the load can write there before anything is written.

This is the one place where asyncpg's exceptions about the target (finding the table and
its columns, checking the COPY options and privileges) become the loader's own errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from . import sql
from .copywire import copy_rows, copy_statement
from .errors import UsageError, is_transient, server_message
from .options import CsvDialect

_WRITABLE_RELKINDS = {"r": "table", "p": "partitioned table", "f": "foreign table"}


@dataclass(frozen=True)
class Target:
    """The table rows go into, as the server resolved it."""

    oid: int
    schema: str
    name: str
    columns: tuple[str, ...]  # every column a COPY can write, in table order
    relkind: str = "r"  # pg_class.relkind: r table, p partitioned table, f foreign table

    @property
    def display(self) -> str:
        return sql.qualified(self.schema, self.name)

    def pick_columns(self, names: Sequence[str], where: str) -> tuple[str, ...]:
        """Map names from the header or --columns to the table's columns: exact match first,
        then a unique case-insensitive one (a header "ID" for a column id)."""
        by_lower: dict[str, list[str]] = {}
        for column in self.columns:
            by_lower.setdefault(column.lower(), []).append(column)
        picked: list[str] = []
        for name in names:
            if name in self.columns:
                picked.append(name)
            elif len(by_lower.get(name.lower(), [])) == 1:
                picked.append(by_lower[name.lower()][0])
            else:
                known = ", ".join(self.columns)
                raise UsageError(f"{where} names {name!r}, which is not a column of {self.display} (columns: {known})")
        duplicated = {c for c in picked if picked.count(c) > 1}
        if duplicated:
            raise UsageError(f"{where} names column {sorted(duplicated)[0]!r} more than once")
        return tuple(picked)


async def resolve_target(conn: asyncpg.Connection, table: str) -> Target:
    try:
        row = await conn.fetchrow(sql.RESOLVE_TABLE, table)
    except asyncpg.PostgresError as exc:
        raise UsageError(f"--table {table}: {server_message(exc)}") from None
    if row is None:
        raise UsageError(f"table {table} does not exist (check the name, its schema and the quotes)")
    if row["relkind"] not in _WRITABLE_RELKINDS:
        raise UsageError(f"{table} is not a table; COPY can load only tables")
    columns = await conn.fetch(sql.TABLE_COLUMNS, row["oid"])
    return Target(row["oid"], row["nspname"], row["relname"], tuple(r["attname"] for r in columns), row["relkind"])


async def check_copy(conn: asyncpg.Connection, target: Target, columns: Sequence[str], dialect: CsvDialect) -> None:
    """COPY nothing in a rolled-back transaction: the table, the columns, the options and the
    privileges are all checked before the first batch, so mistakes exit 2 at once."""
    try:
        async with conn.transaction():
            await copy_rows(conn, copy_statement(target.schema, target.name, columns, dialect), b"")
            raise _Rollback
    except _Rollback:
        pass
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        raise UsageError(f"cannot load into {target.display}: {server_message(exc)}") from None


class _Rollback(Exception):
    pass
