-- An example target table for `loader import` (the README's walk-through loads into it).
CREATE TABLE IF NOT EXISTS public.events (
    id          bigint PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    kind        text NOT NULL,
    user_id     integer,
    amount      numeric(12, 2),
    note        text
);

-- What happened to recent loads, from the ledger:
-- SELECT load_id, target_table, state, rows_loaded, rows_rejected, finished_at - started_at AS took
--   FROM loader.loads ORDER BY started_at DESC LIMIT 10;
