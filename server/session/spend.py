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
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, Literal

from server.config import Settings
from server.errors import RateLimited
from server.observability import Instruments
from server.session.store import Store, StoreError

log = logging.getLogger(__name__)

Kind = Literal["rekognition_calls", "llm_tokens"]
KINDS: tuple[Kind, ...] = ("rekognition_calls", "llm_tokens")
#: The per-address start window.
START_WINDOW_S = 60.0
#: Daily usage increments reach the store at most this late (a crash loses at most this).
FLUSH_INTERVAL_S = 1.0
#: Reasons recorded when a cap is reached (report notes, llm.error, metrics' `cap`).
REKOGNITION_CAP = "rekognition_daily_cap"
LLM_CAP = "daily_token_cap"


def utc_day(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%d")


class SpendCaps:
    def __init__(self, settings: Settings, store: Store, instruments: Instruments) -> None:
        self.starts_per_minute = max(0, settings.session_starts_per_minute)
        self.caps: dict[Kind, int] = {
            "rekognition_calls": max(0, settings.rekognition_daily_calls),
            "llm_tokens": max(0, settings.llm_daily_tokens),
        }
        self.store = store
        self.instruments = instruments
        self.day = utc_day()
        self._used: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._unsaved: dict[tuple[str, Kind], int] = {}
        self._reserved = 0  # Rekognition calls of analyses in flight
        self._starts: dict[str, deque[float]] = {}
        self._swept_at = time.time()
        self._flusher: asyncio.Task[None] | None = None
        for kind in KINDS:
            instruments.usage_cap.labels(kind=kind).set(self.caps[kind])
            instruments.usage_today.labels(kind=kind).set(0)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load today's usage and the last minute's starts (after the store is open)."""
        now = time.time()
        usage = await self.store.usage_on(self.day)
        for kind in KINDS:
            self._used[kind] = int(usage.get(kind, 0))
            self._gauge(kind)
        for address, at in await self.store.starts_since(now - START_WINDOW_S):
            self._starts.setdefault(address, deque()).append(at)
        await self.store.prune_starts(now - START_WINDOW_S)
        if any(self._used.values()):
            log.info("spend today so far: %s", self._used)
        self._flusher = asyncio.create_task(self._flush_loop(), name="spend-flusher")

    async def stop(self) -> None:
        """Write what is still unsaved (before the store closes)."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait({self._flusher}, timeout=1.0)
            self._flusher = None
        await self._flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self._flush()
                now = time.time()
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

    # --- session starts per client address -------------------------------------------------

    def check_start(self, address: str | None) -> None:
        """Raise 429 `rate_limited` (with Retry-After) when `address` has started its
        allowance of sessions in the last minute. None (a start from inside the server,
        e.g. a resumed video) is never limited."""
        if not self.starts_per_minute or not address:
            return
        now = time.time()
        recent = self._recent(address, now)
        if recent is not None and len(recent) >= self.starts_per_minute:
            self.instruments.spend_cap_hits.labels(cap="session_starts").inc()
            retry = math.ceil(recent[0] + START_WINDOW_S - now)
            raise RateLimited(
                f"more than {self.starts_per_minute} new sessions a minute from this address; "
                f"retry in {max(1, retry)} s",
                retry_after_s=retry,
            )

    async def record_start(self, address: str | None) -> None:
        if not self.starts_per_minute or not address:
            return
        now = time.time()
        self._starts.setdefault(address, deque()).append(now)
        try:
            await self.store.record_start(address, now)
        except StoreError as exc:  # counted in memory all the same
            log.warning("session start not stored: %s", exc)

    async def admit_start(self, address: str | None) -> None:
        """Check and count one start at once (no await between them: no race)."""
        self.check_start(address)
        await self.record_start(address)

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
            for kind in KINDS:
                self._gauge(kind)

    def used(self, kind: Kind) -> int:
        self._today()
        return self._used[kind]

    def reached(self, kind: Kind) -> bool:
        cap = self.caps[kind]
        return bool(cap) and self.used(kind) >= cap

    def add(self, kind: Kind, amount: int) -> None:
        if amount <= 0:
            return
        self._today()
        self._used[kind] += amount
        key = (self.day, kind)
        self._unsaved[key] = self._unsaved.get(key, 0) + amount
        self._gauge(kind)

    def reserve_rekognition(self, calls: int) -> bool:
        """Room for `calls` more billed calls today (held until `settle_rekognition`)?"""
        cap = self.caps["rekognition_calls"]
        if not cap:
            return True
        if self.used("rekognition_calls") + self._reserved + calls > cap:
            return False
        self._reserved += calls
        return True

    def settle_rekognition(self, reserved: int, billed: int) -> None:
        self._reserved = max(0, self._reserved - reserved)
        self.add("rekognition_calls", billed)

    def hit(self, cap: str) -> None:
        self.instruments.spend_cap_hits.labels(cap=cap).inc()

    def _gauge(self, kind: Kind) -> None:
        self.instruments.usage_today.labels(kind=kind).set(self._used[kind])

    def to_json(self) -> dict[str, Any]:
        """Today's usage against the caps (GET /health)."""
        self._today()
        return {
            "day": self.day,
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

