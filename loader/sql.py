"""The one home of SQL text. Identifiers reach SQL only through `quote_ident`; values
only as bind parameters ($1, $2, ...)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SQL_DIRS = (_PACKAGE / "sql", _PACKAGE.parent / "sql")  # installed wheel, then source checkout


def quote_ident(name: str) -> str:
    """Quote one identifier the way PostgreSQL's quote_ident does, always."""
    if "\x00" in name:
        raise ValueError("an identifier cannot contain a NUL character")
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def render(template: str, **identifiers: str) -> str:
    """Fill {placeholders} of a template with quoted identifiers (never with values)."""
    return template.format(**{key: quote_ident(value) for key, value in identifiers.items()})


@cache
def sql_file(name: str) -> str:
    for folder in _SQL_DIRS:
        path = folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"SQL file {name} not found in {', '.join(map(str, _SQL_DIRS))}")


# --- the target table -------------------------------------------------------------------

# to_regclass parses the name exactly as PostgreSQL does (quotes, case folding, search_path).
RESOLVE_TABLE = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass($1)
"""

# Columns a COPY can write, in table order (generated columns cannot be written).
TABLE_COLUMNS = """
SELECT attname FROM pg_attribute
 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
 ORDER BY attnum
"""

# --- the ledger (templates: {schema} is the quoted ledger schema) ------------------------

LEDGER_LOCK = "SELECT pg_advisory_xact_lock(hashtext('loader ledger schema'))"

LEDGER_EXISTS = "SELECT to_regclass($1) IS NOT NULL"

SCHEMA_EXISTS = "SELECT to_regnamespace($1) IS NOT NULL"

CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"

START_LOAD = """
INSERT INTO {schema}.loads (load_id, target_table, source, source_size, boundaries)
VALUES ($1, $2, $3, $4, $5::jsonb)
"""

# Claiming the batch's ledger row first, in the batch's transaction, is what makes a retry
# safe: if an earlier attempt committed, the row exists and nothing is inserted; if that
# attempt's transaction is still open on the server, this insert waits for its outcome.
CLAIM_BATCH = """
INSERT INTO {schema}.batches (load_id, batch_no, first_line, byte_offset, byte_length, rows_loaded, checksum)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (load_id, batch_no) DO NOTHING
RETURNING true
"""

COMMITTED_BATCH = """
SELECT rows_loaded, rows_rejected, checksum FROM {schema}.batches WHERE load_id = $1 AND batch_no = $2
"""

SET_BATCH_COUNTS = """
UPDATE {schema}.batches SET rows_loaded = $3, rows_rejected = $4 WHERE load_id = $1 AND batch_no = $2
"""

INSERT_REJECT = """
INSERT INTO {schema}.rejects (load_id, batch_no, line, sqlstate, message, record) VALUES ($1, $2, $3, $4, $5, $6)
"""

LOAD_REJECTS = """
SELECT line, sqlstate, message, record FROM {schema}.rejects WHERE load_id = $1 ORDER BY line
"""

FINISH_LOAD = """
UPDATE {schema}.loads
   SET state = $2, finished_at = now(), rows_read = $3, rows_loaded = $4, rows_rejected = $5, message = $6
 WHERE load_id = $1
"""
