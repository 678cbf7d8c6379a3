"""File sets: `loader import SRC [SRC ...] -t TABLE`, each SRC a path, a quoted glob or a
directory, as a user relies on it.

The files load in the order the arguments give (those of a glob or a directory sorted by
path), each once and each as a load of its own in the ledger; a file that cannot be loaded
fails by name while the others load; a re-run of the same command loads only what no earlier
run loaded, and refuses a loaded file whose bytes changed. With more than one argument, or a
glob or a directory, `--json` reports every source: its state (loaded, loaded-with-rejects,
skipped, failed, not-started), its rows and its error, under the set's totals.

Everything is real: the CLI runs as a subprocess with the test's directory as its working
directory (globs are passed quoted, as plain arguments), kill -9 is a real signal, and long
runs are paced with --max-rate and polled, never slept on.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import lzma
import os
import sys
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from helpers import (
    LOADER_SESSIONS,
    Db,
    Run,
    kill_9,
    loads_in_ledger,
    one_error_line,
    read_rejects,
    until,
    until_batches,
    write_rows,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

TABLE = "CREATE TABLE t (id bigint, name text)"
STATES = ("loaded", "loaded-with-rejects", "skipped", "failed", "not-started")
COUNTS = ("rows_read", "rows_loaded", "rows_rejected")

# --- helpers -----------------------------------------------------------------------------------


def _zstd(data: bytes) -> bytes:
    # with the content checksum, as the zstd tool writes by default
    return zstd.compress(data, options={zstd.CompressionParameter.checksum_flag: 1})


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "zstd": _zstd, "bzip2": bz2.compress, "xz": lzma.compress}


def export(path: Path, ids: Iterable[int], codec: str | None = None, name: str | None = None) -> Path:
    """An id,name file (its directories made): one row per id, named after the file (so that
    the table tells which file each row came from); compressed with `codec` if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(path, "id,name", [(i, name or path.name) for i in ids])
    if codec is not None:
        path.write_bytes(COMPRESS[codec](path.read_bytes()))
    return path


def expected_rows(files: dict[Path, range]) -> list[tuple[int, str]]:
    """What the table must hold once every file loaded exactly once."""
    return sorted((i, path.name) for path, ids in files.items() for i in ids)


def contents(db: Db) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.sql("SELECT id, name FROM t ORDER BY id, name")]


def file_set(run: Run) -> dict[str, Any]:
    """The one JSON object a file set prints: its totals are the sums of its sources', its
    exit code the run's; each source has its fields, a known state, and an error (one line)
    only when it failed."""
    assert "Traceback" not in run.stderr, run.stderr
    report: dict[str, Any] = run.json()
    sources = report["sources"]
    assert isinstance(sources, list)
    for source in sources:
        assert {"source", "state", "error", *COUNTS} <= source.keys(), source
        assert source["state"] in STATES, source
        if source["state"] == "failed":
            error = source["error"]
            assert isinstance(error, str) and error.strip() and "\n" not in error, source
        elif source["state"] in ("loaded", "loaded-with-rejects", "skipped"):
            assert source["error"] is None, source
    for count in COUNTS:
        assert report[count] == sum(s[count] for s in sources), (count, report)
    assert report["exit_code"] == run.code
    assert report["mode"] == "append"
    assert report["table"] in ("t", '"public"."t"')
    return report


def states(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, state) of each source, in load order."""
    return [(s["source"], s["state"]) for s in report["sources"]]


def counts(report: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(rows_read, rows_loaded, rows_rejected) of each source, in load order."""
    return [(s["rows_read"], s["rows_loaded"], s["rows_rejected"]) for s in report["sources"]]


def source_of(report: dict[str, Any], source: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in report["sources"] if s["source"] == source]
    assert len(found) == 1, report["sources"]
    return found[0]


def ledger(db: Db, tmp_path: Path) -> list[tuple[Path, str]]:
    """The loads the ledger records, in the order they started: the file each one's source
    names (a relative path is the test's directory's, where the CLI ran), and its state."""
    if loads_in_ledger(db) == 0:
        return []
    rows = db.sql("SELECT source, state FROM loader.loads ORDER BY started_at, load_id")
    return [((tmp_path / r["source"]).resolve(), r["state"]) for r in rows]


