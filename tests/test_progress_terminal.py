"""The live progress line in a real terminal (tmux, detached, of a given size): it fits the
terminal's width on one line (percent, rows/s and the ETA kept at 80 columns, nothing wrapped
at 120), and it says why the load waits (connecting, retrying). Cron's plain lines say why too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from rich.cells import cell_len

from data import PLAIN_EVENTS, plain_csv
from helpers import LOADER, Background, Db, assert_ids_once, until
from loader.progress import Snapshot, render_line

LONG_NAME = "events-2024-01-01-from-the-nightly-export-of-the-warehouse.csv"
CLOCK = r"\d+:\d\d:\d\d"
PROGRESS = re.compile(rf"(\d+)% .*?([\d,]+) rows/s ETA ({CLOCK})")


class Terminal:
    """A detached tmux session, `width` x `height`, on a tmux server of its own (-L), running
    one shell command; the pane stays after the command ends, so the screen can be read."""

    def __init__(self, width: int, height: int, command: str) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            pytest.fail("tmux is needed to run the loader under a real terminal (apt-get install tmux)", pytrace=False)
        self.tmux_path = tmux
        self.width = width
        self.server = f"loader-test-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        env.update(LC_ALL="C.UTF-8", TERM="xterm-256color")
        self._tmux("new-session", "-d", "-s", "load", "-x", str(width), "-y", str(height), command, env=env)
        self.socket = Path(self._tmux("display-message", "-p", "#{socket_path}").strip())

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        return subprocess.run(
            [self.tmux_path, "-u", "-f", "/dev/null", "-L", self.server, *args],
            capture_output=True, text=True, check=True, timeout=30, env=env,
        ).stdout

    def screen(self) -> list[str]:
        """The pane's rows, a row the terminal wrapped joined to the next (-J): a wrapped line
        shows as a row longer than the terminal is wide."""
        return [row.rstrip() for row in self._tmux("capture-pane", "-p", "-J", "-t", "load").splitlines()]

    def kill(self) -> None:
        """Its server, the shell and the loader in it; and the socket the server leaves."""
        subprocess.run([self.tmux_path, "-L", self.server, "kill-server"], capture_output=True, timeout=30)
        self.socket.unlink(missing_ok=True)


@contextmanager
def terminal(width: int, height: int, command: str) -> Iterator[Terminal]:
    term = Terminal(width, height, command)
    try:
        yield term
    finally:
        term.kill()


def in_shell(db: Db, dsn: str, *args: str, code_file: Path) -> str:
    """The CLI as a user types it, in the test's directory; its exit code goes to `code_file`."""
    loader = " ".join(shlex.quote(a) for a in (*LOADER, *args))
    q = shlex.quote
    return f"cd {q(str(db.tmp))} && DATABASE_URL={q(dsn)} {loader}; echo $? > {q(str(code_file))}; sleep 600"


def exit_code(code_file: Path) -> int:
    until(lambda: code_file.exists() and code_file.read_text().strip() != "", timeout=300)
    return int(code_file.read_text())


def unreachable(db: Db, port: int) -> str:
    """A DSN for the test's database name on 127.0.0.1:`port`."""
    return f"postgresql://loader@127.0.0.1:{port}/{urlsplit(db.dsn).path.lstrip('/')}"


def wide(rows: list[str], width: int) -> list[str]:
    return [row for row in rows if cell_len(row) > width]


@pytest.mark.parametrize(("width", "height"), [(80, 24), (120, 30)])
def test_the_progress_line_fits_the_terminal_on_one_line(db: Db, tmp_path: Path, width: int, height: int) -> None:
    """At 80 columns the percent, rows/s and the ETA stay on screen (the long file name is cut
    short); at 120 more of the name, the bytes and rows are there too; no row ever wraps."""
    rows = 100_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / LONG_NAME, rows)
    code_file = tmp_path / "exit_code"
    command = in_shell(db, db.dsn, "import", str(csv), "-t", "events", "--max-rate", "20000", "--batch-size", "5000",
                       code_file=code_file)
    screens: list[list[str]] = []
    with terminal(width, height, command) as term:

        def measured() -> bool:
            """A screen with the progress line once the rate and the ETA are known, or the end."""
            screens.append(term.screen())
            return code_file.exists() or any(
                (m := PROGRESS.search(row)) and m[2] != "0" for row in screens[-1]
            )

        until(measured, timeout=120, interval=0.1)
        code = exit_code(code_file)
        final = term.screen()
    shown = screens[-1]
    progress = [row for row in shown if PROGRESS.search(row)]
    assert len(progress) == 1, "no progress line with percent, rows/s and ETA on one row:\n" + "\n".join(shown)
    row = progress[0]
    assert row.startswith(LONG_NAME[:7]), row
    assert cell_len(row) < width, row
    assert LONG_NAME not in row and "…" in row, row  # the name gave way, not the fields
    if width == 120:
        assert row.startswith(LONG_NAME[:30]), row
        assert re.search(r"[\d.]+/[\d.]+ MB [\d,]+ rows ", row), row
    # Not one screen of the load had a row wider than the terminal.
    during = [screen for screen in screens if not any(line.startswith("loaded ") for line in screen)]
    assert during
    assert not [wide(screen, width) for screen in during if wide(screen, width)]
    assert code == 0, "\n".join(final)
    assert any(re.search(r"loaded 100,000 of 100,000 rows", line) for line in final), "\n".join(final)
    assert_ids_once(db, rows)


