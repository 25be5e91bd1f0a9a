"""What an analyser backend sees in one frame: the typed observation every backend returns.

Units follow Rekognition so both backends are interchangeable: confidences are 0–100,
angles are degrees, boxes are ratios of the frame (0–1), emotion names are Rekognition's
(HAPPY, SAD, ANGRY, CONFUSED, DISGUSTED, SURPRISED, CALM, FEAR).

`None` means "not looked at or unknown" and is different from an empty tuple, which means
"looked and found nothing": rules must never count an unknown as an absence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

EMOTIONS: tuple[str, ...] = (
    "HAPPY",
    "SAD",
    "ANGRY",
    "CONFUSED",
    "DISGUSTED",
    "SURPRISED",
    "CALM",
    "FEAR",
)


@dataclass(frozen=True, slots=True)
class Checks:
    """Which questions to ask of a frame. Faces are cheap and asked of every frame;
    labels and text are slower signals asked at a lower cadence."""

    faces: bool = True
    labels: bool = False
    text: bool = False

    def names(self) -> list[str]:
        return [n for n in ("faces", "labels", "text") if getattr(self, n)]


@dataclass(frozen=True, slots=True)
class Box:
    left: float
    top: float
    width: float
    height: float


def box_json(box: Box) -> dict[str, float]:
    return {
        "left": round(box.left, 4),
        "top": round(box.top, 4),
        "width": round(box.width, 4),
        "height": round(box.height, 4),
    }


@dataclass(frozen=True, slots=True)
class Pose:
    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True, slots=True)
class Gaze:
    """Where the eyes point relative to the head (Rekognition's EyeDirection: "independent
    of the head pose"), in degrees; the gaze relative to the camera is pose + gaze."""

    yaw: float
    pitch: float
    confidence: float  # 0..100


@dataclass(frozen=True, slots=True)
class Face:
    box: Box
    confidence: float
    pose: Pose | None = None
    emotions: dict[str, float] = field(default_factory=dict)  # name -> 0..100
    eyes_open: bool | None = None
    mouth_open: bool | None = None
    smile: bool | None = None
    gaze: Gaze | None = None  # None: the backend does not estimate eye direction

    @property
    def dominant_emotion(self) -> str | None:
        if not self.emotions:
            return None
        return max(self.emotions.items(), key=lambda kv: kv[1])[0]


@dataclass(frozen=True, slots=True)
class Label:
    name: str
    confidence: float
    instances: int = 0  # how many boxed instances the backend found (0 = not boxed)
    boxes: tuple[Box, ...] = ()  # where those instances are (evidence snapshots box them)


@dataclass(frozen=True, slots=True)
class TextLine:
    text: str
    confidence: float
    box: Box | None = None  # where the line is, when the backend says


@dataclass(frozen=True, slots=True)
class Quality:
    """Whether the frame can tell us anything about the candidate's behaviour."""

    brightness: float | None = None  # mean luma 0..255
    sharpness: float | None = None  # variance of the Laplacian
    face_size: float | None = None  # largest face height as a ratio of frame height
    insufficient: bool = False
    reason: str | None = None  # "too_dark", "too_blurred", "face_too_small", ...

    def to_json(self) -> dict[str, Any]:
        return {
            "brightness": self.brightness,
            "sharpness": self.sharpness,
            "face_size": self.face_size,
            "insufficient": self.insufficient,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Observation:
    backend: str
    checks: Checks
    faces: tuple[Face, ...] | None = None  # None: faces not checked or the check failed
    labels: tuple[Label, ...] | None = None
    text: tuple[TextLine, ...] | None = None
    quality: Quality | None = None
    degraded: tuple[str, ...] = ()  # why a requested check has no answer, e.g. "faces:throttled"
    calls: dict[str, int] = field(default_factory=dict)  # billed API calls by operation
    latency_ms: float = 0.0
    width: int = 0
    height: int = 0

    @property
    def primary_face(self) -> Face | None:
        """The largest face: the candidate, when there is one."""
        if not self.faces:
            return None
        return max(self.faces, key=lambda f: f.box.width * f.box.height)

    @property
    def insufficient(self) -> bool:
        return bool(self.quality and self.quality.insufficient)

    def without_emotions(self) -> Observation:
        """The same observation with no emotion or smile on any face (EMOTION_ANALYSIS
        off: whatever a backend inferred goes no further)."""
        if not self.faces or not any(f.emotions or f.smile is not None for f in self.faces):
            return self
        faces = tuple(replace(f, emotions={}, smile=None) for f in self.faces)
        return replace(self, faces=faces)

    def to_json(self) -> dict[str, Any]:
        """The whole observation as JSON (crosses process boundaries in tests; per-frame
        results carry a smaller projection built by the session manager)."""

        def face_json(f: Face) -> dict[str, Any]:
            return {
                "box": box_json(f.box),
                "confidence": round(f.confidence, 2),
                "pose": None
                if f.pose is None
                else {
                    "yaw": round(f.pose.yaw, 2),
                    "pitch": round(f.pose.pitch, 2),
                    "roll": round(f.pose.roll, 2),
                },
                "gaze": None
                if f.gaze is None
                else {
                    "yaw": round(f.gaze.yaw, 2),
                    "pitch": round(f.gaze.pitch, 2),
                    "confidence": round(f.gaze.confidence, 2),
                },
                "emotions": {k: round(v, 2) for k, v in f.emotions.items()},
                "eyes_open": f.eyes_open,
                "mouth_open": f.mouth_open,
                "smile": f.smile,
            }

        return {
            "backend": self.backend,
            "checks": self.checks.names(),
            "faces": None if self.faces is None else [face_json(f) for f in self.faces],
            "labels": None
            if self.labels is None
            else [
                {
                    "name": lb.name,
                    "confidence": round(lb.confidence, 2),
                    "instances": lb.instances,
                    "boxes": [box_json(b) for b in lb.boxes],
                }
                for lb in self.labels
            ],
            "text": None
            if self.text is None
            else [{"text": t.text, "confidence": round(t.confidence, 2)} for t in self.text],
            "quality": None if self.quality is None else self.quality.to_json(),
            "degraded": list(self.degraded),
            "calls": dict(self.calls),
            "latency_ms": round(self.latency_ms, 2),
            "width": self.width,
            "height": self.height,
        }
