"""Options from LOADER_* environment variables, as a cron user or a container sets them:
each option has its variable, the variable is named in --help (whole, even at 80 columns),
and LOADER_DSN wins over DATABASE_URL.
"""

from __future__ import annotations

import re
from pathlib import Path

from data import PLAIN_EVENTS, plain_csv
from helpers import Db, assert_ids_once

ENV_NAMES = tuple(
    f"LOADER_{name}"
    for name in ("DSN", "TABLE", "WORKERS", "MAX_WORKERS", "BATCH_SIZE", "MAX_RATE", "MAX_REPLICA_LAG", "MAX_LAG_WAIT",
                 "DEADLINE", "STATEMENT_TIMEOUT", "LOCK_TIMEOUT", "APPLICATION_NAME", "LOG_INTERVAL", "METRICS_FILE", "JSON")
)


def test_options_come_from_loader_environment_variables(db: Db, tmp_path: Path) -> None:
    rows = 20_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    env = {
        "LOADER_TABLE": "events",
        "LOADER_WORKERS": "3",
        "LOADER_DSN": db.dsn,
        "LOADER_BATCH_SIZE": "2000",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nowhere",  # LOADER_DSN must win
    }
    run = db.loader("import", str(csv), "--json", env=env)
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["workers"] == 3
    assert report["batches"] == rows // 2000
    assert_ids_once(db, rows)

    shown = db.loader("import", "--help", env={"COLUMNS": "200"})
    assert shown.code == 0, shown.stderr
    for name in ENV_NAMES:
        assert re.search(rf"\b{name}\b", shown.stdout), name


def test_help_on_an_80_column_terminal_shows_every_environment_variable_whole(db: Db) -> None:
    """At 80 columns, the width of a default terminal and of --help piped to a pager or a
    file, the help shows every variable's name whole (never "LOADER_STATEMENT_TIMEOU…")."""
    shown = db.loader("import", "--help", env={"COLUMNS": "80"})
    assert shown.code == 0, shown.stderr
    cut = [name for name in ENV_NAMES if not re.search(rf"\b{name}\b", shown.stdout)]
    assert cut == [], f"--help at 80 columns does not show {cut} whole"
