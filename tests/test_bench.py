"""The benchmark runs end to end and reports only verified loads (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, Db


@pytest.mark.slow
def test_bench_runs_end_to_end_and_verifies_every_load(db: Db, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--rows", "20000", "--runs", "1", "--workers", "1,2", "--dsn", db.dsn,
         "--data-dir", str(tmp_path / "data"), "--out", str(out), "--files", "5", "--file-rows", "100"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["rows"] == 20000
    assert {"server_version", "shared_buffers", "synchronous_commit"} <= report["postgres"].keys()
    methods = {r["method"]: r for r in report["results"]}
    assert {"psql \\copy", "loader --workers 1", "loader --workers 2", "loader (defaults)"} <= methods.keys()
    for result in report["results"]:
        if result["note"] and "skipped" in result["note"]:
            continue
        assert result["verified"] is True, result
        assert result["rows_per_s"] > 0 and result["peak_rss_mb"] > 0 and result["cpu_s_per_million_rows"] > 0
        assert len(result["runs"]) == 1
    assert methods["psql \\copy"]["ratio_to_psql_copy"] == 1.0
    assert report["bad_rows"]["ratio"] > 0 and report["bad_rows_4_workers"]["ratio"] > 0 and report["bad_rows_distinct"]["ratio"] > 0
    assert len(report["bad_rows"]["targets"]) == 1
    indexed = {r["method"]: r for r in report["indexed"]["results"]}
    assert {"psql \\copy", "loader --workers 2", "loader --workers auto", "loader (defaults)"} == indexed.keys()
    assert all(r["verified"] is True for r in indexed.values()), indexed
    assert indexed["psql \\copy"]["ratio_to_psql_copy"] == 1.0
    assert list(report["indexed"]["targets"].values()) in ([True], [False])
    assert "method" in proc.stdout and "loader (defaults)" in proc.stdout
    file_set = report["file_set"]
    assert (file_set["files"], file_set["rows_per_file"]) == (5, 100)
    assert [r["verified"] for r in file_set["results"]] == [True, True], file_set
    assert file_set["loader_to_psql_loop"] > 0
