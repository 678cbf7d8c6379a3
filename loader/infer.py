"""Column types for --create, inferred from the data: the narrowest type that takes every
value seen, and text wherever a guess could lose data.

Conservative on purpose: a number with leading zeros (a zip code, an id) stays text, so does
a date that is not ISO (01/02/2024 is January or February), a column empty everywhere, and
a column mixing timestamps with and without a time zone. Only --create reads rows in Python;
the load itself does not.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import LoaderError
from .options import CsvDialect

# From narrow to wide; a column takes the first type every one of its values fits.
_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)?\.[0-9]+|[+-]?(0|[1-9][0-9]*)\.?")
_FLOAT = re.compile(r"[+-]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)[eE][+-]?[0-9]+|[+-]?(Infinity|inf|NaN)", re.IGNORECASE)
_BOOLEAN = {"true", "false", "t", "f"}
_DATE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
_TIMESTAMP = re.compile(_DATE.pattern + r"[T ]" + _TIME)
_TIMESTAMPTZ = re.compile(_DATE.pattern + r"[T ]" + _TIME + r" ?(Z|[+-]([01][0-9]|2[0-3])(:?[0-5][0-9])?)")
_INT4 = 2**31
_KNOWN = 10_000
_NUMBERS = frozenset(("integer", "bigint", "numeric", "double precision"))
_TIMES = frozenset(("date", "timestamp", "timestamptz"))
_INT8 = 2**63


@dataclass
class _Column:
    """What the values of one column so far allow."""

    seen: bool = False
    known: set[str] = field(default_factory=set)
    fits: set[str] = field(
        default_factory=lambda: {"boolean", "integer", "bigint", "numeric", "double precision", "date", "timestamp", "timestamptz"}
    )

    def add(self, value: str) -> None:
        """Narrow the types to those `value` fits; only those still possible are tried."""
        self.seen = True
        fits = self.fits
        if not fits or value in self.known:
            return
        if len(self.known) < _KNOWN:  # repeated values (flags, categories, dates) are tried once
            self.known.add(value)
        keep: set[str] = set()
        if "boolean" in fits and value.lower() in _BOOLEAN:
            keep.add("boolean")
        if not fits.isdisjoint(_NUMBERS):
            if _INT.fullmatch(value):
                number = int(value)
                if -_INT4 <= number < _INT4:
                    keep.add("integer")
                if -_INT8 <= number < _INT8:
                    keep.add("bigint")
                keep.update(("numeric", "double precision"))
            elif _DECIMAL.fullmatch(value):
                keep.update(("numeric", "double precision"))
            elif _FLOAT.fullmatch(value):
                keep.add("double precision")
        if not fits.isdisjoint(_TIMES):
            if _DATE.fullmatch(value):
                keep.update(("date", "timestamp"))  # a date is midnight, as a timestamp
            elif _TIMESTAMP.fullmatch(value):
                keep.add("timestamp")
            elif _TIMESTAMPTZ.fullmatch(value):
                keep.add("timestamptz")
        self.fits = fits & keep

    @property
    def type(self) -> str:
        if not self.seen:
            return "text"  # empty everywhere: nothing says more
        for candidate in ("boolean", "integer", "bigint", "numeric", "double precision", "date", "timestamp", "timestamptz"):
            if candidate in self.fits:
                return candidate
        return "text"


def infer_types(records: Iterable[list[str | None]], width: int) -> list[str]:
    """The PostgreSQL type of each of `width` columns; None is NULL (left out)."""
    columns = [_Column() for _ in range(width)]
    for record in records:
        for column, value in zip(columns, record, strict=False):
            if value is not None:
                column.add(value)
    return [c.type for c in columns]


def read_records(path: str, dialect: CsvDialect, limit: int | None) -> Iterator[list[str | None]]:
    """The records of a file as COPY reads them in CSV (NULL: the unquoted --null text; an
    empty unquoted field by default), header skipped, at most `limit` of them."""
    from .source import open_source  # the file may be compressed

    source = open_source(path)
    try:
        text = io.TextIOWrapper(source.stream, encoding=dialect.python_encoding, errors="replace", newline="")
        reader = csv.reader(
            text,
            delimiter=dialect.delimiter,
            quotechar=dialect.quote,
            escapechar=dialect.escape if dialect.escape not in (None, dialect.quote) else None,
            doublequote=dialect.escape in (None, dialect.quote),
            strict=False,
        )
        if dialect.header:
            next(reader, None)
        for number, row in enumerate(reader):
            if limit is not None and number >= limit:
                return
            # csv does not tell a quoted "" from an unquoted empty field: neither says a type.
            yield [None if value in ("", dialect.null) else value for value in row]
    finally:
        source.close()


def records_of(paths: Iterable[str], dialect: CsvDialect, limit: int | None) -> Iterator[list[str | None]]:
    """The records of every file that can be read, each file's header skipped, at most
    `limit` of each. A file that cannot be read is left out: its own load says why."""
    for path in paths:
        try:
            yield from read_records(path, dialect, limit)
        except LoaderError:
            continue
