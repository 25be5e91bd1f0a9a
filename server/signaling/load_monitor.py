"""Overload protection for WebRTC: is the server keeping up with its video streams?

aiortc's receive and decode queues are unbounded (aiortc issues #104, #642): a server
that cannot keep up shows it as growing frame lag, not as dropped frames. Once a second
the monitor reads each peer's recent frame lag and the event loop's own lag. A peer whose
frames are late is asked for less video (`adjust_video`); when the median lag or the
loop lag stays above its limit for two ticks in a row, new sessions are refused (503 with
Retry-After, reconnects still accepted), every page is asked for less, and the offline
backend's idle sampling backs off (`on_overload`).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge

from server.config import Settings
from server.media.track_drain import TrackDrain

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 1.0
RECENT_FRAMES = 30  # lag is judged over about the last 2 s of frames
MIN_FRAMES = 15  # a peer's lag counts once it has decoded this many frames


class MonitoredPeer(Protocol):
    drain: TrackDrain | None
    last_adjust_mono: float

    def adjust_video(self, reason: str) -> None: ...


class LoadMonitor:
    def __init__(
        self,
        settings: Settings,
        peers: Callable[[], Iterable[MonitoredPeer]],
        registry: CollectorRegistry,
        on_overload: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.peers = peers
        self.on_overload = on_overload
        self.overloaded_until = 0.0
        self.loop_lag_ms = 0.0
        self.median_frame_lag_ms: float | None = None
        self._behind_ticks = 0
        self._task: asyncio.Task[None] | None = None
        self.gauge = Gauge(
            "proctor_rtc_overloaded", "1 while new WebRTC sessions are refused", registry=registry
        )

    @property
    def overloaded(self) -> bool:
        return time.monotonic() < self.overloaded_until

    def ensure_running(self) -> None:
        """Start the monitor if it is not running (it stops by itself with no peers)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="rtc-load-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _watch(self) -> None:
        while any(True for _ in self.peers()):
            before = time.monotonic()
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                self.tick(time.monotonic(), before)
            except Exception:  # the monitor must outlive a bad reading
                log.exception("load monitor tick failed")
        self.gauge.set(1 if self.overloaded else 0)

    def tick(self, now: float, before: float) -> None:
        s = self.settings
        self.loop_lag_ms = max(0.0, (now - before - MONITOR_INTERVAL_S) * 1000)
        lags: list[float] = []
        peers = list(self.peers())
        for peer in peers:
            drain = peer.drain
            if drain is None or drain.decoded < MIN_FRAMES:
                continue
            lag = drain.lag_ms(0.5, last=RECENT_FRAMES)
            if lag is None:
                continue
            lags.append(lag)
            cooled = now - peer.last_adjust_mono > s.rtc_overload_cooldown_s
            if lag > s.rtc_overload_frame_lag_ms and cooled:
                peer.adjust_video("frames_late")
        self.median_frame_lag_ms = statistics.median(lags) if lags else None
        behind = self.loop_lag_ms > s.rtc_overload_loop_lag_ms or (
            self.median_frame_lag_ms is not None
            and self.median_frame_lag_ms > s.rtc_overload_frame_lag_ms
        )
        # One slow tick (a GC pause, a first import) is not overload; two in a row are.
        self._behind_ticks = self._behind_ticks + 1 if behind else 0
        if self._behind_ticks >= 2:
            if not self.overloaded:
                log.warning(
                    "WebRTC overload (loop lag %.0f ms, median frame lag %s ms): "
                    "refusing new sessions, asking pages for less video",
                    self.loop_lag_ms, self.median_frame_lag_ms,
                )
                for peer in peers:
                    if now - peer.last_adjust_mono > s.rtc_overload_cooldown_s:
                        peer.adjust_video("server_overloaded")
            self.overloaded_until = now + s.rtc_overload_cooldown_s
            if self.on_overload is not None:
                self.on_overload(s.rtc_overload_cooldown_s)
        self.gauge.set(1 if self.overloaded else 0)
