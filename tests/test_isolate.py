"""The slow path's cost: a batch goes whole until bad rows are dense enough to doom it, and a
value the server refused once costs no refused piece again. (Where records end and which one
the server names: tests/test_records.py; outcomes against psql row by row: test_differential.py.)"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import asyncpg

from helpers import Db, batches_of
from loader.copywire import copy_line
from loader.isolate import ErrorRate, isolate
from loader.options import CsvDialect
from loader.rejects import Reject


def test_a_batch_is_sent_whole_until_bad_rows_are_dense_enough_to_doom_it() -> None:
    rate = ErrorRate()
    assert not rate.doomed(10_000)  # nothing seen yet: try the fast path
    rate.bad, rate.rows = 1, 10_000
    assert not rate.doomed(10_000)  # one bad row per batch expected: usually worth a try
    rate.bad, rate.rows = 3, 1_000
    assert rate.doomed(1_000) and not rate.doomed(100)



def _isolate_file(
    db: Db, path: Path, batch_rows: int, rows: str = "SELECT id, n, note FROM t ORDER BY id", before: dict[int, str] | None = None
) -> tuple[list[int], list[int], list[asyncpg.Record], list[Reject]]:
    """Every batch of `path` through `isolate` into table t, as a load sends them (one error
    rate for the load, each COPY in a savepoint), rolled back at the end; `before` batch n,
    its statement runs in another session. Returns how many records each refused COPY held,
    and each COPY that loaded, the `rows` loaded, and the rejects."""
    refused: list[int] = []
    loads: list[int] = []
    rejects: list[Reject] = []

    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db.dsn)
        try:
            transaction = conn.transaction()
            await transaction.start()

            async def copy(data: bytes | bytearray, records: int, keep: bool = True) -> int:
                savepoint = conn.transaction()
                await savepoint.start()
                try:
                    status = await conn.copy_to_table("t", source=io.BytesIO(data), format="csv")
                except asyncpg.DataError:
                    await savepoint.rollback()
                    refused.append(records)
                    raise
                await (savepoint.commit() if keep else savepoint.rollback())
                loads.append(records)
                return int(status.split()[-1])

            rate = ErrorRate()
            for batch in batches_of(path, batch_rows):
                if before and batch.number in before:
                    await db_execute(db.dsn, before[batch.number])
                _, found = await isolate(batch, CsvDialect(), copy, copy_line, rate=rate)
                rejects.extend(found)
            loaded = await conn.fetch(rows)
            await transaction.rollback()
            return loaded
        finally:
            await conn.close()

    return refused, loads, asyncio.run(go()), rejects


async def db_execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def test_a_record_holding_a_value_refused_twice_before_costs_one_copy_of_its_own(db: Db, tmp_path: Path) -> None:
    """Once the server has refused a value in a field twice, a later record holding the same
    bytes in that field goes in a COPY of its own: no piece of good rows is refused for it,
    nor cut short, and every record's outcome is still the server's, as when each goes alone."""
    db.script("CREATE TABLE t (id int, n int, note text, tag text)")
    lines, bad = ["id,n,note,tag"], {}
    for i in range(1, 3001):
        if i % 100 == 7:  # the refused value, in its field
            lines.append(f"{i},n/a,note {i},t")
            bad[i] = 'column n: invalid input syntax for type integer: "n/a"'
        elif i % 100 == 57:  # the refused value, in a record with a quoted field
            lines.append(f'{i},n/a,"a note, quoted",t')
            bad[i] = 'column n: invalid input syntax for type integer: "n/a"'
        elif i % 100 == 31:  # the same bytes in another field: a good row
            lines.append(f"{i},{i},n/a,t")
        elif i == 1550:  # the refused value, after a field the server refuses first
            lines.append(f"x{i},n/a,note,t")
            bad[i] = 'column id: invalid input syntax for type integer: "x1550"'
        elif i == 2222:  # a line like one holding it, inside a quoted field: part of a good row
            lines.append(f'{i},{i},"three\n{i},n/a,lines,t\nof a note",t')
        else:
            lines.append(f"{i},{i},note {i},t")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")

    refused, loads, loaded, rejects = _isolate_file(db, path, batch_rows=1000)

    line_of = {i: i + 1 + 2 * (i > 2222) for i in range(1, 3001)}  # record 2222 spans three lines
    assert [(r.line, r.message) for r in rejects] == [(line_of[i], message) for i, message in bad.items()]
    assert [row["id"] for row in loaded] == [i for i in range(1, 3001) if i not in bad]
    assert all(row["n"] == row["id"] for row in loaded)
    assert refused[0] == 1000 and refused[1] > 1, "the first batch is sent whole, the value is refused twice"
    assert refused[2:] == [1] * (len(bad) - 2), "then each refused COPY held one record"
    assert len(loads) < len(bad), "the good rows went in pieces as if the bad ones were not there"


def test_a_record_foreseen_refused_that_loads_after_all_loads_in_the_files_order(db: Db, tmp_path: Path) -> None:
    """A guess never decides an outcome: a value refused before may load later (here an enum
    gains it while the load runs), and the record holding it then loads with the rows around
    it, in the file's order."""
    db.script("CREATE TYPE mood AS ENUM ('ok'); CREATE TABLE t (id int, m mood)")
    path = tmp_path / "data.csv"
    path.write_text("id,m\n" + "".join(f"{i},{'sad' if i % 50 == 5 else 'ok'}\n" for i in range(1, 401)))

    refused, _, loaded, rejects = _isolate_file(
        db, path, batch_rows=100, rows="SELECT id FROM t ORDER BY ctid", before={3: "ALTER TYPE mood ADD VALUE 'sad'"}
    )

    assert [(r.line, r.message) for r in rejects] == [
        (i + 1, 'column m: invalid input value for enum mood: "sad"') for i in (5, 55, 105, 155)
    ]
    assert refused[2:] == [1, 1], "foreseen before the enum gained the value"
    assert [row["id"] for row in loaded] == [i for i in range(1, 401) if i not in (5, 55, 105, 155)]
