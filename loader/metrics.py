"""--metrics-file: the last run, as a Prometheus textfile for node_exporter's textfile collector.

Written at the end of every run, success or failure, and replaced atomically (a temp file
in the same folder renamed over it), so the collector never reads half a file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .errors import LoaderError
from .report import Report, SetReport

_METRICS = (
    ("loader_last_run_end_timestamp_seconds", "gauge", "When the last run ended (Unix time)."),
    ("loader_last_run_success", "gauge", "1 if the last run loaded every row (exit 0), else 0."),
    ("loader_last_run_exit_code", "gauge", "Exit code of the last run."),
    ("loader_last_run_rows_read", "gauge", "Rows the last run read."),
    ("loader_last_run_rows_loaded", "gauge", "Rows the last run loaded."),
    ("loader_last_run_rows_rejected", "gauge", "Rows the last run rejected."),
    ("loader_last_run_retries", "gauge", "Transient failures the last run retried."),
    ("loader_last_run_duration_seconds", "gauge", "How long the last run took."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write(path: Path, table: str, exit_code: int, report: Report | SetReport | None, duration: float, mode: str = "append") -> None:
    """The CLI checks the path before the run (options.check_writable); should it fail anyway
    by the end (folder removed, disk full), that is one line naming the option, not a crash."""
    values = [
        time.time(),
        1 if exit_code == 0 else 0,
        exit_code,
        report.rows_read if report else 0,
        report.rows_loaded if report else 0,
        report.rows_rejected if report else 0,
        report.retries if report else 0,
        round(duration, 3),
    ]
    labels = f'{{table="{_label(table)}",mode="{_label(mode)}"}}'
    text = "".join(
        f"# HELP {name} {doc}\n# TYPE {name} {kind}\n{name}{labels} {value}\n"
        for (name, kind, doc), value in zip(_METRICS, values, strict=True)
    )
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise LoaderError(f"--metrics-file {path}: cannot write it ({exc.strerror or exc})") from None
