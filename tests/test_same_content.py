"""A source is known by its content, not only by its path: a file renamed, moved, copied or
hard-linked is the load it was, and a file merely alike at its ends is not."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from helpers import LOADER_SESSIONS, Db, assert_ids_once, committed_batches, until

TABLE = "CREATE TABLE events (id bigint, name text)"


def write_events(path: Path, first: int, last: int, name: str = "row") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("id,name\n" + "".join(f"{i},{name} {i}\n" for i in range(first, last + 1)))
    return path


def test_a_copy_or_a_hard_link_of_a_loaded_file_is_skipped_naming_the_load(db: Db, tmp_path: Path) -> None:
    """The same bytes under another name load nothing: the run says which load has them,
    and --force loads them again as a new load."""
    db.script(TABLE)
    write_events(tmp_path / "day.csv", 1, 500)
    assert db.loader("import", "day.csv", "-t", "events").code == 0
    shutil.copy(tmp_path / "day.csv", tmp_path / "copy.csv")
    os.link(tmp_path / "day.csv", tmp_path / "link.csv")
    load_id = db.value("SELECT load_id FROM loader.loads")

    for name in ("copy.csv", "link.csv"):
        run = db.loader("import", name, "-t", "events", "--json")
        assert run.code == 0, run.stderr
        assert run.json()["note"].startswith("the same content was loaded from"), run.stdout
        assert load_id in run.stderr and "day.csv" in run.stderr and "--force" in run.stderr
    assert_ids_once(db, 500)

    forced = db.loader("import", "copy.csv", "-t", "events", "--force")
    assert forced.code == 0, forced.stderr
    assert db.value("SELECT count(*) FROM events") == 1000


def test_a_file_alike_at_both_ends_but_not_in_the_middle_is_a_new_load(db: Db, tmp_path: Path) -> None:
    """The first and last blocks and the size only point at a load; the batches' checksums
    decide. A file that differs only in its middle is loaded, not skipped."""
    db.script(TABLE)
    rows = 60_000  # well over two fingerprint blocks
    original = write_events(tmp_path / "a.csv", 1, rows)
    assert db.loader("import", "a.csv", "-t", "events", "--batch-size", "1000").code == 0
    data = bytearray(original.read_bytes())
    middle = data.index(b"\n30000,row 30000\n") + 1
    data[middle : middle + 5] = b"30001"  # same size, same ends
    (tmp_path / "b.csv").write_bytes(bytes(data))

    run = db.loader("import", "b.csv", "-t", "events", "--batch-size", "1000", "--json")
    assert run.code == 0, run.stderr
    assert run.json()["rows_loaded"] == rows
    assert db.value("SELECT count(*) FROM events") == 2 * rows


@pytest.mark.slow
def test_a_file_moved_between_a_killed_run_and_its_rerun_resumes_its_load(db: Db, tmp_path: Path) -> None:
    """kill -9 in the middle of a load, the file moved into an archive directory, the command
    run on its new path: the load resumes under the new name, each row exactly once."""
    db.script(TABLE)
    rows = 100_000
    write_events(tmp_path / "incoming" / "day.csv", 1, rows)
    args = ("-t", "events", "--batch-size", "5000", "--max-rate", "20000")
    proc = db.spawn("import", "incoming/day.csv", *args)
    until(lambda: proc.poll() is not None or committed_batches(db) >= 2)
    assert proc.poll() is None, "the load ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    db.value("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'loader%'")
    until(lambda: db.value(LOADER_SESSIONS) == 0)
    (tmp_path / "archive").mkdir()
    (tmp_path / "incoming" / "day.csv").rename(tmp_path / "archive" / "day.csv")

    rerun = db.loader("import", "archive/day.csv", *args[:4])
    assert rerun.code == 0, rerun.stderr
    assert "under another name: resuming its load" in rerun.stderr
    assert_ids_once(db, rows)
    assert db.value("SELECT count(*) FROM loader.loads") == 1
    assert db.value("SELECT source FROM loader.loads").endswith("archive/day.csv")
    again = db.loader("import", "archive/day.csv", *args[:4], "--json")
    assert again.code == 0 and again.json()["note"].startswith("already loaded"), again.stderr
