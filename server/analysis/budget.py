"""A server-wide budget of billed analyser API calls per second, shared fairly.

Rekognition enforces a per-account transactions-per-second quota per API; above it every
session's calls are throttled at once. An analysis makes up to three calls (DetectFaces
always, DetectLabels / DetectText at their cadence); the session worker asks this budget
for exactly the calls it is about to make, so the total stays under `rate` calls in any
rolling `window_s`. Only billed (cloud) backends use it: the offline backend is bounded by
its own worker pool.

Waiters are served first come, first served within a priority: every waiting "live"
request (a candidate being watched now) goes before any "background" one (a recorded
video), so a long video never starves live candidates. A session has at most one
analysis in flight and so at most one waiter, which makes the order a round robin: under
saturation every live session gets an equal share. No task: one timer handle wakes the
queue when the oldest grant leaves the window.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Priority = Literal["live", "background"]


class Budget(Protocol):
    """What the session worker asks of a budget: this module's `CallBudget` (one node) or
    `server.cluster.shared_budget.SharedBudget` (one budget for every node)."""

    rate_per_s: float

    @property
    def unlimited(self) -> bool: ...

    @property
    def waiting(self) -> int: ...

    async def acquire(self, calls: int = 1, priority: Priority = "live") -> None: ...

    def close(self) -> None: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class BudgetStats:
    granted: int = 0  # calls granted
    waited: int = 0  # requests that had to wait for room in the window
    wait_s_total: float = 0.0
    max_wait_s: float = 0.0


@dataclass(eq=False)
class Waiter:
    future: asyncio.Future[None]
    calls: int
    asked_at: float
    priority: Priority = "live"


class WaitQueue:
    """Waiters in budget order: every live one before any background one, first come
    first served within a priority. Shared by the local and the cluster's budget."""

    def __init__(self) -> None:
        self._queues: dict[Priority, deque[Waiter]] = {"live": deque(), "background": deque()}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def count(self, priority: Priority) -> int:
        return len(self._queues[priority])

    def add(self, waiter: Waiter) -> None:
        self._queues[waiter.priority].append(waiter)

    def head(self) -> Waiter | None:
        """The next waiter to serve (waiters cancelled while queued are dropped)."""
        for priority in ("live", "background"):
            queue = self._queues[priority]
            while queue and queue[0].future.done():  # cancelled while queued
                queue.popleft()
            if queue:
                return queue[0]
        return None

    def remove(self, waiter: Waiter) -> None:
        """Take `waiter` out, wherever it is (no-op when it is not queued)."""
        queue = self._queues[waiter.priority]
        if queue and queue[0] is waiter:
            queue.popleft()
        elif waiter in queue:
            queue.remove(waiter)

    def cancel_all(self) -> None:
        for queue in self._queues.values():
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.cancel()


class CallBudget:
    def __init__(self, rate_per_s: float, window_s: float = 1.0) -> None:
        """`rate_per_s` ≤ 0 means unlimited."""
        self.rate_per_s = rate_per_s
        self.window_s = window_s
        self._limit = max(1, math.floor(rate_per_s * window_s)) if rate_per_s > 0 else 0
        self._grants: deque[float] = deque(maxlen=self._limit or 1)  # one entry per call
        self._waiters = WaitQueue()
        self._timer: asyncio.TimerHandle | None = None
        self.stats = BudgetStats()

    @property
    def unlimited(self) -> bool:
        return self._limit == 0

    @property
    def limit(self) -> int:
        """Calls allowed in any window (0: unlimited)."""
        return self._limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _room(self, now: float, calls: int) -> float:
        """0 when `calls` grants are possible now, else seconds until they are."""
        free = self._limit - len(self._grants)
        if free >= calls:
            return 0.0
        # The (calls - free)-th oldest grant must leave the window first.
        oldest = self._grants[calls - free - 1]
        return max(0.0, oldest + self.window_s - now)

    def _expire(self, now: float) -> None:
        while self._grants and now - self._grants[0] >= self.window_s:
            self._grants.popleft()

    def _grant(self, now: float, calls: int, asked_at: float) -> None:
        self._grants.extend([now] * calls)
        self.stats.granted += calls
        wait = now - asked_at
        if wait > 0:
            self.stats.waited += 1
            self.stats.wait_s_total += wait
            self.stats.max_wait_s = max(self.stats.max_wait_s, wait)

    async def acquire(self, calls: int = 1, priority: Priority = "live") -> None:
        """Wait for the right to make `calls` API calls. Cancellation-safe: a cancelled
        waiter leaves the queue and consumes nothing."""
        if self.unlimited or calls <= 0:
            self.stats.granted += max(0, calls)
            return
        calls = min(calls, self._limit)  # a request larger than the window still passes
        now = time.monotonic()
        self._expire(now)
        if self._waiters.head() is None and self._room(now, calls) == 0.0:
            self._grant(now, calls, now)
            return
        waiter = Waiter(asyncio.get_running_loop().create_future(), calls, now, priority)
        self._waiters.add(waiter)
        self._schedule()
        try:
            await waiter.future
        except asyncio.CancelledError:
            self._waiters.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted and cancelled in the same tick: the calls were not made.
                for _ in range(waiter.calls):
                    if self._grants:
                        self._grants.pop()
                self.stats.granted -= waiter.calls
            self._reschedule()
            raise

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        head = self._waiters.head()
        if head is None:
            return
        now = time.monotonic()
        self._expire(now)
        delay = self._room(now, head.calls)
        self._timer = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = time.monotonic()
        self._expire(now)
        while (head := self._waiters.head()) is not None and self._room(now, head.calls) == 0.0:
            self._waiters.remove(head)
            self._grant(now, head.calls, head.asked_at)
            head.future.set_result(None)
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiters.cancel_all()

    def try_take(self, calls: int) -> float:
        """Take `calls` grants now if the window has room (0.0), else the seconds until
        it will; never waits and ignores the queue (a caller with its own queue in front
        of this budget, e.g. the shared budget's fallback, uses it)."""
        if self.unlimited or calls <= 0:
            return 0.0
        calls = min(calls, self._limit)
        now = time.monotonic()
        self._expire(now)
        wait = self._room(now, calls)
        if wait == 0.0:
            self._grant(now, calls, now)
        return wait

    def seed(self, ages: list[float]) -> None:
        """Count grants made `ages` seconds ago elsewhere (the shared budget's own recent
        grants, when it falls back to this one) as if made here."""
        now = time.monotonic()
        times = sorted(now - a for a in ages if 0 <= a < self.window_s)
        merged = sorted([*self._grants, *times])[-(self._limit or 1) :]
        self._grants.clear()
        self._grants.extend(merged)

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
