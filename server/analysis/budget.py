"""A server-wide budget of analyser calls per second, shared fairly between sessions.

Rekognition enforces a per-account transactions-per-second quota per API; above it every
session's calls are throttled at once. Each analysis makes at most one call of each API
(DetectFaces always, DetectLabels/DetectText at their cadence), so capping analyses per
second at the DetectFaces quota keeps every API under its quota.

The cap is exact: at most `rate` grants in any rolling `window_s` (a deque of the last
grant times, bounded by the rate). Waiters are served first come, first served; a session
has at most one analysis in flight and so at most one waiter, which makes the order a
round robin: under saturation every waiting session gets an equal share, and none starves.
No task: a single timer handle wakes the queue when the oldest grant leaves the window.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass


@dataclass
class BudgetStats:
    granted: int = 0
    waited: int = 0  # grants that had to wait for room in the window
    wait_s_total: float = 0.0
    max_wait_s: float = 0.0


class CallBudget:
    def __init__(self, rate_per_s: float, window_s: float = 1.0) -> None:
        """`rate_per_s` ≤ 0 means unlimited."""
        self.rate_per_s = rate_per_s
        self.window_s = window_s
        self._limit = max(1, math.floor(rate_per_s * window_s)) if rate_per_s > 0 else 0
        self._grants: deque[float] = deque(maxlen=self._limit or 1)
        self._waiters: deque[tuple[asyncio.Future[None], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.stats = BudgetStats()

    @property
    def unlimited(self) -> bool:
        return self._limit == 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _room(self, now: float) -> float:
        """0 when a grant is possible now, else seconds until one is."""
        if len(self._grants) < self._limit:
            return 0.0
        return max(0.0, self._grants[0] + self.window_s - now)

    def _grant(self, now: float, asked_at: float) -> None:
        self._grants.append(now)
        self.stats.granted += 1
        wait = now - asked_at
        if wait > 0:
            self.stats.waited += 1
            self.stats.wait_s_total += wait
            self.stats.max_wait_s = max(self.stats.max_wait_s, wait)

    async def acquire(self) -> None:
        """Wait for the right to make one analyser call. Cancellation-safe: a cancelled
        waiter leaves the queue and consumes nothing."""
        if self.unlimited:
            self.stats.granted += 1
            return
        now = time.monotonic()
        if not self._waiters and self._room(now) == 0.0:
            self._grant(now, now)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (future, now)
        self._waiters.append(entry)
        self._schedule()
        try:
            await future
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            raise

    def _schedule(self) -> None:
        if self._timer is not None or not self._waiters:
            return
        delay = self._room(time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self._waiters and self._room(now) == 0.0:
            future, asked_at = self._waiters.popleft()
            if future.done():  # cancelled while queued
                continue
            self._grant(now, asked_at)
            future.set_result(None)
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                future.cancel()

    def grants_in_window(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for t in self._grants if now - t < self.window_s)

    def to_json(self) -> dict[str, float | int]:
        s = self.stats
        return {
            "rate_per_s": self.rate_per_s,
            "granted": s.granted,
            "waited": s.waited,
            "waiting": self.waiting,
            "mean_wait_ms": round(1000 * s.wait_s_total / s.waited, 2) if s.waited else 0.0,
            "max_wait_ms": round(1000 * s.max_wait_s, 2),
        }
