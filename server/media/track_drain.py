"""The receiving side of a WebRTC video track: drain every decoded frame, keep the newest,
and feed sampled ones to the session.

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

`SampleLoop` wakes on each new frame while no analysis is in flight, computes the cheap
change score, asks the sampling policy, waits for the server-wide budget, and submits the
newest frame to the session manager (which converts it in a worker thread). It awaits the
result before looking again, so a session has exactly one analysis in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.analysis.budget import CallBudget
from server.errors import SessionEnded, SessionNotFound
from server.media.frames import Frame, FrameError
from server.media.sampler import (
    AlertState,
    ChangeDetector,
    ChangeScore,
    SamplingPolicy,
    thumbnail,
)

log = logging.getLogger(__name__)

#: A change score whose median cost exceeds this (CPU µs) moves to a worker thread.
THUMB_ON_LOOP_MAX_US = 200.0
RECENT = 256  # samples kept for percentiles (bounded)


def _percentile(values: Any, q: float) -> float | None:
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
        value = _percentile(lags, q)
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


SubmitFn = Callable[[Frame, bool], Awaitable[dict[str, Any]]]


class SampleLoop:
    """Feeds one session from one drain: policy → budget → newest frame → analysis."""

    def __init__(
        self,
        drain: TrackDrain,
        policy: SamplingPolicy,
        submit: SubmitFn,
        alert_state: Callable[[], AlertState],
        budget: CallBudget,
        *,
        detector: ChangeDetector | None = None,
        ready: asyncio.Event | None = None,
        ready_timeout_s: float = 5.0,
        on_age: Callable[[float], None] | None = None,
        probe_interval_s: float = 0.0,
    ) -> None:
        self.drain = drain
        self.policy = policy
        self.submit = submit
        self.alert_state = alert_state
        self.budget = budget
        self.detector = detector or ChangeDetector()
        self.last_change: ChangeScore | None = None
        self.ready = ready
        self.ready_timeout_s = ready_timeout_s
        self.on_age = on_age
        self.probe_interval_s = probe_interval_s  # change score at most this often
        self.sampled = 0
        self.analysed = 0
        self.dropped = 0
        self.errors = 0
        self.last_reason: str | None = None
        self.ages_ms: deque[float] = deque(maxlen=RECENT)
        self.budget_waits_ms: deque[float] = deque(maxlen=RECENT)
        self._change_costs: deque[float] = deque(maxlen=64)  # thumbnail + score, CPU µs
        self._change_in_thread = False

    def _measure_change(
        self, frame: Any, reference: np.ndarray | None
    ) -> tuple[np.ndarray, ChangeScore | None, float]:
        # CPU time of this thread, not wall time: waiting for the GIL while the decoder
        # threads run is not work done on the event loop.
        t0 = time.thread_time_ns()
        thumb = thumbnail(frame)
        score = None if reference is None else self.detector.score(thumb, reference)
        return thumb, score, (time.thread_time_ns() - t0) / 1000

    async def _change(
        self, df: DecodedFrame, reference: np.ndarray | None
    ) -> tuple[np.ndarray, ChangeScore | None]:
        """The frame's thumbnail and its change score against `reference`; on the event
        loop while the median cost stays under THUMB_ON_LOOP_MAX_US, else in a thread."""
        if self._change_in_thread:
            thumb, score, _ = await asyncio.to_thread(self._measure_change, df.frame, reference)
            return thumb, score
        thumb, score, cost = self._measure_change(df.frame, reference)
        self._change_costs.append(cost)
        if len(self._change_costs) >= 30 and self.change_us() > THUMB_ON_LOOP_MAX_US:
            log.info("change score costs %.0f µs: computing it off the event loop",
                     self.change_us())
            self._change_in_thread = True
        return thumb, score

    def change_us(self) -> float:
        """Median CPU cost of thumbnail + change score over the recent frames."""
        return _percentile(self._change_costs, 0.5) or 0.0

    async def run(self) -> None:
        if self.ready is not None:
            # Results have nowhere to go before the data channel opens; do not spend
            # analyser calls on them unless the channel never comes.
            try:
                await asyncio.wait_for(self.ready.wait(), self.ready_timeout_s)
            except TimeoutError:
                pass
        seq = 0
        reference: np.ndarray | None = None
        last_probe = 0.0
        while True:
            df = await self.drain.next_frame(seq)
            if df is None:
                return
            seq = df.seq
            thumb: np.ndarray | None = None
            changed: bool | None = None
            now = time.monotonic()
            if reference is not None:
                changed = False
                if now - last_probe >= self.probe_interval_s:
                    last_probe = now
                    thumb, score = await self._change(df, reference)
                    assert score is not None
                    self.last_change, changed = score, score.changed
            decision = self.policy.decide(now, changed, self.alert_state())
            if decision is None:
                continue
            if not self.budget.unlimited:
                asked = time.monotonic()
                await self.budget.acquire()
                self.budget_waits_ms.append((time.monotonic() - asked) * 1000)
                newest = self.drain.latest
                if newest is None:
                    return
                if newest is not df:  # a newer frame arrived while waiting: send that one
                    df, thumb, seq = newest, None, newest.seq
            if thumb is None:
                thumb, _ = await self._change(df, None)
            self.sampled += 1
            self.last_reason = decision.reason
            try:
                result = await self.submit(
                    Frame.from_video_frame(df.frame, df.captured_at), decision.scene_changed
                )
            except (SessionEnded, SessionNotFound):
                return
            except FrameError as exc:
                self.errors += 1
                log.warning("frame refused: %s", exc)
                continue
            if result.get("status") == "dropped":
                self.dropped += 1
                if result.get("reason") == "session_ended":
                    return
                continue
            self.analysed += 1
            reference = thumb
            started = (result.get("timings") or {}).get("analysis_started_at")
            if isinstance(started, int | float):
                age_ms = max(0.0, (started - df.arrived_at) * 1000)
                self.ages_ms.append(age_ms)
                if self.on_age is not None:
                    self.on_age(age_ms)

    def to_json(self) -> dict[str, Any]:
        age50, age95 = _percentile(self.ages_ms, 0.5), _percentile(self.ages_ms, 0.95)
        wait95 = _percentile(self.budget_waits_ms, 0.95)
        return {
            "sampler": self.policy.name,
            "frames_sampled": self.sampled,
            "frames_analysed": self.analysed,
            "frames_dropped": self.dropped,
            "frames_skipped": max(0, self.drain.decoded - self.sampled),
            "frame_errors": self.errors,
            "frame_age_ms_p50": None if age50 is None else round(age50, 1),
            "frame_age_ms_p95": None if age95 is None else round(age95, 1),
            "budget_wait_ms_p95": None if wait95 is None else round(wait95, 1),
            "change_score_us": round(self.change_us(), 1),
            "change_fraction": None if self.last_change is None
            else round(self.last_change.fraction, 4),
            "change_region": None if self.last_change is None else round(self.last_change.blob, 4),
            "change_in_thread": self._change_in_thread,
            "last_reason": self.last_reason,
            "reasons": dict(getattr(self.policy, "reasons", {})),
        }
