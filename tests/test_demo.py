"""scripts/demo.py against a user's own database ($DATABASE_URL)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO, Db


def test_demo_leaves_the_users_database_as_it_was_but_for_its_own_schema(db: Db) -> None:
    """With DATABASE_URL set, the demo creates one schema of its own (its table and its ledger
    both inside it), changes nothing it did not create, and says how to remove what it made."""
    db.script(
        """
        CREATE TABLE public.events (id bigint PRIMARY KEY, occurred_at timestamptz NOT NULL,
            kind text NOT NULL, user_id integer, amount numeric(12, 2), note text);
        INSERT INTO public.events
            SELECT i, '2020-01-01 00:00:00+00'::timestamptz + i * interval '1 minute', 'mine', i, i / 100.0, 'keep me'
            FROM generate_series(1, 500) i;
        """
    )
    fingerprint = "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM public.events t"
    before = tuple(db.sql(fingerprint)[0])
    schemas = "SELECT array_agg(nspname::text ORDER BY nspname) FROM pg_namespace"
    schemas_before = set(db.value(schemas))

    proc = subprocess.run(
        [sys.executable, "scripts/demo.py", "--rows", "2000"],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": db.dsn},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr

    assert tuple(db.sql(fingerprint)[0]) == before
    new = set(db.value(schemas)) - schemas_before
    assert len(new) == 1 and "loader" not in new, new
    (demo,) = new
    assert demo.startswith("loader_demo_")
    assert db.value(f'SELECT count(*) FROM "{demo}".events') == 2000
    assert db.value(f"SELECT count(*) FROM \"{demo}\".loads WHERE state = 'succeeded'") == 1
    assert f"DROP SCHEMA {demo} CASCADE" in proc.stderr
