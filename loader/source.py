"""Opening what the user named: a file or standard input, plain or compressed (gzip, zstd,
bzip2 or xz, told by their magic bytes, not by the name).

Rows may only be committed from the source's real bytes: a file that changes while it is
read (appended to, cut short, rewritten) is noticed before each batch commits, and a
compressed stream is checked whole (its checksums and length come only at its end) before
any of its rows commit, in a thread of its own while the load runs.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from .errors import BadSource, LoaderError, SourceFailed, TryAgainLater

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

_VERIFY_BLOCK = 1 << 20


@dataclass(frozen=True)
class Codec:
    """A compression format: its name, its magic bytes, how to read it."""

    name: str
    magic: bytes
    open: Callable[[BinaryIO], BinaryIO]


CODECS = (
    Codec("gzip", b"\x1f\x8b", lambda raw: cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))),
    Codec("zstd", b"\x28\xb5\x2f\xfd", lambda raw: cast(BinaryIO, zstd.ZstdFile(raw, "rb"))),
    Codec("bzip2", b"BZh", lambda raw: cast(BinaryIO, bz2.BZ2File(raw, "rb"))),
    Codec("xz", b"\xfd7zXZ\x00", lambda raw: cast(BinaryIO, lzma.LZMAFile(raw, "rb"))),  # noqa: SIM115
)
_MAGIC_BYTES = max(len(c.magic) for c in CODECS)

# What a broken stream raises, by codec or around it.
_CORRUPT = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, zstd.ZstdError)

FINGERPRINT_BLOCK = 64 * 1024  # what identifies a file by its content, at each end


def _codec(head: bytes) -> Codec | None:
    return next((c for c in CODECS if head.startswith(c.magic)), None)


@dataclass
class Source:
    """An open byte stream with what is known about where it came from."""

    name: str  # as the user wrote it ("-" for stdin)
    stream: BinaryIO  # yields the decompressed bytes
    raw: BinaryIO  # the underlying file, for progress (bytes read of size)
    size: int | None  # on-disk size when it is a regular file
    codec: Codec | None  # None: not compressed
    path: str | None = None  # what to read again to verify it (a spooled copy for gzip on stdin)
    stat: tuple[int, int] | None = None  # (size, mtime in ns) when opened, for a regular file
    spooled: bool = False  # `path` is our temporary copy, removed on close
    _fingerprint: hashlib._Hash | None = field(default=None, repr=False)

    @property
    def is_stdin(self) -> bool:
        return self.name == "-"

    @property
    def compressed(self) -> bool:
        return self.codec is not None

    def bytes_left(self) -> int | None:
        """How many bytes of a plain file are not read yet; None for a stream of unknown length."""
        if self.compressed or self.stat is None:
            return None
        try:
            return max(self.stat[0] - self.stream.tell(), 0)
        except (OSError, ValueError):
            return None

    def fingerprint(self) -> hashlib._Hash | None:
        """A hash of the file as stored (a compressed file's compressed bytes): its size and
        its first and last FINGERPRINT_BLOCK bytes, read from the open file wherever its reader
        is. Computed once (reading the header primes it, off the event loop); None for a
        stream, or a file that cannot be read at those places."""
        if self._fingerprint is None and self.stat is not None and not self.is_stdin:
            size = self.stat[0]  # as opened, which check_unchanged holds it to
            try:
                head = os.pread(self.raw.fileno(), FINGERPRINT_BLOCK, 0)
                tail = os.pread(self.raw.fileno(), FINGERPRINT_BLOCK, max(size - FINGERPRINT_BLOCK, 0))
            except (OSError, ValueError):
                return None
            fingerprint = hashlib.sha256(f"{size}\0".encode())
            for part in (head, b"\0", tail):  # as one message, without copying it into one
                fingerprint.update(part)
            self._fingerprint = fingerprint
        return self._fingerprint

    def close(self) -> None:
        self.stream.close()
        if self.raw is not self.stream and (self.spooled or not self.is_stdin):
            self.raw.close()
        if self.spooled and self.path is not None:
            os.unlink(self.path)

    def check_unchanged(self, where: str) -> None:
        """Raise TryAgainLater if the file is no longer as it was when opened (size or mtime):
        rows read from a file being written or cut may be half records or miss some."""
        if self.stat is None or self.spooled:
            return
        st = os.fstat(self.raw.fileno())
        if (st.st_size, st.st_mtime_ns) == self.stat:
            return
        size = self.stat[0]
        what = f"its size went from {size:,} to {st.st_size:,} bytes" if st.st_size != size else "it was modified"
        raise TryAgainLater(
            f"{self.name} changed while it was read ({what}): stopped without committing {where}; the batches "
            "committed before came from the file as it was; run the same command again once the file is complete"
        )

    def verify(self, stop: threading.Event | None = None) -> None:
        """Read a compressed source through once, on its own handle: raises BadSource if any
        part is corrupt or cut short. Its rows must not commit before this returns. (Runs in a
        thread: the decompressors let go of the GIL. `stop` ends it early when the load ends
        first.)"""
        if self.codec is None or self.path is None:
            return
        try:
            with open(self.path, "rb") as raw, self.codec.open(raw) as stream:
                while stream.read(_VERIFY_BLOCK) and not (stop is not None and stop.is_set()):
                    pass
        except (OSError, *_CORRUPT) as exc:
            raise _corrupt(self, exc) from None


def open_source(name: str) -> Source:
    """Open `name` for reading, detecting compression by its magic bytes, not its extension."""
    if name == "-":
        stdin = sys.stdin.buffer
        raw: io.BufferedReader = stdin if isinstance(stdin, io.BufferedReader) else io.BufferedReader(cast(io.RawIOBase, stdin))
        size = None
        codec = _codec(raw.peek(_MAGIC_BYTES)[:_MAGIC_BYTES])
        if codec is not None:
            return _spooled(name, raw, codec)
    else:
        try:
            raw = open(name, "rb")  # noqa: SIM115 - closed by Source.close
        except FileNotFoundError:
            raise BadSource(f"{name}: no such file") from None
        except IsADirectoryError:
            raise BadSource(f"{name}: is a directory, not a file") from None
        except PermissionError:
            raise BadSource(f"{name}: permission denied") from None
        except OSError as exc:
            raise BadSource(f"{name}: cannot open ({exc.strerror})") from None
        st = os.fstat(raw.fileno())
        regular = (st.st_mode & 0o170000) == 0o100000
        size = st.st_size if regular else None
    peekable = raw
    try:
        codec = _codec(peekable.peek(_MAGIC_BYTES)[:_MAGIC_BYTES])
    except OSError as exc:
        raise BadSource(f"{name}: cannot read ({exc.strerror})") from None
    stream: BinaryIO = codec.open(peekable) if codec is not None else peekable
    if name == "-":
        return Source(name=name, stream=stream, raw=peekable, size=None, codec=codec)
    return Source(
        name=name, stream=stream, raw=peekable, size=size, codec=codec, path=name,
        stat=(st.st_size, st.st_mtime_ns) if regular else None,
    )


def _spooled(name: str, stdin: BinaryIO, codec: Codec) -> Source:
    """A compressed stream on standard input, copied (compressed) to a temporary file first:
    it must be verified whole before its rows commit, and stdin cannot be read twice."""
    fd, path = tempfile.mkstemp(prefix="loader-stdin-", suffix="." + codec.name)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stdin, out, _VERIFY_BLOCK)
        raw = open(path, "rb")  # noqa: SIM115 - closed by Source.close
    except BaseException:
        os.unlink(path)
        raise
    return Source(name=name, stream=codec.open(raw), raw=raw, size=None, codec=codec, path=path, spooled=True)


_READ_ERRORS = (OSError, *_CORRUPT)


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
    if source.compressed and (isinstance(exc, _CORRUPT) or not getattr(exc, "errno", None)):
        return _corrupt(source, exc)
    reason = getattr(exc, "strerror", None) or str(exc)
    return SourceFailed(f"{source.name}: cannot read ({reason})")


def _corrupt(source: Source, exc: BaseException) -> BadSource:
    """No row of a compressed source commits before the whole stream is verified (Source.verify)."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    name = source.codec.name if source.codec is not None else "compressed"
    return BadSource(f"{source.name}: corrupt {name} data ({reason}); no row of it was committed")
