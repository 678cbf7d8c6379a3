"""Immutable option objects passed from the CLI down to the parts.

Validation happens here, once, so a bad combination fails before any connection is made.
"""

from __future__ import annotations

import codecs
import functools
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from .errors import UsageError

DEFAULT_BATCH_ROWS = 50_000
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_WORKERS = 2
DEFAULT_RETRIES = 5
DEFAULT_MAX_RECORD_BYTES = 64 << 20
DEFAULT_MAX_WORKERS = 8  # the most batches in flight with --workers auto
DEFAULT_LOG_INTERVAL = 60.0  # seconds between progress lines when stderr is not a terminal
MAX_BATCH_BYTES = 1 << 30  # memory is about 2 x workers x batch bytes
MAX_RECORD_BYTES = (1 << 30) - 1  # PostgreSQL refuses a longer line in COPY
_PG_MAX_MS = 2_147_483_647  # statement_timeout and lock_timeout are int milliseconds

# Python codec names PostgreSQL spells differently; the others (utf-8, iso8859-1, euc_jp,
# koi8_r, ...) match once PostgreSQL drops punctuation, and cp125x become WIN125x.
_PG_ENCODING_NAMES = {"ascii": "SQL_ASCII", "shift_jis": "SJIS", "cp932": "SJIS"}
_PYTHON_CODECS = {"sjis": "shift_jis", "sqlascii": "ascii", "koi8r": "koi8_r", "koi8u": "koi8_u"}  # PostgreSQL's names Python does not know


@functools.cache
def _pg_encoding(python_name: str) -> str:
    return _PG_ENCODING_NAMES.get(python_name) or re.sub(r"^cp(125\d)$", r"WIN\1", python_name)


def _lookup(encoding: str) -> codecs.CodecInfo:
    """The codec for --encoding, written as Python or as PostgreSQL names it (WIN1252, SJIS)."""
    try:
        return codecs.lookup(encoding)
    except LookupError:
        plain = re.sub(r"[^a-z0-9]", "", encoding.lower())
        return codecs.lookup(_PYTHON_CODECS.get(plain) or re.sub(r"^win(\d+)$", r"cp\1", plain))


# --delimiter's names for a tab, which a command line takes only quoted ($'\t' in bash).
_TAB_NAMES = ("\\t", "tab")


def parse_delimiter(text: str) -> str:
    """--delimiter: one character, or a tab written as `\\t` or `tab`."""
    return "\t" if text.lower() in _TAB_NAMES else text


def _single_byte(name: str, value: str) -> None:
    if len(value) != 1 or len(value.encode("utf-8")) != 1:
        also = " (or tab)" if name == "delimiter" else ""
        raise UsageError(f"--{name} must be a single one-byte character{also}, got {value!r}")
    if value in "\r\n":
        raise UsageError(f"--{name} cannot be a newline or carriage return")


def _usable_text_encoding(info: codecs.CodecInfo) -> bool:
    """Some codecs exist without being text encodings (hex, rot13: bytes to bytes, str to str)
    or fail on the calls the loader makes (undefined; idna has no errors="replace"): only
    a codec that encodes and decodes plain ASCII the way the loader calls it will do."""
    if not getattr(info, "_is_text_encoding", True):
        return False
    try:
        "\n,\"a".encode(info.name, errors="replace")
        b"\n,\"a".decode(info.name, errors="strict")
        b"\n,\"a".decode(info.name, errors="replace")
    except Exception:  # noqa: BLE001 - any failure means the codec is of no use for a CSV file
        return False
    return True


