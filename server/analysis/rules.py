"""Proctoring alert rules, raised as episodes.

Each rule looks at one analysed frame and says, per key (an object name for
`suspicious_object`, "" otherwise), whether its condition holds: True, False, or None when
the frame cannot tell (the check was not run, it failed, or the frame is too poor to judge).
`AlertEngine` turns those verdicts into episodes: an onset once the condition has held long
enough, nothing while it keeps holding, and an `ended` event with the duration when it
clears. Unknown frames neither advance nor reset a streak.

"Long enough" has two meanings, chosen per session:
- per frame (`dwell_interval_s=None`, the push transports, whose clients choose their own
  pace): `onset_frames` consecutive judged frames;
- capture time (`dwell_interval_s` set, WebRTC and recorded video, where the server picks
  the frames and may analyse five a second while a rule is pending): a rule of N > 1
  frames fires at the first analysed frame where its condition has held over at least
  (N - 1) × dwell_interval_s of capture time (`FrameFacts.time`), seen in at least two
  analysed frames. N = 1 rules fire on the first frame either way.
A rule with its own `dwell_s` (video_unusable) uses that capture-time dwell on every
transport. An episode's `started_at` is the first frame of its streak.
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
#: "behaviour": the brief's six flags; "technical": the video could not be judged.
Category = Literal["behaviour", "technical"]
Verdict = tuple[bool | None, dict[str, Any]]
#: Capture times are floats: a dwell of 2.0 s seen as 10 steps of 0.2 s must count.
_TIME_EPS = 1e-6
#: Quality reasons that say the camera, not the candidate, is the problem.
UNUSABLE_REASONS: frozenset[str] = frozenset({"too_dark", "too_bright", "too_blurred"})


@dataclass(frozen=True, slots=True)
class FrameFacts:
    index: int
    time: float  # capture time of the frame (wall clock; video time for recordings)
    observation: Observation
    metrics: FrameMetrics


class Rule(Protocol):
    type: str
    severity: Severity
    category: Category
    onset_frames: int
    #: A capture-time dwell of the rule's own, on every transport (None: from onset_frames).
    dwell_s: float | None

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        """Verdict per key; `tracked` are keys with a streak or an open episode, so a rule
        can say they no longer hold."""
        ...

    def message(self, key: str, details: dict[str, Any]) -> str: ...

    def thresholds(self) -> dict[str, Any]:
        """The rule's own thresholds, for the report's record of how it was judged."""
        ...


def _judgeable_faces(obs: Observation) -> bool:
    return obs.faces is not None and not obs.insufficient


@dataclass
class NoFaceRule:
    onset_frames: int = 3
    dwell_s: float | None = None
    type: str = "no_face_detected"
    severity: Severity = "warning"
    category: Category = "behaviour"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        obs = facts.observation
        if not _judgeable_faces(obs):
            return {"": (None, {})}
        return {"": (len(obs.faces or ()) == 0, {"faces": 0})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        if "required_dwell_s" in details:
            return f"No face detected for {details['dwell_s']:.1f} s"
        return f"No face detected for {self.onset_frames} or more consecutive frames"

    def thresholds(self) -> dict[str, Any]:
        return {}


@dataclass
class MultipleFacesRule:
    onset_frames: int = 1
    dwell_s: float | None = None
    type: str = "multiple_faces_detected"
    severity: Severity = "critical"
    category: Category = "behaviour"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        obs = facts.observation
        if obs.faces is None:
            return {"": (None, {})}
        count = len(obs.faces)
        return {"": (count > 1, {"faces": count, "min_faces": 2})}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"{details.get('faces', 'More than one')} faces in view"

    def thresholds(self) -> dict[str, Any]:
        return {"min_faces": 2}


@dataclass
class LookingAwayRule:
    yaw_deg: float = 30.0
    pitch_deg: float = 25.0
    onset_frames: int = 5
    dwell_s: float | None = None
    type: str = "looking_away"
    severity: Severity = "warning"
    category: Category = "behaviour"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        obs = facts.observation
        face = obs.primary_face if _judgeable_faces(obs) else None
        # A missing face is the no-face rule's business; turning far away often makes the
        # detector miss the face, so it must not reset this streak either.
        if face is None or face.pose is None:
            return {"": (None, {})}
        yaw, pitch = face.pose.yaw, face.pose.pitch
        away = abs(yaw) > self.yaw_deg or abs(pitch) > self.pitch_deg
        # The numbers that made it fire, beside the thresholds they crossed.
        return {
            "": (
                away,
                {
                    "yaw": round(yaw, 1),
                    "pitch": round(pitch, 1),
                    "yaw_threshold_deg": self.yaw_deg,
                    "pitch_threshold_deg": self.pitch_deg,
                },
            )
        }

    def message(self, key: str, details: dict[str, Any]) -> str:
        return (
            f"Looking away from the screen (yaw {details.get('yaw')}°, "
            f"pitch {details.get('pitch')}°)"
        )

    def thresholds(self) -> dict[str, Any]:
        return {"yaw_deg": self.yaw_deg, "pitch_deg": self.pitch_deg}


@dataclass
class LowEngagementRule:
    threshold: float = 40.0
    onset_frames: int = 10
    dwell_s: float | None = None
    type: str = "low_engagement"
    severity: Severity = "info"
    category: Category = "behaviour"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        value = facts.metrics.engagement
        if value is None or facts.observation.insufficient:
            return {"": (None, {})}
        details = {"engagement": round(value, 1), "engagement_below": self.threshold}
        return {"": (value < self.threshold, details)}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"Engagement below {self.threshold:g} (now {details.get('engagement')})"

    def thresholds(self) -> dict[str, Any]:
        return {"engagement_below": self.threshold}


@dataclass
class SuspiciousObjectRule:
    """`labels` flag whenever seen; `second_device_labels` (the candidate's own computer,
    screen, ...) only as a second device: two or more boxed instances in one frame. One
    person is the candidate; a second one flags the same way."""

    labels: frozenset[str] = frozenset()
    second_device_labels: frozenset[str] = frozenset()
    min_confidence: float = 70.0
    onset_frames: int = 1
    dwell_s: float | None = None
    type: str = "suspicious_object"
    severity: Severity = "warning"
    category: Category = "behaviour"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        labels = facts.observation.labels
        if labels is None:
            return dict.fromkeys(tracked, (None, {}))
        out: dict[str, Verdict] = {key: (False, {}) for key in tracked}
        for label in labels:
            if label.confidence <= self.min_confidence:
                continue
            details: dict[str, Any] = {
                "object": label.name,
                "confidence": round(label.confidence, 1),
                "min_confidence": self.min_confidence,
            }
            if label.name in self.labels and label.name != "Person":
                out[label.name] = (True, details)
            elif label.name == "Person" or label.name in self.second_device_labels:
                if label.instances >= 2:
                    details["instances"] = label.instances
                    if label.name != "Person":
                        details["second_device"] = True
                    out[label.name] = (True, details)
        return out

    def message(self, key: str, details: dict[str, Any]) -> str:
        if key == "Person":
            return f"Another person in view ({details.get('instances')} people)"
        if details.get("second_device"):
            return f"Second device in view: {details.get('instances')} × {key}"
        return f"Suspicious object: {key} ({details.get('confidence')}%)"

    def thresholds(self) -> dict[str, Any]:
        return {
            "min_confidence": self.min_confidence,
            "labels": sorted(self.labels),
            "second_device_labels": sorted(self.second_device_labels),
            "second_device_min_instances": 2,
        }


@dataclass
class TextDetectedRule:
    min_confidence: float = 80.0
    min_chars: int = 8
    onset_frames: int = 1
    dwell_s: float | None = None
    type: str = "text_detected"
    severity: Severity = "info"
    category: Category = "behaviour"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        lines = facts.observation.text
        if lines is None:
            return {"": (None, {})}
        confident = [t.text.strip() for t in lines if t.confidence >= self.min_confidence]
        chars = sum(len(t) for t in confident)
        details = {
            "lines": confident[:10],
            "chars": chars,
            "min_chars": self.min_chars,
            "min_confidence": self.min_confidence,
        }
        return {"": (chars >= self.min_chars, details)}

    def message(self, key: str, details: dict[str, Any]) -> str:
        return f"Text visible in the frame ({details.get('chars')} characters)"

    def thresholds(self) -> dict[str, Any]:
        return {"min_confidence": self.min_confidence, "min_chars": self.min_chars}


@dataclass
class VideoUnusableRule:
    """The camera cannot be judged: frames too dark, too bright or too blurred (quality
    reasons in `reasons`) for `dwell_s` of capture time. A judgeable frame ends it; a flat
    frame (covered lens) is judgeable, so it raises no_face_detected instead."""

    dwell_s: float | None = 10.0
    onset_frames: int = 2
    reasons: frozenset[str] = UNUSABLE_REASONS
    type: str = "video_unusable"
    severity: Severity = "warning"
    category: Category = "technical"

    def verdicts(self, facts: FrameFacts, tracked: Iterable[str]) -> dict[str, Verdict]:
        quality = facts.observation.quality
        if quality is None:
            return {"": (None, {})}
        if not quality.insufficient:
            return {"": (False, {})}
        if quality.reason in self.reasons:
            return {
                "": (
                    True,
                    {
                        "reason": quality.reason,
                        "brightness": quality.brightness,
                        "sharpness": quality.sharpness,
                    },
                )
            }
        return {"": (None, {})}  # e.g. a face too small: not the camera's fault

    def message(self, key: str, details: dict[str, Any]) -> str:
        reason = str(details.get("reason") or "unusable").replace("_", " ")
        return f"Video cannot be judged ({reason}) for {details.get('dwell_s', 0):.0f} s"

    def thresholds(self) -> dict[str, Any]:
        return {"reasons": sorted(self.reasons)}


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
            second_device_labels=frozenset(settings.second_device_labels),
            min_confidence=settings.suspicious_object_confidence,
            onset_frames=settings.suspicious_object_frames,
        ),
        TextDetectedRule(
            min_confidence=settings.text_min_confidence,
            min_chars=settings.text_min_chars,
            onset_frames=settings.text_detected_frames,
        ),
        VideoUnusableRule(dwell_s=settings.unusable_video_s),
    ]


@dataclass
class Episode:
    id: str
    type: str
    key: str
    severity: Severity
    category: Category
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
            "category": self.category,
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
    """Episode bookkeeping for one session. O(rules × tracked keys) per frame.
    `dwell_interval_s`: None counts frames (push transports); a float counts capture time
    (see the module doc)."""

    rules: list[Rule]
    dwell_interval_s: float | None = None
    _tracks: dict[tuple[str, str], _Track] = field(default_factory=dict, init=False)
    _by_type: dict[str, Rule] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._by_type = {rule.type: rule for rule in self.rules}

    @property
    def timing(self) -> Literal["capture", "frames"]:
        return "frames" if self.dwell_interval_s is None else "capture"

    def required_dwell(self, rule: Rule) -> float | None:
        """Capture time the condition must hold before an onset; None: count frames."""
        if rule.dwell_s is not None:
            return rule.dwell_s
        if self.dwell_interval_s is None or rule.onset_frames <= 1:
            return None
        return (rule.onset_frames - 1) * self.dwell_interval_s

    def _due(self, rule: Rule, track: _Track, now: float) -> bool:
        dwell = self.required_dwell(rule)
        if dwell is None:
            return track.streak >= rule.onset_frames
        # Never on one frame alone: a dwell is seen from two sides.
        min_frames = max(2, rule.onset_frames) if rule.dwell_s is not None else 2
        return track.streak >= min_frames and now - track.first_time >= dwell - _TIME_EPS

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
                    if track.episode is None and self._due(rule, track, facts.time):
                        events.append(self._open(rule, key, track, facts, details))
                elif track is not None:
                    if track.episode is not None:
                        events.append(
                            self._close(track.episode, facts.time, facts.index, "cleared")
                        )
                    del self._tracks[(rule.type, key)]
        return events

    def _open(
        self, rule: Rule, key: str, track: _Track, facts: FrameFacts, details: dict[str, Any]
    ) -> dict[str, Any]:
        full = {
            **details,
            "consecutive_frames": track.streak,
            "first_frame": track.first_frame,
            "dwell_s": round(max(0.0, facts.time - track.first_time), 3),
        }
        required = self.required_dwell(rule)
        if required is not None:
            full["required_dwell_s"] = required
        track.episode = Episode(
            id=secrets.token_hex(8),
            type=rule.type,
            key=key,
            severity=rule.severity,
            category=rule.category,
            message=rule.message(key, full),
            onset_frame=facts.index,
            # The behaviour began with the first frame of the streak.
            started_at=track.first_time,
            details=full,
        )
        return track.episode.event("onset")

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
        """The earliest capture time at which a pending rule's dwell completes (a sampler
        samples right then, so the onset is neither early nor late). None when nothing is
        pending, or when counting frames (push clients choose their own pace)."""
        if self.dwell_interval_s is None:
            return None
        due: list[float] = []
        for (type_, _key), track in self._tracks.items():
            if track.episode is not None or track.streak == 0:
                continue
            dwell = self.required_dwell(self._by_type[type_])
            if dwell is not None:
                due.append(track.first_time + dwell)
        return min(due, default=None)

    def describe(self) -> dict[str, Any]:
        """How this engine judges: the report's record of the settings it was judged with."""
        return {
            "timing": self.timing,
            "rule_frame_interval_s": self.dwell_interval_s,
            "rules": {
                rule.type: {
                    "severity": rule.severity,
                    "category": rule.category,
                    "onset_frames": rule.onset_frames,
                    "dwell_s": self.required_dwell(rule),
                    **rule.thresholds(),
                }
                for rule in self.rules
            },
        }
