"""Load a generated sample CSV into a real PostgreSQL with the real CLI, and print its summary.

Server: $DATABASE_URL if set; else docker compose if a Docker engine answers; else a
throwaway local cluster (loader.devserver), removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

from loader.devserver import start_server

REPO = Path(__file__).resolve().parent.parent
ROWS = 200_000
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


async def prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS public.events")
        await conn.execute((REPO / "sql" / "example.sql").read_text())
    finally:
        await conn.close()


def main() -> int:
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
    try:
        with tempfile.TemporaryDirectory(prefix="loader-demo-") as tmp:
            sample = Path(tmp) / "events.csv"
            write_sample(sample, ROWS)
            asyncio.run(prepare(dsn))
            command = [sys.executable, "-m", "loader", "import", str(sample), "--table", "public.events", "--workers", "4"]
            print("demo: $ loader import events.csv --table public.events --workers 4", file=sys.stderr)
            return subprocess.run(command, env={**os.environ, "DATABASE_URL": dsn}).returncode
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