def check_seconds(option: str, value: float | None, *, zero: bool = False, most_ms: int | None = None) -> None:
    """A number of seconds: finite (inf and nan parse as floats), more than 0 (or at least 0
    with `zero`), and with `most_ms` no more milliseconds than PostgreSQL's setting takes."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number of seconds, got {value}")
    if zero and value < 0:
        raise UsageError(f"{option} cannot be negative")
    if not zero and value <= 0:
        raise UsageError(f"{option} must be more than 0 seconds")
    if most_ms is not None and round(value * 1000) > most_ms:
        raise UsageError(f"{option} must be at most {most_ms // 1000} seconds (PostgreSQL's limit)")


def check_dsn(dsn: str) -> None:
    """asyncpg takes only URLs, and several places split the URL (the password warning, the
    server named in messages): its shape is checked once, here. The message never holds the
    DSN, nor any part of it that could be the password."""
    scheme, separator, rest = dsn.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        raise UsageError("--dsn is not a valid PostgreSQL URL (write postgresql://user@host:port/database)")
    try:
        urlsplit(dsn)
    except ValueError as exc:
        reason = " ".join(str(exc).split())
        userinfo = rest.split("/", 1)[0].rpartition("@")[0]
        for secret in (userinfo, userinfo.partition(":")[2]):
            if secret:
                reason = reason.replace(secret, "****")
        raise UsageError(f"--dsn is not a valid PostgreSQL URL ({reason})") from None


def check_writable(path: Path, option: str, folders_checked: set[Path] | None = None) -> None:
    """The rejects and metrics writers create a temp file in the target's folder and rename it
    over the target, after the load: the same steps are tried here first, so that a path they
    cannot write is a usage error before anything is loaded. An existing directory, or a
    device or fifo (the rename would replace it with a regular file), is refused."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot use it ({exc.strerror})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UsageError(f"{option} {path}: is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(f"{option} {path}: not a regular file")
    folder = path.parent
    if not folder.exists():
        raise UsageError(f"{option} {path}: no such directory {folder}")
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: {folder} is not a directory")
    if folders_checked is not None and folder in folders_checked:
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=".loader-check-", dir=folder)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create a file in {folder} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(tmp)
    if folders_checked is not None:
        folders_checked.add(folder)


@dataclass(frozen=True)
class CsvDialect:
    """How the source is written; mirrors the options of PostgreSQL's COPY (FORMAT csv)."""

    delimiter: str = ","
    quote: str = '"'
    escape: str | None = None  # None: same as quote, i.e. "" inside a quoted field
    null: str = ""
    encoding: str = "utf-8"
    header: bool = True
    # What ends a record: "\n" (LF or CRLF files) or "\r" (classic Mac files). Not an option:
    # COPY takes it from the first line of its data, and the batcher does the same (detect_newline).
    newline: str = "\n"

    def __post_init__(self) -> None:
        _single_byte("delimiter", self.delimiter)
        _single_byte("quote", self.quote)
        if self.escape is not None:
            _single_byte("escape", self.escape)
        if self.delimiter == self.quote:
            raise UsageError("--delimiter and --quote must be different characters")
        if "\r" in self.null or "\n" in self.null:
            raise UsageError("--null cannot contain a newline or carriage return")
        if self.delimiter in self.null:
            raise UsageError("--null cannot contain the delimiter")
        try:
            info = _lookup(self.encoding)
        except LookupError:
            raise UsageError(f"unknown --encoding {self.encoding!r}") from None
        if not _usable_text_encoding(info):
            raise UsageError(f"--encoding {self.encoding!r} is not a text encoding a CSV file can be written in")
        if not self.ascii_compatible:
            raise UsageError(
                f"--encoding {self.encoding!r} is not supported: PostgreSQL reads only "
                "ASCII-compatible encodings (convert the file to UTF-8 first, e.g. with iconv)"
            )

    @property
    def escape_char(self) -> str:
        return self.escape if self.escape is not None else self.quote

    @property
    def python_encoding(self) -> str:
        return _lookup(self.encoding).name

    @property
    def pg_encoding(self) -> str:
        """The name PostgreSQL knows this encoding by (it ignores case and punctuation)."""
        return _pg_encoding(self.python_encoding)

    @property
    def ascii_compatible(self) -> bool:
        return "\n,\"".encode(self.python_encoding, errors="replace") == b"\n,\""


@dataclass(frozen=True)
class Rate:
    """A pace: so many rows, or bytes, per second."""

    amount: float
    unit: Literal["rows", "bytes"]

    def __str__(self) -> str:
        return f"{self.amount:g} {self.unit}/s"


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/\s*s)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_ROW_UNITS = {"": 1, "row": 1, "rows": 1, "k": 10**3, "krows": 10**3, "m": 10**6, "mrows": 10**6}


