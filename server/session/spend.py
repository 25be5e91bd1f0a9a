"""Spend caps: new sessions per client address per minute, and daily caps on billed
Rekognition calls and LLM tokens (SPEC "Limits on everything that comes in").

Everything is counted in the store, so a restart does not reset it: each start is a row
(`session_starts`), written as it happens; daily usage (`usage`, per UTC day) is counted
in memory at once and its increments are written through the store's writer queue within
`FLUSH_INTERVAL_S` (and on stop). At start, the last minute's starts and today's usage
are loaded back.

Rekognition calls are reserved before an analysis (the calls it plans) and settled with
the calls the observation says were billed, so concurrent sessions never overshoot the
cap. LLM tokens are only known after a call: a report is narrated while today's total is
below the cap, so the call that crosses it counts in full.

In a cluster (`shared`: `server.cluster.shared_spend.SharedCounters`, REDIS_URL) the caps
are the cluster's: checks and counts go through Redis scripts (atomic across nodes) and
the figures this node shows are the cluster's, refreshed every `FLUSH_INTERVAL_S`; the
store stays the durable record (each node writes its own share) and seeds Redis when it
restarts. Redis unreachable: this store-based counting, with every node's rows in the
shared store re-read every `FLUSH_INTERVAL_S`, until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from server.config import Settings
from server.errors import RateLimited
from server.observability import Instruments
from server.session.store import Store, StoreError

if TYPE_CHECKING:
    from server.cluster.shared_spend import SharedCounters

log = logging.getLogger(__name__)

Kind = Literal["rekognition_calls", "llm_tokens"]
#: Where a Rekognition reservation was counted: this node, or the cluster (Redis).
Held = Literal["local", "shared"]
KINDS: tuple[Kind, ...] = ("rekognition_calls", "llm_tokens")
#: The per-address start window.
START_WINDOW_S = 60.0
#: Daily usage increments reach the store at most this late (a crash loses at most this).
FLUSH_INTERVAL_S = 1.0
#: Reasons recorded when a cap is reached (report notes, llm.error, metrics' `cap`).
REKOGNITION_CAP = "rekognition_daily_cap"
LLM_CAP = "daily_token_cap"


class SharedUnavailable(Exception):
    """The cluster's counters could not be reached (already logged and counted)."""


