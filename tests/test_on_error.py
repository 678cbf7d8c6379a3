"""Bad values on PostgreSQL 17 and later: COPY skips them (ON_ERROR ignore), the loader rejects
them from the server's notices, and the rejects file is the one the isolation of older servers
writes, byte for byte. On PostgreSQL 15 and 16 both runs isolate bad rows the old way, and the
same assertions hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from helpers import Db, batches_of, read_rejects, server_major, sink_for, write_rows
from loader.onerror import usable
from loader.options import CsvDialect
from loader.sink import Outcome, Writing

TABLE = """
CREATE TABLE items (
    id int PRIMARY KEY,
    qty int NOT NULL CHECK (qty >= 0),
    price numeric(6, 2),
    day date,
    "In stock" boolean,
    name text
)
"""
T = TypeVar("T")

HEADER = b"id,qty,price,day,In stock,name"
COLUMNS = '(id, qty, price, day, "In stock", name)'


def good(i: int) -> bytes:
    name = f'"item ""{i}""\nsecond line"' if i % 7 == 0 else f"item {i}"
    return f"{i},{i % 50},{i % 1000}.25,2024-01-{1 + i % 28:02d},{'t' if i % 2 else 'f'},{name}".encode()


# Values of the wrong type: COPY with ON_ERROR skips their rows.
BAD_VALUES = [
    b"{i},many,1.00,2024-01-01,t,not an integer",
    b"{i},99999999999,1.00,2024-01-01,t,integer out of range",
    b"{i},1,123456.78,2024-01-01,t,numeric overflow",  # the server's detail goes in parentheses
    b"{i},1,1.00,2024-02-30,t,impossible date",
    b"{i},1,1.00,2024-13-01,t,month 13",  # with the server's hint
    b"{i},1,1.00,2024-01-01,maybe,not a boolean",  # in a column whose name needs quotes
    b'"{i}","1","1.00","2024-01-01","ma""ybe","quoted, with a doubled quote"',
    b'{i},1,1.00,2024-01-0x,t,"a bad date in a record\nof two lines"',
    b"{i}," + b"9" * 150 + b",1.00,2024-01-01,t,a value longer than a notice shows",
    b"{i},1,1.00,2024-01-01," + "é".encode() * 60 + b",a value of more bytes than a notice shows",
]
# What ON_ERROR does not cover: the COPY is refused, the batch is isolated the old way.
BAD_ROWS = [
    b"{i},1,1.00,2024-01-01,t,caf\xe9 (invalid UTF-8)",
    b"{i},,1.00,2024-01-01,t,NOT NULL",
    b"{i},-5,1.00,2024-01-01,t,CHECK",
    b"3,1,1.00,2024-01-01,t,a duplicate key",
    b"{i},1,1.00",
    b'{i},1,1.00,2024-01-01,t,"two\nlines",',  # too many fields
]


def write_file(path: Path, records: list[bytes]) -> None:
    path.write_bytes(HEADER + b"\n" + b"".join(r + b"\n" for r in records))


def mixed_file(path: Path) -> list[bytes]:
    """120 records in 3 batches of 40: bad values only in the first and the last, bad values
    and constraint errors mixed in the second."""
    records = [good(i) for i in range(1, 121)]
    for n, bad in enumerate(BAD_VALUES):
        records[3 + 3 * n] = bad.replace(b"{i}", str(1000 + n).encode())
        records[82 + 3 * n] = bad.replace(b"{i}", str(2000 + n).encode())
    for n, bad in enumerate(BAD_VALUES[:5] + BAD_ROWS):
        records[41 + 3 * n] = bad.replace(b"{i}", str(3000 + n).encode())
    write_file(path, records)
    return records


def without_load_row(rejects: bytes) -> bytes:
    """A rejects file without its second line, the load's id (each load has its own)."""
    columns, _load, rest = rejects.split(b"\n", 2)
    return columns + b"\n" + rest


