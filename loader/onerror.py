"""PostgreSQL 17 and later: rows with a bad value, skipped by the server and rejected from its
notices as the refused COPY of older servers would have rejected them.

`COPY ... (ON_ERROR ignore, LOG_VERBOSITY verbose)` skips a row whose value its column's type
refuses, and says so in a NOTICE naming the row's line and the column; its command tag counts
the rows it loaded. While a batch's COPY runs, `Skips` hears those notices: a batch whose rows
all load costs only the listener. For a batch with skipped rows, `rejects` finds the records at
the lines named (counting bytes in C: records.records_at_copy_lines), splits them into values,
and asks the server, in the batch's transaction, what error each value gives
(pg_input_error_info, PostgreSQL 16+). Each reject gets the line, the record's bytes, the
SQLSTATE and the message (errors.column_message) that the isolation of a refused batch gives.

What ON_ERROR does not skip (a wrong number of fields, bytes invalid in the encoding, NOT NULL,
CHECK, unique and foreign keys) still refuses the COPY. Such a batch, and one whose skipped rows
the notices do not account for exactly (`Unresolved`), goes through `isolate` from its start,
as on older servers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from . import sql
from .batching import Batch
from .copywire import copy_line_of
from .errors import column_message, is_transient, server_message, server_text
from .options import CsvDialect
from .records import RecordSyntax, records_at_copy_lines, split_fields
from .rejects import Reject

# Client-only encodings in which a byte of a multibyte character may look like an ASCII
# delimiter or quote: COPY reads them with care that split_fields does not take. (Names as
# PostgreSQL compares them: lower case, letters and digits only.)
_EMBEDS_ASCII = frozenset({"sjis", "shiftjis2004", "big5", "gbk", "uhc", "cp949", "gb18030", "johab"})


# In each batch's transaction: a role or database set to hear less than notices would
# otherwise leave every skipped row unheard.
SETTINGS = {"client_min_messages": "notice"}


def usable(server_version: tuple[int, ...], dialect: CsvDialect) -> bool:
    """Whether ON_ERROR may skip bad values: a server that has it (PostgreSQL 17+), and records
    whose lines the loader counts as COPY does (no custom --escape)."""
    return (
        tuple(server_version[:1]) >= (17,)
        and RecordSyntax.of(dialect).parity
        and re.sub(r"[^a-z0-9]", "", dialect.pg_encoding.lower()) not in _EMBEDS_ASCII
    )


class Unresolved(Exception):
    """The rows a COPY with ON_ERROR skipped cannot all be told from its notices (some did not
    come, or one names no record), or their rejects cannot be told exactly: the batch goes
    through `isolate` from its start. `unheard`: not one of the skipped rows was heard of."""

    def __init__(self, reason: str, unheard: bool = False) -> None:
        super().__init__(reason)
        self.unheard = unheard


@dataclass
class Skips:
    """The rows one COPY with ON_ERROR skipped, as its notices name them: (line, the notice's
    text). `hear` is the connection's log listener while the COPY runs; a notice is one of these
    when it comes from the COPY itself, whose error context then names only the relation (a
    trigger's notice names its function too)."""

    relation: str  # the table the COPY loads, as the server names it in the error context
    heard: list[tuple[int, str]] = field(default_factory=list)

    def hear(self, _conn: object, message: asyncpg.PostgresLogMessage) -> None:
        if getattr(message, "context", None) == f"COPY {self.relation}":
            text = str(getattr(message, "message", ""))
            line = copy_line_of(text)
            if line is not None:
                self.heard.append((line, text))

    def check(self, rows: int, records: int) -> None:
        """The COPY of `records` records loaded `rows`: each one it skipped must have been heard of."""
        if rows + len(self.heard) != records:
            raise Unresolved(
                f"PostgreSQL skipped {records - rows} of {records} rows, and {len(self.heard)} notices of skipped rows came",
                unheard=not self.heard,
            )


async def column_types(conn: asyncpg.Connection, schema: str, table: str, columns: Sequence[str]) -> tuple[str, ...]:
    """The type of each of `columns`, with its modifier (numeric(6,2)), as pg_input_error_info takes it."""
    rows = await _fetch(conn, sql.COLUMN_TYPES, sql.qualified(schema, table), list(columns))
    types = tuple(row["type"] for row in rows)
    if len(types) != len(columns) or None in types:
        raise Unresolved(f"the types of the columns {', '.join(columns)} of {schema}.{table} cannot be read")
    return types


async def rejects(
    conn: asyncpg.Connection, batch: Batch, skips: Skips, dialect: CsvDialect, columns: Sequence[str], types: Sequence[str]
) -> list[Reject]:
    """The rejects of the rows the COPY of `batch` skipped, as the isolation of a refused COPY
    tells them; in the batch's transaction. COPY converts a record's values in column order and
    stops at the first refused: so does this, and the notice must name the same column and
    value (its first 24 characters: a notice shows the first 100 bytes)."""
    lines = [line for line, _ in skips.heard]
    if any(a >= b for a, b in zip(lines, lines[1:], strict=False)):
        raise Unresolved("the notices of skipped rows do not follow the file's order")
    found = records_at_copy_lines(batch.data, batch.first_line, lines, dialect)
    if found is None:
        raise Unresolved("a notice of a skipped row names a line where no record ends")
    values: list[str | None] = []
    for line, record in found:
        fields = split_fields(record, dialect)
        if fields is None or len(fields) != len(columns):
            raise Unresolved(f"line {line}: the record skipped does not split into {len(columns)} values")
        values += fields
    errors = await _fetch(conn, sql.INPUT_ERRORS, values, list(types) * len(found))
    if len(errors) != len(values):
        raise Unresolved("pg_input_error_info did not answer for every value")
    kept: list[Reject] = []
    for k, ((line, record), (_, notice)) in enumerate(zip(found, skips.heard, strict=True)):
        mine = errors[k * len(columns) : (k + 1) * len(columns)]
        refused = next((i for i, e in enumerate(mine) if e["sql_error_code"] is not None), None)
        if refused is None or f'"{columns[refused]}": "{(values[k * len(columns) + refused] or "")[:24]}' not in notice:
            raise Unresolved(f"line {line}: no value of the record skipped is refused as the notice says ({notice})")
        error = mine[refused]
        message = column_message(columns[refused], server_text(error["message"], error["detail"], error["hint"]))
        kept.append(Reject(line, error["sql_error_code"], message, record))
    return kept


async def _fetch(conn: asyncpg.Connection, query: str, *args: object) -> list[asyncpg.Record]:
    """A query of this module: a server error (but a transient one) makes the batch Unresolved."""
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
    except asyncpg.PostgresError as exc:
        if is_transient(exc):
            raise
        raise Unresolved(server_message(exc)) from exc
    return rows
