"""The one home of SQL text. Identifiers reach SQL only through `quote_ident`; values
only as bind parameters ($1, $2, ...), except COPY's options, which PostgreSQL takes
only as literals: they go through `quote_literal`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path
from types import MappingProxyType

from .errors import LoaderError

_PACKAGE = Path(__file__).resolve().parent
_SQL_DIRS = (_PACKAGE / "sql", _PACKAGE.parent / "sql")  # installed wheel, then source checkout


def quote_ident(name: str) -> str:
    """Quote one identifier the way PostgreSQL's quote_ident does, always."""
    if "\x00" in name:
        raise ValueError("an identifier cannot contain a NUL character")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote one string constant the way PostgreSQL's quote_literal does: a value with a
    backslash goes as E'...' with the backslashes doubled, which reads the same whatever
    standard_conforming_strings says."""
    if "\x00" in value:
        raise ValueError("a string constant cannot contain a NUL character")
    quoted = value.replace("'", "''")
    return "E'" + quoted.replace("\\", "\\\\") + "'" if "\\" in value else "'" + quoted + "'"


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


@lru_cache(maxsize=256)  # every load of a file set renders its ledger's statements
def render(template: str, **identifiers: str) -> str:
    """Fill {placeholders} of a template with quoted identifiers (never with values)."""
    return template.format(**{key: quote_ident(value) for key, value in identifiers.items()})


@cache
def sql_file(name: str) -> str:
    for folder in _SQL_DIRS:
        path = folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise LoaderError(
        f"the loader's SQL file {name} is in neither {' nor '.join(map(str, _SQL_DIRS))}: "
        "the installation is incomplete (reinstall the loader)"
    )


# --- the target table -------------------------------------------------------------------

# to_regclass parses the name exactly as PostgreSQL does (quotes, case folding, search_path).
RESOLVE_TABLE = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass($1)
"""

# A table name as the server parses it (quotes, case folding), and the schema it would go in.
TABLE_NAME = """
SELECT CASE WHEN cardinality(name) = 2 THEN name[1] ELSE current_schema() END AS schema, name[cardinality(name)] AS name
  FROM parse_ident($1) AS name
"""

CREATE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('loader create ' || $1))"


def create_table(schema: str, table: str, columns: Sequence[tuple[str, str]]) -> str:
    """CREATE TABLE IF NOT EXISTS, the columns' types being the loader's own words (infer.py)."""
    listed = ",\n".join(f"    {quote_ident(name)} {kind}" for name, kind in columns)
    return f"CREATE TABLE IF NOT EXISTS {qualified(schema, table)} (\n{listed}\n)"


# Columns a COPY can write, in table order (generated columns cannot be written).
TABLE_COLUMNS = """
SELECT attname FROM pg_attribute
 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
 ORDER BY attnum
"""

# --- the ledger (templates: {schema} is the quoted ledger schema) ------------------------

LEDGER_LOCK = "SELECT pg_advisory_xact_lock(hashtext('loader ledger schema'))"

# From the catalogs, which every role may read: to_regclass would raise "permission denied
# for schema" for a role without USAGE on it. $1 is the schema's name as is (not quoted).
LEDGER_EXISTS = """
SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = $1 AND c.relname = 'rejects')
"""

# Whether the ledger exists whole (its last table, claims, and column, loads.holder, too:
# ledger.sql adds what a ledger made by an earlier version lacks), and whether the current
# role holds each privilege of $3 on the ledger table of $2 at the same place (one privilege
# per element: has_*_privilege with "SELECT, INSERT" means any of them, not all), and USAGE
# on the schema $1 (names as they are, not quoted). A missing table counts as not granted.
LEDGER_PRIVILEGES = """
SELECT current_user AS role,
       EXISTS (SELECT FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname = 'claims')
       AND EXISTS (SELECT FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
                    WHERE c.relnamespace = n.oid AND c.relname = 'loads' AND a.attname = 'holder') AS present,
       n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'USAGE') AND NOT EXISTS (
           SELECT FROM unnest($2::text[], $3::text[]) AS t(name, privilege)
            WHERE NOT coalesce((SELECT has_table_privilege(c.oid, t.privilege) FROM pg_class c
                                 WHERE c.relnamespace = n.oid AND c.relname = t.name), false)
       ) AS granted
  FROM (SELECT) AS one LEFT JOIN pg_namespace n ON n.nspname = $1::text
"""