async def _each_record_alone(dsn: str, records: list[bytes]) -> None:
    async def one(record: bytes) -> AsyncIterator[bytes]:
        yield record + b"\n"

    conn = await asyncpg.connect(dsn)
    try:
        for record in records:
            with contextlib.suppress(asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                await conn.copy_to_table("oracle", source=one(record), format="csv")
    finally:
        await conn.close()


def rows_alone(db: Db, records: list[bytes]) -> None:
    """The oracle: table `oracle`, like items, loaded with a COPY of each record alone, in order."""
    db.sql("CREATE TABLE oracle (LIKE items INCLUDING ALL)")
    asyncio.run(_each_record_alone(db.dsn, records))


def test_bad_values_and_constraint_errors_give_the_same_rejects_file_either_way(db: Db, tmp_path: Path) -> None:
    """Values of the wrong type (integer, numeric overflow, date, boolean, invalid UTF-8) mixed
    with NOT NULL, CHECK, unique and field-count errors in the same batches: the rejects file
    is the same, byte for byte but for the load's id, whether the server skipped the bad values
    or the loader isolated them (--no-copy-on-error); and the table holds what a COPY of each
    record alone loads."""
    db.sql(TABLE)
    records = mixed_file(tmp_path / "items.csv")
    command = ("import", "items.csv", "-t", "items", "--workers", "1", "--batch-size", "40", "--json")

    skipped = db.loader(*command)
    assert skipped.code == 3, skipped.stderr
    by_server = (tmp_path / "items.csv.rejects.csv").read_bytes()
    db.sql("CREATE TABLE loaded AS SELECT * FROM items")
    db.sql("TRUNCATE items")
    isolated = db.loader(*command, "--force", "--no-copy-on-error")
    assert isolated.code == 3, isolated.stderr
    by_loader = (tmp_path / "items.csv.rejects.csv").read_bytes()

    assert without_load_row(by_server) == without_load_row(by_loader)
    _, rejects = read_rejects(tmp_path / "items.csv.rejects.csv")
    assert len(rejects) == 2 * len(BAD_VALUES) + 5 + len(BAD_ROWS)
    assert {state for _, state, _ in rejects} == {"22P02", "22003", "22008", "22007", "22P04", "22021", "23502", "23514", "23505"}
    for report in (skipped.json(), isolated.json()):
        assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (120, 120 - len(rejects), len(rejects))
    rows_alone(db, records)
    assert db.same_rows("items", "oracle")
    assert db.same_rows("loaded", "oracle")
    if server_major(db.dsn) >= 17:  # the server skipped the bad values: two batches of one COPY each
        assert skipped.json()["copies"] < isolated.json()["copies"]


def test_a_batch_whose_bad_rows_are_all_bad_values_is_one_copy(db: Db, tmp_path: Path) -> None:
    """On PostgreSQL 17 and later, a batch whose bad rows all hold values of the wrong type
    loads in one COPY: its good rows load, its bad rows are rejected at their lines."""
    db.sql(TABLE)
    records = [good(i) for i in range(1, 101)]
    bad = {10: BAD_VALUES[0], 33: BAD_VALUES[4], 70: BAD_VALUES[7]}
    for at, record in bad.items():
        records[at] = record.replace(b"{i}", str(1000 + at).encode())
    write_file(tmp_path / "items.csv", records)
    run = db.loader("import", "items.csv", "-t", "items", "--batch-size", "50", "--json")
    assert run.code == 3, run.stderr
    report = run.json()
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (100, 97, 3)
    starts = [2 + sum(1 + r.count(b"\n") for r in records[:at]) for at in bad]
    _, rejects = read_rejects(tmp_path / "items.csv.rejects.csv")
    assert rejects == [(line, state, records[at]) for line, state, at in zip(starts, ["22P02", "22008", "22007"], bad, strict=True)]
    if server_major(db.dsn) >= 17:
        assert report["copies"] == report["batches"] == 2


class NoticeDroppingProxy:
    """A TCP hop to the server that passes every message but the server's notices
    (NoticeResponse), as a pooler or proxy that drops them would."""

    def __init__(self, dsn: str) -> None:
        self._parts = urlsplit(dsn)
        self._server = (self._parts.hostname or "127.0.0.1", self._parts.port or 5432)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def dsn(self) -> str:
        user = f"{self._parts.username}@" if self._parts.username else ""
        return urlunsplit(self._parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def __enter__(self) -> NoticeDroppingProxy:
        self._thread.start()
        self._listening = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._listening.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _close(self) -> None:
        self._listening.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_in, server_out = await asyncio.open_connection(*self._server)
        try:
            first = await client_in.readexactly(8)
            if int.from_bytes(first[4:8], "big") == 80877103:  # SSLRequest: the server answers one byte
                server_out.write(first)
                client_out.write(await server_in.readexactly(1))
                first = b""
            server_out.write(first)
            directions = [asyncio.ensure_future(self._bytes(client_in, server_out)), asyncio.ensure_future(self._messages(server_in, client_out))]
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)  # one side hung up
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for writer in (server_out, client_out):
                writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    @staticmethod
    async def _messages(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(int.from_bytes(head[1:5], "big") - 4)
            if head[:1] != b"N":
                writer.write(head + body)
                await writer.drain()


@contextlib.contextmanager
def notices_dropped(db: Db) -> Iterator[str]:
    """A DSN of the test's database through a proxy that drops the server's notices."""
    with NoticeDroppingProxy(db.dsn) as proxy:
        yield proxy.dsn()


def test_rows_the_server_skipped_without_a_notice_reaching_the_loader_are_isolated(db: Db, tmp_path: Path) -> None:
    """The server's notices do not reach the loader (a proxy drops them): the rows COPY skipped
    are missed by none of the checks; the batch is isolated the old way, and every row is
    loaded or rejected once, as without the proxy."""
    db.sql(TABLE)
    records = [good(i) for i in range(1, 121)]
    for n, bad in enumerate(BAD_VALUES[:7]):
        records[5 + 16 * n] = bad.replace(b"{i}", str(1000 + n).encode())
    write_file(tmp_path / "items.csv", records)
    command = ("import", "items.csv", "-t", "items", "--batch-size", "40", "--json")
    with notices_dropped(db) as dsn:
        run = db.loader(*command, env={"DATABASE_URL": dsn})
    assert run.code == 3, run.stderr
    report = run.json()
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (120, 113, 7)
    rows_alone(db, records)
    assert db.same_rows("items", "oracle")
    by_proxy = (tmp_path / "items.csv.rejects.csv").read_bytes()
    assert db.value("SELECT count(*) FROM loader.rejects") == 7

    db.sql("TRUNCATE items")
    direct = db.loader(*command, "--force")
    assert direct.code == 3, direct.stderr
    assert without_load_row((tmp_path / "items.csv.rejects.csv").read_bytes()) == without_load_row(by_proxy)
    if server_major(db.dsn) >= 17:
        assert "notices" in run.stderr, run.stderr
        assert report["copies"] > direct.json()["copies"] == direct.json()["batches"]


def test_where_the_server_refuses_on_error_batches_load_as_without_it(db: Db, tmp_path: Path) -> None:
    """Where the server refuses COPY's ON_ERROR (PostgreSQL 15 and 16 do; so do Citus tables),
    a batch sent with it loads as without it, its bad rows isolated row by row."""
    db.sql("CREATE TABLE t (id int, name text)")
    csv = write_rows(tmp_path / "t.csv", "id,name", [(i if i % 4 else "x", f"n{i}") for i in range(1, 21)])

    async def load() -> list[Outcome]:
        async with sink_for(db.dsn, "t", ("id", "name"), csv, writing=Writing(skip_bad_values=True)) as (_, sink):
            return [await sink.load(batch) for batch in batches_of(csv, 10)]

    outcomes = asyncio.run(load())
    assert [(o.rows_loaded, o.rows_rejected) for o in outcomes] == [(8, 2), (7, 3)]
    assert [(r.line, r.sqlstate, r.message, r.record) for o in outcomes for r in o.rejects] == [
        (i + 1, "22P02", 'column id: invalid input syntax for type integer: "x"', b"x,n%d" % i) for i in (4, 8, 12, 16, 20)
    ]
    assert db.value("SELECT count(*) FROM t") == 15


def test_on_error_is_asked_only_where_the_loader_counts_lines_as_copy_does() -> None:
    """ON_ERROR goes to PostgreSQL 17 and later, for files whose records the loader cuts into
    lines and values as COPY does: not with a custom --escape, nor in an encoding whose
    characters may hold bytes that look like a delimiter or a quote."""
    assert usable((17, 0), CsvDialect()) and usable((18, 1), CsvDialect(escape='"', encoding="latin-1"))
    assert not usable((16, 9), CsvDialect())
    assert not usable((18, 1), CsvDialect(escape="\\"))
    assert not usable((18, 1), CsvDialect(encoding="shift_jis")) and not usable((18, 1), CsvDialect(encoding="cp949"))
