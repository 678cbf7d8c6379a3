"""The pure parts behind --workers auto and --max-rate: the concurrency controller raises the
number of batches in flight while throughput rises and lowers it when latency climbs or a
batch fails, never leaving its bounds; the token bucket paces takes at its rate. Both take
their clock (and the bucket its sleep) as arguments, so they are tested by feeding them
numbers, without a server and without waiting."""

from __future__ import annotations

import asyncio
import random

import pytest

from helpers import Clock
from loader.throttle import ConcurrencyController, TokenBucket


def run_round(controller: ConcurrencyController, clock: Clock, latency: float, rows_per_batch: int) -> int:
    """`limit` batches started together, all finishing `latency` later; the new limit."""
    clock.now += latency
    limit = controller.limit
    for _ in range(limit):
        new = controller.record(latency, rows_per_batch)
    return new


def test_controller_raises_the_limit_round_by_round_while_throughput_rises_at_flat_latency() -> None:
    clock = Clock()
    controller = ConcurrencyController(maximum=6, limit=1, clock=clock)
    limits = [controller.limit]
    for _ in range(8):
        limits.append(run_round(controller, clock, latency=1.0, rows_per_batch=1000))
    assert limits == [1, 2, 3, 4, 5, 6, 6, 6, 6]
    assert controller.summary == {"min": 1, "max": 6, "final": 6}


def test_controller_lowers_the_limit_when_latency_climbs_without_more_throughput() -> None:
    clock = Clock()
    controller = ConcurrencyController(maximum=8, limit=4, clock=clock)
    run_round(controller, clock, latency=1.0, rows_per_batch=1000)  # the first round only raises
    assert controller.limit == 5
    latency = 1.0
    seen = [controller.limit]
    for _ in range(3):
        latency *= 2  # each round's batches take twice as long, for the same rows: no more throughput
        seen.append(run_round(controller, clock, latency=latency, rows_per_batch=1000))
    assert seen == [5, 4, 3, 2]


def test_controller_cuts_the_limit_on_a_failed_batch() -> None:
    clock = Clock()
    controller = ConcurrencyController(maximum=10, limit=8, clock=clock)
    assert controller.record(0.5, 0, ok=False) == 5  # 8 * 0.7
    assert controller.record(0.5, 0, ok=False) == 3
    assert controller.record(0.5, 0, ok=False) == 2
    assert controller.record(0.5, 0, ok=False) == 1
    assert controller.record(0.5, 0, ok=False) == 1  # never below the minimum


def test_controller_never_leaves_its_bounds() -> None:
    rnd = random.Random(1234)
    for _ in range(200):
        minimum = rnd.randint(1, 3)
        maximum = rnd.randint(minimum, 8)
        clock = Clock()
        controller = ConcurrencyController(maximum=maximum, minimum=minimum, limit=rnd.randint(0, 10), clock=clock)
        assert minimum <= controller.limit <= maximum
        for _ in range(300):
            clock.now += rnd.choice([0.0, 0.001, 0.1, 1.0, 5.0])
            limit = controller.record(rnd.choice([0.0, 0.01, 0.5, 2.0, 10.0]), rnd.choice([0, 1, 100, 5000]), ok=rnd.random() > 0.1)
            assert minimum <= limit <= maximum
            assert limit == controller.limit
        summary = controller.summary
        assert minimum <= summary["min"] <= summary["final"] <= summary["max"] <= maximum


class FakeTime:
    """A clock and an async sleep that only advances it."""

    def __init__(self) -> None:
        self.now = 50.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_paces_takes_at_its_rate() -> None:
    fake = FakeTime()
    bucket = TokenBucket(1000, clock=fake.clock, sleep=fake.sleep)  # 1000 units/s, 100 units of burst

    async def go() -> None:
        for _ in range(500):
            await bucket.take(20)

    asyncio.run(go())
    total = sum(fake.slept)
    # 10,000 units at 1000/s: 10 s, less the burst the bucket started with
    assert 10.0 - 0.1 - 1e-6 <= total <= 10.0 + 1e-6, total


def test_token_bucket_limits_bursts_to_its_capacity() -> None:
    fake = FakeTime()
    bucket = TokenBucket(1000, burst_seconds=0.1, clock=fake.clock, sleep=fake.sleep)
    assert bucket.capacity == 100

    async def go() -> None:
        fake.now += 3600  # an hour idle saves no more than the capacity
        await bucket.take(100)
        assert fake.slept == []
        await bucket.take(50)
        assert fake.slept == [pytest.approx(0.05)]
        fake.now += 10
        await bucket.take(400)  # more than the capacity at once: paced, not refused
        assert fake.slept[-1] == pytest.approx(0.3)

    asyncio.run(go())


def test_token_bucket_makes_concurrent_takers_queue() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the clock stands still: both take at one moment
        slept.append(seconds)
        await asyncio.sleep(0)

    bucket = TokenBucket(100, clock=lambda: 7.0, sleep=sleep)  # capacity 10

    async def go() -> None:
        await bucket.take(10)  # the burst
        await asyncio.gather(bucket.take(50), bucket.take(50))

    asyncio.run(go())
    # the second waits for its own share and for the first's: 0.5 s and 1 s
    assert sorted(slept) == [pytest.approx(0.5), pytest.approx(1.0)]
