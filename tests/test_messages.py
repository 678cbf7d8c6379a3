"""What the loader tells a user, and that each message says what to do next: a reject names
the column PostgreSQL named and says its detail once, a header that does not match hints at
the option that fixes it, an interrupted run says it stopped and how to resume, counts agree
with their nouns, the usage line names its argument, and --json tells the concurrency used.
Each test runs the real CLI against the session's PostgreSQL."""

from __future__ import annotations

import csv
import io
import re
import signal
from pathlib import Path

import pytest

from data import PLAIN_EVENTS, plain_csv
from helpers import Db, Run, committed_batches, until

STAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "  # stderr is not a terminal here


def lines_of(stderr: str) -> list[str]:
    """stderr's lines without their time stamps."""
    return [re.sub(STAMP, "", line) for line in stderr.splitlines() if line.strip()]


def one_error_line(run: Run) -> str:
    """The run's one line on stderr, an error, without its stamp."""
    lines = lines_of(run.stderr)
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("loader: error: "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def summary_of(run: Run) -> str:
    """The summary's first line."""
    found = [line for line in lines_of(run.stderr) if re.search(r"\bloaded [\d,]+ of .* into ", line)]
    assert len(found) == 1, run.stderr
    return found[0]


def reject_messages(path: Path) -> dict[int, str]:
    """The rejects file's message column, by line (the header row left out)."""
    rows = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    assert rows[0] == ["line", "sqlstate", "message", "record"]
    return {int(r[0]): r[2] for r in rows[1:] if r[1]}


# --- 1. a duplicate key's detail, once -------------------------------------------------------


def test_a_duplicate_key_is_explained_once(db: Db, tmp_path: Path) -> None:
    """A row refused for a duplicate key is reported with the constraint and, once, the key:
    in the summary and in the rejects file."""
    db.sql("CREATE TABLE t (id int PRIMARY KEY, name text)")
    (tmp_path / "t.csv").write_text("id,name\n1,ann\n1,again\n2,bob\n")
    run = db.loader("import", "t.csv", "-t", "t", "--workers", "1")
    assert run.code == 3, run.stderr
    expected = 'duplicate key value violates unique constraint "t_pkey" (Key (id)=(1) already exists.)'
    assert f"  line 3: 23505 {expected}" in lines_of(run.stderr), run.stderr
    assert run.stderr.count("already exists") == 1, run.stderr
    assert reject_messages(tmp_path / "t.csv.rejects.csv") == {3: expected}


# --- 2. the column PostgreSQL named ----------------------------------------------------------


def test_a_rejected_value_names_its_column(db: Db, tmp_path: Path) -> None:
    """A value the column's type refuses is reported with that column's name, as COPY's error
    context gives it: in the summary and in the rejects file's message."""
    db.sql('CREATE TABLE scores (id int, name text, score int, "Due Date" date)')
    (tmp_path / "s.csv").write_text(
        'id,name,score,Due Date\n1,ann,10,2024-01-01\n2,bob,20,2024-01-02\n3,cid,high,2024-01-03\n4,dan,40,someday\n'
    )
    run = db.loader("import", "s.csv", "-t", "scores")
    assert run.code == 3, run.stderr
    score = 'column score: invalid input syntax for type integer: "high"'
    due = 'column "Due Date": invalid input syntax for type date: "someday"'
    shown = lines_of(run.stderr)
    assert f"  line 4: 22P02 {score}" in shown, run.stderr
    assert f"  line 5: 22007 {due}" in shown, run.stderr
    assert reject_messages(tmp_path / "s.csv.rejects.csv") == {4: score, 5: due}
    assert db.value("SELECT count(*) FROM scores") == 2


# --- 3. a header that does not match ---------------------------------------------------------

HEADERS = [
    # (what the file's first lines are, what the error suggests)
    ("other names", "id,full_name\n1,ann\n", "pass --columns id,name"),
    ("data, no header", "1,ann\n2,bob\n", "pass --no-header"),
    ("dates and numbers, no header", "2024-01-01,7.5\n", "pass --no-header"),
    ("semicolons", "id;name\n1;ann\n", "pass --delimiter ';'"),
    ("tabs", "id\tname\n1\tann\n", "pass --delimiter tab"),
]


@pytest.mark.parametrize(("case", "text", "hint"), HEADERS, ids=[h[0] for h in HEADERS])
def test_a_header_that_does_not_match_says_which_option_fixes_it(
    db: Db, tmp_path: Path, case: str, text: str, hint: str
) -> None:
    """A first record that names no column of the table: exit 2, one line, nothing loaded, and
    the line says what to pass: --columns (map the fields by position), --no-header (the first
    record is data), or --delimiter (the one name holds a ; or a tab)."""
    db.sql("CREATE TABLE t (id text, name text)")
    (tmp_path / "h.csv").write_text(text)
    run = db.loader("import", "h.csv", "-t", "t")
    assert run.code == 2, run.stderr
    line = one_error_line(run)
    assert "which is not a column of" in line
    assert hint in line, line
    assert db.value("SELECT count(*) FROM t") == 0


# --- 4. a tab as the delimiter ---------------------------------------------------------------


@pytest.mark.parametrize("delimiter", ["\\t", "tab", "TAB", "\t"])
def test_a_tab_delimited_file_loads_with_delimiter_tab(db: Db, tmp_path: Path, delimiter: str) -> None:
    """`--delimiter '\\t'` and `--delimiter tab` mean a tab, as a literal tab does."""
    db.sql("CREATE TABLE t (id int, name text)")
    (tmp_path / "t.tsv").write_text("id\tname\n1\tann, jr\n2\tbob\n")
    run = db.loader("import", "t.tsv", "-t", "t", "--delimiter", delimiter)
    assert run.code == 0, run.stderr
    assert [tuple(r) for r in db.sql("SELECT id, name FROM t ORDER BY id")] == [(1, "ann, jr"), (2, "bob")]


def test_a_tab_delimiter_comes_from_the_environment_too(db: Db, tmp_path: Path) -> None:
    """LOADER_DELIMITER=tab, as in a crontab."""
    db.sql("CREATE TABLE t (id int, name text)")
    (tmp_path / "t.tsv").write_text("id\tname\n1\tann\n")
    run = db.loader("import", "t.tsv", "-t", "t", env={"LOADER_DELIMITER": "tab"})
    assert run.code == 0, run.stderr
    assert db.value("SELECT name FROM t") == "ann"


def test_a_delimiter_of_two_characters_is_refused_with_the_tab_spelled_out(db: Db, tmp_path: Path) -> None:
    """A wrong --delimiter says what it takes, tab included."""
    db.sql("CREATE TABLE t (id int, name text)")
    (tmp_path / "t.csv").write_text("id,name\n1,ann\n")
    run = db.loader("import", "t.csv", "-t", "t", "--delimiter", ";;")
    assert run.code == 2, run.stderr
    line = one_error_line(run)
    assert "--delimiter must be a single" in line and "tab" in line, line


# --- 5. columns left to their defaults -------------------------------------------------------

DEFAULTS_TABLE = "CREATE TABLE t (id int, name text, created_at timestamptz DEFAULT now(), note text)"


@pytest.mark.parametrize(
    ("text", "options"),
    [("id,name\n1,ann\n", []), ("1,ann\n", ["--no-header", "--columns", "id,name"])],
    ids=["header", "--columns"],
)
def test_table_columns_the_file_does_not_name_are_noted(db: Db, tmp_path: Path, text: str, options: list[str]) -> None:
    """A header (or --columns) naming fewer columns than the table has: the load goes ahead,
    and one note, shown without -v, lists the columns that get their defaults."""
    db.sql(DEFAULTS_TABLE)
    (tmp_path / "t.csv").write_text(text)
    run = db.loader("import", "t.csv", "-t", "t", *options)
    assert run.code == 0, run.stderr
    notes = [line for line in lines_of(run.stderr) if line.startswith("loader: note:")]
    assert notes == ["loader: note: columns created_at, note are not in the file: they get their defaults"], run.stderr
    assert db.value("SELECT count(*) FROM t WHERE created_at IS NOT NULL AND note IS NULL") == 1


def test_a_file_naming_every_column_gets_no_note(db: Db, tmp_path: Path) -> None:
    """A header naming every column, in any order: no note, only the summary."""
    db.sql(DEFAULTS_TABLE)
    (tmp_path / "t.csv").write_text("note,created_at,name,id\nhi,2024-01-01,ann,1\n")
    run = db.loader("import", "t.csv", "-t", "t")
    assert run.code == 0, run.stderr
    assert "note:" not in run.stderr
    assert len(lines_of(run.stderr)) == 1, run.stderr


# --- 6. a run that stopped before the end ----------------------------------------------------


def assert_says_it_stopped(run: Run) -> None:
    summary = summary_of(run)
    assert summary.startswith("stopped before the end of e.csv: "), summary
    assert summary.endswith("; run the same command again to resume"), summary
    loaded = re.search(r"loaded ([\d,]+) of the ([\d,]+) rows read into", summary)
    assert loaded, summary
    assert not re.search(r"loaded ([\d,]+) of \1 rows into", summary), summary
    assert run.json()["stopped_early"] is True
    assert run.json()["exit_code"] == run.code


def test_a_load_stopped_by_its_deadline_says_so_and_how_to_resume(db: Db, tmp_path: Path) -> None:
    """--deadline stops the load (exit 75); the summary says it stopped before the end of the
    file and to run the same command again, which then finishes it."""
    db.sql(PLAIN_EVENTS.format(name="events"))
    plain_csv(tmp_path / "e.csv", 60_000)
    command = ("import", "e.csv", "-t", "events", "--batch-size", "2000", "--max-rate", "20000", "--json")
    first = db.loader(*command, "--deadline", "1s")
    assert first.code == 75, first.stderr
    assert_says_it_stopped(first)
    assert 0 < db.value("SELECT count(*) FROM events") < 60_000
    again = db.loader(*command)
    assert again.code == 0, again.stderr
    assert summary_of(again).startswith("loaded "), again.stderr
    assert again.json()["stopped_early"] is False


def test_a_load_stopped_by_sigterm_says_so_and_how_to_resume(db: Db, tmp_path: Path) -> None:
    """SIGTERM stops the load after the batches in flight (exit 1): the summary does not read
    as complete; it says the run stopped and how to resume."""
    db.sql(PLAIN_EVENTS.format(name="events"))
    plain_csv(tmp_path / "e.csv", 60_000)
    proc = db.spawn("import", "e.csv", "-t", "events", "--batch-size", "2000", "--max-rate", "20000", "--json")
    until(lambda: committed_batches(db) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    run = Run(proc.returncode, out.decode(), err.decode())
    assert run.code == 1, run.stderr
    assert_says_it_stopped(run)


# --- 7. one batch, one retry, one row --------------------------------------------------------

# The first row COPY sends into t fails with a serialization failure (transient: retried);
# the sequence counts outside the transaction, so the retry goes through.
FLAKY_ONCE = """
CREATE TABLE t (id int, name text);
CREATE SEQUENCE rows_seen;
CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('rows_seen') = 1 THEN
    RAISE EXCEPTION 'please retry' USING ERRCODE = 'serialization_failure';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER flaky BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION flaky();
"""


def test_a_summary_counts_one_of_a_thing_in_the_singular(db: Db, tmp_path: Path) -> None:
    """One batch, one retry, one row rejected: said in the singular."""
    db.script(FLAKY_ONCE)
    (tmp_path / "t.csv").write_text("id,name\n1,ann\nx,bob\n")
    run = db.loader("import", "t.csv", "-t", "t")
    assert run.code == 3, run.stderr
    summary = summary_of(run)
    assert summary.startswith('loaded 1 of 2 rows into "public"."t" in '), summary
    assert summary.endswith("; 1 batch, 1 retry; 1 row rejected, written to t.csv.rejects.csv"), summary


def test_a_summary_of_one_row_says_row(db: Db, tmp_path: Path) -> None:
    """A file of one row: `loaded 1 of 1 row`, `1 batch`; none is still `0 retries`."""
    db.sql("CREATE TABLE t (id int, name text)")
    (tmp_path / "t.csv").write_text("id,name\n1,ann\n")
    run = db.loader("import", "t.csv", "-t", "t")
    assert run.code == 0, run.stderr
    summary = summary_of(run)
    assert summary.startswith('loaded 1 of 1 row into "public"."t" in '), summary
    assert summary.endswith("; 1 batch, 0 retries"), summary


# --- 8. the usage line -----------------------------------------------------------------------


@pytest.mark.parametrize(("command", "argument"), [("import", "SOURCE..."), ("retry-rejects", "REJECTS_FILE")])
def test_the_usage_line_names_the_argument(db: Db, command: str, argument: str) -> None:
    """`loader import --help` shows `SOURCE...` (not `{sources}`), and so does the error for a
    missing one; retry-rejects's is REJECTS_FILE."""
    helped = db.loader(command, "--help")
    assert helped.code == 0, helped.stderr
    assert f"Usage: loader {command} [OPTIONS] {argument}\n" in helped.stdout, helped.stdout
    assert "{" not in helped.stdout.split("\n\n")[0]
    assert f"\n  {argument} " in helped.stdout, helped.stdout
    missing = db.loader(command, "-t", "t")
    assert missing.code == 2, missing.stderr
    assert f"Missing argument '{argument}'" in one_error_line(missing)


# --- 9. the concurrency --json reports -------------------------------------------------------


def test_workers_auto_reports_the_batches_it_ran_at_once(db: Db, tmp_path: Path) -> None:
    """With --workers auto, `workers` in the JSON report is the most batches that loaded at
    once (the connections used), not --max-workers: one batch, one worker."""
    db.sql(PLAIN_EVENTS.format(name="events"))
    plain_csv(tmp_path / "one.csv", 100)
    run = db.loader("import", "one.csv", "-t", "events", "--workers", "auto", "--max-workers", "8", "--json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["workers"] == 1, report
    assert set(report["concurrency"]) == {"min", "max", "final"}


def test_workers_auto_reports_no_more_than_its_concurrency_reached(db: Db, tmp_path: Path) -> None:
    """Ten batches from a start at 2 cannot climb to 8 at once: `workers` is what was used."""
    db.sql(PLAIN_EVENTS.format(name="events"))
    plain_csv(tmp_path / "e.csv", 10_000)
    run = db.loader(
        "import", "e.csv", "-t", "events", "--workers", "auto", "--max-workers", "8", "--batch-size", "1000", "--json"
    )
    assert run.code == 0, run.stderr
    report = run.json()
    assert 1 <= report["workers"] <= report["concurrency"]["max"] < 8, report


def test_fixed_workers_are_reported_as_given(db: Db, tmp_path: Path) -> None:
    """With --workers N, `workers` stays N (the server could spare them), however small the file."""
    db.sql(PLAIN_EVENTS.format(name="events"))
    plain_csv(tmp_path / "e.csv", 100)
    run = db.loader("import", "e.csv", "-t", "events", "--workers", "3", "--json")
    assert run.code == 0, run.stderr
    assert run.json()["workers"] == 3
    assert run.json()["concurrency"] is None