def lines_naming(run: Run, text: str) -> list[str]:
    return [line for line in run.stderr.splitlines() if text in line]


# --- which files, in which order ---------------------------------------------------------------


def test_a_directory_loads_every_file_under_it_in_path_order_each_as_a_load_of_its_own(db: Db, tmp_path: Path) -> None:
    """`loader import exports -t t`: every file under the directory, at any depth, loads, in
    the order of their paths (not the order they were written in), each as a load of its own
    in the ledger whose source is that file. Hidden files and directories, and the loader's
    own rejects files, are left out. The report lists each source, loaded, with its rows; the
    table holds every row of every file once."""
    db.sql(TABLE)
    files = {  # written out of order
        tmp_path / "exports/2024/02.csv": range(201, 301),
        tmp_path / "exports/2024/01.csv": range(101, 201),
        tmp_path / "exports/2023-12.csv": range(1, 101),
    }
    for path, ids in files.items():
        export(path, ids)
    export(tmp_path / "exports/.partial.csv", range(9001, 9011))  # a hidden file
    export(tmp_path / "exports/.staging/2024/03.csv", range(9101, 9111))  # under a hidden directory
    (tmp_path / "exports/2024/01.csv.rejects.csv").write_text("line,sqlstate,message,record\n0,,load,abc\n")

    run = db.loader("import", "exports", "-t", "t", "--json")
    assert run.code == 0, run.stderr
    report = file_set(run)
    in_order = ["exports/2023-12.csv", "exports/2024/01.csv", "exports/2024/02.csv"]
    assert states(report) == [(source, "loaded") for source in in_order]
    assert counts(report) == [(100, 100, 0)] * 3
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"], report["exit_code"]) == (300, 300, 0, 0)
    assert contents(db) == expected_rows(files)
    assert ledger(db, tmp_path) == [((tmp_path / source).resolve(), "succeeded") for source in in_order]


GLOBS = [
    # (the quoted pattern, the files it loads, in load order)
    ("exports/*.csv", ["exports/a1.csv", "exports/a2.csv", "exports/b1.csv"]),
    ("exports/a?.csv", ["exports/a1.csv", "exports/a2.csv"]),
    ("exports/[ab]1.csv", ["exports/a1.csv", "exports/b1.csv"]),
    ("exports/**/x*.csv", ["exports/other/x0.csv", "exports/sub/deep/x2.csv", "exports/sub/x1.csv"]),
]


@pytest.mark.parametrize(("pattern", "loaded"), GLOBS, ids=[g[0] for g in GLOBS])
def test_a_quoted_glob_loads_the_files_it_matches_sorted_by_path(db: Db, tmp_path: Path, pattern: str, loaded: list[str]) -> None:
    """A glob argument (`*`, `?`, `[..]`; `**` across directories), even alone, is a file set:
    the files it matches load in path order and the report lists them. Hidden files and
    directories, and rejects files (`*.rejects.csv`, which `*.csv` matches), are left out."""
    db.sql(TABLE)
    tree = {
        "exports/b1.csv": range(101, 151),
        "exports/a2.csv": range(51, 101),
        "exports/a1.csv": range(1, 51),
        "exports/.a3.csv": range(151, 201),  # hidden
        "exports/sub/x1.csv": range(201, 251),
        "exports/sub/deep/x2.csv": range(251, 301),
        "exports/other/x0.csv": range(301, 351),
        "exports/.hidden/x5.csv": range(351, 401),  # under a hidden directory
    }
    for name, ids in tree.items():
        export(tmp_path / name, ids)
    (tmp_path / "exports/a1.csv.rejects.csv").write_text("line,sqlstate,message,record\n0,,load,abc\n")

    run = db.loader("import", pattern, "-t", "t", "--json")
    assert run.code == 0, run.stderr
    report = file_set(run)
    assert states(report) == [(source, "loaded") for source in loaded]
    assert counts(report) == [(50, 50, 0)] * len(loaded)
    assert contents(db) == expected_rows({tmp_path / name: tree[name] for name in loaded})
    assert ledger(db, tmp_path) == [((tmp_path / source).resolve(), "succeeded") for source in loaded]


