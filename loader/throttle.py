"""How fast, and how many at once: a token bucket and the pace of --max-rate over it, and the
concurrency controller behind --workers auto. All are small and pure (time and sleep are
injected), so they are tested by feeding them numbers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal


class TokenBucket:
    """Caps a pace at `rate` per second. Takers may go into debt and then wait it off, so a
    large take is paced rather than refused, and concurrent takers queue up fairly."""

    def __init__(
        self,
        rate: float,
        burst_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = max(rate * burst_seconds, 1.0)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def take(self, amount: float) -> None:
        self._refill()
        self._tokens -= amount
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


@dataclass(frozen=True)
class Pace:
    """--max-rate on the wire: each chunk of COPY data waits for its rows (newlines) or bytes."""

    bucket: TokenBucket
    unit: Literal["rows", "bytes"]

    async def take(self, chunk: memoryview) -> None:
        await self.bucket.take(len(chunk) if self.unit == "bytes" else bytes(chunk).count(b"\n"))


@dataclass
class _Round:
    started: float
    batches: int = 0
    rows: int = 0
    latency: float = 0.0
    errors: int = 0
    saturated: bool = False  # some batch of the round found every place taken


@dataclass
class ConcurrencyController:
    """AIMD over rounds of `limit` batches, as TCP does over round trips: one more batch in
    flight while throughput rises and latency stays flat; one fewer when latency climbs
    without more throughput; a multiplicative cut when batches fail transiently."""

    maximum: int
    minimum: int = 1
    limit: int = 1
    gain: float = 1.05  # throughput must rise 5% to count as rising
    climb: float = 1.2  # latency up 20% counts as climbing
    cut: float = 0.7
    clock: Callable[[], float] = time.monotonic
    history: list[tuple[float, int]] = field(default_factory=list)
    _round: _Round | None = None
    _previous: tuple[float, float] | None = None  # (throughput, latency) of the last round

    def __post_init__(self) -> None:
        self.limit = max(self.minimum, min(self.limit, self.maximum))
        self.history.append((self.clock(), self.limit))

    def record(self, latency: float, rows: int, ok: bool = True, saturated: bool = True) -> int:
        """Account one finished batch (or failed attempt); returns the limit to use now.
        `saturated`: the batch filled the last place, so the limit was what held the load back
        (when batches wait for the reader instead, a higher limit would change nothing)."""
        now = self.clock()
        current = self._round or _Round(started=now - latency)
        self._round = current
        current.batches += 1
        current.rows += rows if ok else 0
        current.latency += latency
        current.errors += 0 if ok else 1
        current.saturated = current.saturated or saturated
        if not ok:
            return self._set(max(self.minimum, min(self.limit - 1, int(self.limit * self.cut))), now)
        if current.batches < self.limit:
            return self.limit
        elapsed = max(now - current.started, 1e-9)
        throughput, mean_latency = current.rows / elapsed, current.latency / current.batches
        previous, self._previous = self._previous, (throughput, mean_latency)
        if previous is None:
            return self._set(self.limit + (1 if current.saturated else 0), now)
        rising = throughput > previous[0] * self.gain
        climbing = mean_latency > previous[1] * self.climb
        if rising and not climbing and current.saturated:
            return self._set(self.limit + 1, now)
        if climbing and not rising:
            return self._set(self.limit - 1, now)
        return self._set(self.limit, now)

    def _set(self, limit: int, now: float) -> int:
        limit = max(self.minimum, min(limit, self.maximum))
        if limit != self.limit:
            self.history.append((now, limit))
        self.limit = limit
        self._round = None
        return limit

    @property
    def summary(self) -> dict[str, int]:
        values = [limit for _, limit in self.history]
        return {"min": min(values), "max": max(values), "final": self.limit}


class Gate:
    """A semaphore whose number of places can change while batches hold them."""

    def __init__(self, places: int) -> None:
        self.places = places
        self.taken = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.taken < self.places)
            self.taken += 1

    async def release(self) -> None:
        async with self._changed:
            self.taken -= 1
            self._changed.notify_all()

    async def resize(self, places: int) -> None:
        async with self._changed:
            self.places = places
            self._changed.notify_all()
