"""Load a generated sample CSV into a real PostgreSQL with the real CLI, and print its summary.

Server: $DATABASE_URL if set; else docker compose if a Docker engine answers; else a
throwaway local cluster (devserver.py), removed at the end.

The server may be the user's own: the demo creates a schema of its own (loader_demo_<8 hex>,
never an existing one) and puts everything in it, the example table and the load ledger,
so it never drops or changes anything it did not create.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # devserver.py lives at the repository root, outside the package

from devserver import start_server  # noqa: E402

ROWS = 200_000
_EXAMPLE_TABLE = re.compile(r"\bpublic\.events\b")
COMPOSE_DSN = "postgresql://loader:loader@127.0.0.1:5432/loader"


def write_sample(path: Path, rows: int) -> None:
    """Events with the CSV a loader must get right: quoted commas, newlines, doubled quotes, NULLs."""
    rnd = random.Random(42)
    kinds = ["click", "view", "purchase", "signup, via email", 'said "hi"', "multi\nline"]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("id,occurred_at,kind,user_id,amount,note\n")
        for i in range(1, rows + 1):
            kind = rnd.choice(kinds)
            kind = f'"{kind.replace(chr(34), chr(34) * 2)}"' if any(c in kind for c in ',"\n') else kind
            user = "" if i % 13 == 0 else str(rnd.randint(1, 50_000))
            note = '""' if i % 17 == 0 else ("" if i % 5 else f"note {i}")
            fh.write(f"{i},2024-06-{1 + i % 30:02d} {i % 24:02d}:{i % 60:02d}:{i % 60:02d}+00,{kind},{user},{rnd.randint(0, 99999) / 100},{note}\n")


def docker_answers() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True).returncode == 0  # type: ignore[list-item]


def example_sql(schema: str) -> str:
    """sql/example.sql, its table moved into the demo's schema (the file itself names public)."""
    text = (REPO / "sql" / "example.sql").read_text()
    moved, count = _EXAMPLE_TABLE.subn(f"{schema}.events", text)
    if not count or re.search(r"\bpublic\.", moved):
        raise SystemExit("demo: sql/example.sql no longer creates only public.events; update scripts/demo.py")
    return moved


async def prepare(dsn: str, schema: str) -> None:
    """A new schema (CREATE SCHEMA fails rather than reuse one) holding the example table."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(example_sql(schema))
    finally:
        await conn.close()


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive, default=ROWS, help=f"rows in the sample CSV (default {ROWS:,})")
    args = parser.parse_args()
    schema = f"loader_demo_{secrets.token_hex(4)}"
    table = f"{schema}.events"
    server = None
    dsn = os.environ.get("DATABASE_URL")
    if dsn:
        print("demo: using $DATABASE_URL", file=sys.stderr)
    elif docker_answers():
        print("demo: starting PostgreSQL with docker compose", file=sys.stderr)
        subprocess.run(["docker", "compose", "up", "-d", "--wait"], cwd=REPO, check=True)
        dsn = COMPOSE_DSN
    else:
        print("demo: starting a throwaway local PostgreSQL cluster", file=sys.stderr)
        server = start_server(local_only=True)
        dsn = server.dsn
    prepared = False
    try:
        with tempfile.TemporaryDirectory(prefix="loader-demo-") as tmp:
            sample = Path(tmp) / "events.csv"
            write_sample(sample, args.rows)
            asyncio.run(prepare(dsn, schema))
            prepared = True
            options = ["--table", table, "--ledger-schema", schema, "--workers", "4"]
            command = [sys.executable, "-m", "loader", "import", str(sample), *options]
            print(f"demo: $ loader import events.csv {' '.join(options)}", file=sys.stderr)
            return subprocess.run(command, env={**os.environ, "DATABASE_URL": dsn}).returncode
    finally:
        if server is not None:
            server.stop()
        elif prepared:
            print(f"demo: the rows are in {table}, the ledger in {schema}.loads; to remove them all:", file=sys.stderr)
            print(f"demo:   DROP SCHEMA {schema} CASCADE;", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
