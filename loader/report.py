"""What a load did, counted as it happens, and how it is told: a human summary or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import EXIT_OK, EXIT_REJECTS

MAX_KEPT_FAILURES = 100  # the report keeps the first ones; the counters count them all


@dataclass(frozen=True)
class Failure:
    """Rows the server refused, and why."""

    first_line: int
    last_line: int
    rows: int
    sqlstate: str
    message: str
    line: int | None  # the source line the server blamed, when it said


@dataclass
class Report:
    source: str
    table: str
    load_id: str
    workers: int
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    batches: int = 0
    batches_failed: int = 0
    retries: int = 0
    copies: int = 0
    elapsed_s: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    def count_retry(self, _exc: BaseException) -> None:
        self.retries += 1

    def add_loaded(self, rows: int) -> None:
        self.batches += 1
        self.rows_read += rows
        self.rows_loaded += rows

    def add_failure(self, failure: Failure) -> None:
        self.batches += 1
        self.batches_failed += 1
        self.rows_read += failure.rows
        self.rows_rejected += failure.rows
        if len(self.failures) < MAX_KEPT_FAILURES:
            self.failures.append(failure)

    @property
    def rows_per_s(self) -> float:
        return self.rows_loaded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_REJECTS if self.rows_rejected else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["rows_per_s"] = round(self.rows_per_s, 1)
        data["exit_code"] = self.exit_code
        return data

    def summary(self) -> str:
        """One line for cron's mail, then one line per kept failure."""
        head = (
            f"loaded {self.rows_loaded:,} of {self.rows_read:,} rows into {self.table} "
            f"in {self.elapsed_s:.1f} s ({self.rows_per_s:,.0f} rows/s); "
            f"{self.batches} batches, {self.retries} retries"
        )
        if self.rows_rejected:
            head += f", {self.rows_rejected:,} rows not loaded ({self.batches_failed} batches refused)"
        lines = [head]
        for f in self.failures[:10]:
            at = f" (line {f.line})" if f.line else ""
            lines.append(f"  lines {f.first_line}-{f.last_line}: {f.sqlstate} {f.message}{at}")
        if self.batches_failed > 10:
            lines.append(f"  ... and {self.batches_failed - 10} more refused batches (see --json)")
        return "\n".join(lines)
