"""Rejected rows and the rejects file: a CSV of line, sqlstate, message and the raw record.

The file is written in bytes: the record column holds the record exactly as it was in the
source (same encoding, delimiter and quoting, even bytes that do not decode), so a user can
fix it in place and `loader retry-rejects` can load it with the original options. When the
original load had a header, a row carries it (line 1, sqlstate empty, message "header").
The first row names the load the rows come from (line 0, sqlstate empty, message "load",
the load id as its record): retry-rejects finds the original options in the ledger by it.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

COLUMNS = (b"line", b"sqlstate", b"message", b"record")
HEADER_MESSAGE = "header"
LOAD_MESSAGE = "load"


@dataclass(frozen=True, slots=True)
class Reject:
    line: int  # source line where the record starts (1-based, the header counts)
    sqlstate: str
    message: str
    record: bytes  # exactly as in the source, without its line ending


REJECTS_SUFFIX = ".rejects.csv"


def default_path(source_name: str) -> Path:
    """Next to the source (data.csv -> data.csv.rejects.csv); for stdin, in the working directory."""
    if source_name == "-":
        return Path("stdin.rejects.csv")
    return Path(source_name + REJECTS_SUFFIX)


def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b'"', b'""') + b'"'


def _row(line: int, sqlstate: str, message: str, record: bytes, encoding: str) -> bytes:
    return b",".join(
        (str(line).encode(), sqlstate.encode(), _quoted(message.encode(encoding, "replace")), _quoted(record))
    ) + b"\n"


async def write(
    path: Path, load_id: str, header: bytes | None, rejects: AsyncIterable[Reject], encoding: str
) -> int:
    """Write the whole file atomically (a temp file renamed over it); returns the rows written."""
    folder = path.parent if str(path.parent) else Path(".")
    count = 0
    fd, tmp = tempfile.mkstemp(prefix=".rejects-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(b",".join(COLUMNS) + b"\n")
            out.write(_row(0, "", LOAD_MESSAGE, load_id.encode(), encoding))
            if header is not None:
                out.write(_row(1, "", HEADER_MESSAGE, header, encoding))
            async for reject in rejects:
                out.write(_row(reject.line, reject.sqlstate, reject.message, reject.record, encoding))
                count += 1
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return count


@dataclass(frozen=True)
class RejectsFile:
    load_id: str | None  # None: written by a version that did not name the load
    header: bytes | None
    rejects: list[Reject]


def read(path: Path) -> RejectsFile:
    """Read a rejects file back, bytes intact (latin-1 maps every byte to one character)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    rows = csv.reader(io.StringIO(raw.decode("latin-1"), newline=""))
    if [c.encode("latin-1") for c in next(rows, [])] != list(COLUMNS):
        raise UsageError(f"{path}: not a rejects file (its first line must be {b','.join(COLUMNS).decode()})")
    load_id: str | None = None
    header: bytes | None = None
    rejects: list[Reject] = []
    for number, row in enumerate(rows, start=2):
        if len(row) != 4 or not row[0].isdigit():
            raise UsageError(f"{path}: line {number} is not a rejects row (line,sqlstate,message,record)")
        line, state, message, record = int(row[0]), row[1], row[2], row[3].encode("latin-1")
        if line == 0 and not state and message == LOAD_MESSAGE and number == 2:
            load_id = record.decode("latin-1")
        elif not state and message == HEADER_MESSAGE and not rejects and header is None:
            header = record
        else:
            rejects.append(Reject(line, state, message, record))
    return RejectsFile(load_id, header, rejects)
