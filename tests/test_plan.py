"""What a run does, decided from the ledger's latest load of the same source and table: no
server needed, the decision is a function."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from loader.errors import UsageError
from loader.plan import Action, Decision, Previous, decide

CUT = {"delimiter": ",", "quote": '"', "escape": '"', "encoding": "utf-8", "header": True, "batch_rows": 50_000, "batch_bytes": 4 << 20}
DONE = datetime(2026, 11, 25, 2, 15, tzinfo=UTC)


def previous(state: str, size: int | None = 100, mtime: float | None = 1.5, boundaries: dict[str, object] = CUT) -> Previous:
    return Previous("abc", state, size, mtime, DONE if state == "succeeded" else None, dict(boundaries))


def run(prev: Previous | None, *, restart: bool = False, force: bool = False, size: int | None = 100, mtime: float | None = 1.5) -> Decision:
    return decide(prev, restart=restart, force=force, size=size, mtime=mtime, boundaries=CUT, source="data.csv")


def test_a_source_never_loaded_starts_a_new_load() -> None:
    assert run(None) == Decision(Action.NEW)


def test_an_unfinished_load_is_resumed_whatever_the_file_looks_like() -> None:
    for state in ("running", "failed", "interrupted"):
        assert run(previous(state), size=999, mtime=9.0) == Decision(Action.RESUME, "abc")


def test_a_finished_load_of_the_untouched_file_leaves_nothing_to_do() -> None:
    decision = run(previous("succeeded"))
    assert (decision.action, decision.load_id) == (Action.NOTHING, "abc")
    assert decision.note == "already loaded by load abc (finished 2026-11-25 02:15:00 UTC)"


def test_a_finished_load_of_a_touched_file_is_verified_not_loaded_again() -> None:
    assert run(previous("succeeded"), mtime=2.5) == Decision(Action.VERIFY, "abc")
    assert run(previous("succeeded"), size=None) == Decision(Action.VERIFY, "abc")  # stdin: no size to compare


def test_restart_and_force_start_anew() -> None:
    assert run(previous("interrupted"), restart=True) == Decision(Action.NEW)
    assert run(previous("succeeded"), force=True) == Decision(Action.NEW)
    assert run(previous("interrupted"), force=True) == Decision(Action.RESUME, "abc")  # --force is for finished loads


@pytest.mark.parametrize(
    ("state", "advice"),
    [("interrupted", "run with the same options to resume it (or --restart"), ("succeeded", "pass --force")],
)
def test_other_batch_boundaries_are_refused_naming_them(state: str, advice: str) -> None:
    cut = {**CUT, "batch_rows": 1000}
    with pytest.raises(UsageError) as refused:
        run(previous(state, mtime=2.5, boundaries=cut))
    assert "batch_rows 1000 (now 50000)" in refused.value.message
    assert advice in refused.value.message