SCHEMA_EXISTS = "SELECT to_regnamespace($1) IS NOT NULL"

SCHEMA_TABLE_EXISTS = """
SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2)
"""

CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"

# One command per table at a time: a lease row per run in the ledger (see ledger.sql), which
# works through a connection pooler as well as directly. A lease is live until it expires and,
# when it names the session that took it (a direct connection), only while that session
# exists: a crashed run's direct session ends at once, so the next run need not wait for the
# expiry. (pg_stat_activity hides backend_start of other roles' sessions: then the pid alone
# counts.)
LEASE_LIVE = """(
    {alias}.expires_at > clock_timestamp() AND (
        {alias}.backend_pid IS NULL OR EXISTS (
            SELECT FROM pg_stat_activity a
             WHERE a.pid = {alias}.backend_pid
               AND (a.backend_start IS NULL OR a.backend_start = {alias}.backend_start))))"""

START_LOAD = """
INSERT INTO {schema}.loads
       (load_id, load_key, target_table, source, source_size, source_mtime, boundaries, content_key, holder)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9)
"""

# The latest load of the same file, to resume, verify, skip or start anew: of the same path
# ($1, the load key) if any, else of the same content ($2, the content key). `live`: a run
# (this one, or another sharing the table) is loading it now. `other_run`: another run than
# this one ($3) began it after this one took the table (two runs sharing a set).
# `by_live_run`: another run, still going, made it.
LATEST_LOAD = """
SELECT load_id, state, source, source_size, source_mtime, started_at, finished_at, runs, boundaries::text AS boundaries,
       same_path,
       state = 'running' AND h.live AS live,
       coalesce(d.holder <> $3::text AND d.started_at >= (
           SELECT min(taken_at) FROM {schema}.leases WHERE holder = $3::text), false) AS other_run,
       coalesce(d.holder <> $3::text, false) AND h.live AS by_live_run
  FROM (SELECT *, coalesce(load_key = $1, false) AS same_path FROM {schema}.loads
         WHERE load_key = $1 OR content_key = $2
         ORDER BY same_path DESC, started_at DESC LIMIT 1) d
 CROSS JOIN LATERAL (  -- whether the run that made the load still holds its lease
       SELECT EXISTS (SELECT FROM {schema}.leases l WHERE l.holder = d.holder AND """ + LEASE_LIVE.format(alias="l") + """) AS live
       ) h
"""

# A load's source under a new name (renamed or moved): its runs from now on go by that name.
RENAME_SOURCE = "UPDATE {schema}.loads SET load_key = $2, source = $3 WHERE load_id = $1"

RESUME_LOAD = """
UPDATE {schema}.loads SET state = 'running', runs = runs + 1, finished_at = NULL, message = NULL,
       source_size = $2, source_mtime = $3, holder = $4
 WHERE load_id = $1
"""

COUNT_REJECTS = "SELECT count(*) FROM {schema}.rejects WHERE load_id = $1"

LOAD_OPTIONS = "SELECT target_table, boundaries::text AS boundaries FROM {schema}.loads WHERE load_id = $1"

UPDATE_SOURCE = "UPDATE {schema}.loads SET source_size = $2, source_mtime = $3 WHERE load_id = $1"

COMMITTED_BATCHES = """
SELECT batch_no, checksum, rows_loaded, rows_rejected FROM {schema}.batches WHERE load_id = $1
"""

# Runs taking a table's lease go one at a time ($1 the table's oid), so that two runs of
# different commands never both find the table free. In the lease's transaction, before TAKE_LEASE.
LEASE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('loader lease ' || $1::oid::text, 0))"

