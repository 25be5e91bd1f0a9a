"""Proctoring alert rules, raised as episodes.

Each rule looks at one analysed frame and says, per key (an object name for
`suspicious_object`, "" otherwise), whether its condition holds: True, False, or None when
the frame cannot tell (the check was not run, it failed, or the frame is too poor to judge).
`AlertEngine` turns those verdicts into episodes: an onset once the condition has held for
the rule's number of consecutive frames, nothing while it keeps holding, and an `ended`
event with the duration when it clears. Unknown frames neither advance nor reset a streak.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from server.analysis.observation import Observation
from server.analysis.scoring import FrameMetrics
from server.config import Settings

Severity = Literal["info", "warning", "critical"]
Verdict = tuple[bool | None, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FrameFacts:
    index: int
    time: float  # wall-clock capture time of the frame
    observation: Observation
    metrics: FrameMetrics


class Rule(Protocol):
    type: str
    severity: Severity
    onset_frames: int

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        """Verdict per key; `tracked` are keys with a streak or an open episode, so a rule
        can say they no longer hold."""
        ...

    def message(self, key: str, details: dict[str, Any]) -> str: ...


def _judgeable_faces(obs: Observation) -> bool:
    return obs.faces is not None and not obs.insufficient


@dataclass
class NoFaceRule:
    onset_frames: int = 3
    type: str = "no_face_detected"
    severity: Severity = "warning"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        obs = facts.observation
        if not _judgeable_faces(obs):
            return {"": (None, {})}
        return {"": (len(obs.faces or ()) == 0, {})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"No face detected for {self.onset_frames} or more consecutive frames"


@dataclass
class MultipleFacesRule:
    onset_frames: int = 1
    type: str = "multiple_faces_detected"
    severity: Severity = "critical"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        obs = facts.observation
        if obs.faces is None:
            return {"": (None, {})}
        count = len(obs.faces)
        return {"": (count > 1, {"faces": count})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"{details.get('faces', 'More than one')} faces in view"


@dataclass
class LookingAwayRule:
    yaw_deg: float = 30.0
    pitch_deg: float = 25.0
    onset_frames: int = 5
    type: str = "looking_away"
    severity: Severity = "warning"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        obs = facts.observation
        face = obs.primary_face if _judgeable_faces(obs) else None
        # A missing face is the no-face rule's business; turning far away often makes the
        # detector miss the face, so it must not reset this streak either.
        if face is None or face.pose is None:
            return {"": (None, {})}
        yaw, pitch = face.pose.yaw, face.pose.pitch
        away = abs(yaw) > self.yaw_deg or abs(pitch) > self.pitch_deg
        return {"": (away, {"yaw": round(yaw, 1), "pitch": round(pitch, 1)})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return (
            f"Looking away from the screen (yaw {details.get('yaw')}°, "
            f"pitch {details.get('pitch')}°)"
        )


@dataclass
class LowEngagementRule:
    threshold: float = 40.0
    onset_frames: int = 10
    type: str = "low_engagement"
    severity: Severity = "info"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        value = facts.metrics.engagement
        if value is None or facts.observation.insufficient:
            return {"": (None, {})}
        return {"": (value < self.threshold, {"engagement": round(value, 1)})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"Engagement below {self.threshold:g} (now {details.get('engagement')})"


@dataclass
class SuspiciousObjectRule:
    labels: frozenset[str] = frozenset()
    min_confidence: float = 70.0
    onset_frames: int = 1
    type: str = "suspicious_object"
    severity: Severity = "warning"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        labels = facts.observation.labels
        if labels is None:
            return dict.fromkeys(tracked, (None, {}))
        out: dict[str, Verdict] = {key: (False, {}) for key in tracked}
        for label in labels:
            if label.confidence <= self.min_confidence:
                continue
            # One person is the candidate; a second one is what matters.
            if label.name == "Person":
                if label.instances >= 2:
                    out["Person"] = (
                        True,
                        {
                            "object": "Person",
                            "instances": label.instances,
                            "confidence": round(label.confidence, 1),
                        },
                    )
                continue
            if label.name in self.labels:
                out[label.name] = (
                    True,
                    {"object": label.name, "confidence": round(label.confidence, 1)},
                )
        return out

    def message(self, key: str, details: dict[str, Any]) -> str:
        if key == "Person":
            return f"Another person in view ({details.get('instances')} people)"
        return f"Suspicious object: {key} ({details.get('confidence')}%)"


@dataclass
class TextDetectedRule:
    min_confidence: float = 80.0
    min_chars: int = 8
    onset_frames: int = 1
    type: str = "text_detected"
    severity: Severity = "info"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        lines = facts.observation.text
        if lines is None:
            return {"": (None, {})}
        confident = [t.text.strip() for t in lines if t.confidence >= self.min_confidence]
        chars = sum(len(t) for t in confident)
        return {"": (chars >= self.min_chars, {"lines": confident[:10], "chars": chars})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"Text visible in the frame ({details.get('chars')} characters)"


def rules_from_settings(settings: Settings) -> list[Rule]:
    return [
        NoFaceRule(onset_frames=settings.no_face_frames),
        MultipleFacesRule(onset_frames=settings.multiple_faces_frames),
        LookingAwayRule(
            yaw_deg=settings.looking_away_yaw_deg,
            pitch_deg=settings.looking_away_pitch_deg,
            onset_frames=settings.looking_away_frames,
        ),
        LowEngagementRule(
            threshold=settings.low_engagement_threshold,
            onset_frames=settings.low_engagement_frames,
        ),
        SuspiciousObjectRule(
            labels=frozenset(settings.suspicious_labels),
            min_confidence=settings.suspicious_object_confidence,
        ),
        TextDetectedRule(
            min_confidence=settings.text_min_confidence, min_chars=settings.text_min_chars
        ),
    ]


@dataclass
class Episode:
    id: str
    type: str
    key: str
    severity: Severity
    message: str
    onset_frame: int
    started_at: float
    details: dict[str, Any]
    ended_at: float | None = None
    end_frame: int | None = None
    end_reason: str | None = None

    @property
    def duration_s(self) -> float | None:
        return (
            None if self.ended_at is None else round(max(0.0, self.ended_at - self.started_at), 3)
        )

    def event(self, status: Literal["onset", "ended"]) -> dict[str, Any]:
        return {
            "episode_id": self.id,
            "type": self.type,
            "severity": self.severity,
            "status": status,
            "message": self.message,
            "object": self.key or None,
            "frame_index": self.onset_frame if status == "onset" else self.end_frame,
            "onset_frame": self.onset_frame,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "end_reason": self.end_reason,
            "details": self.details,
        }


@dataclass
class _Track:
    streak: int = 0
    first_time: float = 0.0
    first_frame: int = 0
    episode: Episode | None = None


@dataclass
class AlertEngine:
    """Episode bookkeeping for one session. O(rules × tracked keys) per frame."""

    rules: list[Rule]
    _tracks: dict[tuple[str, str], _Track] = field(default_factory=dict)

    def evaluate(self, facts: FrameFacts) -> list[dict[str, Any]]:
        """Feed one analysed frame; returns the onset/ended events it caused."""
        events: list[dict[str, Any]] = []
        for rule in self.rules:
            tracked = [k for (t, k) in self._tracks if t == rule.type]
            for key, (holds, details) in rule.verdicts(facts, tracked).items():
                if holds is None:
                    continue
                track = self._tracks.get((rule.type, key))
                if holds:
                    if track is None:
                        track = self._tracks[(rule.type, key)] = _Track()
                    if track.streak == 0:
                        track.first_time, track.first_frame = facts.time, facts.index
                    track.streak += 1
                    if track.episode is None and track.streak >= rule.onset_frames:
                        track.episode = Episode(
                            id=secrets.token_hex(8),
                            type=rule.type,
                            key=key,
                            severity=rule.severity,
                            message=rule.message(key, details),
                            onset_frame=facts.index,
                            # The behaviour began with the first frame of the streak.
                            started_at=track.first_time,
                            details={
                                **details,
                                "consecutive_frames": track.streak,
                                "first_frame": track.first_frame,
                            },
                        )
                        events.append(track.episode.event("onset"))
                elif track is not None:
                    if track.episode is not None:
                        events.append(
                            self._close(track.episode, facts.time, facts.index, "cleared")
                        )
                    del self._tracks[(rule.type, key)]
        return events

    def _close(self, episode: Episode, when: float, frame: int, reason: str) -> dict[str, Any]:
        episode.ended_at = when
        episode.end_frame = frame
        episode.end_reason = reason
        return episode.event("ended")

    def close_all(
        self, when: float, frame: int, reason: str = "session_ended"
    ) -> list[dict[str, Any]]:
        events = [
            self._close(t.episode, when, frame, reason)
            for t in self._tracks.values()
            if t.episode is not None
        ]
        self._tracks.clear()
        return events

    def active(self) -> list[Episode]:
        return [t.episode for t in self._tracks.values() if t.episode is not None]

    def pending(self) -> list[str]:
        """Rule types with a streak under way but no episode yet (a sampler samples
        faster while any is pending, to confirm or clear it quickly)."""
        return [t for (t, _k), tr in self._tracks.items() if tr.episode is None and tr.streak > 0]

    def pending_due_at(self) -> float | None:
        """Capture time at which a pending rule's dwell completes (per-frame counting:
        never)."""
        return None
