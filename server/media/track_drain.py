"""The receiving side of a WebRTC video track: drain every decoded frame, keep the newest.

`TrackDrain` pulls frames from aiortc's remote track as fast as they come. It must: the
decoder needs every frame (a skipped one corrupts the ones after it until the next
keyframe), and aiortc's receive and decode queues are unbounded (aiortc issues #104,
#642), so any frame we do not take waits there and every later frame with it. Taking a
frame costs a reference swap: the newest `av.VideoFrame` sits in a one-slot buffer and
the previous one is released; nothing is converted here.

How late a frame is comes from its RTP timestamp: arrival time minus media time is
constant for a stream flowing smoothly, so its excess over a windowed minimum is the
frame's lag — time spent queued in the network, the jitter buffer, aiortc's decode queue
or behind a busy event loop. Lag that grows means the server is not keeping up.

Which of these frames are analysed is `server.media.sample_loop`'s business.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RECENT = 256  # samples kept for percentiles (bounded)


def percentile(values: Any, q: float) -> float | None:
    data = sorted(values)
    if not data:
        return None
    return float(data[min(len(data) - 1, int(q * len(data)))])


@dataclass(slots=True, eq=False)
class DecodedFrame:
    frame: Any  # av.VideoFrame
    seq: int
    arrived_at: float  # wall clock, when the drain received it
    arrived_mono: float
    lag_s: float  # arrival delay above the stream's baseline

    @property
    def captured_at(self) -> float:
        """Receive-side estimate of the capture time: when the frame would have arrived
        with no queueing (the sender's clock is not ours)."""
        return self.arrived_at - self.lag_s


class ArrivalLag:
    """Arrival delay above the smallest (arrival − media time) seen in the last one to two
    windows; the windows let the baseline follow sender clock drift."""

    RESET_S = 10.0  # larger lag is a timestamp discontinuity, not a backlog

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._prev_min: float | None = None
        self._cur_min: float | None = None
        self._cur_start = 0.0

    def update(self, arrival_mono: float, media_s: float | None) -> float:
        if media_s is None:
            return 0.0
        offset = arrival_mono - media_s
        if self._cur_min is None or arrival_mono - self._cur_start >= self.window_s:
            self._prev_min, self._cur_min, self._cur_start = self._cur_min, offset, arrival_mono
        else:
            self._cur_min = min(self._cur_min, offset)
        base = self._cur_min if self._prev_min is None else min(self._prev_min, self._cur_min)
        lag = offset - base
        if lag > self.RESET_S:
            self._prev_min, self._cur_min, self._cur_start = None, offset, arrival_mono
            return 0.0
        return lag


class TrackDrain:
    def __init__(
        self,
        track: Any,
        on_frame: Callable[[], None] | None = None,
        lag_window_s: float = 30.0,
    ) -> None:
        self.track = track
        self.on_frame = on_frame
        self.latest: DecodedFrame | None = None
        self.decoded = 0
        self.ended = False
        self.started_mono = time.monotonic()
        self.last_arrival_mono: float | None = None
        self._lag = ArrivalLag(lag_window_s)
        self._lags: deque[float] = deque(maxlen=RECENT)
        self._arrivals: deque[float] = deque(maxlen=64)
        self._new_frame = asyncio.Event()

    async def run(self) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                try:
                    frame = await self.track.recv()
                except MediaStreamError:
                    return
                self._take(frame)
        finally:
            self.ended = True
            self.latest = None  # release the last decoded picture
            self._new_frame.set()

    def _take(self, frame: Any) -> None:
        mono, wall = time.monotonic(), time.time()
        media_s = None
        if frame.pts is not None and frame.time_base:
            media_s = float(frame.pts * frame.time_base)
        lag = self._lag.update(mono, media_s)
        self.decoded += 1
        self.latest = DecodedFrame(frame, self.decoded, wall, mono, lag)
        self.last_arrival_mono = mono
        self._lags.append(lag)
        self._arrivals.append(mono)
        self._new_frame.set()
        if self.on_frame is not None:
            self.on_frame()

    async def next_frame(self, after_seq: int) -> DecodedFrame | None:
        """The newest frame newer than `after_seq`, waiting for one; None once the track
        has ended."""
        while True:
            latest = self.latest
            if latest is not None and latest.seq > after_seq:
                return latest
            if self.ended:
                return None
            self._new_frame.clear()
            await self._new_frame.wait()

    # --- measurements ------------------------------------------------------------------

    def fps(self) -> float:
        a = self._arrivals
        if len(a) < 2 or a[-1] <= a[0]:
            return 0.0
        return (len(a) - 1) / (a[-1] - a[0])

    def lag_ms(self, q: float = 0.95, last: int | None = None) -> float | None:
        """Percentile of the frame lag over the recent frames (the last `last` of them)."""
        lags = self._lags if last is None else list(self._lags)[-last:]
        value = percentile(lags, q)
        return None if value is None else value * 1000

    def idle_s(self, now: float | None = None) -> float:
        """Seconds since the last frame (since the start when none came yet)."""
        now = time.monotonic() if now is None else now
        return now - (self.last_arrival_mono or self.started_mono)

    def to_json(self) -> dict[str, Any]:
        latest = self.latest
        lag50, lag95 = self.lag_ms(0.5), self.lag_ms(0.95)
        return {
            "frames_decoded": self.decoded,
            "fps": round(self.fps(), 2),
            "width": latest.frame.width if latest else None,
            "height": latest.frame.height if latest else None,
            "lag_ms_p50": None if lag50 is None else round(lag50, 1),
            "lag_ms_p95": None if lag95 is None else round(lag95, 1),
        }
