"""How many batches load at once: one object owns the gate and everything that resizes it.

With --workers N the gate has N places. With --workers auto a ConcurrencyController moves
it between 1 and --max-workers from each batch's latency and rows. Either way the server's
"too many connections" (53300) takes one place away for good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .throttle import ConcurrencyController, Gate

log = logging.getLogger("loader")


class Concurrency:
    """The gate batches pass to load, and its size."""

    def __init__(self, workers: int, auto: bool) -> None:
        self.controller = ConcurrencyController(maximum=workers, limit=min(2, workers)) if auto else None
        self.gate = Gate(self.controller.limit if self.controller else workers)
        self._resizing: set[asyncio.Task[None]] = set()  # kept, so that none is collected mid-way

    @property
    def places(self) -> int:
        return self.gate.places

    @property
    def summary(self) -> dict[str, int] | None:
        """--workers auto: the least, most and last batches in flight."""
        return self.controller.summary if self.controller is not None else None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[bool]:
        """Hold one place while a batch loads; yields whether it took the last free one (the
        limit, not the reader, held the load back)."""
        await self.gate.acquire()
        try:
            yield self.gate.taken >= self.gate.places
        finally:
            await self.gate.release()

    async def after_batch(self, started: float, rows: int, failures: int, saturated: bool) -> None:
        """A batch loaded after `failures` transient failures: --workers auto adapts."""
        if self.controller is None:
            return
        elapsed = time.monotonic() - started
        for _ in range(failures):
            self.controller.record(elapsed, 0, ok=False)
        await self.gate.resize(self.controller.record(elapsed, rows, saturated=saturated))

    def too_many_connections(self) -> None:
        """The server refused a connection: go on with one place fewer (at least one)."""
        if self.gate.places <= 1:
            return
        places = self.gate.places - 1
        log.warning("loader: the server has too many connections: going on with %d batches at once", places)
        task = asyncio.get_running_loop().create_task(self.gate.resize(places))
        self._resizing.add(task)
        task.add_done_callback(self._resizing.discard)
