"""`python -m bench`: loader against server-side COPY, psql \\copy and pgloader, in one run.

Every method loads the same generated file into a fresh table, several times; the median
is reported with rows/s, MB/s, the client's peak RSS and CPU, and the ratio to psql \\copy
measured in the same run. A method whose table differs from the \\copy twin (count and
EXCEPT ALL both ways) gets no figure. Timing is never asserted anywhere: these machines
are shared and noisy, so only ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

import loader
from bench.generate import TABLE_DDL, write
from devserver import pg_binary, start_server

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SETTINGS = ("server_version", "shared_buffers", "max_wal_size", "wal_level", "synchronous_commit", "fsync", "checkpoint_timeout", "max_connections")


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    cpu_s: float


@dataclass
class Result:
    method: str
    rows: int
    runs: list[Run] = field(default_factory=list)
    verified: bool | None = None
    note: str | None = None
    seconds: float | None = None
    rows_per_s: float | None = None
    mb_per_s: float | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    cpu_s_per_million_rows: float | None = None
    ratio_to_psql_copy: float | None = None


def _peak_rss_kb(pid: int) -> int:
    """VmHWM: the peak RSS of the process's current image (rusage's maxrss would also count the
    forked copy of this Python process from before the exec)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[Run, int, str]:
    """Run a command; its wall time, its peak RSS (sampled every 10 ms) and its CPU (wait4)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        peak = 0
        while True:
            peak = max(peak, _peak_rss_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        message = err.read().decode(errors="replace")
    run = Run(round(seconds, 3), round(peak / 1024, 1), round(usage.ru_utime + usage.ru_stime, 3))
    return run, proc.returncode, message


class Bench:
    def __init__(self, dsn: str, server_files: bool) -> None:
        self.dsn = dsn
        self.server_files = server_files

    def sql(self, statement: str, *args: Any) -> Any:
        async def go() -> Any:
            conn = await asyncpg.connect(self.dsn)
            try:
                return await conn.fetch(statement, *args)
            finally:
                await conn.close()

        return asyncio.run(go())

    def fresh(self, table: str) -> None:
        self.sql(f"DROP TABLE IF EXISTS {table}")
        self.sql(TABLE_DDL.format(name=table))
        self.sql("CHECKPOINT")

    def psql(self) -> str:
        psql = pg_binary("psql")
        if psql is None:
            sys.exit("bench: psql is needed (install the PostgreSQL client)")
        return psql

    def same_as_twin(self, table: str, twin: str, expected_rows: int) -> bool:
        count = self.sql(f"SELECT count(*) FROM {table}")[0][0]
        if count != expected_rows:
            return False
        diff = self.sql(
            f"SELECT (SELECT count(*) FROM (TABLE {table} EXCEPT ALL TABLE {twin}) a)"
            f"     + (SELECT count(*) FROM (TABLE {twin} EXCEPT ALL TABLE {table}) b)"
        )[0][0]
        return bool(diff == 0)

    def commands(self, path: Path, workers: list[int | None], batch_size: int | None) -> dict[str, list[str] | None]:
        loader = [sys.executable, "-m", "loader", "import", str(path), "--table", "bench", "--dsn", self.dsn, "--force"]
        if batch_size:
            loader += ["--batch-size", str(batch_size)]
        methods: dict[str, list[str] | None] = {}
        if self.server_files:
            methods["server COPY FROM file"] = [self.psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn, "-c", f"COPY bench FROM '{path}' WITH (FORMAT csv, HEADER true)"]
        methods["psql \\copy"] = [self.psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn, "-c", f"\\copy bench FROM '{path}' WITH (FORMAT csv, HEADER true)"]
        pgloader = shutil.which("pgloader")
        csv_options = ["--type", "csv", "--with", "skip header = 1", "--with", "fields terminated by ','",
                       "--with", "fields optionally enclosed by '\"'", "--with", "fields escaped by double-quote"]
        target = self.dsn.replace("postgresql://", "pgsql://", 1) + "?tablename=bench"
        methods["pgloader"] = [pgloader, *csv_options, str(path), target] if pgloader else None
        methods["pgloader, workers 4 / concurrency 2"] = (
            [pgloader, *csv_options, "--with", "workers = 4", "--with", "concurrency = 2", str(path), target] if pgloader else None
        )
        for w in workers:
            name = f"loader --workers {w}" if w else "loader (defaults)"
            methods[name] = loader + (["--workers", str(w)] if w else [])
        return methods

    def measure(
        self, path: Path, rows: int, runs: int, workers: list[int | None], batch_size: int | None, only: set[str] | None = None
    ) -> list[Result]:
        self.fresh("bench_twin")
        subprocess.run([self.psql(), "-X", "-q", "-d", self.dsn, "-c", f"\\copy bench_twin FROM '{path}' WITH (FORMAT csv, HEADER true)"], check=True)
        size_mb = path.stat().st_size / 1e6
        commands = {name: cmd for name, cmd in self.commands(path, workers, batch_size).items() if only is None or name in only}
        results = {name: Result(name, rows, note=None if cmd else "not installed: skipped") for name, cmd in commands.items()}
        # Round robin, not method after method: a slow spell on a shared machine then falls on
        # every method alike instead of on one, and the ratios stay honest.
        for round_ in range(runs):
            for name, cmd in commands.items():
                result = results[name]
                if cmd is None or result.note:
                    continue
                self.fresh("bench")
                run, code, err = timed(cmd)
                if code != 0:
                    result.note = f"exit {code}: {err.strip()[-300:]}"
                    continue
                result.runs.append(run)
                if round_ == runs - 1:
                    result.verified = self.same_as_twin("bench", "bench_twin", rows)
                print(f"bench: round {round_ + 1}: {name}: {run.seconds} s", file=sys.stderr, flush=True)
        for result in results.values():
            if result.verified:
                result.seconds = statistics.median(r.seconds for r in result.runs)
                result.rows_per_s = round(rows / result.seconds)
                result.mb_per_s = round(size_mb / result.seconds, 1)
                result.peak_rss_mb = max(r.peak_rss_mb for r in result.runs)
                result.cpu_s = statistics.median(r.cpu_s for r in result.runs)
                result.cpu_s_per_million_rows = round(result.cpu_s / rows * 1e6, 3)
            elif result.runs and not result.note:
                result.note = "WRONG LOAD: the table differs from the \\copy twin; no figure reported"
        psql = results["psql \\copy"]
        for r in results.values():
            if r.rows_per_s and psql.rows_per_s:
                r.ratio_to_psql_copy = round(r.rows_per_s / psql.rows_per_s, 2)
        return list(results.values())

    def measure_bad_rows(self, good: Path, bad: Path, rows: int, bad_rows: int, runs: int, workers: int | None = None) -> dict[str, Any]:
        """The same file with 0.1% bad rows against the clean one, at the defaults (or `workers`)."""
        out: dict[str, Any] = {"workers": workers or "default"}
        extra = ["--workers", str(workers)] if workers else []
        seconds: dict[str, list[float]] = {"clean": [], "0.1% bad rows": []}
        for _ in range(runs):  # alternating, so that a slow spell falls on both
            for label, path, expected in (("clean", good, rows), ("0.1% bad rows", bad, rows - bad_rows)):
                self.fresh("bench")
                rejects = Path(tempfile.mkdtemp()) / "rejects.csv"
                cmd = [sys.executable, "-m", "loader", "import", str(path), "-t", "bench", "--dsn", self.dsn, "--force", "--rejects", str(rejects), *extra]
                run, code, err = timed(cmd)
                loaded = self.sql("SELECT count(*) FROM bench")[0][0]
                shutil.rmtree(rejects.parent, ignore_errors=True)
                if code not in (0, 3) or loaded != expected:
                    return {"note": f"{label}: wrong load (exit {code}, {loaded} rows): {err.strip()[-300:]}"}
                seconds[label].append(run.seconds)
        for label, times in seconds.items():
            out[label] = {"seconds": statistics.median(times), "rows_per_s": round(rows / statistics.median(times))}
        out["ratio"] = round(out["0.1% bad rows"]["rows_per_s"] / out["clean"]["rows_per_s"], 2)
        return out


def table(results: list[Result]) -> str:
    head = f"{'method':<36} {'rows/s':>10} {'MB/s':>7} {'x psql':>7} {'median s':>9} {'client CPU s':>13} {'CPU s/M rows':>13} {'peak RSS MB':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.rows_per_s is None:
            lines.append(f"{r.method:<36} {r.note}")
            continue
        lines.append(
            f"{r.method:<36} {r.rows_per_s:>10,} {r.mb_per_s:>7} {r.ratio_to_psql_copy:>7} {r.seconds:>9} "
            f"{r.cpu_s:>13} {r.cpu_s_per_million_rows:>13} {r.peak_rss_mb:>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated file (default 1,000,000)")
    parser.add_argument("--large", type=int, default=0, help="also measure psql \\copy and the loader's defaults at this many rows (e.g. 5000000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per method; the median is reported (default 3)")
    parser.add_argument("--workers", default="1,2,4", help="loader --workers values besides the default (default 1,2,4)")
    parser.add_argument("--batch-size", type=int, default=None, help="loader --batch-size (default: the loader's)")
    parser.add_argument("--dsn", default=None, help="a PostgreSQL to measure (default: a throwaway local cluster, as the tests use)")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"), help="JSON results file")
    parser.add_argument("--data-dir", default=str(DATA), help="where generated files are kept (default bench/data)")
    parser.add_argument("--no-bad-rows", action="store_true", help="skip the 0.1%%-bad-rows comparison")
    args = parser.parse_args(argv)

    # An installed package runs from bytecode pip compiled; a checkout run with
    # PYTHONDONTWRITEBYTECODE set would compile the loader's modules on every run instead.
    compileall.compile_dir(Path(loader.__file__).parent, quiet=1)
    server = None
    dsn = args.dsn
    if dsn is None:
        server = start_server(local_only=True)
        dsn = server.dsn
    try:
        bench = Bench(dsn, server_files=server is not None)
        workers: list[int | None] = [int(w) for w in args.workers.split(",") if w] + [None]
        data = Path(args.data_dir)
        path = data / f"bench-{args.rows}.csv"
        if not path.exists():
            print(f"bench: generating {path} ({args.rows:,} rows)", file=sys.stderr)
            write(path, args.rows)
        settings = {row[0]: row[1] for row in bench.sql("SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY($1::text[])", list(SETTINGS))}
        report: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "postgres": settings,
            "rows": args.rows,
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "runs": args.runs,
            "results": [asdict(r) for r in bench.measure(path, args.rows, args.runs, workers, args.batch_size)],
        }
        print(table([Result(**{**r, "runs": []}) for r in report["results"]]))
        if not args.no_bad_rows:
            bad_every = 1000
            bad_path = data / f"bench-{args.rows}-bad-scattered.csv"
            if not bad_path.exists():
                write(bad_path, args.rows, bad_every=bad_every)
            report["bad_rows"] = bench.measure_bad_rows(path, bad_path, args.rows, args.rows // bad_every, args.runs)
            print(f"0.1% bad rows: {report['bad_rows']}")
            report["bad_rows_4_workers"] = bench.measure_bad_rows(path, bad_path, args.rows, args.rows // bad_every, args.runs, workers=4)
            print(f"0.1% bad rows, --workers 4: {report['bad_rows_4_workers']}")
        if args.large:
            large = data / f"bench-{args.large}.csv"
            if not large.exists():
                print(f"bench: generating {large} ({args.large:,} rows)", file=sys.stderr)
                write(large, args.large)
            big = bench.measure(
                large, args.large, args.runs, [1, None], args.batch_size,
                only={"psql \\copy", "loader --workers 1", "loader (defaults)"},
            )
            report["large"] = {"rows": args.large, "results": [asdict(r) for r in big]}
            print(table(big))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"bench: results written to {args.out}", file=sys.stderr)
        wrong = [r for r in report["results"] if r["verified"] is False]
        return 1 if wrong else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