def test_arguments_load_in_the_order_given_and_a_file_named_twice_loads_once(db: Db, tmp_path: Path) -> None:
    """Arguments load in the order given (a path before a glob loads first, whatever the
    names); a file both a glob and a path name loads once, at its first place."""
    db.sql(TABLE)
    files = {
        tmp_path / "z.csv": range(1, 41),
        tmp_path / "in/a.csv": range(41, 81),
        tmp_path / "in/b.csv": range(81, 121),
    }
    for path, ids in files.items():
        export(path, ids)

    run = db.loader("import", "z.csv", "in/*.csv", "in/a.csv", "-t", "t", "--json")
    assert run.code == 0, run.stderr
    report = file_set(run)
    assert states(report) == [("z.csv", "loaded"), ("in/a.csv", "loaded"), ("in/b.csv", "loaded")]
    assert report["rows_loaded"] == 120
    assert contents(db) == expected_rows(files)
    assert ledger(db, tmp_path) == [(path.resolve(), "succeeded") for path in files]


@pytest.mark.parametrize("named_by", ["paths", "directory"])
def test_compressed_files_in_a_file_set_load_told_by_their_magic_bytes(db: Db, tmp_path: Path, named_by: str) -> None:
    """gzip, zstd, bzip2 and xz files load in a set as they do alone, told by their magic
    bytes, not their names (the xz one is called .dat), beside a plain file."""
    db.sql(TABLE)
    files = {
        export(tmp_path / "exports/p1.csv.gz", range(1, 201), "gzip"): range(1, 201),
        export(tmp_path / "exports/p2.csv.zst", range(201, 401), "zstd"): range(201, 401),
        export(tmp_path / "exports/p3.csv.bz2", range(401, 601), "bzip2"): range(401, 601),
        export(tmp_path / "exports/p4.dat", range(601, 801), "xz"): range(601, 801),
        export(tmp_path / "exports/p5.csv", range(801, 1001)): range(801, 1001),
    }
    names = [f"exports/{path.name}" for path in files]
    run = db.loader("import", *(names if named_by == "paths" else ["exports"]), "-t", "t", "--json")
    assert run.code == 0, run.stderr
    report = file_set(run)
    assert states(report) == [(name, "loaded") for name in names]
    assert counts(report) == [(200, 200, 0)] * 5
    assert contents(db) == expected_rows(files)


# --- what is said ------------------------------------------------------------------------------


def test_without_json_stderr_has_a_line_for_each_source_and_a_total(db: Db, tmp_path: Path) -> None:
    """Without --json nothing goes to stdout; stderr has a summary line naming each source,
    and a line with the set's total (120 + 230 = 350 rows)."""
    db.sql(TABLE)
    export(tmp_path / "first.csv", range(1, 121))
    export(tmp_path / "second.csv", range(121, 351))
    run = db.loader("import", "first.csv", "second.csv", "-t", "t")
    assert run.code == 0, run.stderr
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert [line for line in lines if "first.csv" in line and "second.csv" not in line], run.stderr
    assert [line for line in lines if "second.csv" in line and "first.csv" not in line], run.stderr
    assert [line for line in lines if "350" in line and "first.csv" not in line and "second.csv" not in line], run.stderr
    assert db.value("SELECT count(*) FROM t") == 350


def test_a_glob_or_directory_that_matches_nothing_is_a_warning_and_the_rest_load(db: Db, tmp_path: Path) -> None:
    """A glob or a directory with no file in it: a warning line names it, and the other
    sources load (exit 0)."""
    db.sql(TABLE)
    files = {export(tmp_path / "exports/a.csv", range(1, 51)): range(1, 51)}
    (tmp_path / "nothing-here").mkdir()
    run = db.loader("import", "exports/*.csv", "missing/*.csv", "nothing-here", "-t", "t", "--json")
    assert run.code == 0, run.stderr
    report = file_set(run)
    assert states(report) == [("exports/a.csv", "loaded")]
    for argument in ("missing/*.csv", "nothing-here"):
        named = lines_naming(run, argument)
        assert named and any("warning" in line.lower() for line in named), run.stderr
    assert contents(db) == expected_rows(files)


