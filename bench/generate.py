"""A deterministic CSV like the benchmark's reference: 10 mixed-type columns, about 210 bytes a row,
about 1% of records with quoted newlines and doubled quotes, some NULLs, optionally bad rows."""

from __future__ import annotations

import random
from pathlib import Path

TABLE_DDL = """
CREATE TABLE {name} (
    id          bigint,
    created_at  timestamptz,
    user_id     integer,
    amount      numeric(12, 2),
    score       double precision,
    active      boolean,
    category    text,
    name        text,
    note        text,
    day         date
)
"""

# The load modes' table (upsert matches rows on a key; replace matches them on the primary key).
PK_TABLE_DDL = TABLE_DDL.replace("id          bigint,", "id          bigint PRIMARY KEY,", 1)
assert PK_TABLE_DDL != TABLE_DDL

# The common target: a primary key and two secondary indexes (statements separated by ";").
INDEXED_TABLE_DDL = PK_TABLE_DDL + """;
CREATE INDEX ON {name} (user_id);
CREATE INDEX ON {name} (created_at)
"""

HEADER = "id,created_at,user_id,amount,score,active,category,name,note,day\n"
_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau"]
_CATEGORIES = ["books", "music", "garden", "tools", "toys", "food, fresh", "sports", "home"]


def _note(rnd: random.Random) -> str:
    return " ".join(rnd.choices(_WORDS, k=14))


def write(path: Path, rows: int, seed: int = 1, bad_every: int = 0, distinct: bool = False) -> Path:
    """Write `rows` records (plus a header) to `path`; one row in `bad_every` (0: none), at
    random places, has a letter in an integer column: `n/a` in each, as exports write a
    placeholder, or (`distinct`) a value of its own in each. The same arguments always write the
    same bytes, and the other rows are those of the file without bad rows. Bad rows at
    random, not every n-th row: a period lines up with the loader's piece sizes and makes
    some sizes look far better or worse than they are. Another `seed` writes the same ids
    (and dates, flags) with other values in every row: the load modes' benchmark starts from
    such a file's rows, so that an update really changes each row."""
    rnd = random.Random(seed)
    bad = set(random.Random(seed + 1).sample(range(1, rows + 1), rows // bad_every)) if bad_every else set()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(HEADER)
        chunk: list[str] = []
        for i in range(1, rows + 1):
            category = rnd.choice(_CATEGORIES)
            name = f"customer {rnd.randint(1, 10**6)}"
            note = _note(rnd)
            if rnd.random() < 0.01:
                note = f'said "hello"\nand then ""{note}""'
            note_field = '"' + note.replace('"', '""') + '"' if any(c in note for c in ',"\n') else note
            category_field = f'"{category}"' if "," in category else category
            user = "" if i % 17 == 0 else str(rnd.randint(1, 2_000_000))
            if i in bad:
                user = f"{i}x" if distinct else "n/a"
            chunk.append(
                f"{i},2024-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}+00,"
                f"{user},{rnd.randint(0, 10**8) / 100:.2f},{rnd.random():.12f},{'t' if i % 3 else 'f'},"
                f"{category_field},{name},{note_field},2024-{1 + i % 12:02d}-{1 + i % 28:02d}\n"
            )
            if len(chunk) >= 10_000:
                fh.write("".join(chunk))
                chunk.clear()
        fh.write("".join(chunk))
    tmp.chmod(0o644)
    tmp.replace(path)
    return path
