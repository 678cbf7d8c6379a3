"""What a load did, counted as it happens, and how it is told: a human summary or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import EXIT_OK, EXIT_REJECTS

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
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    rows_skipped: int = 0  # loaded by an earlier run of the same load, not again
    batches: int = 0
    retries: int = 0
    copies: int = 0
    elapsed_s: float = 0.0
    rejects_file: str | None = None
    rejects: list[RejectNote] = field(default_factory=list)
    note: str | None = None  # why this run had nothing to do
    concurrency: dict[str, int] | None = None  # --workers auto: min, max and final batches in flight
    # Live state, for progress displays.
    bytes_read: int = 0
    bytes_total: int | None = None
    in_flight: int = 0
    concurrency_now: int = 0
    waiting_for_replicas: bool = False

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
        if self.note:  # nothing to do: the earlier run already answered for its rejects
            return EXIT_OK
        return EXIT_REJECTS if self.rows_rejected else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for live in ("bytes_read", "bytes_total", "in_flight", "concurrency_now", "waiting_for_replicas"):
            data.pop(live)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["rows_per_s"] = round(self.rows_per_s, 1)
        data["exit_code"] = self.exit_code
        return data

    def summary(self) -> str:
        """One line for cron's mail, then the first few rejects."""
        if self.note:
            return f"{self.source} into {self.table}: nothing to do: {self.note}"
        head = (
            f"loaded {self.rows_loaded:,} of {self.rows_read:,} rows into {self.table} "
            f"in {self.elapsed_s:.1f} s ({self.rows_per_s:,.0f} rows/s); "
            f"{self.batches} batches, {self.retries} retries"
        )
        if self.concurrency:
            c = self.concurrency
            head += f"; concurrency {c['min']}-{c['max']}, settled at {c['final']}"
        if self.rows_skipped:
            head += f"; {self.rows_skipped:,} rows were loaded by an earlier run (load {self.load_id}, resumed)"
        if self.rows_rejected:
            head += f"; {self.rows_rejected:,} rows rejected"
            if self.rejects_file:
                head += f", written to {self.rejects_file}"
        lines = [head]
        for note in sorted(self.rejects, key=lambda n: n.line)[:SHOWN_REJECTS]:
            lines.append(f"  line {note.line}: {note.sqlstate} {note.message}")
        if self.rows_rejected > SHOWN_REJECTS:
            lines.append(f"  ... and {self.rows_rejected - SHOWN_REJECTS:,} more")
        return "\n".join(lines)
