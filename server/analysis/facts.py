"""Per-frame facts: the few numbers and names the alert rules read from a frame, kept
with every stored frame so its alert history can be replayed (`server.analysis.rescore`).

They are small (counts, angles, labels, text), never pixels, and enough to run every rule
exactly as it ran live: the face count and the candidate's face (pose after the session's
pose baseline, confidence, eye direction), the unrounded engagement (the metrics in a
frame summary are rounded), the labels with their confidence and instance count, the
text lines with their confidence, and the frame's quality. Angles and confidences are
stored at full precision, so a replay reaches the same verdict at a threshold's edge.

`None` keeps its meaning throughout ("not looked at"), as in the observation itself.
"""

from __future__ import annotations

import math
from typing import Any

from server.analysis.observation import (
    Box,
    Checks,
    Face,
    Gaze,
    Label,
    Observation,
    Pose,
    Quality,
    TextLine,
)
from server.analysis.scoring import FrameMetrics

VERSION = 1
#: Bounds of what one frame keeps (far above what the backends return: Rekognition's
#: DetectText finds at most 100 words), so a frame's facts stay small whatever happens.
MAX_LABELS = 100
MAX_TEXT_LINES = 100
MAX_TEXT_CHARS = 500
_FULL = Box(0.0, 0.0, 1.0, 1.0)
_NONE = Box(0.0, 0.0, 0.0, 0.0)


def encode(obs: Observation, metrics: FrameMetrics) -> dict[str, Any]:
    """The facts of one analysed frame, as JSON-ready values (plain floats: a backend's
    numpy scalars would not survive JSON)."""
    face = obs.primary_face
    q = obs.quality
    return {
        "v": VERSION,
        "faces": None if obs.faces is None else len(obs.faces),
        "face": None if face is None else _face(face),
        "engagement": _f(metrics.engagement),
        "labels": None
        if obs.labels is None
        else [
            [str(lb.name), float(lb.confidence), int(lb.instances)]
            for lb in obs.labels[:MAX_LABELS]
        ],
        "text": None
        if obs.text is None
        else [
            [str(t.text)[:MAX_TEXT_CHARS], float(t.confidence)] for t in obs.text[:MAX_TEXT_LINES]
        ],
        "quality": None
        if q is None
        else {
            "brightness": _f(q.brightness),
            "sharpness": _f(q.sharpness),
            "face_size": _f(q.face_size),
            "insufficient": bool(q.insufficient),
            "reason": q.reason,
        },
    }


def _f(value: float | None) -> float | None:
    return None if value is None else float(value)


def _face(face: Face) -> dict[str, Any]:
    pose, gaze = face.pose, face.gaze
    return {
        "confidence": float(face.confidence),
        "pose": None if pose is None else [float(pose.yaw), float(pose.pitch), float(pose.roll)],
        "gaze": None
        if gaze is None
        else [float(gaze.yaw), float(gaze.pitch), float(gaze.confidence)],
    }


class BadFacts(ValueError):
    """A stored frame's facts cannot be read (damaged, or from another version)."""


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadFacts(f"not a number: {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise BadFacts(f"not a finite number: {value!r}")
    return v


def _opt_num(value: Any) -> float | None:
    return None if value is None else _num(value)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise BadFacts(f"not a list: {type(value).__name__}")
    return value


def decode(facts: Any) -> tuple[Observation, FrameMetrics]:
    """An observation and metrics that every rule judges exactly as it judged the live
    frame (only what the rules read is rebuilt). Raises `BadFacts`."""
    if not isinstance(facts, dict) or facts.get("v") != VERSION:
        raise BadFacts("no facts of a known version")
    faces: tuple[Face, ...] | None = None
    count = facts.get("faces")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1000:
            raise BadFacts(f"bad face count {count!r}")
        if count:
            # The candidate's face, then stand-ins that count but are never the largest.
            stand_ins = (Face(box=_NONE, confidence=0.0) for _ in range(count - 1))
            faces = (_decode_face(facts.get("face")), *stand_ins)
        else:
            faces = ()
    labels = None
    if facts.get("labels") is not None:
        labels = tuple(_decode_label(x) for x in _list(facts["labels"]))
    text = None
    if facts.get("text") is not None:
        text = tuple(_decode_text(x) for x in _list(facts["text"]))
    observation = Observation(
        backend="replay",
        checks=Checks(faces=faces is not None, labels=labels is not None, text=text is not None),
        faces=faces,
        labels=labels,
        text=text,
        quality=_decode_quality(facts.get("quality")),
    )
    return observation, FrameMetrics(engagement=_opt_num(facts.get("engagement")))


def _decode_face(raw: Any) -> Face:
    if not isinstance(raw, dict):
        raise BadFacts("faces counted but the face is missing")
    pose = raw.get("pose")
    gaze = raw.get("gaze")
    return Face(
        box=_FULL,
        confidence=_num(raw.get("confidence")),
        pose=None if pose is None else Pose(*(_num(v) for v in _triple(pose))),
        gaze=None if gaze is None else Gaze(*(_num(v) for v in _triple(gaze))),
    )


def _triple(value: Any) -> list[Any]:
    items = _list(value)
    if len(items) != 3:
        raise BadFacts("expected three numbers")
    return items


def _decode_label(raw: Any) -> Label:
    items = _list(raw)
    if len(items) != 3 or not isinstance(items[0], str):
        raise BadFacts("bad label")
    instances = items[2]
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 0:
        raise BadFacts("bad label instances")
    return Label(items[0], _num(items[1]), instances)


def _decode_text(raw: Any) -> TextLine:
    items = _list(raw)
    if len(items) != 2 or not isinstance(items[0], str):
        raise BadFacts("bad text line")
    return TextLine(items[0], _num(items[1]))


def _decode_quality(raw: Any) -> Quality | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadFacts("bad quality")
    reason = raw.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadFacts("bad quality reason")
    return Quality(
        brightness=_opt_num(raw.get("brightness")),
        sharpness=_opt_num(raw.get("sharpness")),
        face_size=_opt_num(raw.get("face_size")),
        insufficient=bool(raw.get("insufficient")),
        reason=reason,
    )
