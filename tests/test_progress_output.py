"""What a load shows while it runs: timestamped plain lines when stderr is not a terminal (as
in cron), at the pace --log-interval sets, and a live bar on a real terminal (run under tmux),
then the one-line summary.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from data import PLAIN_EVENTS, plain_csv
from helpers import LOADER, Db, assert_ids_once, until

TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{4}"


def test_progress_lines_in_cron_are_timestamped_and_plain(db: Db, tmp_path: Path) -> None:
    rows = 80_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    run = db.loader("import", str(csv), "-t", "events", "--max-rate", "20000", "--batch-size", "5000", "--log-interval", "1")
    assert run.code == 0, run.stderr
    assert "\x1b[" not in run.stderr
    assert "\r" not in run.stderr
    lines = run.stderr.splitlines()
    assert all(re.match(TIMESTAMP + " ", line) for line in lines), run.stderr
    progress = [line for line in lines if "rows/s" in line and "% of the file" in line]
    assert len(progress) >= 2, run.stderr
    assert re.search(r"loaded 80,000 of 80,000 rows", lines[-1]), run.stderr
    assert_ids_once(db, rows)


@pytest.mark.slow
def test_a_terminal_shows_a_live_bar_then_the_summary(db: Db, tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is needed to run the loader under a real terminal (apt-get install tmux)", pytrace=False)
    rows = 100_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    socket = tmp_path / "tmux.sock"
    code_file = tmp_path / "exit_code"
    loader = " ".join(shlex.quote(a) for a in (
        *LOADER, "import", str(csv), "-t", "events", "--max-rate", "20000", "--batch-size", "5000"))
    shell = f"cd {shlex.quote(str(tmp_path))} && DATABASE_URL={shlex.quote(db.dsn)} {loader}; echo $? > {shlex.quote(str(code_file))}; sleep 600"

    def tmux_run(*args: str) -> str:
        return subprocess.run([tmux, "-f", "/dev/null", "-S", str(socket), *args], capture_output=True, text=True, check=True, timeout=30).stdout

    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run([tmux, "-f", "/dev/null", "-S", str(socket), "new-session", "-d", "-s", "load", "-x", "160", "-y", "40", shell],
                   check=True, env=env, timeout=30)
    try:
        screens: list[str] = []

        def bar_shown() -> bool:
            screens.append(tmux_run("capture-pane", "-p", "-t", "load"))
            return "rows/s" in screens[-1] or code_file.exists()

        until(bar_shown, timeout=60, interval=0.1)
        assert "rows/s" in screens[-1], "no progress bar was seen:\n" + screens[-1]
        assert "e.csv" in screens[-1]
        until(code_file.exists, timeout=120)
        until(lambda: code_file.read_text().strip() != "", timeout=10)
        final = tmux_run("capture-pane", "-p", "-t", "load")
    finally:
        subprocess.run([tmux, "-f", "/dev/null", "-S", str(socket), "kill-server"], capture_output=True, timeout=30)
    assert code_file.read_text().strip() == "0", final
    assert re.search(r"loaded 100,000 of 100,000 rows into \"public\".\"events\"", final), final
    assert not re.search(TIMESTAMP, final), final  # a terminal gets no timestamps
    assert_ids_once(db, rows)


def test_a_log_interval_of_zero_is_refused_like_the_other_durations(db: Db, tmp_path: Path) -> None:
    """--log-interval must be more than 0 seconds (a zero would log a progress line at every
    turn of the event loop, thousands a second, into cron's mail): exit 2, one line naming
    the option, nothing loaded."""
    rows = 20_000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    run = db.loader("import", str(csv), "-t", "events", "--max-rate", "20000", "--batch-size", "5000", "--log-interval", "0")
    assert run.code == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr
    assert "--log-interval must be more than 0 seconds" in run.stderr
    assert db.value("SELECT count(*) FROM events") == 0