def test_a_refused_connection_shows_the_retry_and_its_attempt(db: Db, tmp_path: Path) -> None:
    """Nothing listens on the port (bound, not listening: refused at once): while the load
    retries with backoff, the line says so, and at which attempt."""
    csv = plain_csv(tmp_path / "e.csv", 100)
    code_file = tmp_path / "exit_code"
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        dsn = unreachable(db, bound.getsockname()[1])
        command = in_shell(db, dsn, "import", str(csv), "-t", "events", "--retries", "20", code_file=code_file)
        with terminal(80, 24, command) as term:
            screens: list[list[str]] = []

            def retrying() -> bool:
                screens.append(term.screen())
                return any(re.search(r"retrying: connection refused \(attempt \d+ of 21\)", row) for row in screens[-1])

            until(retrying, timeout=60, interval=0.1)
    shown = screens[-1]
    row = next(row for row in shown if "retrying:" in row)
    assert row.startswith("e.csv "), "\n".join(shown)
    assert "0%" in row
    assert not wide(shown, 80), "\n".join(shown)
    assert not code_file.exists()  # still retrying when seen


def test_a_server_that_does_not_answer_shows_where_the_load_connects(db: Db, tmp_path: Path) -> None:
    """The port listens but nothing answers (the connection waits for its timeout): the line
    says where the load is connecting."""
    csv = plain_csv(tmp_path / "e.csv", 100)
    code_file = tmp_path / "exit_code"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        database = urlsplit(db.dsn).path.lstrip("/")
        command = in_shell(db, unreachable(db, port), "import", str(csv), "-t", "events", code_file=code_file)
        with terminal(120, 30, command) as term:
            screens: list[list[str]] = []

            def connecting() -> bool:
                screens.append(term.screen())
                return any(f"connecting to 127.0.0.1:{port}/{database}" in row for row in screens[-1])

            until(connecting, timeout=60, interval=0.1)
    assert not wide(screens[-1], 120), "\n".join(screens[-1])


def test_cron_lines_say_why_the_load_waits(db: Db, tmp_path: Path) -> None:
    """Not a terminal: the plain, timestamped progress lines carry the waiting reason."""
    csv = plain_csv(tmp_path / "e.csv", 100)
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        run = db.loader("import", str(csv), "-t", "events", "--retries", "3", "--log-interval", "0.2",
                        env={"DATABASE_URL": unreachable(db, port)})
    assert run.code == 1, run.stderr
    assert "\x1b[" not in run.stderr
    waiting = [line for line in run.stderr.splitlines() if "% of the file" in line and "retrying: connection refused" in line]
    assert waiting, run.stderr
    assert all(re.search(r", retrying: connection refused \(attempt [234] of 4\)$", line) for line in waiting), run.stderr
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/" in run.stderr.splitlines()[-1]


SNAPSHOTS = [
    Snapshot(f"/data/exports/{LONG_NAME}", 12_300_000, 29_100_000, 84_000, 20_000, 2.4, 2, 2, 0, 0, None),
    Snapshot("e.csv", 29_100_000, 29_100_000, 1_084_000, 123_456, 0.0, 8, 8, 12, 3_456, None),
    Snapshot("e.csv", 0, 29_100_000, 0, 0, None, 0, 0, 1, 0, "retrying: too many connections (attempt 12)"),
    Snapshot("-", 12_300_000, None, 84_000, 20_000, None, 2, 2, 3, 17, "waiting for replicas"),
]


@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=["loading", "done", "waiting", "stdin"])
def test_the_line_never_outgrows_any_width(snapshot: Snapshot) -> None:
    """Every width from 1 to 220 columns: one line, shorter than the width; from 60 columns up
    the percent, rows/s and the ETA are in it (and why the load waits, when it does)."""
    for width in range(1, 221):
        line = render_line(snapshot, width).plain
        assert "\n" not in line
        assert cell_len(line) <= max(width - 1, 1), (width, line)
        if width >= 60 and snapshot.waiting:
            assert snapshot.waiting in line, (width, line)
        elif width >= 60 and snapshot.bytes_total:
            assert PROGRESS.search(line), (width, line)


def test_a_load_waiting_for_the_table_says_so(db: Db, tmp_path: Path) -> None:
    """With --wait-lock, a load that finds the table held by another one says that it waits
    for it, rather than nothing at all, until it gets the table."""
    db.script(
        """
        CREATE TABLE events (id bigint, name text);
        CREATE FUNCTION pace() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.id % 1000 = 0 THEN PERFORM pg_sleep(0.2); END IF; RETURN NEW; END $$;
        CREATE TRIGGER pace BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION pace();
        """
    )
    first = Background(db, "import", str(plain_csv(tmp_path / "a.csv", 20_000)), "-t", "events", "--batch-size", "1000")
    until(lambda: db.value("SELECT to_regclass('loader.batches')") and db.value("SELECT count(*) FROM loader.batches"))
    second = db.loader(
        "import", str(plain_csv(tmp_path / "b.csv", 10, start=20_001)), "-t", "events", "--wait-lock", "120",
        "--log-interval", "0.2",
    )
    assert second.code == 0, second.stderr
    assert first.wait() == 0
    waiting = [line for line in second.stderr.splitlines() if line.endswith('waiting for another load of "public"."events"')]
    assert waiting, second.stderr
