"""Showing a load while it runs: a live line on a terminal, a timestamped line now and then
in cron (no animation, no escape codes); and, in both, why the load waits when it does
(connecting, retrying after a transient failure, waiting for replicas).

The terminal line fits the terminal's width, whatever it is, on one line: the less
important fields are left out first (see `render_line`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import asyncpg

from .connect import describe_server, resolve_dsn
from .errors import TOO_MANY_CONNECTIONS, ConnectionLost, sqlstate
from .options import ConnectOptions
from .report import Report

if TYPE_CHECKING:  # rich is imported only on a terminal: cron runs do not pay for it
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.text import Text

log = logging.getLogger("loader")

REFRESH_S = 0.2  # the terminal line is redrawn this often
RATE_WINDOW_S = 10.0  # rows/s and the ETA are measured over this much of the recent past


# Why the load waits.


class Waits:
    """Says in the report why the load waits (`report.waiting`): connecting, or retrying after
    a transient failure, with the attempt it is at. A retry's reason holds until the load moves
    on (more rows read; see `waiting_reason`), or until `done`.

    Batches retry each in their own task: the attempt is counted per task, since the load last
    moved on."""

    def __init__(self, report: Report, options: ConnectOptions) -> None:
        self.report = report
        self.attempts = options.retry.attempts
        self.server = describe_server(resolve_dsn(options.dsn))
        self._failures: dict[object, int] = {}
        self._rows = report.rows_read

    def connecting(self) -> None:
        self._say(f"connecting to {self.server}")

    def retry(self, exc: BaseException) -> None:
        """The `on_retry` of connecting and of batches: a transient failure, retried next."""
        if self.report.rows_read != self._rows:  # the load moved on since the last failure
            self._failures.clear()
            self._rows = self.report.rows_read
        task = asyncio.current_task() or self
        failures = self._failures[task] = self._failures.get(task, 0) + 1
        if sqlstate(exc) == TOO_MANY_CONNECTIONS:  # does not use up the attempts (see retry.py)
            attempt = f"attempt {failures + 1}"
        else:
            attempt = f"attempt {failures + 1} of {self.attempts}"
        self._say(f"retrying: {transient_reason(exc)} ({attempt})")

    def table_held(self, table: str) -> None:
        """--wait-lock: another load holds the table, and this one waits for it."""
        self._say(f"waiting for another load of {table}")

    def done(self) -> None:
        self.report.waiting = None
        self._failures.clear()

    def _say(self, reason: str) -> None:
        self.report.waiting = reason
        self.report.waiting_rows = self.report.rows_read


_SERVER_STATES = {
    TOO_MANY_CONNECTIONS: "too many connections",
    "57P01": "connection terminated by the server",  # admin shutdown, pg_terminate_backend
    "57P02": "server crashed",
    "57P03": "server restarting",  # cannot connect now: starting up, shutting down, recovering
    "57P05": "idle session timeout",
    "57014": "statement timeout",
    "55P03": "lock timeout",
    "40P01": "deadlock",
    "40001": "serialization failure",
}
_SERVER_CLASSES = {"08": "connection lost", "40": "transaction rolled back", "53": "server short of resources"}


def transient_reason(exc: BaseException) -> str:
    """A transient failure in a few words, for the waiting reason."""
    state = sqlstate(exc)
    if state is not None:
        return _SERVER_STATES.get(state) or _SERVER_CLASSES.get(state[:2]) or f"server error {state}"
    text = str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError) or f"[Errno {errno.ECONNREFUSED}]" in text:
        return "connection refused"
    if isinstance(exc, (ConnectionLost, ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InterfaceError)):
        return "connection lost"
    if isinstance(exc, OSError):
        return f"network error: {os.strerror(exc.errno).lower()}" if exc.errno else "network error"
    return " ".join(text.split())[:60] or type(exc).__name__


def waiting_reason(report: Report) -> str | None:
    """Why the load waits now, or None while it loads."""
    if report.waiting_for_replicas:
        return "waiting for replicas"
    if report.waiting is not None and report.rows_read == report.waiting_rows:
        return report.waiting
    return None


# Cron: a line now and then.


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
    reason = waiting_reason(report)
    if reason:
        parts.append(reason)
    return ", ".join(parts)


async def show(report: Report, interval: float, terminal: bool | None = None) -> None:
    """Run until cancelled: a live line when stderr is a terminal, else a log line every `interval`."""
    started = time.monotonic()
    terminal = sys.stderr.isatty() if terminal is None else terminal
    if not terminal:
        while True:
            await asyncio.sleep(interval)
            done = f"{report.bytes_read / report.bytes_total:.0%} of the file, " if report.bytes_total else ""
            log.warning("loader: %s: %s%s", report.source, done, _state(report, started))
    # Only a terminal needs rich: cron runs do not pay for importing it.
    from rich.console import Console
    from rich.live import Live

    meter = _Meter(report)
    line = _Line(meter.snapshot())
    stderr = sys.stderr
    # Redrawn from here, not from a thread of rich's: the report is read on the event loop.
    live = Live(line, console=Console(stderr=True), transient=True, auto_refresh=False, redirect_stdout=False)
    with live, _logs_above(stderr), contextlib.suppress(asyncio.CancelledError):
        while True:
            line.snapshot = meter.snapshot()
            live.refresh()
            await asyncio.sleep(REFRESH_S)


@contextlib.contextmanager
def _logs_above(stderr: TextIO) -> Iterator[None]:
    """While the live line shows, sys.stderr is rich's proxy, which prints above the line; the
    logging handlers were given the real stderr before: they write through the proxy meanwhile
    (a warning must not be drawn over, nor break the line)."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    moved = [
        handler
        for logger in loggers
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler and handler.stream is stderr and sys.stderr is not stderr
    ]
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler in moved:
            handler.setStream(stderr)