# $1 table oid, $2 table name, $3 holder, $4 client, $5 own session (direct), $6 lease seconds,
# $7 command key (NULL: shares with no other run). Taken (a row back) unless another live
# lease on the table is of another command, or of a command that shares with none; the
# table's dead leases go.
TAKE_LEASE = """
WITH dead AS (
    DELETE FROM {schema}.leases l WHERE l.table_oid = $1 AND l.holder <> $3 AND NOT """ + LEASE_LIVE.format(alias="l") + """
)
INSERT INTO {schema}.leases AS l
       (table_oid, target_table, holder, command_key, client, backend_pid, backend_start, taken_at, expires_at)
SELECT $1::oid, $2::text, $3::text, $7::text, $4::text,
       CASE WHEN $5::bool THEN pg_backend_pid() END,
       CASE WHEN $5::bool THEN (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) END,
       clock_timestamp(), clock_timestamp() + $6::float8 * interval '1 second'
 WHERE NOT EXISTS (
       SELECT FROM {schema}.leases o
        WHERE o.table_oid = $1 AND o.holder <> $3 AND NOT coalesce(o.command_key = $7::text, false)
          AND """ + LEASE_LIVE.format(alias="o") + """)
ON CONFLICT (table_oid, holder) DO UPDATE
   SET target_table = EXCLUDED.target_table, client = EXCLUDED.client,
       backend_pid = EXCLUDED.backend_pid, backend_start = EXCLUDED.backend_start, expires_at = EXCLUDED.expires_at
RETURNING holder
"""

# $1 table oid, $2 holder, $3 lease seconds, $4 load id (NULL: unchanged). No row back: the
# lease was lost (it expired, and another run found it dead).
RENEW_LEASE = """
UPDATE {schema}.leases SET expires_at = clock_timestamp() + $3::float8 * interval '1 second',
       load_id = coalesce($4::text, load_id)
 WHERE table_oid = $1 AND holder = $2
RETURNING holder
"""

RELEASE_LEASE = """
UPDATE {schema}.leases SET expires_at = '-infinity' WHERE table_oid = $1 AND holder = $2
"""

# Who keeps the table from a run ($2 its holder, $3 its command key), for its message.
LEASE_HOLDER = """
SELECT client, load_id, taken_at, expires_at, backend_pid IS NULL AS pooled
  FROM {schema}.leases l
 WHERE table_oid = $1 AND holder <> $2 AND NOT coalesce(command_key = $3::text, false) AND """ + LEASE_LIVE.format(alias="l") + """
 ORDER BY taken_at LIMIT 1
"""

# A run sharing a file set takes a source ($1 its load key) for itself ($2 its holder): no
# row back in `claimed` when a live run (its lease) has it. `client`: the run that has it.
# A claim is this run's already, or taken over from a run whose lease has ended.
_CLAIM_TAKEN = """
ON CONFLICT (load_key) DO UPDATE SET holder = EXCLUDED.holder, claimed_at = EXCLUDED.claimed_at
 WHERE c.holder = EXCLUDED.holder OR NOT EXISTS (
       SELECT FROM {schema}.leases l WHERE l.holder = c.holder AND """ + LEASE_LIVE.format(alias="l") + """)"""

CLAIM_SOURCE = """
WITH claimed AS (
    INSERT INTO {schema}.claims AS c (load_key, holder, claimed_at) VALUES ($1, $2, clock_timestamp())""" + _CLAIM_TAKEN + """
    RETURNING holder
)
SELECT EXISTS (SELECT FROM claimed) AS claimed,
       (SELECT l.client FROM {schema}.claims c JOIN {schema}.leases l ON l.holder = c.holder
         WHERE c.load_key = $1 LIMIT 1) AS client
"""

# The same for many sources at once ($1 their load keys, in one order for every run, so that
# two runs claiming overlapping sets take their rows in the same order): the keys claimed.
CLAIM_SOURCES = """
INSERT INTO {schema}.claims AS c (load_key, holder, claimed_at)
SELECT k, $2, clock_timestamp() FROM unnest($1::text[]) AS k""" + _CLAIM_TAKEN + """
RETURNING load_key
"""

