"""The server's pressure: how many connections a load may take, and how far replicas lag.

The connection rule: a load never takes more than the free slots (max_connections, less
the reserved ones, less the backends in use, the load's own session included) minus a
margin kept free for everyone else: max(1, 5% of max_connections), rounded up.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from . import sql
from .errors import UsageError


@dataclass(frozen=True)
class ConnectionBudget:
    max_connections: int
    reserved: int
    in_use: int

    @property
    def margin(self) -> int:
        return max(1, math.ceil(self.max_connections * 0.05))

    @property
    def allowed(self) -> int:
        """Connections this load may still open."""
        return self.max_connections - self.reserved - self.in_use - self.margin

    def describe(self) -> str:
        return (
            f"the server has {self.max_connections} connection slots, {self.reserved} reserved, "
            f"{self.in_use} in use, and {self.margin} kept free for others"
        )


async def connection_budget(conn: asyncpg.Connection) -> ConnectionBudget:
    row = await conn.fetchrow(sql.CONNECTION_BUDGET)
    return ConnectionBudget(row["max_connections"], row["reserved"], row["in_use"])


class ReplicaLag:
    """How many seconds the slowest streaming replica is behind, from our own samples of the
    primary's WAL position: the replica has replayed up to some sample's position, and its
    lag is the age of the newest such sample (or of the oldest one, if it has not even
    reached that). pg_stat_replication's replay_lag stops moving while replay is paused;
    this keeps growing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, current: int, slowest: int | None) -> float:
        now = self._clock()
        self._samples.append((now, current))
        if slowest is None or slowest >= current:
            self._samples = deque([(now, current)])
            return 0.0
        while len(self._samples) > 1 and self._samples[1][1] <= slowest:
            self._samples.popleft()
        return now - self._samples[0][0]

    async def measure(self, conn: asyncpg.Connection) -> tuple[float, int]:
        """(lag in seconds, number of streaming replicas)."""
        row = await conn.fetchrow(sql.REPLICATION_POSITIONS)
        return self.observe(row["current"], row["slowest"]), row["replicas"]


async def require_monitor(conn: asyncpg.Connection) -> None:
    """Without pg_monitor, pg_stat_replication hides the replay positions: refuse rather than
    silently never wait."""
    if not await conn.fetchval(sql.CAN_MONITOR):
        raise UsageError(
            "--max-replica-lag needs to read the replicas' positions in pg_stat_replication: "
            "GRANT pg_monitor TO the loading user (or run without --max-replica-lag)"
        )