# The terminal line.


@dataclass(frozen=True)
class Snapshot:
    """What the terminal line shows, read from the report at one moment."""

    source: str
    bytes_done: int  # of the file: up to the batches committed (a plain file), else read
    bytes_total: int | None
    rows: int
    rows_per_s: float
    eta_s: float | None
    in_flight: int
    concurrency: int
    retries: int
    rejected: int
    waiting: str | None


class _Meter:
    """Snapshots of the report, with rows/s and the ETA measured over the recent past."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.samples: deque[tuple[float, int, int]] = deque()

    def snapshot(self) -> Snapshot:
        r, now = self.report, time.monotonic()
        # A gzip file's batches are counted in its uncompressed bytes: its progress is the
        # compressed bytes read (ahead of the loading by a few batches).
        done = r.bytes_read if r.bytes_loaded is None else r.bytes_loaded
        self.samples.append((now, r.rows_loaded, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        then, rows_then, bytes_then = self.samples[0]
        span = now - then
        rows_per_s = (r.rows_loaded - rows_then) / span if span > 0 else 0.0
        bytes_per_s = (done - bytes_then) / span if span > 0 else 0.0
        eta = max(r.bytes_total - done, 0) / bytes_per_s if r.bytes_total and bytes_per_s > 0 else None
        return Snapshot(
            source=r.source,
            bytes_done=done,
            bytes_total=r.bytes_total,
            rows=r.rows_loaded + r.rows_skipped,
            rows_per_s=rows_per_s,
            eta_s=eta,
            in_flight=r.in_flight,
            concurrency=r.concurrency_now,
            retries=r.retries,
            rejected=r.rows_rejected,
            waiting=waiting_reason(r),
        )


class _Line:
    """The live renderable: the latest snapshot, laid out for the console's width when drawn
    (so a resized terminal gets a line that fits at the next redraw)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render_line(self.snapshot, options.max_width)


BAR_MIN, BAR_MORE, BAR_MAX = 10, 20, 40  # cells of the bar: at least, when there is room, at most
NAME_MIN, NAME_MORE = 8, 20  # cells of the file's name (then "…"): at least, when there is room
_STATE_GAP = " · "  # before the fields that say the load's state (waiting, rejects, ...)
_STATE = ("waiting", "rejected", "retries", "concurrency", "in_flight")
_ORDER = ("name", "bar", "percent", "bytes", "rows", "rate", "eta", *_STATE)  # left to right