# Which of many sources ($1 load keys, $2 content keys, in pairs) some load has had, by path
# or by content: their positions (1-based). The others are new.
KNOWN_SOURCES = """
SELECT k.i FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(load_key, content_key, i)
 WHERE EXISTS (SELECT FROM {schema}.loads d WHERE d.load_key = k.load_key OR d.content_key = k.content_key)
"""

# Small new sources loaded several to a transaction (see smallfiles.py). Each is a load of
# its own, started (committed, so that other runs and status see it) before its group's
# transaction; $1-$6 one array per column, a source an element of each, in the set's order.
START_SMALL_LOADS = """
INSERT INTO {schema}.loads
       (load_id, load_key, target_table, source, source_size, source_mtime, boundaries, content_key, holder, started_at)
SELECT load_id, load_key, $7, source, size, mtime, $8::jsonb, content_key, $9, clock_timestamp()
  FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::float8[], $6::text[])
       AS f(load_id, load_key, source, size, mtime, content_key)
"""

# ... and in the transaction that COPYed them, each with its one batch, finished. Nothing
# written, and 0 back, when the table's name ($7) has come to mean another table ($8).
FINISH_SMALL_LOADS = """
WITH files AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[])
             AS f(load_id, rows, first_line, byte_offset, byte_length, checksum)
     WHERE to_regclass($7::text)::oid = $8::oid
), batch AS (
    INSERT INTO {schema}.batches (load_id, batch_no, first_line, byte_offset, byte_length, rows_loaded, checksum)
    SELECT load_id, 1, first_line, byte_offset, byte_length, rows, checksum FROM files
    RETURNING load_id, rows_loaded
), done AS (
    UPDATE {schema}.loads l
       SET state = 'succeeded', finished_at = clock_timestamp(), message = NULL,
           rows_read = b.rows_loaded, rows_loaded = b.rows_loaded, rows_rejected = 0
      FROM batch b WHERE l.load_id = b.load_id
    RETURNING true
)
SELECT count(*) FROM done
"""

# Which of these loads committed a batch: a group's commit got through.
BATCHES_PRESENT = "SELECT count(*) FROM {schema}.batches WHERE load_id = ANY($1::text[])"

# What status shows. The stored states stay as the loader writes them; shown are:
# - a load stored `running` is live only while the run loading it holds its lease (see
#   LEASE_LIVE);
#   else its process is gone (kill -9, OOM, reboot): `interrupted`.
# - rows of a load stored `running` (live or dead) are those of its committed batches (the
#   totals are written when a load finishes), and its duration ends at its last commit if dead;
# - a load that succeeded with rejected rows: `finished-with-rejects`.
RECENT_LOADS = """
WITH recent AS (
    SELECT * FROM {schema}.loads
     WHERE $1::text IS NULL OR target_table = $1
     ORDER BY started_at DESC LIMIT $2
), shown AS (
    SELECT r.*, b.loaded, b.rejected, b.last_commit,
           r.state = 'running' AND EXISTS (
               SELECT FROM {schema}.leases l
                WHERE (l.holder = r.holder OR (r.holder IS NULL AND l.load_id = r.load_id)) AND """ + LEASE_LIVE.format(alias="l") + """
           ) AS live
      FROM recent r
      LEFT JOIN LATERAL (
          SELECT coalesce(sum(rows_loaded), 0)::bigint AS loaded, coalesce(sum(rows_rejected), 0)::bigint AS rejected,
                 max(committed_at) AS last_commit
            FROM {schema}.batches WHERE load_id = r.load_id AND r.state = 'running'
      ) b ON true
)
SELECT load_id, target_table, source, coalesce(boundaries->>'mode', 'append') AS mode,
       CASE WHEN state = 'running' AND NOT live THEN 'interrupted'
            WHEN state = 'succeeded' AND rows_rejected > 0 THEN 'finished-with-rejects'
            ELSE state END AS state,
       runs,
       CASE WHEN state = 'running' THEN loaded + rejected ELSE rows_read END AS rows_read,
       CASE WHEN state = 'running' THEN loaded ELSE rows_loaded END AS rows_loaded,
       CASE WHEN state = 'running' THEN rejected ELSE rows_rejected END AS rows_rejected,
       started_at, finished_at,
       extract(epoch FROM coalesce(finished_at, CASE WHEN live THEN now() ELSE greatest(last_commit, started_at) END)
                          - started_at) AS seconds,
       message
  FROM shown
 ORDER BY started_at DESC
"""

