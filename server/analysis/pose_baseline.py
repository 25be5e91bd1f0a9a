"""Per-candidate head-pose baseline for backends whose pose is only meaningful relatively.

A webcam is rarely straight in front of the face, and the local backend's pose comes from
a face model with a person-dependent offset; without a baseline an off-axis camera makes
a candidate "look away" all session. `PoseBaseline` (one per session, pure, no I/O)
learns the candidate's resting pose and reports the primary face's pose relative to it.

- Calibration: the primary face's poses from judgeable frames (quality sufficient) are
  collected while they are stable — every sample within `BASELINE_MAX_SPREAD_DEG` of the
  newest on each axis — and inside the looking-away thresholds (|yaw| ≤ `max_yaw_deg`,
  |pitch| ≤ `max_pitch_deg`, the session's LOOKING_AWAY_YAW_DEG / _PITCH_DEG), so a
  candidate who looks away from the first frame on is never calibrated on it: the
  baseline can only absorb a camera offset the rules would tolerate anyway. The baseline
  is also clamped to those thresholds, after every (re-)calibration. Once such a run
  spans `BASELINE_WINDOW_S` seconds with at least `BASELINE_MIN_SAMPLES` poses, its
  per-axis median is the baseline. A new sample drops the older samples it disagrees
  with, so a candidate who settles late is still calibrated on their settled pose.
- Until calibrated, poses pass through unchanged: the backend has already removed the
  face model's mean bias (`local_models.head_pose.POSE_BIAS`), so early frames are judged
  on that generic correction rather than held back.
- Re-calibration: after `BASELINE_ABSENCE_S` seconds with no face the baseline is dropped
  and learnt again (someone else may sit down, or the camera may have moved).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import replace

from server.analysis.observation import Observation, Pose

#: Calibration needs a stable run at least this long (seconds)...
BASELINE_WINDOW_S = 1.0
#: ...with at least this many poses in it.
BASELINE_MIN_SAMPLES = 3
#: Poses in a stable run differ by at most this on each axis (degrees).
BASELINE_MAX_SPREAD_DEG = 8.0
#: Calibration poses (and the baseline) are within these of straight ahead (degrees);
#: sessions pass the looking-away thresholds, these are their defaults.
BASELINE_MAX_YAW_DEG = 30.0
BASELINE_MAX_PITCH_DEG = 25.0
#: No face for this long (seconds) drops the baseline.
BASELINE_ABSENCE_S = 30.0


class PoseBaseline:
    def __init__(
        self,
        window_s: float = BASELINE_WINDOW_S,
        min_samples: int = BASELINE_MIN_SAMPLES,
        max_spread_deg: float = BASELINE_MAX_SPREAD_DEG,
        max_yaw_deg: float = BASELINE_MAX_YAW_DEG,
        max_pitch_deg: float = BASELINE_MAX_PITCH_DEG,
        absence_s: float = BASELINE_ABSENCE_S,
    ) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self.max_spread_deg = max_spread_deg
        self.max_yaw_deg = abs(max_yaw_deg)
        self.max_pitch_deg = abs(max_pitch_deg)
        self.absence_s = absence_s
        self.baseline: Pose | None = None
        self._samples: deque[tuple[float, Pose]] = deque(maxlen=64)
        self._last_face: float | None = None

    @property
    def calibrated(self) -> bool:
        return self.baseline is not None

    def apply(self, observation: Observation, now: float) -> Observation:
        """The observation with its primary face's pose relative to the baseline."""
        face = observation.primary_face
        if face is None:
            return observation
        if self._last_face is not None and now - self._last_face > self.absence_s:
            self.reset()
        self._last_face = now
        if face.pose is None:
            return observation
        if self.baseline is None and not observation.insufficient:
            self._learn(face.pose, now)
        if self.baseline is None:
            return observation
        relative = Pose(
            yaw=_wrap(face.pose.yaw - self.baseline.yaw),
            pitch=_wrap(face.pose.pitch - self.baseline.pitch),
            roll=_wrap(face.pose.roll - self.baseline.roll),
        )
        faces = tuple(
            replace(f, pose=relative) if f is face else f for f in observation.faces or ()
        )
        return replace(observation, faces=faces)

    def reset(self) -> None:
        self.baseline = None
        self._samples.clear()
        self._last_face = None

    def _learn(self, pose: Pose, now: float) -> None:
        if abs(pose.yaw) > self.max_yaw_deg or abs(pose.pitch) > self.max_pitch_deg:
            self._samples.clear()
            return
        # Keep only the samples that agree with the newest one.
        kept = [s for s in self._samples if _close(s[1], pose, self.max_spread_deg)]
        self._samples = deque(kept, maxlen=self._samples.maxlen)
        self._samples.append((now, pose))
        span = now - self._samples[0][0]
        if len(self._samples) >= self.min_samples and span >= self.window_s:
            poses = [p for _, p in self._samples]
            self.baseline = Pose(
                yaw=_clamp(statistics.median(p.yaw for p in poses), self.max_yaw_deg),
                pitch=_clamp(statistics.median(p.pitch for p in poses), self.max_pitch_deg),
                roll=statistics.median(p.roll for p in poses),
            )
            self._samples.clear()


def _close(a: Pose, b: Pose, limit: float) -> bool:
    return (
        abs(a.yaw - b.yaw) <= limit
        and abs(a.pitch - b.pitch) <= limit
        and abs(a.roll - b.roll) <= limit
    )


def _clamp(angle: float, limit: float) -> float:
    return max(-limit, min(limit, angle))


def _wrap(angle: float) -> float:
    return (angle + 180.0) % 360.0 - 180.0