def render_line(s: Snapshot, width: int) -> Text:
    """One line of at most `width` - 1 cells (a terminal may wrap a line that reaches its last
    column). Percent, rows/s and the ETA come first (while the load waits: the percent, why it
    waits, the file's name, then rows/s and the ETA); then the file's name and the bar at their
    narrowest; then, while there is room: rejects and retries if any, the bytes done, rows, more
    of the file's name, a wider bar, the whole name, concurrency, batches in flight, no
    retries, no rejects; the room left shows the whole path (if it fits whole) and widens the
    bar."""
    from rich.cells import cell_len
    from rich.text import Text

    room = max(width - 1, 1)
    fraction = min(s.bytes_done / s.bytes_total, 1.0) if s.bytes_total else None
    base = os.path.basename(s.source.rstrip("/")) or s.source
    texts: dict[str, tuple[str, str]] = {
        "name": (base, "bold"),
        "bytes": (_bytes(s.bytes_done, s.bytes_total), "progress.download"),
        "rows": (f"{s.rows:,} rows", ""),
        "rate": (f"{s.rows_per_s:,.0f} rows/s", "progress.data.speed"),
        "rejected": (f"{s.rejected:,} rejected", "red" if s.rejected else ""),
        "retries": (f"{s.retries:,} {'retry' if s.retries == 1 else 'retries'}", "yellow" if s.retries else ""),
        "concurrency": (f"concurrency {s.concurrency}", ""),
        "in_flight": (f"{s.in_flight} in flight", ""),
    }
    if fraction is not None:
        texts["percent"] = (f"{fraction:4.0%}", "progress.percentage")
        texts["eta"] = (f"ETA {_clock(s.eta_s)}", "progress.remaining")
    if s.waiting:
        texts["waiting"] = (s.waiting, "bold yellow")
    widths: dict[str, int] = {}  # what is shown, and how many cells wide

    def free() -> int:
        shown = [k for k in _ORDER if k in widths]
        gaps = sum(len(_STATE_GAP) if k in _STATE else 1 for k in shown[1:])
        return room - gaps - sum(widths.values())

    def add(key: str, cells: int | None = None) -> None:
        """Show `key`, if it fits whole (its text, or `cells` wide)."""
        if key not in texts or key in widths:
            return
        widths[key] = cell_len(texts[key][0]) if cells is None else cells
        if free() < 0:
            del widths[key]

    def grow(key: str, to: int) -> None:
        """Widen `key` towards `to` cells, as far as the room allows."""
        if key in widths:
            widths[key] = max(widths[key], min(to, widths[key] + free()))

    add("percent")
    if s.waiting:
        add("waiting")
        if "waiting" not in widths:  # too narrow for all of it: as much as fits
            add("waiting", 1)
            grow("waiting", cell_len(s.waiting))
        add("name", min(cell_len(base), NAME_MIN))
    add("rate")
    add("eta")
    add("name", min(cell_len(base), NAME_MIN))
    if fraction is not None:
        texts["bar"] = ("", "")
        add("bar", BAR_MIN)
    if s.rejected:
        add("rejected")
    if s.retries:
        add("retries")
    for key in ("bytes", "rows"):
        add(key)
    grow("name", min(NAME_MORE, cell_len(base)))
    grow("bar", BAR_MORE)
    grow("name", cell_len(base))
    for key in ("concurrency", "in_flight", "retries", "rejected"):
        add(key)
    if widths.get("name") == cell_len(base) and free() >= cell_len(s.source) - cell_len(base):
        texts["name"] = (s.source, "bold")  # the whole path, when it fits whole
        widths["name"] = cell_len(s.source)
    grow("bar", BAR_MAX)

    line = Text(no_wrap=True, overflow="ellipsis", end="")
    for i, key in enumerate(k for k in _ORDER if k in widths):
        if i:
            line.append(_STATE_GAP if key in _STATE else " ")
        if key == "bar":
            assert fraction is not None
            done = round(fraction * widths["bar"])
            line.append("━" * done, "bar.finished" if fraction >= 1 else "bar.complete")
            line.append("━" * (widths["bar"] - done), "bar.back")
        else:
            piece = Text(texts[key][0], style=texts[key][1])
            piece.truncate(widths[key], overflow="ellipsis")
            line.append_text(piece)
    line.truncate(room, overflow="ellipsis")
    return line


def _bytes(done: int, total: int | None) -> str:
    """12.3/29.1 MB, in the unit of the total (decimal, as rich's own columns)."""
    unit, suffix = 1, "bytes"
    for i, name in enumerate(("kB", "MB", "GB", "TB", "PB"), start=1):
        if (total or done) >= 1000**i:
            unit, suffix = 1000**i, name
    if unit == 1:
        return f"{done:,}/{total:,} bytes" if total is not None else f"{done:,} bytes"
    return f"{done / unit:,.1f}/{total / unit:,.1f} {suffix}" if total is not None else f"{done / unit:,.1f} {suffix}"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