# Claiming the batch's ledger row first, in the batch's transaction, is what makes a retry
# safe: if an earlier attempt committed, the row exists and nothing is inserted; if that
# attempt's transaction is still open on the server, this insert waits for its outcome.
# It also checks that the table's name ($8) still means the table the load planned ($9):
# COPY goes by name, and the batch's BEGIN locked whatever the name meant (see begin_batch).
CLAIM_BATCH = """
WITH claimed AS (
    INSERT INTO {schema}.batches (load_id, batch_no, first_line, byte_offset, byte_length, rows_loaded, checksum)
    SELECT $1::text, $2::integer, $3::bigint, $4::bigint, $5::bigint, $6::bigint, $7::text
     WHERE to_regclass($8::text)::oid = $9::oid
    ON CONFLICT (load_id, batch_no) DO NOTHING
    RETURNING true
)
SELECT coalesce(to_regclass($8::text)::oid = $9::oid, false) AS same_table, EXISTS (SELECT FROM claimed) AS claimed
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

# The totals come from the batches, so they count every run of a resumed load.
FINISH_LOAD = """
UPDATE {schema}.loads l
   SET state = $2, finished_at = now(), message = $3,
       rows_loaded = b.loaded, rows_rejected = b.rejected, rows_read = b.loaded + b.rejected
  FROM (SELECT coalesce(sum(rows_loaded), 0) AS loaded, coalesce(sum(rows_rejected), 0) AS rejected
          FROM {schema}.batches WHERE load_id = $1) b
 WHERE l.load_id = $1
"""

# A load done: marked succeeded with its totals, in one statement, but only if every batch
# this run committed ($2) is still in the ledger; no row back: one was lost (a crash took
# back an asynchronous commit), and the caller finds out which.
FINISH_WHOLE_LOAD = """
UPDATE {schema}.loads l
   SET state = 'succeeded', finished_at = now(), message = NULL,
       rows_loaded = b.loaded, rows_rejected = b.rejected, rows_read = b.loaded + b.rejected
  FROM (SELECT coalesce(sum(rows_loaded), 0) AS loaded, coalesce(sum(rows_rejected), 0) AS rejected,
               count(*) FILTER (WHERE batch_no = ANY($2::int[])) AS present
          FROM {schema}.batches WHERE load_id = $1) b
 WHERE l.load_id = $1 AND b.present = cardinality($2::int[])
RETURNING l.load_id
"""

# --- the server's pressure ---------------------------------------------------------------

# Connection slots: max_connections less the reserved ones, and the backends in use.
CONNECTION_BUDGET = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int
         + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int AS in_use
"""

CAN_MONITOR = "SELECT pg_has_role(current_user, 'pg_monitor', 'USAGE')"

# Where the primary's WAL is now, and how far the slowest streaming replica has replayed.
REPLICATION_POSITIONS = """
SELECT pg_current_wal_lsn() AS current,
       (SELECT min(replay_lsn) FROM pg_stat_replication WHERE state = 'streaming') AS slowest,
       (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming')::int AS replicas
"""

SET_APPLICATION_NAME = "SELECT set_config('application_name', $1, false)"

BACKEND_PID = "SELECT pg_backend_pid()"


# --- COPY ----------------------------------------------------------------------------------


def set_local(settings: Mapping[str, str]) -> str:
    """SET LOCAL of each setting: names are the loader's own, values go as literals."""
    return "; ".join(f"SET LOCAL {name} TO {quote_literal(value)}" for name, value in settings.items())


