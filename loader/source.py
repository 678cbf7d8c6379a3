"""Opening what the user named: a file, standard input, or either of them gzip-compressed."""

from __future__ import annotations

import gzip
import io
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO

from .errors import LoaderError, UsageError

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Source:
    """An open byte stream with what is known about where it came from."""

    name: str  # as the user wrote it ("-" for stdin)
    stream: BinaryIO  # yields the decompressed bytes
    raw: BinaryIO  # the underlying file, for progress (bytes read of size)
    size: int | None  # on-disk size when it is a regular file
    compressed: bool

    @property
    def is_stdin(self) -> bool:
        return self.name == "-"

    def close(self) -> None:
        self.stream.close()
        if self.raw is not self.stream and not self.is_stdin:
            self.raw.close()


def open_source(name: str) -> Source:
    """Open `name` for reading, detecting gzip by its magic bytes rather than its extension."""
    if name == "-":
        raw: BinaryIO = sys.stdin.buffer
        size = None
    else:
        try:
            raw = open(name, "rb")  # noqa: SIM115 - closed by Source.close
        except FileNotFoundError:
            raise UsageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"{name}: is a directory, not a file") from None
        except PermissionError:
            raise UsageError(f"{name}: permission denied") from None
        except OSError as exc:
            raise UsageError(f"{name}: cannot open ({exc.strerror})") from None
        st = os.fstat(raw.fileno())
        size = st.st_size if (st.st_mode & 0o170000) == 0o100000 else None
    peekable = raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[arg-type]
    try:
        compressed = peekable.peek(2)[:2] == _GZIP_MAGIC
    except OSError as exc:
        raise UsageError(f"{name}: cannot read ({exc.strerror})") from None
    stream: BinaryIO = gzip.GzipFile(fileobj=peekable, mode="rb") if compressed else peekable  # type: ignore[assignment]
    return Source(name=name, stream=stream, raw=peekable, size=size, compressed=compressed)


_READ_ERRORS = (OSError, EOFError, gzip.BadGzipFile)


def read_block(source: Source, size: int) -> bytes:
    """Read the next block, turning I/O and decompression errors into one clear line."""
    try:
        return source.stream.read(size)
    except _READ_ERRORS as exc:
        raise _cannot_read(source, exc) from None


def read_into(source: Source, buffer: memoryview) -> int:
    """Read into `buffer` (no copy for a plain file); how many bytes came, 0 at the end."""
    try:
        return source.stream.readinto(buffer)  # type: ignore[attr-defined, no-any-return]
    except _READ_ERRORS as exc:
        raise _cannot_read(source, exc) from None


def _cannot_read(source: Source, exc: BaseException) -> LoaderError:
    reason = getattr(exc, "strerror", None) or str(exc)
    return LoaderError(f"{source.name}: cannot read ({reason})")
