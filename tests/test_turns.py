"""The order in which an upsert's batches merge (modes.Turns): batches that may share a key
merge in file order, batches whose keys lie apart merge at once. No server needed: each
batch is a task that waits for its turn, as the sink's workers do."""

from __future__ import annotations

import asyncio

import pytest

from loader.modes import NO_KEYS, OutOfTurn, Span, Turns


def span(low: int, high: int) -> Span:
    return ((low,), (high,))


async def merging(turns: Turns, number: int, keys: Span | None) -> bool:
    """Whether batch `number` got its turn within a moment."""
    try:
        await asyncio.wait_for(asyncio.shield(turns.wait(number, keys)), 0.2)
    except TimeoutError:
        return False
    return True


def test_batches_whose_keys_lie_apart_merge_at_once_without_waiting_for_those_before() -> None:
    async def go() -> None:
        turns = Turns()
        assert await merging(turns, 1, span(1, 500))
        assert await merging(turns, 2, span(501, 1000))  # batch 1 is still merging
        assert await merging(turns, 3, NO_KEYS)  # no whole key: meets no batch
        turns.leave(2, committed=True)
        turns.leave(3, committed=True)
        turns.leave(1, committed=True)

    asyncio.run(go())


def test_a_batch_that_may_share_a_key_with_an_earlier_one_waits_for_its_commit() -> None:
    async def go() -> None:
        turns = Turns()
        assert await merging(turns, 1, span(1, 500))
        later = asyncio.create_task(turns.wait(2, span(400, 900)))
        await asyncio.sleep(0.1)
        assert not later.done()
        turns.leave(1, committed=True)
        await asyncio.wait_for(later, 1)

    asyncio.run(go())


def test_a_batch_waits_until_every_earlier_one_has_shown_its_keys() -> None:
    async def go() -> None:
        turns = Turns()
        later = asyncio.create_task(turns.wait(2, span(501, 1000)))
        await asyncio.sleep(0.1)
        assert not later.done(), "batch 1's keys are not known yet"
        assert await merging(turns, 1, span(1, 500))
        await asyncio.wait_for(later, 1)

    asyncio.run(go())


def test_keys_whose_order_is_unknown_merge_strictly_in_file_order() -> None:
    async def go() -> None:
        turns = Turns()
        assert await merging(turns, 1, None)
        assert not await merging(turns, 2, span(501, 1000))
        turns.leave(1, committed=True)
        assert await merging(turns, 2, span(501, 1000))
        assert not await merging(turns, 3, None)
        turns.leave(2, committed=True)
        assert await merging(turns, 3, None)

    asyncio.run(go())


def test_a_failed_batch_stops_the_later_ones_that_may_share_its_keys_and_no_other() -> None:
    async def go() -> None:
        turns = Turns()
        assert await merging(turns, 1, span(1, 500))
        turns.leave(1, committed=False)
        with pytest.raises(OutOfTurn, match="batch 1"):
            await turns.wait(2, span(300, 800))
        turns.leave(2, committed=False)
        assert await merging(turns, 3, span(801, 1000))
        with pytest.raises(OutOfTurn, match="batch 1"):
            await turns.wait(4, None)

    asyncio.run(go())


def test_a_batch_skipped_before_showing_its_keys_stops_every_later_one() -> None:
    async def go() -> None:
        turns = Turns()
        turns.leave(1, committed=False)
        with pytest.raises(OutOfTurn):
            await turns.wait(2, span(501, 1000))

    asyncio.run(go())


def test_a_resumed_load_merges_after_the_batches_earlier_runs_committed() -> None:
    async def go() -> None:
        turns = Turns(done={1, 3})
        assert await merging(turns, 2, span(1, 1000))
        assert not await merging(turns, 4, span(1, 1000))
        turns.leave(2, committed=True)
        assert await merging(turns, 4, span(1, 1000))

    asyncio.run(go())


def test_a_batch_keeps_the_keys_it_showed_first_when_a_later_attempt_cannot_tell() -> None:
    """An attempt that stages the batch piece by piece cannot tell its range; the batch's rows
    are the same, so the range its first attempt found still holds."""

    async def go() -> None:
        turns = Turns()
        assert await merging(turns, 1, span(1, 500))
        assert await merging(turns, 1, None)
        assert await merging(turns, 2, span(501, 1000))

    asyncio.run(go())
