"""The Rekognition call budget shared by every node of a cluster (REDIS_URL).

`ANALYSER_CALLS_PER_S` is one account's quota, so with N nodes it must be one budget,
not N. The budget is the same rule as a single node's (`server.analysis.budget`): at
most `rate` calls in any rolling `window_s`, counted over all three APIs. In Redis it is
a sliding-window log: a sorted set of grants scored by Redis' own clock (`TIME`, so the
nodes' clocks do not matter), trimmed, counted and added to by one Lua script, so two
nodes can never both take the last slot. A token bucket was not used: one of capacity
`rate` lets up to twice `rate` through in a second (a full bucket, then its refill), which
is exactly what the per-second quota throttles.

A log found missing — the cluster's first, or one Redis lost (a restart without
persistence, even one no command noticed) — grants nothing for one window: the grants
it lost, made in the last window by any node, have left the window before new ones
begin.

In front of Redis each node keeps its own queue with the single-node order: every
waiting live request before any background (recorded-video) one, first come first served
within a priority. Across nodes the same holds: a node whose live request must wait
marks it in Redis (until its slot), and background requests of other nodes wait while
such a mark stands, so a node busy with recorded videos never takes the slots live
candidates on another node are waiting for. Between nodes at the same priority, a freed
slot goes to whichever asks first (while the window is contended, a pump pauses up to a
millisecond between two grants, so one node does not take a whole freed window at once).

One pump task serves the head of that queue: it runs the script, and when the window is
full the script answers how long until the slot it needs is free, so
the pump sleeps exactly that long (at most one window) instead of polling; a node makes
one Redis call per grant or per expected slot, whatever its number of waiting sessions.

Redis unreachable: the pump falls back, without raising into any session worker, to a
local budget of `rate / max(CLUSTER_SIZE_HINT, nodes last seen)`, so N cut-off nodes
together still stay under the quota. The local budget starts full: it grants nothing for
one window, so no window holds both the shared grants made before the outage (up to the
whole budget, from any node) and local ones. It is logged once per outage, counted
(`proctor_budget_fallbacks_total`) and shown in /health (`redis.budget.mode`). When the
link is back, the local grants of the last window are written into the shared log with
the first request, so the shared window counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from typing import Any, Literal

from server.analysis.budget import BudgetStats, CallBudget, Priority, Waiter, WaitQueue
from server.cluster.redis_link import PREFIX, REDIS_ERRORS, RedisLink
from server.observability import Instruments

log = logging.getLogger(__name__)

Mode = Literal["shared", "local-fallback"]
#: A live request that waits for the shared window keeps background requests of every
#: node waiting until its slot, plus this (time for its node to wake and take it, on a
#: busy machine too; its node clears the mark as soon as it has no live request left).
LIVE_MARGIN_S = 0.25

# KEYS: the grant log (sorted set), its member counter, the live waiters (sorted set:
# node → until when it waits), the log's start (when grants may begin: a log found
# missing — the first ever, or one Redis lost — grants nothing for one window, since the
# lost grants of the last window are not in it). ARGV: limit, window (µs), calls, live
# (1/0), node, more live requests queued behind this one on that node (1/0), margin
# (µs), then the ages (µs) of grants this node made that the log lacks (made from its
# local share while Redis was unreachable to it).
# Answers {1, 0, first member, now} when granted, else {0, µs to wait, 0, now} (now:
# Redis' clock, µs). A background request waits while another node has live requests
# waiting; a live request that must wait says so (until its slot, plus the margin).
# Numbers go back to Redis through %.0f: Lua's default formatting keeps 14 digits only.
TAKE_LUA = """
local zkey, skey, lkey, bkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local calls = tonumber(ARGV[3])
local live = ARGV[4] == '1'
local node = ARGV[5]
local more_live = ARGV[6] == '1'
local margin = tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function s(x) return string.format('%.0f', x) end
local begins = redis.call('GET', bkey)
if not begins then
  begins = now + window
  redis.call('SET', bkey, s(begins))
else
  begins = tonumber(begins)
end
for i = 8, #ARGV do
  local seq = redis.call('INCR', skey)
  redis.call('ZADD', zkey, s(now - tonumber(ARGV[i])), s(seq))
end
redis.call('ZREMRANGEBYSCORE', zkey, '-inf', s(now - window))
redis.call('ZREMRANGEBYSCORE', lkey, '-inf', s(now))
if now < begins then
  return {0, begins - now, 0, now}
