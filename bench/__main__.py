"""`python -m bench`: loader against server-side COPY, psql \\copy and pgloader, in one run.

The same file goes into a table with a primary key and two secondary indexes, the common
target, against psql \\copy into the same table (`--no-indexed` skips it).

The load modes are measured in the same run (`--modes-only`: only them): `--mode upsert`
against the usual psql script (stage with \\copy, then INSERT ... ON CONFLICT), and
`--mode replace` against an append of the same file into an empty table.

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
from bench.generate import HEADER, INDEXED_TABLE_DDL, PK_TABLE_DDL, TABLE_DDL, write
from devserver import VERSION_VARIABLE, pg_binary, start_server

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

    def summarize(self, size_mb: float) -> None:
        """The medians of a verified method's runs (a wrong load gets no figure)."""
        if self.verified:
            self.seconds = statistics.median(r.seconds for r in self.runs)
            self.rows_per_s = round(self.rows / self.seconds)
            self.mb_per_s = round(size_mb / self.seconds, 1)
            self.peak_rss_mb = max(r.peak_rss_mb for r in self.runs)
            self.cpu_s = statistics.median(r.cpu_s for r in self.runs)
            self.cpu_s_per_million_rows = round(self.cpu_s / self.rows * 1e6, 3)
        elif self.runs and not self.note:
            self.note = "WRONG LOAD: the table differs from the \\copy twin; no figure reported"


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

    def fresh(self, table: str, ddl: str = TABLE_DDL, fill: str | None = None) -> None:
        """A new table; `fill` (a query) gives its rows, vacuumed and analyzed as a table
        in service would be. Then a checkpoint, so that no run pays for the one before."""
        self.sql(f"DROP TABLE IF EXISTS {table}")
        for statement in ddl.format(name=table).split(";"):
            self.sql(statement)
        if fill:
            self.sql(f"INSERT INTO {table} {fill}")
            self.sql(f"VACUUM ANALYZE {table}")
        self.sql("CHECKPOINT")

    def run_fresh(self, result: Result, cmd: list[str], table: str = "bench", ddl: str = TABLE_DDL, fill: str | None = None) -> str | None:
        """One run of `cmd` into a fresh `table`, added to `result`; its stderr, or None when
        it failed (the result then says why, and gets no more runs)."""
        self.fresh(table, ddl, fill)
        run, code, err = timed(cmd)
        if code != 0:
            result.note = f"exit {code}: {err.strip()[-300:]}"
            return None
        result.runs.append(run)
        return err

    def copy_in(self, table: str, path: Path) -> None:
        """Load `path` into `table` with psql \\copy (the twins every load is checked against)."""
        subprocess.run(
            [self.psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn, "-c", f"\\copy {table} FROM '{path}' WITH (FORMAT csv, HEADER true)"],
            check=True,
        )

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

    def commands(self, path: Path, workers: list[int | str | None], batch_size: int | None) -> dict[str, list[str] | None]:
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
        self,
        path: Path,
        rows: int,
        runs: int,
        workers: list[int | str | None],
        batch_size: int | None,
        only: set[str] | None = None,
        ddl: str = TABLE_DDL,
    ) -> list[Result]:
        """Each method loads `path` into a fresh table made by `ddl`, round robin."""
        self.fresh("bench_twin")
        self.copy_in("bench_twin", path)
        size_mb = path.stat().st_size / 1e6
        commands = {name: cmd for name, cmd in self.commands(path, workers, batch_size).items() if only is None or name in only}
        results = {name: Result(name, rows, note=None if cmd else "not installed: skipped") for name, cmd in commands.items()}
        # Round robin, not method after method: a slow spell on a shared machine then falls on
        # every method alike instead of on one, and the ratios stay honest.
        for round_ in range(runs):
            for name, cmd in commands.items():
                result = results[name]
                if cmd is None or result.note or self.run_fresh(result, cmd, "bench", ddl) is None:
                    continue
                if round_ == runs - 1:
                    result.verified = self.same_as_twin("bench", "bench_twin", rows)
                print(f"bench: round {round_ + 1}: {name}: {result.runs[-1].seconds} s", file=sys.stderr, flush=True)
        for result in results.values():
            result.summarize(size_mb)
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

    def measure_modes(self, path: Path, other: Path, rows: int, runs: int) -> dict[str, Any]:
        """The load modes at the defaults, round robin, each run on a fresh table with a primary key:

        - upsert: the file into a table holding its first half of ids with other values (from
          `other`, the file written with another seed), so that half the rows update an existing
          key and really change it, and half are new; against the usual psql script, one
          transaction: a temp table, \\copy into it, INSERT ... ON CONFLICT DO UPDATE;
        - replace: the file into a table holding the same rows (a re-export with nothing
          changed), and into one where every row differs; against an append of the file into
          an empty table.

        Every run's table must equal the file's \\copy twin (after an upsert or a replace the
        table holds exactly the file's rows), or the method gets no figure."""
        half = rows // 2
        table, twin, old = "bench_modes", "bench_modes_twin", "bench_modes_other"
        for name, source in ((twin, path), (old, other)):
            self.fresh(name)
            self.copy_in(name, source)
        differing = self.sql(
            f"SELECT count(*) FROM {twin} f JOIN {old} o USING (id) WHERE (f.*) IS DISTINCT FROM (o.*)"
        )[0][0]
        columns = HEADER.strip().split(",")
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != "id")
        script_dir = Path(tempfile.mkdtemp(prefix="bench-modes-"))
        script = script_dir / "upsert.sql"
        script.write_text(
            "BEGIN;\n"
            f"CREATE TEMP TABLE s (LIKE {table}) ON COMMIT DROP;\n"
            f"\\copy s FROM '{path}' WITH (FORMAT csv, HEADER true)\n"
            f"INSERT INTO {table} SELECT * FROM s ON CONFLICT (id) DO UPDATE SET {sets};\n"
            "COMMIT;\n"
        )
        loader = [sys.executable, "-m", "loader", "import", str(path), "--table", table, "--dsn", self.dsn, "--force"]
        upsert_base = f"SELECT * FROM {old} WHERE id <= {half}"
        # name: (the rows the table holds before the run, the command)
        methods: dict[str, tuple[str | None, list[str]]] = {
            "upsert: loader (defaults)": (upsert_base, [*loader, "--mode", "upsert", "--key", "id"]),
            "upsert: psql script": (upsert_base, [self.psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn, "-f", str(script)]),
            "append: loader (defaults), empty table": (None, loader),
            "replace: loader (defaults), rows unchanged": (f"SELECT * FROM {twin}", [*loader, "--mode", "replace"]),
            "replace: loader (defaults), every row changed": (f"SELECT * FROM {old}", [*loader, "--mode", "replace"]),
        }
        results = {name: Result(name, rows) for name in methods}
        summaries: dict[str, str] = {}
        try:
            for round_ in range(runs):  # round robin, as in measure()
                for name, (base, cmd) in methods.items():
                    result = results[name]
                    err = None if result.note else self.run_fresh(result, cmd, table, PK_TABLE_DDL, base)
                    if err is None:
                        continue
                    if err.strip() and "loader" in name:
                        summaries[name] = err.strip().splitlines()[-1]
                    # Every run, not only the last: a merge that goes wrong once is wrong.
                    result.verified = self.same_as_twin(table, twin, rows) and result.verified is not False
                    print(f"bench: modes round {round_ + 1}: {name}: {result.runs[-1].seconds} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(script_dir, ignore_errors=True)
            for name in (table, twin, old):
                self.sql(f"DROP TABLE IF EXISTS {name}")
        size_mb = path.stat().st_size / 1e6
        for result in results.values():
            result.summarize(size_mb)

        def ratio(a: str, b: str) -> float | None:
            """Time of `a` over time of `b`, both medians of this run."""
            sa, sb = results[a].seconds, results[b].seconds
            return round(sa / sb, 2) if sa and sb else None

        upsert_speedup = ratio("upsert: psql script", "upsert: loader (defaults)")  # loader rows/s over psql's
        unchanged = ratio("replace: loader (defaults), rows unchanged", "append: loader (defaults), empty table")
        changed = ratio("replace: loader (defaults), every row changed", "append: loader (defaults), empty table")
        rss = [r.peak_rss_mb for n, r in results.items() if n.startswith(("upsert: loader", "replace:")) and r.peak_rss_mb is not None]
        return {
            "rows": rows,
            "upsert_rows_updated": half,
            "upsert_rows_inserted": rows - half,
            "rows_differing_from_the_other_seed": differing,
            "results": [asdict(r) for r in results.values()],
            "loader_summaries": summaries,
            "upsert_loader_to_psql": upsert_speedup,
            "replace_unchanged_to_append_time": unchanged,
            "replace_changed_to_append_time": changed,
            "targets": {
                "upsert: loader >= 1.2x the psql script": None if upsert_speedup is None else upsert_speedup >= 1.2,
                "replace: at most 2x the append's time (aim 1.5x)": None if unchanged is None or changed is None else max(unchanged, changed) <= 2,
                "peak client RSS under 100 MB": bool(rss) and max(rss) < 100,
            },
        }


    def measure_file_set(self, directory: Path, files: int, rows: int, runs: int) -> dict[str, Any]:
        """Many small files: `files` files of `rows` rows each, loaded by one loader command
        (a quoted glob) against a shell loop of psql \\copy, one process per file (what
        people script), round robin, each run into a fresh table, checked against the
        loop's table of the first round."""
        paths = [directory / f"part-{n:04}.csv" for n in range(files)]
        for n, path in enumerate(paths):
            if not path.exists():
                write(path, rows, seed=n + 1)
        script = directory / "copy-loop.sh"
        script.write_text(
            f'for f in "$1"/part-*.csv; do "{self.psql()}" -X -q -v ON_ERROR_STOP=1 -d "$2" '
            '-c "\\copy bench FROM \'$f\' WITH (FORMAT csv, HEADER true)" || exit 1; done\n'
        )
        methods = {
            "psql \\copy, a shell loop": ["bash", str(script), str(directory), self.dsn],
            # The command as a user runs it (no --force: each fresh table is new to the ledger).
            "loader (defaults), one command": [
                sys.executable, "-m", "loader", "import", str(directory / "part-*.csv"), "--table", "bench", "--dsn", self.dsn,
            ],
        }
        total = files * rows
        results = {name: Result(name, total) for name in methods}
        try:
            for round_ in range(runs):
                for name, cmd in methods.items():
                    result = results[name]
                    if result.note or self.run_fresh(result, cmd) is None:
                        continue
                    if round_ == 0 and name.startswith("psql"):
                        self.sql("DROP TABLE IF EXISTS bench_files_twin")
                        self.sql("ALTER TABLE bench RENAME TO bench_files_twin")
                        result.verified = self.sql("SELECT count(*) FROM bench_files_twin")[0][0] == total
                    else:
                        result.verified = self.same_as_twin("bench", "bench_files_twin", total) and result.verified is not False
                    print(f"bench: file set round {round_ + 1}: {name}: {result.runs[-1].seconds} s", file=sys.stderr, flush=True)
        finally:
            self.sql("DROP TABLE IF EXISTS bench_files_twin")
        size_mb = sum(path.stat().st_size for path in paths) / 1e6
        for result in results.values():
            result.summarize(size_mb)
        loop, loader = (results[name].seconds for name in methods)
        speedup = round(loop / loader, 2) if loop and loader else None
        for result in results.values():  # here the "psql" column is the loop's
            if result.seconds and loop:
                result.ratio_to_psql_copy = round(loop / result.seconds, 2)
        return {
            "files": files,
            "rows_per_file": rows,
            "results": [asdict(r) for r in results.values()],
            "loader_to_psql_loop": speedup,
            "targets": {"file set: loader >= 3x a psql \\copy loop": None if speedup is None else speedup >= 3},
        }


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


def modes_table(modes: dict[str, Any]) -> str:
    head = f"{'load mode (1 PK on id)':<48} {'rows/s':>10} {'median s':>9} {'client CPU s':>13} {'peak RSS MB':>12}"
    lines = [head, "-" * len(head)]
    for r in modes["results"]:
        if r["rows_per_s"] is None:
            lines.append(f"{r['method']:<48} {r['note']}")
            continue
        lines.append(f"{r['method']:<48} {r['rows_per_s']:>10,} {r['seconds']:>9} {r['cpu_s']:>13} {r['peak_rss_mb']:>12}")
    lines.append(
        f"upsert: loader / psql script {modes['upsert_loader_to_psql']}x (rows/s); replace / append time: "
        f"rows unchanged {modes['replace_unchanged_to_append_time']}, every row changed {modes['replace_changed_to_append_time']}"
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
    parser.add_argument("--pg", default=None, help="the throwaway cluster's PostgreSQL major version, e.g. 15 or 18 (as LOADER_TEST_PG)")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"), help="JSON results file")
    parser.add_argument("--data-dir", default=str(DATA), help="where generated files are kept (default bench/data)")
    parser.add_argument("--no-bad-rows", action="store_true", help="skip the 0.1%%-bad-rows comparison")
    parser.add_argument("--no-modes", action="store_true", help="skip the load modes (upsert, replace)")
    parser.add_argument("--no-indexed", action="store_true", help="skip the table with a primary key and two indexes")
    parser.add_argument("--modes-only", action="store_true", help="measure only the load modes (upsert, replace): a quick run")
    parser.add_argument("--files", type=int, default=500, help="files in the many-small-files comparison (default 500; 0: skip it)")
    parser.add_argument("--file-rows", type=int, default=1000, help="rows in each of those files (default 1,000)")
    parser.add_argument("--files-only", action="store_true", help="measure only the many-small-files comparison")
    parser.add_argument("--bad-rows-only", action="store_true", help="measure only the 0.1%%-bad-rows comparisons (at the defaults and 4 workers; and with a value of its own in each bad row)")
    args = parser.parse_args(argv)
    if args.modes_only and args.no_modes:
        parser.error("--modes-only and --no-modes exclude each other")
    if sum((args.modes_only, args.files_only, args.bad_rows_only)) > 1:
        parser.error("--modes-only, --files-only and --bad-rows-only exclude each other")

    # An installed package runs from bytecode pip compiled; a checkout run with
    # PYTHONDONTWRITEBYTECODE set would compile the loader's modules on every run instead.
    compileall.compile_dir(Path(loader.__file__).parent, quiet=1)
    server = None
    dsn = args.dsn
    if args.pg:
        os.environ[VERSION_VARIABLE] = args.pg
    if dsn is None:
        server = start_server(local_only=True)
        dsn = server.dsn
    try:
        bench = Bench(dsn, server_files=server is not None)
        workers: list[int | str | None] = [int(w) for w in args.workers.split(",") if w] + [None]
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
        }
        only = args.modes_only or args.files_only or args.bad_rows_only
        if args.files_only or args.bad_rows_only:
            args.no_modes = True
        if args.modes_only or args.bad_rows_only:
            args.files = 0
        if not only:
            report["results"] = [asdict(r) for r in bench.measure(path, args.rows, args.runs, workers, args.batch_size)]
            print(table([Result(**{**r, "runs": []}) for r in report["results"]]))
        if not args.no_indexed and not only:
            indexed_workers: list[int | str | None] = [*(w for w in workers if w and w != 1), "auto", None]
            indexed = bench.measure(
                path, args.rows, args.runs, indexed_workers, args.batch_size,
                only={"psql \\copy", *(f"loader --workers {w}" if w else "loader (defaults)" for w in indexed_workers)},
                ddl=INDEXED_TABLE_DDL,
            )
            defaults = next((r.ratio_to_psql_copy for r in indexed if r.method == "loader (defaults)"), None)
            report["indexed"] = {
                "table": "primary key and two secondary indexes",
                "results": [asdict(r) for r in indexed],
                "targets": {"indexed table: loader (defaults) >= 1.3x psql \\copy": None if defaults is None else defaults >= 1.3},
            }
            print("indexed table:")
            print(table(indexed))
        if args.bad_rows_only or (not args.no_bad_rows and not only):
            bad_every = 1000
            bad_path = data / f"bench-{args.rows}-bad-scattered.csv"
            if not bad_path.exists():
                write(bad_path, args.rows, bad_every=bad_every)
            report["bad_rows"] = bench.measure_bad_rows(path, bad_path, args.rows, args.rows // bad_every, args.runs)
            # PostgreSQL 17+ skips bad values in the COPY itself (ON_ERROR); older servers refuse the batch.
            floor = 0.85 if int(settings["server_version"].split(".")[0]) >= 17 else 0.5
            ratio = report["bad_rows"].get("ratio")
            report["bad_rows"]["targets"] = {f"0.1% bad rows >= {floor}x the clean pace": None if ratio is None else ratio >= floor}
            print(f"0.1% bad rows: {report['bad_rows']}")
            report["bad_rows_4_workers"] = bench.measure_bad_rows(path, bad_path, args.rows, args.rows // bad_every, args.runs, workers=4)
            print(f"0.1% bad rows, --workers 4: {report['bad_rows_4_workers']}")
            # The bad rows above all hold one placeholder; here each holds a value of its own,
            # which no bad row before it foretells (see isolate.RefusedValues).
            distinct_path = data / f"bench-{args.rows}-bad-distinct.csv"
            if not distinct_path.exists():
                write(distinct_path, args.rows, bad_every=bad_every, distinct=True)
            report["bad_rows_distinct"] = bench.measure_bad_rows(path, distinct_path, args.rows, args.rows // bad_every, args.runs)
            print(f"0.1% bad rows, each with a value of its own: {report['bad_rows_distinct']}")
        if not args.no_modes:
            other = data / f"bench-{args.rows}-seed2.csv"
            if not other.exists():
                print(f"bench: generating {other} ({args.rows:,} rows, other values)", file=sys.stderr)
                write(other, args.rows, seed=2)
            report["modes"] = bench.measure_modes(path, other, args.rows, args.runs)
            print(modes_table(report["modes"]))
        if args.files:
            files_dir = data / f"files-{args.files}x{args.file_rows}"
            report["file_set"] = bench.measure_file_set(files_dir, args.files, args.file_rows, args.runs)
            fs = report["file_set"]
            print(table([Result(**{**r, "runs": []}) for r in fs["results"]]))
            print(f"file set: loader / psql loop {fs['loader_to_psql_loop']}x")
        if args.large and not only:
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
        measured = [
            *report.get("results", []), *report.get("indexed", {}).get("results", []), *report.get("modes", {}).get("results", []),
            *report.get("file_set", {}).get("results", []),
        ]
        wrong = [r for r in measured if r["verified"] is False]
        return 1 if wrong else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