def utc_day(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%d")


class SpendCaps:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        instruments: Instruments,
        shared: SharedCounters | None = None,
    ) -> None:
        self.starts_per_minute = max(0, settings.session_starts_per_minute)
        self.caps: dict[Kind, int] = {
            "rekognition_calls": max(0, settings.rekognition_daily_calls),
            "llm_tokens": max(0, settings.llm_daily_tokens),
        }
        self.store = store
        self.instruments = instruments
        self.shared = shared
        self.day = utc_day()
        self._used: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._unsaved: dict[tuple[str, Kind], int] = {}
        self._reserved = 0  # Rekognition calls of analyses in flight (counted here)
        self._starts: dict[str, deque[float]] = {}
        self._swept_at = time.time()
        self._flusher: asyncio.Task[None] | None = None
        # Cluster mode: today's store figures (all nodes' rows: a floor for Redis), and
        # this node's increments not yet added in Redis.
        self._stored: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._pending: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._wake = asyncio.Event()
        self._resyncing: asyncio.Task[None] | None = None
        for kind in KINDS:
            instruments.usage_cap.labels(kind=kind).set(self.caps[kind])
            instruments.usage_today.labels(kind=kind).set(0)

    @property
    def mode(self) -> str:
        """node: counted here and in the store; shared: the cluster's figures in Redis;
        local-fallback: a cluster node counting from the store while Redis is down."""
        if self.shared is None:
            return "node"
        return "shared" if self.shared.up else "local-fallback"

    def _shared_up(self) -> SharedCounters | None:
        return self.shared if self.shared is not None and self.shared.up else None

    def _redis_failed(self) -> None:
        self._pending = dict.fromkeys(KINDS, 0)  # the store has them: its figure wins

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load today's usage and the last minute's starts (after the store is open)."""
        now = time.time()
        usage = await self.store.usage_on(self.day)
        for kind in KINDS:
            self._used[kind] = self._stored[kind] = int(usage.get(kind, 0))
            self._gauge(kind)
        await self._load_starts(now)
        await self.store.prune_starts(now - START_WINDOW_S)
        if any(self._used.values()):
            log.info("spend today so far: %s", self._used)
        if self.shared is not None:
            self.shared.link.on_up(self.resync)
        self._flusher = asyncio.create_task(self._flush_loop(), name="spend-flusher")

    async def _load_starts(self, now: float) -> None:
        starts: dict[str, deque[float]] = {}
        for address, at in await self.store.starts_since(now - START_WINDOW_S):
            starts.setdefault(address, deque()).append(at)
        self._starts = starts

    async def stop(self) -> None:
        """Write what is still unsaved (before the store closes)."""
        for task in (self._flusher, self._resyncing):
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        self._flusher = self._resyncing = None
        await self._flush()

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_INTERVAL_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
                now = time.time()
                if self.shared is not None:
                    await self._refresh(now)
                if now - self._swept_at >= START_WINDOW_S:
                    self._swept_at = now
                    self._sweep(now)
                    await self.store.prune_starts(now - START_WINDOW_S)
            except Exception:  # the flusher must keep flushing
                log.exception("spend counters could not be saved")

    async def _flush(self) -> None:
        unsaved, self._unsaved = self._unsaved, {}
        for (day, kind), amount in unsaved.items():
            await self.store.add_usage(day, kind, amount)

    async def _refresh(self, now: float) -> None:
        """Cluster mode: re-read today's store figures (every node's rows); with Redis,
        add this node's pending increments and take the cluster's totals (never below the
        store's); without, count from the store (the other nodes' rows included)."""
        self._today()
        usage = await self.store.usage_on(self.day)
        for kind in KINDS:
            self._stored[kind] = int(usage.get(kind, 0))
        shared = self._shared_up()
        if shared is None:
            for kind in KINDS:
                self._used[kind] = max(self._used[kind], self._stored[kind])
                self._gauge(kind)
            await self._load_starts(now)
            return
        await self._sync_shared(shared)

    async def _sync_shared(self, shared: SharedCounters, kinds: tuple[Kind, ...] = KINDS) -> None:
        try:
            for kind in kinds:
                pending, self._pending[kind] = self._pending[kind], 0
                if pending:
                    await shared.add(self.day, kind, pending, self._stored[kind])
                self._used[kind] = await shared.raise_to(self.day, kind, self._stored[kind])
                self._gauge(kind)
        except SharedUnavailable:
            self._redis_failed()

    async def resync(self) -> None:
        """Redis is reachable (at start, after an outage or a Redis restart): this
        node's unsaved usage goes to the store, then Redis gets at least the store's
        figures for today and the store's starts of the last minute."""
        if self.shared is None:
            return
        await self._flush()
        try:
            await self.store.flush()
        except StoreError as exc:
            log.warning("spend resync: %s", exc)
        now = time.time()
        self._today()
        usage = await self.store.usage_on(self.day)
        for kind in KINDS:
            self._stored[kind] = int(usage.get(kind, 0))
        self._pending = dict.fromkeys(KINDS, 0)  # the store's figure includes them
        await self._sync_shared(self.shared)
        rows = await self.store.starts_since(now - START_WINDOW_S)
        try:
            await self.shared.seed_starts(rows, START_WINDOW_S)
        except SharedUnavailable:
            self._redis_failed()

    # --- session starts per client address -------------------------------------------------

    def _refuse(self, retry_s: float) -> RateLimited:
        self.instruments.spend_cap_hits.labels(cap="session_starts").inc()
        retry = math.ceil(retry_s)
        return RateLimited(
            f"more than {self.starts_per_minute} new sessions a minute from this address; "
            f"retry in {max(1, retry)} s",
            retry_after_s=retry,
        )

    async def _shared_start(self, address: str, mode: str, now: float) -> float | None:
        """The cluster's answer (0.0 or seconds to wait), None when Redis is not there
        or has not got the store's starts yet (then counted from the store)."""
        shared = self._shared_up()
        if shared is None:
            return None
        try:
            wait = await shared.start(address, mode, now, START_WINDOW_S, self.starts_per_minute)
        except SharedUnavailable:
            self._redis_failed()
            wait = None
        else:
            if wait is None:  # Redis lost them: write them back, meanwhile the store's
                self._resync_soon()
        if wait is None:
            await self._load_starts(now)  # every node's starts, from the store
        return wait

    def _resync_soon(self) -> None:
        if self._resyncing is None or self._resyncing.done():
            self._resyncing = asyncio.create_task(self._resync_quietly(), name="spend-resync")

    async def _resync_quietly(self) -> None:
        try:
            await self.resync()
        except Exception:  # the next start asks again
            log.exception("spend counters could not be written back to Redis")

    async def check_start(self, address: str | None) -> None:
        """Raise 429 `rate_limited` (with Retry-After) when `address` has started its
        allowance of sessions in the last minute (over the cluster, in cluster mode).
        None (a start from inside the server, e.g. a resumed video) is never limited."""
        if not self.starts_per_minute or not address:
            return
        now = time.time()
        wait = await self._shared_start(address, "check", now)
        if wait is None:
            wait = self._local_wait(address, now)
        if wait > 0:
            raise self._refuse(wait)

    def _local_wait(self, address: str, now: float) -> float:
        recent = self._recent(address, now)
        if recent is not None and len(recent) >= self.starts_per_minute:
            return recent[0] + START_WINDOW_S - now
        return 0.0

    async def record_start(self, address: str | None, *, shared: bool = True) -> None:
        if not self.starts_per_minute or not address:
            return
        now = time.time()
        if shared:
            await self._shared_start(address, "record", now)
        await self._record_here(address, now)

    async def _record_here(self, address: str, now: float) -> None:
        self._starts.setdefault(address, deque()).append(now)
        try:
            await self.store.record_start(address, now)
        except StoreError as exc:  # counted in memory all the same
            log.warning("session start not stored: %s", exc)

    async def admit_start(self, address: str | None) -> None:
        """Check and count one start at once (atomic: locally no await between them; in
        a cluster one Redis script)."""
        if not self.starts_per_minute or not address:
            return
        now = time.time()
        wait = await self._shared_start(address, "admit", now)
        if wait is None:  # counted here (and in the store) only
            wait = self._local_wait(address, now)
        if wait > 0:
            raise self._refuse(wait)
        await self._record_here(address, now)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        recent = self._starts.get(address)
        if recent is None:
            return None
        while recent and recent[0] <= now - START_WINDOW_S:
            recent.popleft()
        if not recent:
            del self._starts[address]
            return None
        return recent

    def _sweep(self, now: float) -> None:
        """Forget addresses with no start in the window (bounds the table)."""
        for address in list(self._starts):
            self._recent(address, now)

    # --- daily usage -----------------------------------------------------------------------

    def _today(self) -> None:
        day = utc_day()
        if day != self.day:  # a new UTC day: every count starts again
            self.day = day
            self._used = dict.fromkeys(KINDS, 0)
            self._stored = dict.fromkeys(KINDS, 0)
            self._pending = dict.fromkeys(KINDS, 0)
            for kind in KINDS:
                self._gauge(kind)

    def used(self, kind: Kind) -> int:
        self._today()
        return self._used[kind]

    def reached(self, kind: Kind) -> bool:
        """Today's figure (in a cluster: the cluster's, at most FLUSH_INTERVAL_S old)."""
        cap = self.caps[kind]
        return bool(cap) and self.used(kind) >= cap

    async def reached_now(self, kind: Kind) -> bool:
        """`reached`, with the cluster's figure read from Redis first (cluster mode)."""
        shared = self._shared_up()
        if shared is not None and self.caps[kind]:
            self._today()
            await self._sync_shared(shared, (kind,))
        return self.reached(kind)

    def add(self, kind: Kind, amount: int) -> None:
        if amount <= 0:
            return
        self._today()
        self._used[kind] += amount
        key = (self.day, kind)
        self._unsaved[key] = self._unsaved.get(key, 0) + amount
        if self._shared_up() is not None:
            self._pending[kind] += amount
            self._wake.set()  # to Redis now, not at the next tick
        self._gauge(kind)

    async def reserve_rekognition(self, calls: int) -> Held | None:
        """Room for `calls` more billed calls today? Where they are held until
        `settle_rekognition` ("local" or "shared"), or None when the cap refuses."""
        cap = self.caps["rekognition_calls"]
        if not cap:
            return "local"
        self._today()
        shared = self._shared_up()
        if shared is not None:
            kind: Kind = "rekognition_calls"
            try:
                ok, total = await shared.reserve(self.day, kind, calls, cap, self._stored[kind])
            except SharedUnavailable:
                self._redis_failed()
            else:
                self._used[kind] = total
                self._gauge(kind)
                return "shared" if ok else None
        if self.used("rekognition_calls") + self._reserved + calls > cap:
            return None
        self._reserved += calls
        return "local"

    def settle_rekognition(self, reserved: int, billed: int, held: Held = "local") -> None:
        """An analysis ended: `billed` of its `reserved` calls were really made."""
        if held == "local":
            self._reserved = max(0, self._reserved - reserved)
            self.add("rekognition_calls", billed)
            return
        # Charged in Redis when reserved: the store gets what was billed, Redis (and the
        # figure shown here) the correction.
        kind: Kind = "rekognition_calls"
        self._today()
        if billed > 0:
            key = (self.day, kind)
            self._unsaved[key] = self._unsaved.get(key, 0) + billed
        if billed != reserved:
            self._used[kind] = max(0, self._used[kind] + billed - reserved)
            if self._shared_up() is not None:
                self._pending[kind] += billed - reserved
        self._gauge(kind)

    def hit(self, cap: str) -> None:
        self.instruments.spend_cap_hits.labels(cap=cap).inc()

    def _gauge(self, kind: Kind) -> None:
        self.instruments.usage_today.labels(kind=kind).set(self._used[kind])

    def to_json(self) -> dict[str, Any]:
        """Today's usage against the caps (GET /health)."""
        self._today()
        return {
            "day": self.day,
            "mode": self.mode,
            "session_starts_per_minute": self.starts_per_minute,
            **{
                kind: {
                    "used": self._used[kind],
                    "cap": self.caps[kind],
                    "reached": self.reached(kind),
                }
                for kind in KINDS
            },
        }