def begin_batch(schema: str, table: str, lockable: bool, settings: Mapping[str, str]) -> str:
    """A batch's BEGIN, with its settings (SET LOCAL: names are the loader's own, values go as
    literals), which also locks the target by name as its COPY will (ROW EXCLUSIVE, only the
    named table, not each partition): until the batch commits the name cannot move to another
    table, so the claim's check that it is the planned one holds for the COPY. (LOCK TABLE
    refuses foreign tables: for them the claim's check alone.) One message, one round trip."""
    statements = ["BEGIN", set_local(settings)] if settings else ["BEGIN"]
    if lockable:
        statements.append(f"LOCK TABLE ONLY {qualified(schema, table)} IN ROW EXCLUSIVE MODE")
    return "; ".join(statements)



def copy_from_stdin(schema: str, table: str, columns: Sequence[str], options: Mapping[str, str]) -> str:
    """COPY schema.table (columns) FROM STDIN (OPTION 'value', ...)."""
    listed = f" ({', '.join(map(quote_ident, columns))})" if columns else ""
    settings = ", ".join(f"{name.upper()} {quote_literal(value)}" for name, value in options.items())
    return f"COPY {qualified(schema, table)}{listed} FROM STDIN ({settings})"


# --- isolating bad rows: each piece of a refused batch in a savepoint, moved on after it ---
# The moves go in the same message as the next piece's COPY (statements run in order, and
# an error skips the rest of the message): one round trip per piece.

# A dry run's batches, each in a savepoint of the load's one transaction.
BATCH_SAVEPOINT = "SAVEPOINT loader_batch"
BATCH_UNDO = "ROLLBACK TO SAVEPOINT loader_batch; RELEASE SAVEPOINT loader_batch"
BATCH_KEEP = "RELEASE SAVEPOINT loader_batch"

PIECE_SAVEPOINT = "SAVEPOINT loader_piece"
PIECE_UNDO = "ROLLBACK TO SAVEPOINT loader_piece"  # the savepoint stays, ready for the next piece
PIECE_KEEP = "RELEASE SAVEPOINT loader_piece; SAVEPOINT loader_piece"


# --- bad values skipped by COPY ... ON_ERROR ignore (PostgreSQL 17+, see onerror.py) ------

# The type of each column a COPY names ($2, in order), with its modifier (numeric(6,2),
# varchar(3)), as pg_input_error_info takes it; $1 is the table's qualified name.
COLUMN_TYPES = """
SELECT format_type(a.atttypid, a.atttypmod) AS type
  FROM unnest($2::text[]) WITH ORDINALITY AS c(name, n)
  LEFT JOIN pg_attribute a ON a.attrelid = to_regclass($1::text) AND a.attname = c.name AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY c.n
"""

# What the type of each value says of it ($1 the values, $2 their types): the SQLSTATE,
# message, detail and hint of its input function's error, all NULL when it takes the value.
INPUT_ERRORS = """
SELECT e.sql_error_code, e.message, e.detail, e.hint
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS v(value, type, n)
  CROSS JOIN LATERAL pg_input_error_info(v.value, v.type) AS e
 ORDER BY v.n
"""


# --- load modes (see modes.py) ---------------------------------------------------------------

# Whether the columns $2 (names as they are) are exactly the key columns of a unique index of
# the table $1 that ON CONFLICT can take as its arbiter: valid, not partial, no expressions.
UNIQUE_KEY = """
SELECT EXISTS (
    SELECT FROM pg_index i
     WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
       AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
              FROM generate_series(0, i.indnkeyatts - 1) AS g
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[g])
           = (SELECT array_agg(name ORDER BY name) FROM unnest($2::text[]) AS name))
"""

# The primary key's columns of the table $1, in key order (none: no primary key).
PRIMARY_KEY = """
SELECT array_agg(a.attname::text ORDER BY g) AS columns
  FROM pg_index i, generate_series(0, i.indnkeyatts - 1) AS g, pg_attribute a
 WHERE i.indrelid = $1 AND i.indisprimary AND a.attrelid = i.indrelid AND a.attnum = i.indkey[g]
"""

UPSERT_STAGE = "loader_stage"  # a temporary table, one per batch transaction