def parse_rate(text: str) -> Rate:
    """--max-rate: 20000 or 20k (rows/s), 20000rows/s, 20MB/s, 512KiB/s."""
    match = _RATE.match(text)
    unit = (match.group(2) if match else "").lower()
    if not match or float(match.group(1)) <= 0 or (unit not in _ROW_UNITS and unit not in _BYTE_UNITS):
        raise UsageError(f"--max-rate {text!r}: write rows per second (20000, 20k) or bytes per second (20MB/s, 512KiB/s)")
    number = float(match.group(1))
    if unit in _ROW_UNITS:
        return Rate(number * _ROW_UNITS[unit], "rows")
    return Rate(number * _BYTE_UNITS[unit], "bytes")


_DURATION = re.compile(r"^\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*$", re.IGNORECASE)
_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


def parse_deadline(text: str, now: datetime | None = None) -> float:
    """--deadline: a local time of day (05:30, the next one to come) or a duration (2h, 90m,
    1h30m, 45s); returns the moment as a Unix timestamp."""
    now = now or datetime.now().astimezone()
    clock = _CLOCK.match(text)
    if clock:
        hour, minute = int(clock.group(1)), int(clock.group(2))
        if hour > 23 or minute > 59:
            raise UsageError(f"--deadline {text!r}: not a time of day")
        moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if moment <= now:
            moment += timedelta(days=1)
        return moment.timestamp()
    duration = _DURATION.match(text)
    if duration and any(duration.groups()):
        hours, minutes, seconds = (int(g or 0) for g in duration.groups())
        return now.timestamp() + hours * 3600 + minutes * 60 + seconds
    raise UsageError(f"--deadline {text!r}: write a time of day (05:30) or a duration (2h, 90m, 1h30m)")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried."""

    attempts: int = DEFAULT_RETRIES + 1  # the first try plus the retries
    initial_wait: float = 0.5
    max_wait: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise UsageError("--retries cannot be negative")


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    """The database to work in: how to reach it, what its sessions are set to, where its load
    ledger is. All that `loader status` needs; a load's options extend it."""

    dsn: str | None = None  # None: $DATABASE_URL, then libpq's PG* variables and .pgpass
    ledger_schema: str = "loader"
    application_name: str = "loader"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    statement_timeout: float | None = None  # seconds, per statement on the loading connections
    lock_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.dsn:
            check_dsn(self.dsn)
        check_seconds("--statement-timeout", self.statement_timeout, most_ms=_PG_MAX_MS)
        check_seconds("--lock-timeout", self.lock_timeout, most_ms=_PG_MAX_MS)


MODES = ("append", "upsert", "replace")
ON_CONFLICT = ("update", "nothing")


