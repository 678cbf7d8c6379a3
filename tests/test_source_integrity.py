"""Committed rows come only from the source's real bytes: a file that changes while it is
read, or a gzip stream that is corrupt, is never loaded in part and never reported as a
success; the table named at the start is the only one rows go into."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path

import pytest

from data import EVENTS_HEADER, event_rows, write_csv
from helpers import Db, committed_batches, until

SLOW_EVENTS = """
CREATE TABLE events (id bigint, name text, note text, amount numeric, at timestamptz, flag boolean);
CREATE TABLE twin (LIKE events);
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.0002); RETURN NEW; END $$;
CREATE TRIGGER slow BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow();
"""

def start_slow_load(db: Db, path: Path, *args: str):  # type: ignore[no-untyped-def]
    proc = db.spawn("import", str(path), "-t", "events", "--workers", "2", "--batch-size", "1000", "--json", *args)
    until(lambda: committed_batches(db) >= 2 or proc.poll() is not None, timeout=120)
    assert proc.poll() is None, "the load finished before the file could be changed"
    return proc


def states(db: Db) -> list[str]:
    return [r["state"] for r in db.sql("SELECT state FROM loader.loads ORDER BY started_at")]


def test_a_file_cut_short_while_it_is_read_is_not_reported_as_loaded(db: Db, tmp_path: Path) -> None:
    """Truncating the source mid-load stops the load (exit 75) before a cut record commits;
    every row in the table is a whole row of the original file."""
    db.script(SLOW_EVENTS)
    path = write_csv(tmp_path / "e.csv", event_rows(60_000), EVENTS_HEADER)
    db.psql_copy("twin", path)
    proc = start_slow_load(db, path)
    os.truncate(path, path.stat().st_size // 3 + 17)  # mid-record, most of the file unread
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err.decode()
    assert "changed while it was read" in err.decode()
    assert db.value("SELECT count(*) FROM (SELECT * FROM events EXCEPT ALL SELECT * FROM twin) x") == 0
    assert db.value("SELECT count(*) FROM events") < 60_000
    assert states(db) == ["interrupted"]


@pytest.mark.slow
def test_a_file_appended_to_while_it_is_read_resumes_exactly_once_complete(db: Db, tmp_path: Path) -> None:
    """A source still being written is not a success: exit 75, no half-written line loaded;
    the next run, once the file is complete, loads the rest, each row exactly once."""
    db.script(SLOW_EVENTS)
    # 10 batches: the slow trigger (pg_sleep rounds up to 1 ms a row) keeps the load running
    # for seconds after the test sees its first two batches committed.
    rows = 10_000
    path = write_csv(tmp_path / "e.csv", event_rows(rows), EVENTS_HEADER)
    proc = start_slow_load(db, path)
    with open(path, "a", encoding="utf-8") as more:
        more.write(f"{rows + 1},appen")  # half a line, as a writer leaves it between two writes
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err.decode()
    assert "changed while it was read" in err.decode()
    assert db.value("SELECT count(*) FROM events WHERE id = $1", rows + 1) == 0
    with open(path, "a", encoding="utf-8") as more:
        more.write("ded,x,1,2024-01-01 00:00:00+00,t\n")
    again = db.loader("import", str(path), "-t", "events", "--workers", "2", "--batch-size", "1000", "--json")
    assert again.code == 0, again.stderr
    assert db.value("SELECT count(*) FROM events") == rows + 1
    assert db.value("SELECT count(DISTINCT id) FROM events") == rows + 1
    assert db.value("SELECT name FROM events WHERE id = $1", rows + 1) == "appended"


def corrupt_gzip(tmp_path: Path) -> Path:
    """A gzip file whose deflate data decodes for a long while before a flipped byte breaks
    it: rows come out of it before any check can fail."""
    source = write_csv(tmp_path / "e.csv", event_rows(50_000), EVENTS_HEADER)
    data = bytearray(gzip.compress(source.read_bytes(), compresslevel=1))
    data[len(data) * 2 // 3] ^= 0xFF
    path = tmp_path / "e.csv.gz"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_rows_of_a_corrupt_gzip_file_are_never_committed(db: Db, tmp_path: Path, via: str) -> None:
    """The whole gzip stream is checked before any of its rows commit: exit 2, an empty table."""
    db.sql("CREATE TABLE events (id bigint, name text, note text, amount numeric, at timestamptz, flag boolean)")
    path = corrupt_gzip(tmp_path)
    if via == "file":
        run = db.loader("import", str(path), "-t", "events", "--batch-size", "500")
    else:
        run = db.loader("import", "-", "-t", "events", "--batch-size", "500", input=path.read_bytes())
    assert run.code == 2, run.stderr
    assert "corrupt gzip" in run.stderr and "Traceback" not in run.stderr
    assert db.value("SELECT count(*) FROM events") == 0
    assert "running" not in states(db)


def test_a_whole_gzip_file_still_loads(db: Db, tmp_path: Path) -> None:
    """The check costs a second decompression, not a change of result."""
    db.sql("CREATE TABLE events (id bigint, name text, note text, amount numeric, at timestamptz, flag boolean)")
    source = write_csv(tmp_path / "e.csv", event_rows(20_000), EVENTS_HEADER)
    path = tmp_path / "e.csv.gz"
    path.write_bytes(gzip.compress(source.read_bytes()))
    for args in (["import", str(path)], ["import", "-", "--load-id", "gz-stdin"]):
        run = db.loader(*args, "-t", "events", "--batch-size", "3000", input=path.read_bytes())
        assert run.code == 0, run.stderr
    assert db.value("SELECT count(*) FROM events") == 40_000


@pytest.mark.slow
def test_a_table_replaced_under_a_running_load_gets_no_rows_of_it(db: Db, tmp_path: Path) -> None:
    """A table dropped and created again under the same name mid-load: the load stops (exit 1)
    without a row in the new table; the next run loads the whole file into it, as a new load."""
    db.script(SLOW_EVENTS)
    path = write_csv(tmp_path / "e.csv", event_rows(40_000), EVENTS_HEADER)
    proc = start_slow_load(db, path)
    db.script("BEGIN; DROP TABLE events; CREATE TABLE events (LIKE twin); COMMIT")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err.decode()
    assert "no longer the table this load began with" in err.decode()
    assert db.value("SELECT count(*) FROM events") == 0
    assert states(db) == ["failed"]
    again = db.loader("import", str(path), "-t", "events", "--workers", "2", "--batch-size", "1000")
    assert again.code == 0, again.stderr
    assert db.value("SELECT count(*) FROM events") == 40_000


def _compress(codec: str, data: bytes) -> bytes:
    if codec == "zstd":
        from backports import zstd

        # with the content checksum, as the zstd tool writes by default
        return zstd.compress(data, options={zstd.CompressionParameter.checksum_flag: 1})
    return {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[codec](data)


@pytest.mark.parametrize("codec", ["zstd", "bzip2", "xz"])
def test_zstd_bzip2_and_xz_sources_load_from_a_file_and_from_stdin(db: Db, tmp_path: Path, codec: str) -> None:
    """A compressed source is told by its magic bytes, whatever its name, on disk or on stdin."""
    db.sql("CREATE TABLE events (id bigint, name text, note text, amount numeric, at timestamptz, flag boolean)")
    source = write_csv(tmp_path / "e.csv", event_rows(5_000), EVENTS_HEADER)
    path = tmp_path / "export.dat"  # no telling extension
    path.write_bytes(_compress(codec, source.read_bytes()))
    for args in (["import", str(path)], ["import", "-", "--load-name", f"{codec}-stdin"]):
        run = db.loader(*args, "-t", "events", "--batch-size", "1000", input=path.read_bytes())
        assert run.code == 0, run.stderr
    db.sql("CREATE TABLE twin (LIKE events)")
    db.psql_copy("twin", source)
    assert db.value("SELECT count(*) FROM events") == 10_000
    assert db.value("SELECT count(*) FROM (SELECT * FROM events EXCEPT SELECT * FROM twin) x") == 0


@pytest.mark.parametrize("codec", ["zstd", "bzip2", "xz"])
def test_rows_of_a_corrupt_zstd_bzip2_or_xz_file_are_never_committed(db: Db, tmp_path: Path, codec: str) -> None:
    """As for gzip: a stream that breaks after a while commits none of its rows: exit 2."""
    db.sql("CREATE TABLE events (id bigint, name text, note text, amount numeric, at timestamptz, flag boolean)")
    source = write_csv(tmp_path / "e.csv", event_rows(20_000), EVENTS_HEADER)
    data = bytearray(_compress(codec, source.read_bytes()))
    data[len(data) * 2 // 3] ^= 0xFF
    path = tmp_path / "e.csv.x"
    path.write_bytes(bytes(data))
    run = db.loader("import", str(path), "-t", "events", "--batch-size", "500")
    assert run.code == 2, run.stderr
    assert f"corrupt {codec} data" in run.stderr and "Traceback" not in run.stderr
    assert db.value("SELECT count(*) FROM events") == 0