# Whether every column $2 (names as they are) of the table $1 is NOT NULL.
NOT_NULL = "SELECT bool_and(attnotnull) FROM pg_attribute WHERE attrelid = $1 AND attname = ANY($2::text[])"

# Whether every column $2 of the table $1 has a type whose order Python reproduces on the
# values asyncpg returns (integers, dates, timestamps, uuids): batches' key ranges are then
# compared on the client (see modes.Turns).
KEY_ORDER_KNOWN = """
SELECT bool_and(atttypid = ANY('{int2,int4,int8,date,timestamp,timestamptz,uuid}'::regtype[]::oid[]))
  FROM pg_attribute WHERE attrelid = $1 AND attname = ANY($2::text[])
"""

# Sorts and hashes of a merge (a batch's keys; the stage against the table) in memory rather
# than on disk: set for the merging transactions only.
MERGE_WORK_MEM: Mapping[str, str] = MappingProxyType({"work_mem": "64MB"})


def create_upsert_stage(schema: str, table: str, columns: Sequence[str]) -> str:
    """A batch's rows before they merge: the file's columns (typed as the table's, no
    constraints) and their order in the file. Dropped at the batch's commit."""
    listed = ", ".join(map(quote_ident, columns))
    stage = qualified("pg_temp", UPSERT_STAGE)
    return (
        f"CREATE TEMP TABLE {quote_ident(UPSERT_STAGE)} ON COMMIT DROP AS SELECT {listed} FROM {qualified(schema, table)} WITH NO DATA; "
        f"ALTER TABLE {stage} ADD COLUMN loader_ord bigint GENERATED ALWAYS AS IDENTITY"
    )


def merge_upsert_stage(
    schema: str, table: str, columns: Sequence[str], key: Sequence[str], update: bool, key_not_null: bool
) -> str:
    """Merge the stage into the table: one row per key (the file's last with `update`, its
    first without), inserted or, on a key that exists, updated (or kept). Rows with a NULL in
    the key never conflict: all of them go in (no such branch when the key cannot be NULL).
    No ORDER BY: merges that may share a key run one at a time (modes.Turns), so no lock
    order is needed.
    Returns the counts of rows inserted and updated."""
    listed = ", ".join(map(quote_ident, columns))
    keys = ", ".join(map(quote_ident, key))
    stage = qualified("pg_temp", UPSERT_STAGE)
    order = "DESC" if update else "ASC"
    rest = [c for c in columns if c not in key]
    if update and rest:
        action = "DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in rest)
    else:
        action = "DO NOTHING"
    one_per_key = f"SELECT DISTINCT ON ({keys}) {listed} FROM {stage}"
    if key_not_null:
        rows = f"{one_per_key} ORDER BY {keys}, loader_ord {order}"
    else:
        whole = " AND ".join(f"{quote_ident(k)} IS NOT NULL" for k in key)
        rows = (
            f"({one_per_key} WHERE {whole} ORDER BY {keys}, loader_ord {order}) "
            f"UNION ALL SELECT {listed} FROM {stage} WHERE NOT ({whole})"
        )
    return f"""
WITH merged AS (
    INSERT INTO {qualified(schema, table)} AS t ({listed})
    {rows}
    ON CONFLICT ({keys}) {action}
    RETURNING t.xmax = 0 AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted, count(*) FILTER (WHERE NOT inserted) AS updated FROM merged
"""


def upsert_stage_span(key: Sequence[str]) -> str:
    """The lowest and the highest key in the stage (rows with a NULL in the key aside), side
    by side in one row; no row when no row has a whole key."""
    keys = ", ".join(map(quote_ident, key))
    whole = " AND ".join(f"{quote_ident(k)} IS NOT NULL" for k in key)
    stage = qualified("pg_temp", UPSERT_STAGE)
    lowest = f"SELECT {keys} FROM {stage} WHERE {whole} ORDER BY {keys} LIMIT 1"
    highest = f"SELECT {keys} FROM {stage} WHERE {whole} ORDER BY {', '.join(f'{quote_ident(k)} DESC' for k in key)} LIMIT 1"
    return f"SELECT * FROM ({lowest}) AS lowest CROSS JOIN ({highest}) AS highest"


