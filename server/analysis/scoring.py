"""Per-frame behavioural metrics (0–100) from an observation, as the contract defines them.

- eye_contact: from the primary face's gaze relative to the camera; frontal = 100, the
  looking-away thresholds score 50, twice the thresholds or more score 0. The gaze is the
  head pose plus the eye direction when the backend reports one confidently (Rekognition's
  EyeDirection is relative to the head), so eyes on a second screen with the head frontal
  score low; otherwise it is the head pose alone.
- facial_expression: share of positive emotions (settings.positive_emotions) in the
  face's emotion distribution.
- engagement: 0.6 × eye_contact + 0.4 × facial_expression.
- posture: head stability over the last `posture_window_frames` faces: the mean standard
  deviation of yaw, pitch and roll; 0° → 100, 15° or more → 0.
- confidence: the face detector's confidence.

All metrics are None for a frame without a face (nothing to score), and the scorer keeps
its small window only; its cost does not grow with the session.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from server.analysis.observation import Face, Observation

METRICS: tuple[str, ...] = (
    "eye_contact",
    "engagement",
    "facial_expression",
    "posture",
    "confidence",
)
POSTURE_ZERO_AT_DEG = 15.0


@dataclass(frozen=True, slots=True)
class FrameMetrics:
    eye_contact: float | None = None
    engagement: float | None = None
    facial_expression: float | None = None
    posture: float | None = None
    confidence: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {m: (None if (v := getattr(self, m)) is None else round(v, 1)) for m in METRICS}


def _clamp(value: float) -> float:
    return max(0.0, min(100.0, value))


def gaze_angles(face: Face, gaze_min_confidence: float = 50.0) -> tuple[float, float] | None:
    """(yaw, pitch) of where the face looks, relative to the camera."""
    if face.pose is None:
        return None  # an eye direction alone is relative to an unknown head pose
    yaw, pitch = face.pose.yaw, face.pose.pitch
    if face.gaze is not None and face.gaze.confidence >= gaze_min_confidence:
        # Small-angle composition: eyes rotate within the head, the head within the view.
        yaw += face.gaze.yaw
        pitch += face.gaze.pitch
    return yaw, pitch


def eye_contact_score(
    face: Face, yaw_limit: float, pitch_limit: float, gaze_min_confidence: float = 50.0
) -> float | None:
    angles = gaze_angles(face, gaze_min_confidence)
    if angles is None:
        return None
    yaw, pitch = angles
    # 1.0 at the looking-away threshold, 2.0 at twice it.
    off_axis = max(abs(yaw) / yaw_limit, abs(pitch) / pitch_limit)
    return _clamp(100.0 * (1.0 - off_axis / 2.0))


def expression_score(face: Face, positive: frozenset[str]) -> float | None:
    total = sum(face.emotions.values())
    if total <= 0:
        return None
    return _clamp(100.0 * sum(v for k, v in face.emotions.items() if k in positive) / total)


class Scorer:
    """Scores one session's frames; holds only the posture window."""

    def __init__(
        self,
        yaw_limit: float = 30.0,
        pitch_limit: float = 25.0,
        posture_window: int = 10,
        positive_emotions: tuple[str, ...] = ("HAPPY", "CALM", "SURPRISED"),
        gaze_min_confidence: float = 50.0,
    ) -> None:
        self.gaze_min_confidence = gaze_min_confidence
        self.yaw_limit = yaw_limit
        self.pitch_limit = pitch_limit
        self.positive = frozenset(e.upper() for e in positive_emotions)
        self._poses: deque[tuple[float, float, float]] = deque(maxlen=max(2, posture_window))

    def score(self, observation: Observation) -> FrameMetrics:
        face = observation.primary_face
        if face is None:
            return FrameMetrics()
        eye = eye_contact_score(
            face, self.yaw_limit, self.pitch_limit, self.gaze_min_confidence
        )
        expr = expression_score(face, self.positive)
        if eye is not None and expr is not None:
            engagement: float | None = 0.6 * eye + 0.4 * expr
        else:
            engagement = eye if eye is not None else expr
        posture = None
        if face.pose is not None:
            self._poses.append((face.pose.yaw, face.pose.pitch, face.pose.roll))
            posture = self._posture()
        return FrameMetrics(
            eye_contact=eye,
            engagement=engagement,
            facial_expression=expr,
            posture=posture,
            confidence=_clamp(face.confidence),
        )

    def _posture(self) -> float:
        if len(self._poses) < 2:
            return 100.0
        n = len(self._poses)
        spread = 0.0
        for axis in range(3):
            values = [p[axis] for p in self._poses]
            mean = sum(values) / n
            spread += math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        return _clamp(100.0 * (1.0 - (spread / 3.0) / POSTURE_ZERO_AT_DEG))
