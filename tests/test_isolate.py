"""The slow path's piece sizing: a batch goes whole until bad rows are dense enough to doom it.
(Where records end and which one the server names: tests/test_records.py.)"""

from __future__ import annotations

from loader.isolate import ErrorRate


def test_a_batch_is_sent_whole_until_bad_rows_are_dense_enough_to_doom_it() -> None:
    rate = ErrorRate()
    assert not rate.doomed(10_000)  # nothing seen yet: try the fast path
    rate.bad, rate.rows = 1, 10_000
    assert not rate.doomed(10_000)  # one bad row per batch expected: usually worth a try
    rate.bad, rate.rows = 3, 1_000
    assert rate.doomed(1_000) and not rate.doomed(100)
