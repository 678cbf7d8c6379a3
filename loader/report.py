"""What a load did, counted as it happens, and how it is told: a human summary or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import EXIT_FATAL, EXIT_OK, EXIT_REJECTS, EXIT_TEMPFAIL, EXIT_USAGE

MAX_KEPT_REJECTS = 100  # the report keeps the first ones; the counters count them all
SHOWN_REJECTS = 5


@dataclass(frozen=True)
class RejectNote:
    """A rejected row as the report tells it (the rejects file has the record itself)."""

    line: int
    sqlstate: str
    message: str


@dataclass
class Report:
    source: str
    table: str
    load_id: str
    workers: int
    mode: str = "append"
    dry_run: bool = False  # nothing was committed: the counts say what a load would do
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    rows_skipped: int = 0  # loaded by an earlier run of the same load, not again
    rows_inserted: int | None = None  # upsert: rows merged as new keys ...
    rows_updated: int | None = None  # ... and onto existing ones (a key's earlier rows in its batch: neither)
    batches: int = 0
    retries: int = 0
    copies: int = 0
    elapsed_s: float = 0.0
    rejects_file: str | None = None
    rejects: list[RejectNote] = field(default_factory=list)
    note: str | None = None  # why this run had nothing to do
    elsewhere: str | None = None  # ... another load had the source, or its content (see plan.OTHER_RUN)
    concurrency: dict[str, int] | None = None  # --workers auto: min, max and final batches in flight
    # The run stopped before the end of the source (a signal, the deadline, --max-errors, a
    # failure): what it committed stays, and the same command run again resumes the load.
    stopped_early: bool = False
    _stopped_exit_code: int | None = field(default=None, repr=False)  # see stopped
    # Live state, for progress displays.
    bytes_read: int = 0
    bytes_total: int | None = None
    _in_flight: int = field(default=0, repr=False)  # see in_flight
    peak_in_flight: int = 0  # the most batches in flight at once: with --workers auto, the workers used
    concurrency_now: int = 0
    waiting_for_replicas: bool = False
    bytes_loaded: int | None = None  # of a plain file: its bytes up to the end of the batches committed (None: unknown)
    waiting: str | None = None  # why the load waits: connecting, retrying a transient failure (progress.Waits)
    waiting_rows: int = 0  # rows_read when `waiting` was said: a retry's reason is stale once rows move on

    @property
    def in_flight(self) -> int:
        """Batches loading now."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        self.peak_in_flight = max(self.peak_in_flight, value)

    def stopped(self, exit_code: int) -> None:
        """The run stopped before the end of the source, and exits `exit_code`."""
        self.stopped_early = True
        self._stopped_exit_code = exit_code

    def count_retry(self, _exc: BaseException) -> None:
        self.retries += 1

    def add_batch(self, rows_read: int, rows_loaded: int, rows_rejected: int, rejects: list[RejectNote]) -> None:
        """`rows_read` is the batcher's count of the batch's records, not the server's: the
        check at the end (read = loaded + rejected + skipped) holds each against the other."""
        self.batches += 1
        self.rows_read += rows_read
        self.rows_loaded += rows_loaded
        self.rows_rejected += rows_rejected
        self.rejects.extend(rejects[: MAX_KEPT_REJECTS - len(self.rejects)])

    def add_merged(self, merged: tuple[int, int] | None) -> None:
        """An upsert's batch: rows merged as new keys, and onto existing ones."""
        if merged is not None:
            self.rows_inserted = (self.rows_inserted or 0) + merged[0]
            self.rows_updated = (self.rows_updated or 0) + merged[1]

    def add_skipped(self, rows_read: int, rows_loaded: int, rows_rejected: int) -> None:
        """A batch an earlier run committed: read and checked again, not loaded again."""
        self.rows_read += rows_read
        self.rows_skipped += rows_loaded
        self.rows_rejected += rows_rejected

    @property
    def rows_per_s(self) -> float:
        return self.rows_loaded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self._stopped_exit_code is not None:
            return self._stopped_exit_code
        if self.note:  # nothing to do: the earlier run already answered for its rejects
            return EXIT_OK
        return EXIT_REJECTS if self.rows_rejected else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_stopped_exit_code")
        for live in ("bytes_read", "bytes_total", "_in_flight", "peak_in_flight", "concurrency_now", "waiting_for_replicas", "bytes_loaded", "waiting", "waiting_rows"):
            data.pop(live)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["rows_per_s"] = round(self.rows_per_s, 1)
        data["exit_code"] = self.exit_code
        if self.concurrency is not None:  # --workers auto: the workers it used, not --max-workers
            data["workers"] = self.peak_in_flight
        return data

    def summary(self) -> str:
        """One line for cron's mail, then the first few rejects."""
        if self.note:
            return f"{self.source} into {self.table}: {'' if self.elsewhere else 'nothing to do: '}{self.note}"
        loaded = f"loaded {self.rows_loaded:,} of {_count(self.rows_read, 'row')}"
        if self.stopped_early:  # not "loaded 650,000 of 650,000 rows", which reads as complete
            source = "standard input" if self.source == "-" else self.source
            read = f"the {_count(self.rows_read, 'row')} read" if self.rows_read else "no rows read"
            loaded = f"stopped before the end of {source}: loaded {self.rows_loaded:,} of {read}"
        if self.dry_run:
            loaded = f"dry run, nothing committed: would have {loaded}"
        into = f"into {self.table}" if self.mode == "append" else f"into {self.table} ({self.mode})"
        head = (
            f"{loaded} {into} in {self.elapsed_s:.1f} s ({self.rows_per_s:,.0f} rows/s); "
            f"{_count(self.batches, 'batch', 'batches')}, {_count(self.retries, 'retry', 'retries')}"
        )
        if self.rows_inserted is not None and self.rows_updated is not None:
            head += f"; {self.rows_inserted:,} inserted, {self.rows_updated:,} updated"
        if self.concurrency:
            c = self.concurrency
            head += f"; concurrency {c['min']}-{c['max']}, settled at {c['final']}"
        if self.rows_skipped:
            were = "was" if self.rows_skipped == 1 else "were"
            head += f"; {_count(self.rows_skipped, 'row')} {were} loaded by an earlier run (load {self.load_id}, resumed)"
        if self.rows_rejected:
            head += f"; {_count(self.rows_rejected, 'row')} rejected"
            if self.rejects_file:
                head += f", written to {self.rejects_file}"
        if self.stopped_early:
            head += "; run the same command again to resume"
        lines = [head]
        for note in sorted(self.rejects, key=lambda n: n.line)[:SHOWN_REJECTS]:
            lines.append(f"  line {note.line}: {note.sqlstate} {note.message}")
        if self.rows_rejected > SHOWN_REJECTS:
            lines.append(f"  ... and {self.rows_rejected - SHOWN_REJECTS:,} more")
        return "\n".join(lines)


