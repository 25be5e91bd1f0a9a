"""Feeds one session from one WebRTC track: newest frame → change score → policy → sink.

The loop only ever *offers* frames: `FrameSink.offer` puts the frame in the session's
one-frame slot and returns at once. Everything after that — one analysis in flight, the
analyser budget, analysis, rules, store, publishing — belongs to the session's worker,
and results come back to the transport as session events (the peer calls `analysed()`
when the session's `frame_analysis` event arrives). So the loop never waits on analysis,
and a slow analyser shows up as frames the loop did not offer, never as a backlog.

While the worker waits for the budget with an offered frame, each newer decoded frame
replaces it (latest wins), so the frame analysed is the freshest one. While an analysis is
in flight nothing is offered: the next decision waits for its result, which updates the
alert state the policy reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from server.media.frames import Frame
from server.media.sampler import (
    ChangeDetector,
    ChangeScore,
    SamplingPolicy,
    SamplingState,
    thumbnail,
)
from server.media.track_drain import RECENT, DecodedFrame, TrackDrain, percentile

log = logging.getLogger(__name__)

#: A change score whose median cost exceeds this (CPU µs) moves to a worker thread.
THUMB_ON_LOOP_MAX_US = 200.0


class FrameSink(Protocol):
    """Where sampled frames go (the session's one-frame slot)."""

    def offer(self, frame: Frame, scene_changed: bool) -> bool:
        """Put `frame` in the slot (replacing a waiting one); False once the sink takes
        no more frames (the session is over)."""
        ...

    @property
    def waiting(self) -> bool:
        """A frame is in the slot, not yet taken by the worker."""
        ...

    @property
    def in_flight(self) -> bool:
        """The worker is analysing a frame."""
        ...


class SampleLoop:
    def __init__(
        self,
        drain: TrackDrain,
        policy: SamplingPolicy,
        sink: FrameSink,
        state: Callable[[float], SamplingState],
        *,
        detector: ChangeDetector | None = None,
        ready: asyncio.Event | None = None,
        ready_timeout_s: float = 5.0,
        on_age: Callable[[float], None] | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        probe_interval_s: float = 0.0,
    ) -> None:
        """`state(captured_at)` is the session's sampling state for a frame captured then
        (`due` says whether that frame completes a pending rule's dwell)."""
        self.drain = drain
        self.policy = policy
        self.sink = sink
        self.state = state
        self.detector = detector or ChangeDetector()
        self.last_change: ChangeScore | None = None
        self.ready = ready
        self.ready_timeout_s = ready_timeout_s
        self.on_age = on_age
        self.on_error = on_error
        self.probe_interval_s = probe_interval_s  # change score at most this often
        self.sampled = 0
        self.replaced = 0  # offered frames replaced by newer ones while waiting
        self.analysed_count = 0
        self.errors = 0
        self.last_reason: str | None = None
        self.ages_ms: deque[float] = deque(maxlen=RECENT)
        self._reference: np.ndarray | None = None
        self._offered: DecodedFrame | None = None
        self._offered_thumb: np.ndarray | None = None
        self._last_probe = 0.0
        self._change_costs: deque[float] = deque(maxlen=64)  # thumbnail + score, CPU µs
        self._change_in_thread = False

    # --- change score ----------------------------------------------------------------------

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
        return percentile(self._change_costs, 0.5) or 0.0

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        if self.ready is not None:
            # Results have nowhere to go before the data channel opens; do not spend
            # analyser calls on them unless the channel never comes.
            try:
                await asyncio.wait_for(self.ready.wait(), self.ready_timeout_s)
            except TimeoutError:
                pass
        seq = 0
        while True:
            df = await self.drain.next_frame(seq)
            if df is None:
                return
            seq = df.seq
            try:
                if not await self._consider(df):
                    return
            except Exception as exc:  # a bug here must not stop this session's sampling
                self.errors += 1
                if self.on_error is not None:
                    self.on_error("sampler", exc)
                else:
                    log.exception("sampler failed on a frame")

    async def _consider(self, df: DecodedFrame) -> bool:
        """Offer `df` if the policy wants it; False once the sink takes no more frames."""
        if self.sink.waiting:
            # The worker waits (for the budget) with an older frame: the newest wins.
            self.replaced += 1
            return self._offer(df, None, scene_changed=False)
        if self.sink.in_flight:
            return True
        thumb: np.ndarray | None = None
        changed: bool | None = None
        now = time.monotonic()
        if self._reference is not None:
            changed = False
            if now - self._last_probe >= self.probe_interval_s:
                self._last_probe = now
                thumb, score = await self._change(df, self._reference)
                assert score is not None
                self.last_change, changed = score, score.changed
        decision = self.policy.decide(now, changed, self.state(df.captured_at))
        if decision is None:
            return True
        self.sampled += 1
        self.last_reason = decision.reason
        return self._offer(df, thumb, decision.scene_changed)

    def _offer(self, df: DecodedFrame, thumb: np.ndarray | None, scene_changed: bool) -> bool:
        self._offered, self._offered_thumb = df, thumb
        return self.sink.offer(Frame.from_video_frame(df.frame, df.captured_at), scene_changed)

    def analysed(self, analysis_started_at: float | None) -> None:
        """The session analysed the frame this loop offered last: it becomes the reference
        for the change score. Called by the transport on the session's result event."""
        self.analysed_count += 1
        df, thumb = self._offered, self._offered_thumb
        self._offered = self._offered_thumb = None
        if df is None:
            return
        self._reference = thumb if thumb is not None else thumbnail(df.frame)
        if analysis_started_at is not None:
            age_ms = max(0.0, (analysis_started_at - df.arrived_at) * 1000)
            self.ages_ms.append(age_ms)
            if self.on_age is not None:
                self.on_age(age_ms)

    def to_json(self) -> dict[str, Any]:
        age50, age95 = percentile(self.ages_ms, 0.5), percentile(self.ages_ms, 0.95)
        return {
            "sampler": self.policy.name,
            "frames_sampled": self.sampled,
            "frames_analysed": self.analysed_count,
            "frames_replaced": self.replaced,
            "frames_skipped": max(0, self.drain.decoded - self.sampled - self.replaced),
            "sampler_errors": self.errors,
            "frame_age_ms_p50": None if age50 is None else round(age50, 1),
            "frame_age_ms_p95": None if age95 is None else round(age95, 1),
            "change_score_us": round(self.change_us(), 1),
            "change_fraction": None if self.last_change is None
            else round(self.last_change.fraction, 4),
            "change_region": None if self.last_change is None else round(self.last_change.blob, 4),
            "change_in_thread": self._change_in_thread,
            "last_reason": self.last_reason,
            "reasons": dict(getattr(self.policy, "reasons", {})),
        }
