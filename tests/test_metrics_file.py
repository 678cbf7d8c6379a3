"""--metrics-file: after every run, success or failure, a Prometheus textfile that
node_exporter's textfile collector accepts (checked by a strict reader of the format), with
the run's outcome and counts, replaced atomically (never rewritten in place).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from data import PLAIN_EVENTS, plain_csv
from helpers import Db

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*,?)?\}})? (\S+)(?: -?\d+)?$")
_VALUE = re.compile(r"^(?:[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]?Inf|NaN)$")


def parse_prometheus(text: str) -> dict[str, tuple[dict[str, str], float]]:
    """A strict reader of the Prometheus text format (what node_exporter's textfile collector
    accepts): HELP and TYPE before a metric's samples, one TYPE per metric, valid samples."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    helped: set[str] = set()
    typed: dict[str, str] = {}
    samples: dict[str, tuple[dict[str, str], float]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helped, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            parts = line.split(" ")
            assert len(parts) == 4 and re.fullmatch(_NAME, parts[2]), line
            assert parts[3] in {"counter", "gauge", "histogram", "summary", "untyped"}, line
            assert parts[2] not in typed and parts[2] not in samples, f"line {number}: TYPE after samples: {line}"
            typed[parts[2]] = parts[3]
        elif line.startswith("#"):
            continue
        else:
            match = _SAMPLE.match(line)
            assert match, f"line {number} is not a sample: {line!r}"
            name, labels, value = match.groups()
            assert _VALUE.match(value), line
            assert name in typed, f"{name} has no TYPE"
            assert name not in samples, f"{name} appears twice with the same labels"
            pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"', labels or ""))
            samples[name] = (pairs, float(value))
    return samples


def test_metrics_file_after_success_and_failure_is_valid_and_replaced_atomically(db: Db, tmp_path: Path) -> None:
    rows = 5000
    db.sql(PLAIN_EVENTS.format(name="events"))
    csv = plain_csv(tmp_path / "e.csv", rows)
    folder = tmp_path / "textfile"
    folder.mkdir()
    metrics = folder / "loader.prom"

    ok = db.loader("import", str(csv), "-t", "events", "--metrics-file", str(metrics))
    assert ok.code == 0, ok.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["loader.prom"]
    first = parse_prometheus(metrics.read_text())
    first_inode = metrics.stat().st_ino
    assert first["loader_last_run_success"] == ({"table": "events", "mode": "append"}, 1.0)
    assert first["loader_last_run_exit_code"][1] == 0
    assert first["loader_last_run_rows_read"][1] == rows
    assert first["loader_last_run_rows_loaded"][1] == rows
    assert first["loader_last_run_rows_rejected"][1] == 0
    assert first["loader_last_run_end_timestamp_seconds"][1] == pytest.approx(time.time(), abs=120)
    assert first["loader_last_run_duration_seconds"][1] > 0
    assert metrics.stat().st_mode & 0o777 == 0o644

    failed = db.loader("import", str(csv), "-t", '"Missing"', "--metrics-file", str(metrics))  # a quoted label
    assert failed.code == 2, failed.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["loader.prom"]
    second = parse_prometheus(metrics.read_text())
    assert metrics.stat().st_ino != first_inode, "the metrics file was rewritten in place, not replaced"
    assert second["loader_last_run_success"] == ({"table": '\\"Missing\\"', "mode": "append"}, 0.0)
    assert second["loader_last_run_exit_code"][1] == 2
    assert second["loader_last_run_rows_loaded"][1] == 0
    assert set(second) == set(first)