def test_a_file_set_with_no_file_at_all_warns_and_loads_nothing(db: Db, tmp_path: Path) -> None:
    """When no source remains (the glob matches nothing, the directory holds only hidden
    files and rejects files), each argument is warned about by name, the run exits 0, and
    nothing is loaded or recorded."""
    db.sql(TABLE)
    export(tmp_path / "drop/.incoming.csv", range(1, 11))
    (tmp_path / "drop/old.csv.rejects.csv").write_text("line,sqlstate,message,record\n0,,load,abc\n")
    run = db.loader("import", "exports/*.csv", "drop", "-t", "t")
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stderr
    for argument in ("exports/*.csv", "drop"):
        named = lines_naming(run, argument)
        assert named and any("warning" in line.lower() for line in named), run.stderr
    assert db.value("SELECT count(*) FROM t") == 0
    assert loads_in_ledger(db) == 0


# --- failures ----------------------------------------------------------------------------------


def corrupt_gzip(path: Path, ids: range) -> Path:
    """A gzip file whose deflate data decodes for a while before a flipped byte breaks it."""
    export(path, ids)
    data = bytearray(gzip.compress(path.read_bytes(), compresslevel=1))
    data[len(data) * 2 // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_sources_that_cannot_be_loaded_fail_by_name_and_the_others_still_load(db: Db, tmp_path: Path) -> None:
    """A missing file, a file whose header names no column of the table, and a corrupt gzip
    file each fail (state failed, an error naming the problem, a line on stderr naming the
    file, no traceback), none of their rows is committed; the sources around them load in
    full. The set exits 2."""
    db.sql(TABLE)
    good = {export(tmp_path / "a.csv", range(1, 101)): range(1, 101), export(tmp_path / "e.csv", range(201, 301)): range(201, 301)}
    (tmp_path / "header.csv").write_text("id,nope\n501,x\n502,y\n")
    corrupt_gzip(tmp_path / "corrupt.csv.gz", range(1001, 21001))
    problems = {"missing.csv": ("no such file", "not found", "does not exist", "missing"), "header.csv": ("nope",), "corrupt.csv.gz": ("corrupt",)}

    run = db.loader("import", "a.csv", "missing.csv", "header.csv", "corrupt.csv.gz", "e.csv", "-t", "t", "--batch-size", "500", "--json")
    assert run.code == 2, run.stderr
    report = file_set(run)
    assert states(report) == [
        ("a.csv", "loaded"), ("missing.csv", "failed"), ("header.csv", "failed"), ("corrupt.csv.gz", "failed"), ("e.csv", "loaded"),
    ]
    assert (source_of(report, "a.csv")["rows_loaded"], source_of(report, "e.csv")["rows_loaded"]) == (100, 100)
    assert report["rows_loaded"] == 200
    for name, words in problems.items():
        failed = source_of(report, name)
        assert failed["rows_loaded"] == 0, failed
        assert any(word in failed["error"].lower() for word in words), failed
        assert lines_naming(run, name), f"{name} is not named on stderr: {run.stderr}"
    assert contents(db) == expected_rows(good)
    assert [(path, state) for path, state in ledger(db, tmp_path) if state == "succeeded"] == [
        ((tmp_path / "a.csv").resolve(), "succeeded"), ((tmp_path / "e.csv").resolve(), "succeeded"),
    ]


# --- exactly once across runs ------------------------------------------------------------------


def test_a_rerun_loads_nothing_then_only_new_files_and_refuses_a_changed_one_by_name(db: Db, tmp_path: Path) -> None:
    """The same command again loads nothing (every source skipped, exit 0, the table and the
    ledger unchanged); a file that appeared in the directory loads alone on the next run; a
    loaded file whose bytes then changed is refused by name (failed, exit 2) while a new file
    of the same run still loads, and the changed file's new rows never reach the table."""
    db.sql(TABLE)
    files = {export(tmp_path / "exports/a.csv", range(1, 101)): range(1, 101), export(tmp_path / "exports/b.csv", range(101, 201)): range(101, 201)}
    command = ("import", "exports", "-t", "t", "--json")

    first = db.loader(*command)
    assert first.code == 0, first.stderr
    assert states(file_set(first)) == [("exports/a.csv", "loaded"), ("exports/b.csv", "loaded")]
    assert contents(db) == expected_rows(files)

    again = db.loader(*command)
    assert again.code == 0, again.stderr
    report = file_set(again)
    assert states(report) == [("exports/a.csv", "skipped"), ("exports/b.csv", "skipped")]
    assert (report["rows_loaded"], report["rows_rejected"]) == (0, 0)
    assert contents(db) == expected_rows(files)
    assert loads_in_ledger(db) == 2

    files[export(tmp_path / "exports/c.csv", range(201, 301))] = range(201, 301)
    new = db.loader(*command)
    assert new.code == 0, new.stderr
    report = file_set(new)
    assert states(report) == [("exports/a.csv", "skipped"), ("exports/b.csv", "skipped"), ("exports/c.csv", "loaded")]
    assert (report["rows_loaded"], source_of(report, "exports/c.csv")["rows_loaded"]) == (100, 100)
    assert contents(db) == expected_rows(files)
    assert loads_in_ledger(db) == 3

    changed = tmp_path / "exports/a.csv"
    loaded_at = changed.stat().st_mtime_ns
    export(changed, range(1, 101), name="A.CSV")  # other bytes, the same size
    os.utime(changed, ns=(loaded_at + 10**10, loaded_at + 10**10))
    files[export(tmp_path / "exports/d.csv", range(301, 401))] = range(301, 401)
    refused = db.loader(*command)
    assert refused.code == 2, refused.stderr
    report = file_set(refused)
    assert states(report) == [
        ("exports/a.csv", "failed"), ("exports/b.csv", "skipped"), ("exports/c.csv", "skipped"), ("exports/d.csv", "loaded"),
    ]
    assert "changed" in source_of(report, "exports/a.csv")["error"]
    assert lines_naming(refused, "exports/a.csv"), refused.stderr
    assert (report["rows_loaded"], source_of(report, "exports/d.csv")["rows_loaded"]) == (100, 100)
    assert contents(db) == expected_rows(files)  # a.csv's rows as first loaded, once; none named A.CSV
    assert loads_in_ledger(db) == 4


@pytest.mark.slow
def test_a_file_set_killed_mid_load_is_completed_exactly_once_by_the_same_command(db: Db, tmp_path: Path) -> None:
    """kill -9 in the middle of a file set (the first file loaded, the second half-way, the
    third not begun; paced with --max-rate), then the same command again: exit 0, the first
    file skipped, the others loaded, the run loading exactly the rows the killed one had not
    committed, and the table holds every row of every file exactly once."""
    db.sql(TABLE)
    files = {tmp_path / f"exports/part-{n}.csv": range(n * 20_000 + 1, (n + 1) * 20_000 + 1) for n in range(3)}
    for path, ids in files.items():
        export(path, ids)
    command = ("import", "exports", "-t", "t", "--batch-size", "1000", "--max-rate", "20000", "--json")

    proc = db.spawn(*command)
    until_batches(db, proc, 25)  # 20 batches a file
    kill_9(db, proc)
    committed = int(db.value("SELECT count(*) FROM t"))
    assert 20_000 < committed < 40_000, committed

    rerun = db.loader(*command)
    assert rerun.code == 0, rerun.stderr
    report = file_set(rerun)
    assert states(report) == [
        ("exports/part-0.csv", "skipped"), ("exports/part-1.csv", "loaded"), ("exports/part-2.csv", "loaded"),
    ]
    assert report["rows_loaded"] == 60_000 - committed
    assert db.value("SELECT count(*) FROM t") == 60_000
    assert db.value("SELECT count(DISTINCT id) FROM t") == 60_000
    assert contents(db) == expected_rows(files)
    assert ledger(db, tmp_path) == [(path.resolve(), "succeeded") for path in files]


def test_a_file_set_stops_with_75_while_another_load_holds_the_table_and_resumes_later(db: Db, tmp_path: Path) -> None:
    """While another load of the table runs, the set cannot go on: exit 75, no row of it
    loaded, the sources after the one it stopped at not-started. Run again once the other
    load is done, it loads every file, each once."""
    db.sql(TABLE)
    files = {
        export(tmp_path / "big.csv", range(100_001, 160_001)): range(100_001, 160_001),
        export(tmp_path / "a.csv", range(1, 101)): range(1, 101),
        export(tmp_path / "b.csv", range(101, 201)): range(101, 201),
    }
    other = db.spawn("import", "big.csv", "-t", "t", "--batch-size", "1000", "--max-rate", "20000")
    until_batches(db, other, 1)  # it holds the table, for seconds more

    command = ("import", "a.csv", "b.csv", "-t", "t", "--json")
    held = db.loader(*command)
    assert held.code == 75, held.stderr
    assert other.poll() is None, "the other load ended before the set ran"
    report = file_set(held)
    assert [s["source"] for s in report["sources"]] == ["a.csv", "b.csv"]
    assert report["sources"][0]["state"] in ("not-started", "failed"), report["sources"]
    assert report["sources"][1]["state"] == "not-started", report["sources"]
    assert report["rows_loaded"] == 0
    assert "another load" in held.stderr
    assert db.value("SELECT count(*) FROM t WHERE id <= 200") == 0

    _, err = other.communicate(timeout=120)
    assert other.returncode == 0, err.decode()
    later = db.loader(*command)
    assert later.code == 0, later.stderr
    assert states(file_set(later)) == [("a.csv", "loaded"), ("b.csv", "loaded")]
    assert contents(db) == expected_rows(files)


# --- rejects -----------------------------------------------------------------------------------


def with_bad_rows(path: Path, ids: range, bad: Iterable[int]) -> Path:
    """An id,name file whose rows at the given indexes have an id that is not a number
    (line = index + 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wrong = set(bad)
    return write_rows(path, "id,name", [(f"x{i}" if n in wrong else i, path.name) for n, i in enumerate(ids)])


def reject_lines(path: Path) -> list[tuple[int, str]]:
    return sorted((line, state) for line, state, _ in read_rejects(path)[1])


def test_each_sources_rejects_go_next_to_it_and_the_set_exits_3_then_a_rerun_exits_0(db: Db, tmp_path: Path) -> None:
    """A bad row is rejected at its line into `<source>.rejects.csv` next to its own source
    (none for a clean file); those sources are loaded-with-rejects, with their counts, and the
    set exits 3. The same command again has nothing to do: every source skipped, exit 0."""
    db.sql(TABLE)
    export(tmp_path / "a.csv", range(1, 101))
    with_bad_rows(tmp_path / "b.csv", range(101, 201), [9, 49])  # lines 11 and 51
    with_bad_rows(tmp_path / "sub/c.csv", range(201, 301), [0])  # line 2
    command = ("import", "a.csv", "b.csv", "sub/c.csv", "-t", "t", "--json")

    run = db.loader(*command)
    assert run.code == 3, run.stderr
    report = file_set(run)
    assert states(report) == [("a.csv", "loaded"), ("b.csv", "loaded-with-rejects"), ("sub/c.csv", "loaded-with-rejects")]
    assert counts(report) == [(100, 100, 0), (100, 98, 2), (100, 99, 1)]
    assert (report["rows_read"], report["rows_loaded"], report["rows_rejected"]) == (300, 297, 3)
    assert reject_lines(tmp_path / "b.csv.rejects.csv") == [(11, "22P02"), (51, "22P02")]
    assert reject_lines(tmp_path / "sub/c.csv.rejects.csv") == [(2, "22P02")]
    assert not (tmp_path / "a.csv.rejects.csv").exists()
    expected = sorted(
        [(i, "a.csv") for i in range(1, 101)]
        + [(i, "b.csv") for i in range(101, 201) if i not in (110, 150)]
        + [(i, "c.csv") for i in range(202, 301)]
    )
    assert contents(db) == expected

    again = db.loader(*command)
    assert again.code == 0, again.stderr
    report = file_set(again)
    assert states(report) == [("a.csv", "skipped"), ("b.csv", "skipped"), ("sub/c.csv", "skipped")]
    assert report["rows_loaded"] == 0
    assert contents(db) == expected


def test_rejects_into_a_directory_go_there_under_each_files_name(db: Db, tmp_path: Path) -> None:
    """`--rejects DIR` (an existing directory): each source's rejects go to
    DIR/<file name>.rejects.csv, not next to the source."""
    db.sql(TABLE)
    with_bad_rows(tmp_path / "a.csv", range(1, 51), [4])  # line 6
    with_bad_rows(tmp_path / "in/b.csv", range(51, 101), [0, 49])  # lines 2 and 51
    (tmp_path / "rejected").mkdir()

    run = db.loader("import", "a.csv", "in/b.csv", "-t", "t", "--rejects", "rejected", "--json")
    assert run.code == 3, run.stderr
    report = file_set(run)
    assert states(report) == [("a.csv", "loaded-with-rejects"), ("in/b.csv", "loaded-with-rejects")]
    assert counts(report) == [(50, 49, 1), (50, 48, 2)]
    assert reject_lines(tmp_path / "rejected/a.csv.rejects.csv") == [(6, "22P02")]
    assert reject_lines(tmp_path / "rejected/b.csv.rejects.csv") == [(2, "22P02"), (51, "22P02")]
    assert not (tmp_path / "a.csv.rejects.csv").exists()
    assert not (tmp_path / "in/b.csv.rejects.csv").exists()
    assert db.value("SELECT count(*) FROM t") == 97


REFUSED = [
    # (what the user did, the arguments after `import`, what the error line names)
    ("one rejects file for several sources", ["a.csv", "b.csv", "--rejects", "all.rejects.csv"], ("--rejects",)),
    ("one load name for several sources", ["a.csv", "b.csv", "--load-name", "nightly"], ("--load-name",)),
    ("standard input with files", ["-", "a.csv"], ("standard input", "stdin")),
    ("a replace from several sources", ["a.csv", "b.csv", "--mode", "replace"], ("--mode replace",)),
]


@pytest.mark.parametrize(("action", "args", "names"), REFUSED, ids=[r[0] for r in REFUSED])
def test_options_for_one_source_are_refused_with_several_before_anything_loads(
    db: Db, tmp_path: Path, action: str, args: list[str], names: tuple[str, ...]
) -> None:
    """--rejects naming a file (not a directory), --load-name, or `-` (standard input) with
    other sources: one error line naming the problem, exit 2, nothing loaded or recorded, no
    rejects file written."""
    db.sql(TABLE)
    export(tmp_path / "a.csv", range(1, 51))
    with_bad_rows(tmp_path / "b.csv", range(51, 101), [0])
    run = db.loader("import", *args, "-t", "t", input=(tmp_path / "a.csv").read_bytes())
    assert run.code == 2, run.stderr
    line = one_error_line(run)
    assert any(name in line for name in names), line
    assert db.value("SELECT count(*) FROM t") == 0
    assert loads_in_ledger(db) == 0
    assert not (tmp_path / "all.rejects.csv").exists()
    assert not (tmp_path / "b.csv.rejects.csv").exists()


# --- --create ----------------------------------------------------------------------------------


def test_create_with_a_file_set_gives_each_column_a_type_every_file_fits(db: Db, tmp_path: Path) -> None:
    """--create with several files: the types are inferred from all of them, so a column that
    holds only integers in the first file and a decimal in the second is numeric, and both
    files load without a reject."""
    write_rows(tmp_path / "ints.csv", "id,n", [(i, i) for i in range(1, 51)])
    write_rows(tmp_path / "decimals.csv", "id,n", [(51, "2.5"), (52, 3), (53, "-0.25")])
    run = db.loader("import", "ints.csv", "decimals.csv", "-t", "t", "--create", "--json")
    assert run.code == 0, run.stderr
    report = file_set(run)
    assert states(report) == [("ints.csv", "loaded"), ("decimals.csv", "loaded")]
    assert counts(report) == [(50, 50, 0), (3, 3, 0)]
    assert db.value("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'n'") == "numeric"
    assert [tuple(r) for r in db.sql("SELECT id, n FROM t ORDER BY id")] == [
        *((i, Decimal(i)) for i in range(1, 51)), (51, Decimal("2.5")), (52, Decimal(3)), (53, Decimal("-0.25")),
    ]


# --- one session, one pool ---------------------------------------------------------------------


class SessionCount:
    """Sessions the server has opened in the test's database, read through one session of
    its own (opened first, so that reading adds none)."""

    def __init__(self, db: Db) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(db.dsn))

    def __call__(self) -> int:
        async def read() -> int:
            await self.conn.execute("SELECT pg_stat_clear_snapshot()")
            return int(await self.conn.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = current_database()"))

        return self.loop.run_until_complete(read())

    def loader_sessions(self) -> int:
        return int(self.loop.run_until_complete(self.conn.fetchval(LOADER_SESSIONS)))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def test_a_file_set_connects_once_not_once_per_file(db: Db, tmp_path: Path) -> None:
    """The files of a set load one after another through the same session (holding the
    table's lease from the first file to the last) and the same pool of --workers
    connections: 30 files open 3 sessions, not 90."""
    db.script(TABLE)
    for n in range(30):
        export(tmp_path / "parts" / f"{n:02}.csv", range(n * 10 + 1, n * 10 + 11))
    count = SessionCount(db)
    try:
        before = count()
        run = db.loader("import", "parts", "-t", "t", "--workers", "2")
        assert run.code == 0, run.stderr
        until(lambda: count.loader_sessions() == 0)
        until(lambda: count() - before >= 3, timeout=10)  # the counts of ended sessions may lag a moment
        opened = count() - before
    finally:
        count.close()
    assert 3 <= opened <= 4, opened  # the load's session and 2 workers (not 3 for each file)
    assert tuple(db.sql("SELECT count(*), count(DISTINCT id) FROM t")[0]) == (300, 300)


def test_the_next_file_loads_while_the_one_before_is_still_loading(db: Db, tmp_path: Path) -> None:
    """Small files do not wait for each other: while a file is held up (a trigger holds it
    until a row of the next file is in the table), the next file loads and commits, each a
    batch's worth here (--batch-size 2). Each file is still a load of its own, exactly once."""
    db.script(
        """
        CREATE TABLE t (id bigint, name text);
        CREATE TABLE seen (waited boolean);
        CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = 'hold' THEN
                FOR i IN 1..600 LOOP
                    EXIT WHEN EXISTS (SELECT FROM t WHERE name = 'next file');
                    PERFORM pg_sleep(0.05);
                END LOOP;
                INSERT INTO seen VALUES (EXISTS (SELECT FROM t WHERE name = 'next file'));
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER hold BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION hold();
        """
    )
    (tmp_path / "parts").mkdir()
    write_rows(tmp_path / "parts" / "1.csv", "id,name", [(1, "first"), (2, "first"), (3, "first")])
    write_rows(tmp_path / "parts" / "2.csv", "id,name", [(4, "hold"), (5, "second")])
    write_rows(tmp_path / "parts" / "3.csv", "id,name", [(6, "next file"), (7, "third")])
    run = db.loader("import", "parts", "-t", "t", "--workers", "2", "--batch-size", "2", "--json")
    assert run.code == 0, run.stderr
    assert db.value("SELECT waited FROM seen") is True
    assert states(file_set(run)) == [("parts/1.csv", "loaded"), ("parts/2.csv", "loaded"), ("parts/3.csv", "loaded")]
    assert tuple(db.sql("SELECT count(*), count(DISTINCT id) FROM t")[0]) == (7, 7)


def test_create_dry_run_with_a_file_set_prints_the_table_once_and_creates_nothing(db: Db, tmp_path: Path) -> None:
    """--create --dry-run on several files: one CREATE TABLE, typed from all of them, is
    printed; no table, no ledger, exit 0."""
    write_rows(tmp_path / "ints.csv", "id,n", [(i, i) for i in range(1, 51)])
    write_rows(tmp_path / "decimals.csv", "id,n", [(51, "2.5")])
    run = db.loader("import", "ints.csv", "decimals.csv", "-t", "t", "--create", "--dry-run", "--json")
    assert run.code == 0, run.stderr
    assert run.stderr.count("CREATE TABLE") == 1, run.stderr
    assert "numeric" in run.stderr
    assert states(file_set(run)) == [("ints.csv", "skipped"), ("decimals.csv", "skipped")]
    assert db.value("SELECT to_regclass('t')") is None
    assert loads_in_ledger(db) == 0


def test_a_file_set_refused_before_loading_is_still_recorded_in_the_metrics_file(db: Db, tmp_path: Path) -> None:
    """A mistake in naming the sources is an outcome like any other: the metrics file says
    the run exited 2, so the alert on the nightly load fires."""
    export(tmp_path / "a.csv", range(1, 11))
    run = db.loader("import", "-", "a.csv", "-t", "t", "--metrics-file", "loader.prom")
    assert run.code == 2, run.stderr
    assert 'loader_last_run_exit_code{table="t",mode="append"} 2\n' in (tmp_path / "loader.prom").read_text()
