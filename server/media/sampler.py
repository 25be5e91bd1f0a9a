"""When the newest decoded WebRTC frame goes to the analyser: the sampling policy.

A policy is a small synchronous object asked, each time a new frame has been decoded and
the session is free to take one, "sample this one?". It sees only the clock, a change
score and the session's state (`SamplingState`); the loop that feeds it
(`server.media.sample_loop.SampleLoop`) owns the frames. Two policies:

- `AdaptiveSampler` (the default): a low idle rate while the scene is stable (the
  session chooses it: slow for a billed cloud backend, about once a second for the
  offline one while it has headroom), an immediate sample when the scene changes, a
  boosted rate while an alert rule is pending (its streak has started) plus one sample
  exactly when the pending rule's dwell completes, so the alert arrives right when its
  dwell is over, and a moderate rate while an alert is active so its end is seen quickly
  even when the change score misses it.
- `FixedRateSampler`: one frame every `interval_s`, the seed design's client-side 1 fps,
  kept for comparisons in the benchmarks.

The change detector (`ChangeDetector`) compares small grey thumbnails of the newest frame
and of the last analysed one, tolerating small shifts; it costs ~50 µs per 640×480 frame
on a still scene and ~120 µs when something moves (thumbnail ~40 µs, comparison 10–80 µs),
so it runs on the event loop; the loop measures it and moves it to a thread if it ever
averages more than 0.2 ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from server.config import Settings

THUMB_W, THUMB_H = 64, 48
#: Luma layouts whose first plane is the full-resolution grey image.
_LUMA_FIRST = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p",
                         "nv12", "nv21", "gray", "gray8"})


class Reason(StrEnum):
    FIRST = "first"
    SCENE_CHANGE = "scene_change"
    ALERT_PENDING = "alert_pending"
    ALERT_ACTIVE = "alert_active"
    ALERT_DUE = "alert_due"
    IDLE = "idle"
    FIXED = "fixed"


@dataclass(frozen=True, slots=True)
class SamplingState:
    """What the session tells its sampler (read before each decision)."""

    pending: bool = False  # some rule has a streak under way but no episode yet
    active: bool = False  # some episode is open
    #: The newest frame's capture time has reached a pending rule's dwell: sample it.
    due: bool = False
    #: The session's idle interval now (None: the policy's own default).
    idle_interval_s: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    #: Ask for the slower checks (labels, text) too: the scene is new to the analyser.
    scene_changed: bool = False


class SamplingPolicy(Protocol):
    name: str

    def decide(self, now: float, changed: bool | None, state: SamplingState) -> Decision | None:
        """`now` is time.monotonic(); `changed` whether the newest frame differs from the
        last analysed one (None before the first analysis). None means "not now"."""
        ...

    def interval(self, state: SamplingState) -> float:
        """The current sampling interval in seconds (for metrics and wake-ups)."""
        ...


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    idle_interval_s: float = 12.0
    pending_interval_s: float = 0.5
    active_interval_s: float = 1.0
    min_interval_s: float = 0.1
    change_min_interval_s: float = 0.5
    scene_checks_interval_s: float = 2.0

    @classmethod
    def from_settings(cls, s: Settings) -> SamplerConfig:
        return cls(
            idle_interval_s=s.sampler_idle_interval_s,
            pending_interval_s=s.sampler_pending_interval_s,
            active_interval_s=s.sampler_active_interval_s,
            min_interval_s=s.sampler_min_interval_s,
            change_min_interval_s=s.sampler_change_min_interval_s,
            scene_checks_interval_s=s.sampler_scene_checks_interval_s,
        )


class AdaptiveSampler:
    name = "adaptive"

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        self._last_sample: float | None = None
        self._last_change: float | None = None
        self._last_scene_checks: float | None = None
        self.reasons: dict[str, int] = {}

    def interval(self, state: SamplingState) -> float:
        c = self.config
        if state.pending:
            return c.pending_interval_s
        if state.active:
            return c.active_interval_s
        return self._idle(state)

    def _idle(self, state: SamplingState) -> float:
        return c if (c := state.idle_interval_s) is not None else self.config.idle_interval_s

    def decide(self, now: float, changed: bool | None, state: SamplingState) -> Decision | None:
        c = self.config
        if self._last_sample is None:
            return self._take(now, Decision(Reason.FIRST, scene_changed=True))
        since = now - self._last_sample
        if since < c.min_interval_s:
            return None
        if changed and (
            self._last_change is None or now - self._last_change >= c.change_min_interval_s
        ):
            self._last_change = now
            # Labels and text follow a scene change, but a restless candidate must not
            # turn every movement into three calls.
            checks = (
                self._last_scene_checks is None
                or now - self._last_scene_checks >= c.scene_checks_interval_s
            )
            return self._take(now, Decision(Reason.SCENE_CHANGE, scene_changed=checks))
        if state.due:
            return self._take(now, Decision(Reason.ALERT_DUE))
        if state.pending and since >= c.pending_interval_s:
            return self._take(now, Decision(Reason.ALERT_PENDING))
        if state.active and since >= c.active_interval_s:
            return self._take(now, Decision(Reason.ALERT_ACTIVE))
        if since >= self._idle(state):
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

    def interval(self, state: SamplingState) -> float:
        return self.interval_s

    def decide(self, now: float, changed: bool | None, state: SamplingState) -> Decision | None:
        if self._last_sample is not None and now - self._last_sample < self.interval_s:
            return None
        first = self._last_sample is None
        self._last_sample = now
        self.reasons[Reason.FIXED] = self.reasons.get(Reason.FIXED, 0) + 1
        return Decision(Reason.FIRST if first else Reason.FIXED, scene_changed=first)


# --- change score -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangeScore:
    fraction: float  # share of thumbnail cells that changed beyond a small shift
    blob: float  # share covered by the largest compact changed region
    changed: bool


class ChangeDetector:
    """Has the scene changed since the analyser last looked? Compares 64×48 grey
    thumbnails (block means, so sensor noise averages out):

    - a cell counts as changed when it differs by more than `cell_delta` grey levels from
      the reference at its own position *and* at every position one cell (~10 px at
      640×480) away, so small head movements and camera shake do not count;
    - the scene changed when `fraction_threshold` of the cells changed (camera covered,
      candidate gone, a big move), or when the changed cells form one compact region of
      at least `blob_threshold` of the frame after an opening removes thin edge lines
      (a phone, a sheet of paper or a second face coming into view).

    Measured on a 640×480 frame: noise σ=8 → 0; shifts of 3–10 px, 5° rotations → no
    region, ≤ 7 % of cells; a 60×100 px object → a 1.2 % region; covering → ~55 %.
    """

    RADIUS = 1
    _KERNEL = np.ones((3, 3), np.uint8)

    def __init__(
        self, cell_delta: int = 16, fraction_threshold: float = 0.10, blob_threshold: float = 0.008
    ) -> None:
        self.cell_delta = cell_delta
        self.fraction_threshold = fraction_threshold
        self.blob_threshold = blob_threshold

    @classmethod
    def from_settings(cls, s: Settings) -> ChangeDetector:
        return cls(
            cell_delta=s.sampler_change_cell_delta,
            fraction_threshold=s.sampler_change_threshold,
            blob_threshold=s.sampler_change_object_threshold,
        )

    def score(self, current: np.ndarray, reference: np.ndarray) -> ChangeScore:
        import cv2

        if current.shape != reference.shape:
            return ChangeScore(1.0, 1.0, True)
        plain = cv2.absdiff(current, reference)
        if np.count_nonzero(plain > self.cell_delta) < self.blob_threshold * plain.size:
            # Shift tolerance only removes changed cells: too few to matter already.
            return ChangeScore(0.0, 0.0, False)
        r = self.RADIUS
        h, w = current.shape
        padded = cv2.copyMakeBorder(reference, r, r, r, r, cv2.BORDER_REPLICATE)
        best: np.ndarray | None = None
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                diff = cv2.absdiff(current, padded[r + dy : r + dy + h, r + dx : r + dx + w])
                best = diff if best is None else cv2.min(best, diff)
        assert best is not None
        mask = (best > self.cell_delta).astype(np.uint8)
        fraction = float(np.count_nonzero(mask)) / mask.size
        if fraction >= self.fraction_threshold:
            return ChangeScore(fraction, fraction, True)
        blob = 0.0
        if fraction >= self.blob_threshold:  # no region can be larger than all changed cells
            opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._KERNEL)
            count, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
            if count > 1:
                blob = float(stats[1:, cv2.CC_STAT_AREA].max()) / mask.size
        return ChangeScore(fraction, blob, blob >= self.blob_threshold)


def _luma(frame: Any) -> np.ndarray | None:
    """A zero-copy view of the luma plane of a decoded `av.VideoFrame`, or None when the
    frame's layout does not start with one."""
    if frame.format.name not in _LUMA_FIRST:
        return None
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
    return rows[:, : frame.width]


def thumbnail(frame: Any) -> np.ndarray:
    """64×48 grey thumbnail (uint8) of a decoded `av.VideoFrame`: luma averaged along
    every (height/48)-th row. ~40 µs at 640×480."""
    import cv2

    luma = _luma(frame)
    if luma is None:  # rare layouts (rgb24, …): let FFmpeg scale, ~0.1 ms
        return np.ascontiguousarray(
            frame.reformat(width=THUMB_W, height=THUMB_H, format="gray").to_ndarray()
        )
    # Every n-th row (a strided view, no copy), averaged along the row: reads ~48 rows of
    # a frame fresh from the decoder instead of all of it (≈ 40 µs vs 130 µs, cold cache).
    rows = luma[:: max(1, luma.shape[0] // THUMB_H)]
    return cv2.resize(rows, (THUMB_W, THUMB_H), interpolation=cv2.INTER_AREA)


def thumbnail_cost_us(frame: Any, repeats: int = 50) -> float:
    """Median cost of `thumbnail(frame)` in microseconds (for metrics and benchmarks)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        thumbnail(frame)
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return samples[len(samples) // 2]
