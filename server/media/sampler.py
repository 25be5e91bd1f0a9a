"""When the newest decoded WebRTC frame goes to the analyser: the sampling policy.

A policy is a small synchronous object asked, each time a new frame has been decoded and
no analysis is in flight, "sample this one?". It sees only the clock, a change score and
the session's alert state; the loop that feeds it (`server.media.track_drain.SampleLoop`)
owns the frames, the analyser budget and the one-in-flight rule. Two policies:

- `AdaptiveSampler` (the default): a low idle rate while the scene is stable, an
  immediate sample when the scene changes, a fast rate while an alert rule is pending
  (its streak has started, e.g. 1 faceless frame seen of the 3 needed) so onsets are
  confirmed within a second, and a moderate rate while an alert is active so its end is
  seen quickly even when the change score misses it.
- `FixedRateSampler`: one frame every `interval_s`, the seed design's client-side 1 fps,
  kept for comparisons in the benchmarks.

The change score compares tiny grey thumbnails (32×24, block means of the luma plane):
the fraction of cells whose brightness moved by more than `cell_delta` grey levels since
the last analysed frame. It is local (a phone entering a corner moves a few percent of the
cells), ignores sensor noise (each cell averages ~25 samples), and costs ~20 µs per
640×480 frame, so it runs on the event loop; `thumbnail_cost_us` lets callers watch that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from server.config import Settings

THUMB_W, THUMB_H = 32, 24
#: Luma layouts whose first plane is the full-resolution grey image.
_LUMA_FIRST = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p",
                         "nv12", "nv21", "gray", "gray8"})


class Reason(StrEnum):
    FIRST = "first"
    SCENE_CHANGE = "scene_change"
    ALERT_PENDING = "alert_pending"
    ALERT_ACTIVE = "alert_active"
    IDLE = "idle"
    FIXED = "fixed"


@dataclass(frozen=True, slots=True)
class AlertState:
    pending: bool = False  # some rule has a streak under way but no episode yet
    active: bool = False  # some episode is open


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    #: Ask for the slower checks (labels, text) too: the scene is new to the analyser.
    scene_changed: bool = False


class SamplingPolicy(Protocol):
    name: str

    def decide(self, now: float, change: float | None, alerts: AlertState) -> Decision | None:
        """`now` is time.monotonic(); `change` the change score of the newest frame against
        the last analysed one (None before the first analysis). None means "not now"."""
        ...

    def interval(self, alerts: AlertState) -> float:
        """The current sampling interval in seconds (for metrics and wake-ups)."""
        ...


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    idle_interval_s: float = 12.0
    pending_interval_s: float = 0.2
    active_interval_s: float = 1.0
    min_interval_s: float = 0.1
    change_threshold: float = 0.06
    cell_delta: int = 18
    scene_checks_interval_s: float = 2.0

    @classmethod
    def from_settings(cls, s: Settings) -> SamplerConfig:
        return cls(
            idle_interval_s=s.sampler_idle_interval_s,
            pending_interval_s=s.sampler_pending_interval_s,
            active_interval_s=s.sampler_active_interval_s,
            min_interval_s=s.sampler_min_interval_s,
            change_threshold=s.sampler_change_threshold,
            cell_delta=s.sampler_change_cell_delta,
            scene_checks_interval_s=s.sampler_scene_checks_interval_s,
        )


class AdaptiveSampler:
    name = "adaptive"

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        self._last_sample: float | None = None
        self._last_scene_checks: float | None = None
        self.reasons: dict[str, int] = {}

    def interval(self, alerts: AlertState) -> float:
        c = self.config
        if alerts.pending:
            return c.pending_interval_s
        if alerts.active:
            return c.active_interval_s
        return c.idle_interval_s

    def decide(self, now: float, change: float | None, alerts: AlertState) -> Decision | None:
        c = self.config
        if self._last_sample is None:
            return self._take(now, Decision(Reason.FIRST, scene_changed=True))
        since = now - self._last_sample
        if since < c.min_interval_s:
            return None
        if change is not None and change >= c.change_threshold:
            # Labels and text follow a scene change, but a fidgeting candidate must not
            # turn every movement into three calls.
            checks = (
                self._last_scene_checks is None
                or now - self._last_scene_checks >= c.scene_checks_interval_s
            )
            return self._take(now, Decision(Reason.SCENE_CHANGE, scene_changed=checks))
        if alerts.pending and since >= c.pending_interval_s:
            return self._take(now, Decision(Reason.ALERT_PENDING))
        if alerts.active and since >= c.active_interval_s:
            return self._take(now, Decision(Reason.ALERT_ACTIVE))
        if since >= c.idle_interval_s:
            return self._take(now, Decision(Reason.IDLE))
        return None

    def _take(self, now: float, decision: Decision) -> Decision:
        self._last_sample = now
        if decision.scene_changed:
            self._last_scene_checks = now
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        return decision


class FixedRateSampler:
    """One frame every `interval_s` whatever happens (the seed's client-side 1 fps)."""

    name = "fixed"

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last_sample: float | None = None
        self.reasons: dict[str, int] = {}

    def interval(self, alerts: AlertState) -> float:
        return self.interval_s

    def decide(self, now: float, change: float | None, alerts: AlertState) -> Decision | None:
        if self._last_sample is not None and now - self._last_sample < self.interval_s:
            return None
        first = self._last_sample is None
        self._last_sample = now
        self.reasons[Reason.FIXED] = self.reasons.get(Reason.FIXED, 0) + 1
        return Decision(Reason.FIRST if first else Reason.FIXED, scene_changed=first)


# --- change score -----------------------------------------------------------------------


def _luma(frame: Any) -> np.ndarray | None:
    """A zero-copy view of the luma plane of a decoded `av.VideoFrame`, or None when the
    frame's layout does not start with one."""
    if frame.format.name not in _LUMA_FIRST:
        return None
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
    return rows[:, : frame.width]


def thumbnail(frame: Any) -> np.ndarray:
    """32×24 grey thumbnail (uint8) of a decoded `av.VideoFrame`: block means of every
    4th luma sample. ~20 µs at 640×480."""
    import cv2

    luma = _luma(frame)
    if luma is None:  # rare layouts (rgb24, …): let FFmpeg scale, ~0.1 ms
        return np.ascontiguousarray(
            frame.reformat(width=THUMB_W, height=THUMB_H, format="gray").to_ndarray()
        )
    step = 4 if min(luma.shape) >= 4 * THUMB_H else 1
    return cv2.resize(luma[::step, ::step], (THUMB_W, THUMB_H), interpolation=cv2.INTER_AREA)


def thumbnail_of_array(grey: np.ndarray) -> np.ndarray:
    """The same thumbnail from a grey uint8 array (tests, tools)."""
    import cv2

    return cv2.resize(grey, (THUMB_W, THUMB_H), interpolation=cv2.INTER_AREA)


def change_score(current: np.ndarray, reference: np.ndarray, cell_delta: int = 18) -> float:
    """Fraction (0–1) of thumbnail cells whose brightness differs by more than
    `cell_delta` grey levels."""
    import cv2

    if current.shape != reference.shape:
        return 1.0
    moved = np.count_nonzero(cv2.absdiff(current, reference) > cell_delta)
    return moved / current.size


def thumbnail_cost_us(frame: Any, repeats: int = 50) -> float:
    """Median cost of `thumbnail(frame)` in microseconds (for metrics and benchmarks)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        thumbnail(frame)
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return samples[len(samples) // 2]
