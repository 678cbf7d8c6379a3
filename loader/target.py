"""The target table: what the server resolves the name to, its columns, and a dry-run COPY
that proves the load can write there before anything is written.

This is the one place where asyncpg's exceptions about the target (finding the table and
its columns, checking the COPY options and privileges) become the loader's own errors.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from . import sql
from .copywire import copy_rows, copy_statement
from .errors import UsageError, is_transient, server_message
from .options import CsvDialect

_WRITABLE_RELKINDS = {"r": "table", "p": "partitioned table", "f": "foreign table"}

log = logging.getLogger("loader")


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

    def pick_columns(self, names: Sequence[str], where: str, *, header: bool = False) -> tuple[str, ...]:
        """Map names from the header or --columns to the table's columns: exact match first,
        then a unique case-insensitive one (a header "ID" for a column id). A `header` that
        names no column says which option would load the file (see header_advice)."""
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
                advice = f"; {header_advice(names, self.columns)}" if header else ""
                raise UsageError(f"{where} names {name!r}, which is not a column of {self.display} (columns: {known}){advice}")
        duplicated = {c for c in picked if picked.count(c) > 1}
        if duplicated:
            raise UsageError(f"{where} names column {sorted(duplicated)[0]!r} more than once")
        return tuple(picked)

    def note_defaults(self, columns: Sequence[str]) -> None:
        """Say which of the table's columns the load leaves out: they get their defaults."""
        left = [c for c in self.columns if c not in columns]
        if len(left) == 1:
            log.warning("loader: note: column %s is not in the file: it gets its default", left[0])
        elif left:
            log.warning("loader: note: columns %s are not in the file: they get their defaults", ", ".join(left))


# A header field that reads as a value rather than a name: a number (1, -2.5, 1e6, 3,5), a
# date (2024-01-31, 31/01/2024, 31.01.2024, with a time after it) or a time of day (10:30).
_VALUE = re.compile(
    r"[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:e[+-]?\d+)?"
    r"|\d{1,4}([-/.])\d{1,2}\1\d{1,4}(?:[ T]\d.*)?"
    r"|\d{1,2}:\d\d(?::\d\d(?:\.\d+)?)?",
    re.IGNORECASE,
)
# Delimiters a file may have instead of the one given, as --delimiter takes them.
_OTHER_DELIMITERS = {";": "';'", "\t": "tab", "|": "'|'", ",": "','"}


def header_advice(names: Sequence[str], columns: Sequence[str]) -> str:
    """What to pass when a header names no column of the table: --delimiter when its one name
    holds another delimiter (the file is delimited by that), --no-header when its first record
    reads as data, else --columns, to take the file's fields for the table's columns by position."""
    if len(names) == 1:
        found = [d for d in _OTHER_DELIMITERS if d in names[0]]
        if found:
            delimiter = _OTHER_DELIMITERS[max(found, key=names[0].count)]
            return f"the file looks delimited by {delimiter}: pass --delimiter {delimiter}"
    if any(_VALUE.fullmatch(name.strip()) for name in names):
        return (
            "the first record looks like data, not column names: pass --no-header "
            "(with --columns a,b,c when the fields are not in the table's order)"
        )
    if len(names) > len(columns):
        return f"the file has {len(names)} fields and the table {len(columns)} columns: check --delimiter and --table"
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(columns[: len(names)])
    return f"to load the fields by position, pass --columns {shlex.quote(out.getvalue())} (the table's names, in file order)"


async def table_exists(conn: asyncpg.Connection, table: str) -> bool:
    try:
        return await conn.fetchval(sql.RESOLVE_TABLE, table) is not None
    except asyncpg.PostgresError as exc:
        raise UsageError(f"--table {table}: {server_message(exc)}") from None


async def create_table(
    conn: asyncpg.Connection, table: str, columns: Sequence[tuple[str, str]], dry_run: bool
) -> tuple[str, bool]:
    """Create the table, unless another process just did (one creates, the others find it):
    the DDL, to be shown (in a dry run, only that), and whether this call created it."""
    try:
        row = await conn.fetchrow(sql.TABLE_NAME, table)
        ddl = sql.create_table(row["schema"], row["name"], columns)
        if dry_run:
            return ddl, False
        async with conn.transaction():
            await conn.execute(sql.CREATE_LOCK, sql.qualified(row["schema"], row["name"]))
            if await conn.fetchval(sql.SCHEMA_TABLE_EXISTS, row["schema"], row["name"]):
                return ddl, False
            await conn.execute(ddl)
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        raise UsageError(f"--create: cannot create {table}: {server_message(exc)}") from None
    return ddl, True


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
