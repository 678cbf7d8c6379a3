"""Why a load stops before its end, and the watchers that can stop it.

Every part that can stop a load (a signal, the deadline, the replicas' wait, --max-errors,
a failed batch, a lost table lock) gives its reason to one `Stop`, and the first reason
wins; every part that would start work asks it first. The watchers take their clock and
sleep as arguments, as TokenBucket does, so they are tested as plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from .errors import Interrupted, LoaderError, TryAgainLater

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Watcher = Callable[[], Awaitable["LoaderError | None"]]  # returns the reason to stop, or None

REPLICA_POLL_S = 0.5


class Stop:
    """The reason a load stops early; the first one given wins."""

    def __init__(self) -> None:
        self.reason: LoaderError | None = None
        self._requested = asyncio.Event()

    def request(self, reason: LoaderError | None = None) -> None:
        """Stop with `reason` (None: a worker failed, and raises its own error)."""
        if not self._requested.is_set():
            self.reason = reason
            self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    async def wait(self) -> None:
        await self._requested.wait()


async def on_interrupt(interrupt: asyncio.Event) -> LoaderError:
    """SIGINT or SIGTERM (set by the CLI): stop after the batches in flight."""
    await interrupt.wait()
    return Interrupted("interrupted: in-flight batches finished or rolled back; run the same command again to resume")


class Deadline:
    """--deadline: no batch starts after this moment (Unix time); the next run resumes."""

    def __init__(self, at: float, clock: Callable[[], float] = time.time, sleep: Sleep = asyncio.sleep) -> None:
        self.at, self._clock, self._sleep = at, clock, sleep

    async def __call__(self) -> LoaderError:
        await self._sleep(max(0.0, self.at - self._clock()))
        return _deadline_came(self.at)


def deadline_passed(at: float) -> LoaderError | None:
    """--deadline, asked between steps: the error that stops the run once it has come."""
    return _deadline_came(at) if time.time() >= at else None


def _deadline_came(at: float) -> LoaderError:
    return TryAgainLater(
        f"the deadline {datetime.fromtimestamp(at).astimezone():%Y-%m-%d %H:%M %Z} came: "
        "no new batch was started, and the next run resumes the load"
    )


class ReplicaWatch:
    """--max-replica-lag: holds new batches back (`ok` cleared) while the slowest streaming
    replica lags more than `limit` seconds; after `max_wait` seconds of waiting in all, stops
    the load cleanly (the batches in flight finish)."""

    def __init__(
        self,
        limit: float,
        max_wait: float | None,
        measure: Callable[[], Awaitable[float]],
        stop: Stop,
        say: Callable[[str], None],
        waiting: Callable[[bool], None] = lambda waiting: None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        poll: float = REPLICA_POLL_S,
    ) -> None:
        self.limit, self.max_wait, self._measure, self._stop, self._say = limit, max_wait, measure, stop, say
        self._waiting = waiting  # told when waiting starts and ends, for progress displays
        self._clock, self._sleep, self._poll = clock, sleep, poll
        self.ok = asyncio.Event()
        self.ok.set()

    async def __call__(self) -> LoaderError | None:
        waited, said = 0.0, 0.0
        while not self._stop.requested:
            lag = await self._measure()
            if lag > self.limit:
                if self.ok.is_set() or self._clock() - said > 30:
                    self._say(f"loader: waiting: a replica lags {lag:.1f} s, more than --max-replica-lag {self.limit:g} s")
                    said = self._clock()
                self.ok.clear()
                self._waiting(True)
                waited += self._poll
                if self.max_wait is not None and waited > self.max_wait:
                    self._stop.request(
                        LoaderError(
                            f"stopped: replicas lagged more than {self.limit:g} s for longer than "
                            f"--max-lag-wait {self.max_wait:g} s; the next run resumes the load"
                        )
                    )
                    self.ok.set()
                    return None
            elif not self.ok.is_set():
                self._say(f"loader: replicas caught up (lag {lag:.1f} s): going on")
                self.ok.set()
                self._waiting(False)
            await self._sleep(self._poll)
        return None


async def unless_interrupted(
    job: Awaitable[T], interrupt: asyncio.Event | None, until: Callable[[], bool] = lambda: False
) -> T:
    """Await `job`; a signal that comes before it finishes (or before `until()` is true) cancels
    it. Connecting, waiting for the table and planning are cancelled so; once batches flow, the
    load stops itself cleanly (see stream.Stream)."""
    task = asyncio.ensure_future(job)
    while interrupt is not None and not task.done() and not until():
        waiter = asyncio.ensure_future(interrupt.wait())
        await asyncio.wait({task, waiter}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if interrupt.is_set() and not until() and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise Interrupted("interrupted before loading began; nothing was loaded")
    return await task