def _count(n: int, one: str, many: str | None = None) -> str:
    """`1 row`, `2 rows`, `1 batch`, `0 batches`."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


@dataclass(frozen=True)
class SourceOutcome:
    """What became of one source of a file set."""

    source: str
    state: str  # loaded, loaded-with-rejects, skipped, other-run, failed, stopped, not-started (see SetReport)
    report: Report | None = None  # None: its load never began
    error: str | None = None
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        report = self.report
        data: dict[str, Any] = {"source": self.source, "state": self.state, "error": self.error, "exit_code": self.exit_code}
        for name in ("load_id", "rows_read", "rows_loaded", "rows_rejected", "rows_skipped", "rows_inserted", "rows_updated", "rejects_file"):
            data[name] = getattr(report, name) if report is not None else (None if name in _OPTIONAL else 0)
        if report is not None and not report.load_id:
            data["load_id"] = None
        return data

    def summary(self) -> str:
        if self.report is not None and self.state != "failed":
            line = self.report.summary()
            return line if self.report.note else f"{self.source}: {line}"
        error = (self.error or "").removeprefix(f"{self.source}: ")
        return f"{self.source}: {self.state}" + (f": {error}" if error else "")


_OPTIONAL = frozenset({"load_id", "rows_inserted", "rows_updated", "rejects_file"})

# The worse outcome decides a file set's exit code: a stopped run (run it again), a source
# that failed, a source refused as it is, rejected rows, all loaded.
_WORST_FIRST = (EXIT_TEMPFAIL, EXIT_FATAL, EXIT_USAGE, EXIT_REJECTS)


@dataclass
class SetReport:
    """A file set's run: each source a load of its own, told one by one, then the totals.

    States: loaded; loaded-with-rejects; skipped (an earlier run loaded it: nothing to do);
    other-run (another run of the same command is loading it, or loaded it); failed (it could not be loaded: the error says why; the others still were); stopped (the
    run stopped in it: the next run resumes it); not-started (the run stopped before it)."""

    table: str
    mode: str = "append"
    dry_run: bool = False
    sources: list[SourceOutcome] = field(default_factory=list)
    empty: tuple[str, ...] = ()  # globs and directories that matched no file
    elapsed_s: float = 0.0
    _stopped_exit_code: int | None = field(default=None, repr=False)

    def stopped(self, exit_code: int) -> None:
        self._stopped_exit_code = exit_code

    def _total(self, name: str) -> int:
        return sum(getattr(o.report, name) for o in self.sources if o.report is not None)

    @property
    def rows_read(self) -> int:
        return self._total("rows_read")

    @property
    def rows_loaded(self) -> int:
        return self._total("rows_loaded")

    @property
    def rows_rejected(self) -> int:
        return self._total("rows_rejected")

    @property
    def retries(self) -> int:
        return self._total("retries")

    @property
    def exit_code(self) -> int:
        codes = {o.exit_code for o in self.sources}
        if self._stopped_exit_code is not None:
            codes.add(self._stopped_exit_code)
        return next((code for code in _WORST_FIRST if code in codes), EXIT_OK)

    def count(self, state: str) -> int:
        return sum(1 for o in self.sources if o.state == state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "mode": self.mode,
            "dry_run": self.dry_run,
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "rows_rejected": self.rows_rejected,
            "retries": self.retries,
            "elapsed_s": round(self.elapsed_s, 3),
            "exit_code": self.exit_code,
            "sources": [o.to_dict() for o in self.sources],
            "unmatched": list(self.empty),
        }

    def summary(self) -> str:
        """A line per source, then the totals."""
        lines = [o.summary() for o in self.sources]
        states = ", ".join(
            f"{self.count(state)} {state}"
            for state in ("loaded", "loaded-with-rejects", "skipped", "other-run", "failed", "stopped", "not-started")
            if self.count(state)
        )
        if self.count("other-run") and not (self.count("loaded") or self.count("loaded-with-rejects")):
            states += " (nothing left to claim: other runs of this command have the rest)"
        total = (
            f"{_count(len(self.sources), 'source')} into {self.table} in {self.elapsed_s:.1f} s: {states or 'nothing to load'}; "
            f"{self.rows_loaded:,} of {_count(self.rows_read, 'row')} loaded"
        )
        if self.rows_rejected:
            total += f", {_count(self.rows_rejected, 'row')} rejected"
        if self.count("stopped") or self.count("not-started"):
            total += "; run the same command again to load the rest"
        return "\n".join([*lines, total])