end
if not live then
  local marks = redis.call('ZRANGE', lkey, 0, 1, 'WITHSCORES')
  for i = 1, #marks, 2 do
    if marks[i] ~= node then
      return {0, tonumber(marks[i + 1]) - now, 0, now}
    end
  end
end
local n = redis.call('ZCARD', zkey)
if n + calls <= limit then
  local last = redis.call('INCRBY', skey, calls)
  for i = 1, calls do
    redis.call('ZADD', zkey, s(now), s(last - calls + i))
  end
  redis.call('PEXPIRE', zkey, math.ceil(window / 1000) + 1000)
  redis.call('PEXPIRE', skey, 86400000)
  if live then
    if more_live then
      redis.call('ZADD', lkey, s(now + margin), node)
    else
      redis.call('ZREM', lkey, node)
    end
  end
  return {1, 0, last - calls + 1, now}
end
local idx = n + calls - limit - 1
local oldest = redis.call('ZRANGE', zkey, idx, idx, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if live then
  redis.call('ZADD', lkey, s(now + wait + margin), node)
  redis.call('PEXPIRE', lkey, math.ceil((window + margin) / 1000) + 1000)
end
return {0, wait, 0, now}
"""


class SharedBudget:
    def __init__(
        self,
        rate_per_s: float,
        link: RedisLink,
        instruments: Instruments,
        *,
        window_s: float = 1.0,
        size_hint: int = 1,
        key: str = PREFIX + "budget:analyser_calls",
        live_margin_s: float = LIVE_MARGIN_S,
    ) -> None:
        """`rate_per_s` ≤ 0 means unlimited (no Redis involved)."""
        self.live_margin_s = live_margin_s
        self.rate_per_s = rate_per_s
        self.window_s = window_s
        self._limit = max(1, math.floor(rate_per_s * window_s)) if rate_per_s > 0 else 0
        self.link = link
        self.instruments = instruments
        self.size_hint = max(1, size_hint)
        self._keys = [key, key + ":seq", key + ":live", key + ":begins"]
        self._take_script = link.client.register_script(TAKE_LUA)
        self._waiters = WaitQueue()
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self.mode: Mode = "shared"
        self._fallback: CallBudget | None = None
        # Grants made by the local share (monotonic times), not yet written into Redis.
        self._local_grants: deque[float] = deque()
        self.fallbacks = 0
        self.redis_calls = 0
        #: When Redis granted the latest shared grant, on Redis' clock (s; measurements).
        self.last_grant_at = 0.0
        self.stats = BudgetStats()
        self._closed = False
        instruments.budget_shared.set(1)

    @property
    def unlimited(self) -> bool:
        return self._limit == 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def fallback_rate_per_s(self) -> float:
        return self.rate_per_s / max(self.size_hint, self.link.nodes_seen)

    # --- asking ------------------------------------------------------------------------

    async def acquire(self, calls: int = 1, priority: Priority = "live") -> None:
        """Wait for the right to make `calls` API calls, counted against the cluster's
        budget (or this node's share of it while Redis is down). Raises nothing but
        CancelledError; a cancelled waiter leaves the queue."""
        if self.unlimited or calls <= 0:
            self.stats.granted += max(0, calls)
            return
        if self._closed:
            raise asyncio.CancelledError("the budget is closed")
        waiter = Waiter(
            asyncio.get_running_loop().create_future(),
            min(calls, self._limit),
            time.monotonic(),
            priority,
        )
        self._waiters.add(waiter)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="shared-budget")
        self._wake.set()
        try:
            await waiter.future
        except asyncio.CancelledError:
            self._waiters.remove(waiter)
            raise

    # --- the pump ----------------------------------------------------------------------

    async def _run(self) -> None:
        refused_at = -math.inf  # when the window last made this node wait
        while not self._closed:
            head = self._waiters.head()
            if head is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                wait, first = await self._take(head)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stall every session: local share
                log.exception("shared budget error; granting from the local share")
                self.instruments.internal_errors.labels(where="budget").inc()
                wait, first = self._take_local(head.calls), None
            if wait <= 0.0:
                self._waiters.remove(head)
                if head.future.done():  # cancelled while the grant was being taken
                    if first is not None:
                        await self._release(first, head.calls)
                    continue
                self._granted(head)
                head.future.set_result(None)
                if self.mode == "shared" and time.monotonic() - refused_at < self.window_s:
                    # Contended: let the other nodes' pumps ask too.
                    await asyncio.sleep(random.uniform(0.0, 0.001))
                continue
            refused_at = time.monotonic()
            # Sleep until the slot is free (the script said when), never longer than a
            # window; a little jitter so nodes woken by the same slot do not all ask at
            # the same instant.
            await asyncio.sleep(min(wait, self.window_s) + random.uniform(0.0, 0.002))

    async def _take(self, head: Waiter) -> tuple[float, int | None]:
        """(0, first member) when granted, else (seconds to wait, None)."""
        calls = head.calls
        if self.mode == "shared" and not self.link.up and self.link.checked:
            self._enter_fallback("Redis link down")
        if self.mode == "local-fallback" and self.link.up:
            self._leave_fallback()
        if self.mode == "shared":
            now = time.monotonic()
            backfill = [now - t for t in self._local_grants if now - t < self.window_s]
            live = head.priority == "live"
            more_live = live and self._waiters.count("live") > 1
            args: list[int | str] = [
                self._limit,
                int(self.window_s * 1e6),
                calls,
                int(live),
                self.link.node_id,
                int(more_live),
                int(self.live_margin_s * 1e6),
            ]
            args += [int(age * 1e6) for age in backfill]
            try:
                async with asyncio.timeout(self.link.settings.redis_timeout_s * 2 + 0.1):
                    reply = await self._take_script(keys=self._keys, args=args)
                self.redis_calls += 1
            except REDIS_ERRORS as exc:
                self.link.failed("budget", exc)
                self._enter_fallback(f"{type(exc).__name__}: {exc}")
            else:
                self._local_grants.clear()  # written in with this call
                granted, wait_us, first, now_us = (int(x) for x in reply)
                if granted:
                    self.last_grant_at = now_us / 1e6
                    return 0.0, first
                return max(0.0, wait_us / 1e6), None
        return self._take_local(calls), None

    def _take_local(self, calls: int) -> float:
        wait = self._local().try_take(calls)
        if wait == 0.0:
            now = time.monotonic()
            grants = self._local_grants
            while grants and now - grants[0] >= self.window_s:
                grants.popleft()
            grants.extend([now] * calls)
        return wait

    async def _release(self, first: int, calls: int) -> None:
        """Give back a grant nobody will use (best effort)."""
        with contextlib.suppress(*REDIS_ERRORS):
            async with asyncio.timeout(self.link.settings.redis_timeout_s):
                await self.link.client.zrem(self._keys[0], *range(first, first + calls))

    def _granted(self, waiter: Waiter) -> None:
        s = self.stats
        s.granted += waiter.calls
        wait = time.monotonic() - waiter.asked_at
        if wait > 0.0005:
            s.waited += 1
            s.wait_s_total += wait
            s.max_wait_s = max(s.max_wait_s, wait)

    # --- fallback ------------------------------------------------------------------------

    def _local(self) -> CallBudget:
        if self._fallback is None:
            self._fallback = CallBudget(self.fallback_rate_per_s, self.window_s)
            # Full for one window (see the module's docstring), plus what this node
            # granted locally and could not write into Redis yet.
            now = time.monotonic()
            ages = [now - t for t in self._local_grants]
            self._fallback.seed([0.0] * self._fallback.limit + ages)
        return self._fallback

    def _enter_fallback(self, reason: str) -> None:
        if self.mode == "local-fallback":
            return
        self.mode = "local-fallback"
        self._fallback = None
        local = self._local()
        self.fallbacks += 1
        self.instruments.budget_fallbacks.inc()
        self.instruments.budget_shared.set(0)
        log.warning(
            "shared call budget unreachable (%s): this node grants at most %.2f calls/s "
            "(%.2f / %d nodes) until Redis is back",
            reason,
            local.rate_per_s,
            self.rate_per_s,
            max(self.size_hint, self.link.nodes_seen),
        )

    def _leave_fallback(self) -> None:
        self.mode = "shared"
        self._fallback = None
        self.instruments.budget_shared.set(1)
        log.info("shared call budget reachable again: back on the cluster's budget")

    # --- the rest ------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        self._waiters.cancel_all()

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "rate_per_s": self.rate_per_s,
            "scope": "cluster",
            "mode": self.mode,
            "fallback_rate_per_s": round(self.fallback_rate_per_s, 3),
            "fallbacks": self.fallbacks,
            "redis_calls": self.redis_calls,
            "granted": s.granted,
            "waited": s.waited,
            "waiting": self.waiting,
            "mean_wait_ms": round(1000 * s.wait_s_total / s.waited, 2) if s.waited else 0.0,
            "max_wait_ms": round(1000 * s.max_wait_s, 2),
        }
