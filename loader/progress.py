"""Showing a load while it runs: a live bar on a terminal, a timestamped line now and then
in cron (no animation, no escape codes)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextlib import suppress

from .report import Report

log = logging.getLogger("loader")


def _state(report: Report, started: float) -> str:
    elapsed = max(time.monotonic() - started, 1e-9)
    parts = [
        f"{report.rows_loaded + report.rows_skipped:,} rows",
        f"{report.rows_loaded / elapsed:,.0f} rows/s",
        f"{report.in_flight} in flight",
        f"concurrency {report.concurrency_now}",
        f"{report.retries} retries",
        f"{report.rows_rejected:,} rejected",
    ]
    if report.waiting_for_replicas:
        parts.append("waiting for replicas")
    return ", ".join(parts)


async def show(report: Report, interval: float, terminal: bool | None = None) -> None:
    """Run until cancelled: a rich bar when stderr is a terminal, else a log line every `interval`."""
    started = time.monotonic()
    terminal = sys.stderr.isatty() if terminal is None else terminal
    if not terminal:
        while True:
            await asyncio.sleep(interval)
            done = f"{report.bytes_read / report.bytes_total:.0%} of the file, " if report.bytes_total else ""
            log.warning("loader: %s: %s%s", report.source, done, _state(report, started))
    # Only a terminal needs rich: cron runs do not pay for importing it.
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[state]}"),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(report.source, total=report.bytes_total, state="")
    with bar, suppress(asyncio.CancelledError):
        while True:
            bar.update(task, completed=report.bytes_read, state=_state(report, started))
            await asyncio.sleep(0.2)
