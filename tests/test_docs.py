"""The docs against the CLI: every option `--help` shows is in docs/options.md, and every
option docs/options.md names is one the CLI has. Also: every relative link of README.md and
docs/ leads to a file, and every #anchor to a heading. No database needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONS_DOC = ROOT / "docs" / "options.md"
COMMANDS = ("import", "retry-rejects", "status")

# A long option as a whole word: `--no-header` but not the `--no` of a word wrapped at "--no-".
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
# The first column of an option line of click's help: two spaces, then the names and the
# metavar ("-t, --table <str>", "--header / --no-header", "--load-name, --load-id NAME"),
# ended by two spaces before the description or by the end of the line.
OPTION_LINE = re.compile(r"^  (-\S.*?)(?: {2,}|$)")


def _help(command: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("LOADER_")}
    done = subprocess.run(
        [sys.executable, "-m", "loader", command, "--help"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli_options(command: str) -> set[str]:
    """The option names `loader COMMAND --help` defines (not those it only mentions)."""
    text = _help(command)
    names: set[str] = set()
    for line in text.splitlines():
        match = OPTION_LINE.match(line)
        if match:
            names.update(OPTION.findall(match.group(1)))
    # A changed help format must fail here, not pass with nothing to check.
    assert {"--table", "--dsn", "--help"} <= names, f"no options parsed from:\n{text}"
    return names


@pytest.fixture(scope="module")
def cli_options() -> dict[str, set[str]]:
    return {command: _cli_options(command) for command in COMMANDS}


def _documented() -> set[str]:
    return set(OPTION.findall(OPTIONS_DOC.read_text(encoding="utf-8")))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_help_is_documented(command: str, cli_options: dict[str, set[str]]) -> None:
    missing = sorted(cli_options[command] - _documented())
    assert not missing, f"`loader {command} --help` has options docs/options.md does not name: {missing}"


def test_every_documented_option_exists(cli_options: dict[str, set[str]]) -> None:
    known = set().union(*cli_options.values())
    stale = sorted(_documented() - known)
    assert not stale, f"docs/options.md names options no command has: {stale}"


# Links: [text](target) in README.md and docs/*.md.

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else HEADING.match(line)
        if match:
            title = match.group(1).lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"
