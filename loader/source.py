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


def read_block(source: Source, size: int) -> bytes:
    """Read the next block, turning I/O and decompression errors into one clear line."""
    try:
        return source.stream.read(size)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise LoaderError(f"{source.name}: cannot read ({reason})") from None