@dataclass(frozen=True)
class LoadOptions(ConnectOptions):
    """Everything one `loader import` needs; built by the CLI or by a library caller. The
    database's options (dsn=, ledger_schema=, retry=, ...) are keyword-only."""

    source: str  # a path, or "-" for standard input
    table: str  # as written in SQL: schema.table, with double quotes where needed
    dialect: CsvDialect = field(default_factory=CsvDialect)
    columns: tuple[str, ...] | None = None
    workers: int = DEFAULT_WORKERS
    batch_rows: int = DEFAULT_BATCH_ROWS
    batch_bytes: int = DEFAULT_BATCH_BYTES
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # the longest record accepted (PostgreSQL: 1 GiB - 1)
    rejects: str | None = None  # rejects file; None: next to the source (see rejects.default_path)
    max_errors: int | None = None  # stop once more rows than this were rejected; None: no limit
    # For a source derived from another file (retry-rejects): the original line of each of its lines.
    source_lines: tuple[int, ...] | None = None
    shown_as: str | None = None  # ... and the name it goes by in messages and the ledger
    load_name: str | None = None  # --load-name: names the load, so that stdin can resume
    restart: bool = False  # start a new load even though an unfinished one exists
    force: bool = False  # load again a source that was fully loaded
    wait_lock: float = 0.0  # seconds to wait for another load of the table to finish
    lease: float = 60.0  # seconds another load waits for this one to renew its hold on the table
    mode: str = "append"  # append, upsert (with `key`) or replace; see modes.py
    key: tuple[str, ...] | None = None  # upsert: the columns a row is matched on
    on_conflict: str = "update"  # upsert: update the existing row, or keep it ("nothing")
    dry_run: bool = False  # send every batch, commit none
    copy_on_error: bool = True  # PostgreSQL 17+: COPY skips rows with bad values, rejected from its notices (onerror.py)
    create: bool = False  # create a missing table, with types inferred from the data
    infer_rows: int | None = None  # --create reads this many records to infer types; None: all
    create_from: tuple[str, ...] = ()  # --create: the files whose data the types must fit; (): the source
    # Runs of the same file set command (this key, see plan.command_key) share the table and
    # split the set, each source claimed by one run; None: the run holds the table alone.
    command: str | None = None
    auto_workers: bool = False  # adapt the batches in flight between 1 and `workers`
    deadline: float | None = None  # Unix time after which no batch starts (exit 75, resumable)
    max_rate: Rate | None = None
    max_replica_lag: float | None = None  # seconds; pause while a streaming replica lags more
    max_lag_wait: float | None = None  # seconds of waiting for replicas before stopping (exit 1)

    def __post_init__(self) -> None:
        if not self.table.strip():
            raise UsageError("--table cannot be empty")
        if self.workers < 1:
            raise UsageError("--workers must be at least 1")
        if self.batch_rows < 1:
            raise UsageError("--batch-size must be at least 1 row")
        if self.batch_bytes < 1024:
            raise UsageError("--batch-bytes must be at least 1024")
        if self.batch_bytes > MAX_BATCH_BYTES:
            raise UsageError(
                f"--batch-bytes must be at most 1 GiB ({MAX_BATCH_BYTES}): memory is about 2 x workers x batch bytes"
            )
        if self.max_record_bytes < 1024:
            raise UsageError("--max-record-bytes must be at least 1024")
        if self.max_record_bytes > MAX_RECORD_BYTES:
            raise UsageError(
                f"--max-record-bytes must be at most {MAX_RECORD_BYTES} (1 GiB - 1): PostgreSQL cannot take a longer line"
            )
        super().__post_init__()
        check_seconds("--max-replica-lag", self.max_replica_lag)
        check_seconds("--max-lag-wait", self.max_lag_wait)
        if self.max_lag_wait is not None and self.max_replica_lag is None:
            raise UsageError("--max-lag-wait goes with --max-replica-lag")
        check_seconds("--wait-lock", self.wait_lock, zero=True)
        check_seconds("--lease", self.lease)
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: write one of {', '.join(MODES)}")
        if self.mode == "upsert" and not self.key:
            raise UsageError("--mode upsert needs --key: the columns a row is matched on (a primary key or unique index)")
        if self.key is not None and self.mode != "upsert":
            raise UsageError("--key goes with --mode upsert")
        if self.key is not None and (any(not k for k in self.key) or len(set(self.key)) != len(self.key)):
            raise UsageError("--key must name each column once, with no empty names")
        if self.on_conflict not in ON_CONFLICT:
            raise UsageError(f"--on-conflict {self.on_conflict!r}: write update or nothing")
        if self.infer_rows is not None and (self.infer_rows < 1 or not self.create):
            raise UsageError("--infer-rows goes with --create, and must be at least 1")
        if self.create and self.source == "-":
            raise UsageError("--create needs a file: it reads the data once to choose the columns' types, then loads it")
        if self.on_conflict != "update" and self.mode != "upsert":
            raise UsageError("--on-conflict goes with --mode upsert")
        if self.lease < 2:
            raise UsageError("--lease must be at least 2 seconds: the load renews it every quarter of it")
        if self.load_name is not None and not self.load_name.strip():
            raise UsageError("--load-name cannot be empty")
        if self.max_errors is not None and self.max_errors < 0:
            raise UsageError("--max-errors cannot be negative")
        if self.columns is not None:
            if not self.columns or any(not c for c in self.columns):
                raise UsageError("--columns must name at least one column, with no empty names")
            if len(set(self.columns)) != len(self.columns):
                raise UsageError("--columns names a column twice")