def empty_upsert_stage() -> str:
    """Before each COPY into the stage: what an earlier piece or batch left there is merged."""
    return f"TRUNCATE {qualified('pg_temp', UPSERT_STAGE)}"


def create_replace_stage(stage_schema: str, stage: str, schema: str, table: str) -> str:
    """The table a replace loads into, shaped as the target with its defaults, constraints and
    indexes (so rows are refused there as the table would refuse them); its foreign keys
    follow (ADD_FOREIGN_KEYS)."""
    return (
        f"CREATE TABLE {qualified(stage_schema, stage)} (LIKE {qualified(schema, table)} "
        "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES INCLUDING GENERATED)"
    )


# The target's foreign keys, as ALTER TABLE ... ADD takes them; and its identity columns,
# which the stage draws from the target's own sequence.
FOREIGN_KEYS = "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint WHERE conrelid = $1::oid AND contype = 'f'"
IDENTITY_SEQUENCES = """
SELECT attname, pg_get_serial_sequence($1::oid::regclass::text, attname) AS sequence
  FROM pg_attribute WHERE attrelid = $1::oid AND attidentity <> '' AND NOT attisdropped
"""


def add_foreign_key(stage_schema: str, stage: str, name: str, definition: str) -> str:
    """`definition` is the server's own rendering (pg_get_constraintdef), not user text."""
    return f"ALTER TABLE {qualified(stage_schema, stage)} ADD CONSTRAINT {quote_ident(name)} {definition}"


def default_from_sequence(stage_schema: str, stage: str, column: str, sequence: str) -> str:
    return (
        f"ALTER TABLE {qualified(stage_schema, stage)} ALTER COLUMN {quote_ident(column)} "
        f"SET DEFAULT nextval({quote_literal(sequence)}::regclass)"
    )


def replace_from_stage(
    stage_schema: str, stage: str, schema: str, table: str, columns: Sequence[str], key: Sequence[str] | None
) -> str:
    """The switch, run in the transaction that marks the load done: the table's rows become
    the stage's. With a primary key, rows are matched on it: rows whose key is gone are
    deleted, then one MERGE updates the rows that changed, inserts the new ones and leaves
    unchanged rows alone (not even locked: no WAL, no dead tuple); rows that others reference
    stay as long as their key does. Without one: every row is deleted and the stage's
    inserted."""
    target, staged = qualified(schema, table), qualified(stage_schema, stage)
    listed = ", ".join(map(quote_ident, columns))
    if not key:
        return f"DELETE FROM {target}; INSERT INTO {target} ({listed}) OVERRIDING SYSTEM VALUE SELECT {listed} FROM {staged}"
    match = " AND ".join(f"s.{quote_ident(k)} = t.{quote_ident(k)}" for k in key)
    rest = [c for c in columns if c not in key]
    values = ", ".join(f"s.{quote_ident(c)}" for c in columns)
    merge = f"MERGE INTO {target} AS t USING {staged} AS s ON {match} "
    if rest:
        new = ", ".join(f"s.{quote_ident(c)}" for c in rest)
        old = ", ".join(f"t.{quote_ident(c)}" for c in rest)
        sets = ", ".join(f"{quote_ident(c)} = s.{quote_ident(c)}" for c in rest)
        merge += f"WHEN MATCHED AND ROW({old}) IS DISTINCT FROM ROW({new}) THEN UPDATE SET {sets} "
    merge += f"WHEN NOT MATCHED THEN INSERT ({listed}) OVERRIDING SYSTEM VALUE VALUES ({values})"
    return f"DELETE FROM {target} AS t WHERE NOT EXISTS (SELECT FROM {staged} AS s WHERE {match}); {merge}"


def drop_table(schema: str, table: str) -> str:
    return f"DROP TABLE IF EXISTS {qualified(schema, table)}"


def analyze(schema: str, table: str) -> str:
    return f"ANALYZE {qualified(schema, table)}"
