"""CSV files for the tests, written by hand so that NULL (unquoted empty) and the empty
string (quoted "") are told apart exactly as PostgreSQL's COPY reads them."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

TRICKY = [
    "plain",
    "with,comma",
    'a "quoted" word',
    "two\nlines",
    "crlf\r\ninside",
    "",  # the empty string, written ""
    None,  # NULL, written as nothing
    "ünïcödé ✓ 漢字",
    " leading and trailing ",
    '""',
    "\\backslash\\",
    "semi;colon",
]

EVENTS_DDL = "CREATE TABLE {name} (id bigint, name text, note text, amount numeric, at timestamptz, flag boolean)"
EVENTS_HEADER = ["id", "name", "note", "amount", "at", "flag"]


def field(value: object, delimiter: str = ",", quote: str = '"', null: str = "") -> str:
    if value is None:
        return null
    text = str(value)
    if text == "" or text == null or any(c in text for c in (delimiter, quote, "\n", "\r")) or text != text.strip():
        return quote + text.replace(quote, quote + quote) + quote
    return text


def write_csv(
    path: Path,
    rows: Iterable[Sequence[object]],
    header: Sequence[str] | None = None,
    delimiter: str = ",",
    null: str = "",
    encoding: str = "utf-8",
    newline: str = "\n",
) -> Path:
    with open(path, "w", encoding=encoding, newline="") as fh:
        if header is not None:
            fh.write(delimiter.join(field(h, delimiter) for h in header) + newline)
        for row in rows:
            fh.write(delimiter.join(field(v, delimiter, null=null) for v in row) + newline)
    return path


def event_rows(n: int, seed: int = 7, start: int = 1) -> list[tuple[object, ...]]:
    """Rows for the events table: every tricky value appears, ids are unique."""
    rnd = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        rows.append(
            (
                i,
                TRICKY[i % len(TRICKY)],
                rnd.choice(TRICKY),
                None if i % 11 == 0 else f"{rnd.randint(-10**6, 10**6)}.{rnd.randint(0, 99):02d}",
                f"2024-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:00+00",
                None if i % 7 == 0 else bool(i % 2),
            )
        )
    return rows


# An id,name table for plain_csv's files, and one whose inserts cost a plpgsql call per row
# (a load of it takes seconds, not a blink).
PLAIN_EVENTS = "CREATE TABLE {name} (id bigint, name text)"
SLOW_EVENTS = """
CREATE TABLE {name} (id bigint, name text);
CREATE FUNCTION {name}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER slow BEFORE INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION {name}_slow();
"""


def plain_csv(path: Path, rows: int, start: int = 1) -> Path:
    """id,name rows without quotes or embedded newlines: one record per line."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("id,name\n")
        fh.writelines(f"{i},name {i}\n" for i in range(start, start + rows))
    return path
