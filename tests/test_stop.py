"""Stopping a load early: the first reason wins, and each watcher, given its clock, says
when and why. No server needed."""

from __future__ import annotations

import asyncio

from loader.errors import Interrupted, LoaderError, TryAgainLater
from loader.stop import Deadline, ReplicaWatch, Stop, on_interrupt


def test_the_first_reason_to_stop_wins() -> None:
    async def go() -> Stop:
        stop = Stop()
        assert not stop.requested
        stop.request(TryAgainLater("deadline"))
        stop.request(Interrupted("signal"))
        await asyncio.wait_for(stop.wait(), 1)
        return stop

    stop = asyncio.run(go())
    assert stop.requested and isinstance(stop.reason, TryAgainLater)


def test_a_signal_stops_with_a_resumable_reason() -> None:
    async def go() -> LoaderError:
        interrupt = asyncio.Event()
        interrupt.set()
        return await on_interrupt(interrupt)

    reason = asyncio.run(go())
    assert isinstance(reason, Interrupted) and "run the same command again" in reason.message


def test_the_deadline_waits_for_its_moment_then_says_try_again_later() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    reason = asyncio.run(Deadline(at=1_000.0, clock=lambda: 940.0, sleep=sleep)())
    assert slept == [60.0]
    assert isinstance(reason, TryAgainLater) and "the next run resumes" in reason.message
    asyncio.run(Deadline(at=1_000.0, clock=lambda: 2_000.0, sleep=sleep)())
    assert slept[-1] == 0.0  # a deadline already past stops at once


def test_a_lagging_replica_holds_batches_back_until_it_catches_up() -> None:
    lags = iter([0.5, 12.0, 15.0, 3.0, 0.1])
    said: list[str] = []
    seen: list[bool] = []

    async def go() -> None:
        stop = Stop()

        async def measure() -> float:
            try:
                return next(lags)
            except StopIteration:
                stop.request(None)
                return 0.0

        async def sleep(_: float) -> None:
            seen.append(watch.ok.is_set())

        watch = ReplicaWatch(10.0, None, measure, stop, said.append, clock=lambda: 0.0, sleep=sleep)
        assert await watch() is None

    asyncio.run(go())
    assert seen == [True, False, False, True, True, True]
    assert said[0].startswith("loader: waiting: a replica lags 12.0 s") and said[-1].startswith("loader: replicas caught up")


def test_a_replica_lagging_past_max_lag_wait_stops_the_load_cleanly() -> None:
    async def go() -> Stop:
        stop = Stop()

        async def measure() -> float:
            return 60.0

        async def sleep(_: float) -> None:
            pass

        watch = ReplicaWatch(10.0, 1.0, measure, stop, lambda _: None, clock=lambda: 0.0, sleep=sleep, poll=0.5)
        assert await watch() is None
        assert watch.ok.is_set()  # the batches waiting go on, and see the stop
        return stop

    stop = asyncio.run(go())
    assert stop.reason is not None and "--max-lag-wait 1 s" in stop.reason.message
