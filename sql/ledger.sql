-- The load ledger: one row per load, one row per committed batch, and a lease per table.
-- A batch's row is inserted in the same transaction as the batch's rows, so a batch is
-- either loaded and recorded, or neither. Run idempotently when the ledger is missing;
-- {schema} is replaced by the quoted ledger schema name (default "loader"), which the
-- loader creates first if it does not exist.

CREATE TABLE IF NOT EXISTS {schema}.loads (
    load_id        text PRIMARY KEY,
    load_key       text,                    -- same source, table and batch boundaries; NULL: not resumable
    target_table   text NOT NULL,
    source         text NOT NULL,
    source_size    bigint,
    source_mtime   double precision,
    boundaries     jsonb NOT NULL,          -- what decides batch boundaries (dialect, batch size)
    state          text NOT NULL DEFAULT 'running'
                   CHECK (state IN ('running', 'succeeded', 'failed', 'interrupted')),
    runs           integer NOT NULL DEFAULT 1,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    rows_read      bigint NOT NULL DEFAULT 0,
    rows_loaded    bigint NOT NULL DEFAULT 0,
    rows_rejected  bigint NOT NULL DEFAULT 0,
    message        text
);

-- The source's content (its size, first and last blocks) with the table and the mode: a
-- file renamed, moved, copied or linked is known again by it (see plan.py).
ALTER TABLE {schema}.loads ADD COLUMN IF NOT EXISTS content_key text;

CREATE INDEX IF NOT EXISTS loads_key ON {schema}.loads (load_key, started_at);
CREATE INDEX IF NOT EXISTS loads_content ON {schema}.loads (content_key, started_at);
CREATE INDEX IF NOT EXISTS loads_started ON {schema}.loads (started_at);

CREATE TABLE IF NOT EXISTS {schema}.batches (
    load_id        text NOT NULL REFERENCES {schema}.loads ON DELETE CASCADE,
    batch_no       integer NOT NULL,
    first_line     bigint NOT NULL,
    byte_offset    bigint NOT NULL,
    byte_length    bigint NOT NULL,
    rows_loaded    bigint NOT NULL,
    rows_rejected  bigint NOT NULL DEFAULT 0,
    checksum       text NOT NULL,
    committed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (load_id, batch_no)
);

-- Rows the server refused, kept with their batch so that they too are recorded exactly
-- once; the rejects file is written from here at the end of every run.
CREATE TABLE IF NOT EXISTS {schema}.rejects (
    load_id        text NOT NULL,
    batch_no       integer NOT NULL,
    line           bigint NOT NULL,
    sqlstate       text NOT NULL,
    message        text NOT NULL,
    record         bytea NOT NULL,            -- the raw record, as in the source
    PRIMARY KEY (load_id, line),
    FOREIGN KEY (load_id, batch_no) REFERENCES {schema}.batches ON DELETE CASCADE
);

-- One command per table at a time: a run holds a lease on its table, one row per run, renews
-- it while it runs and gives it up when it ends. A run may take the table while every other
-- live lease on it is held by runs of the same file set command (command_key; NULL: a command
-- that shares with none), which then split the set between them. A lease is live until it
-- expires and, while the session that took it (backend_pid, on a direct connection) exists;
-- through a connection pooler backend_pid is NULL: the server session is not the run's own.
CREATE TABLE IF NOT EXISTS {schema}.leases (
    table_oid      oid NOT NULL,
    target_table   text NOT NULL,
    holder         text NOT NULL,             -- the run holding it (a random token)
    command_key    text,                      -- the command it runs, when it shares the table
    load_id        text,                      -- its load now, once planned
    client         text NOT NULL,             -- host and process of that run, for messages
    backend_pid    integer,
    backend_start  timestamptz,
    taken_at       timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL
);

-- Which run loads a source now (load_key as in loads): the runs sharing a file set each take
-- a source whose last claim is theirs, or whose claimer's lease is no longer live.
CREATE TABLE IF NOT EXISTS {schema}.claims (
    load_key       text PRIMARY KEY,
    holder         text NOT NULL,
    claimed_at     timestamptz NOT NULL
);

-- What a ledger made by an earlier version lacks: one lease per run, not per table, and the
-- run that loads each load.
ALTER TABLE {schema}.leases DROP CONSTRAINT IF EXISTS leases_pkey;
ALTER TABLE {schema}.leases ADD COLUMN IF NOT EXISTS command_key text;
CREATE UNIQUE INDEX IF NOT EXISTS leases_holder ON {schema}.leases (table_oid, holder);
ALTER TABLE {schema}.loads ADD COLUMN IF NOT EXISTS holder text;
