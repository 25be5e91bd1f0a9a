"""Re-scoring: a session's alert history recomputed from its stored per-frame facts with
other thresholds, or with rules switched off, beside the original and without touching it.

Pure: nothing here reads the store or the clock. The caller gives the session's own rule
record (`sessions.rules`, what `AlertEngine.describe()` wrote when it started) and the
operator's overrides; `effective_rules` validates the overrides strictly (an unknown rule,
an unknown field or a value out of range is a `RescoreInvalid` with its own code) and
builds the rules; `Replay.consume` feeds the stored frames, streamed in index order, to
a fresh `AlertEngine` with the session's own pacing (capture-time dwell for WebRTC and
recorded video, frame counts for push clients), exactly as the live worker fed it.
Replaying with no overrides therefore reproduces the session's alerts (tests prove it);
only the episode ids differ, so replayed alerts are matched to the originals by rule,
object and onset frame.

The per-frame metrics are the ones measured live: a new looking-away threshold changes
the looking_away rule, not the engagement score the live scorer computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from server.analysis import facts as frame_facts
from server.analysis.rules import (
    AlertEngine,
    FrameFacts,
    LookingAwayRule,
    LowEngagementRule,
    MultipleFacesRule,
    NoFaceRule,
    Rule,
    SuspiciousObjectRule,
    TextDetectedRule,
    VideoUnusableRule,
)

#: Episodes a replay keeps at most (a flapping rule over hours could open thousands).
MAX_ALERTS = 10_000
#: Quality reasons video_unusable may be told to count.
QUALITY_REASONS = frozenset({"too_dark", "too_bright", "too_blurred", "face_too_small"})


class RescoreInvalid(ValueError):
    """The overrides are not acceptable; `code` says how (400 at the API)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Field:
    kind: str  # "number" | "int" | "labels" | "reasons"
    low: float = 0.0
    high: float = math.inf


_ONSET = _Field("int", 1, 1000)
_CONFIDENCE = _Field("number", 0, 100)
_LABELS = _Field("labels")
#: What each rule lets an operator change (the names `describe()` gives them), besides
#: `enabled`. A rule's own `dwell_s` is changeable where it has one (video_unusable);
#: elsewhere it follows from onset_frames and the session's pacing.
FIELDS: dict[str, dict[str, _Field]] = {
    "no_face_detected": {"onset_frames": _ONSET},
    "multiple_faces_detected": {"onset_frames": _ONSET},
    "looking_away": {
        "onset_frames": _ONSET,
        "yaw_deg": _Field("number", 0, 180),
        "pitch_deg": _Field("number", 0, 180),
    },
    "low_engagement": {"onset_frames": _ONSET, "engagement_below": _Field("number", 0, 100)},
    "suspicious_object": {
        "onset_frames": _ONSET,
        "min_confidence": _CONFIDENCE,
        "labels": _LABELS,
        "second_device_labels": _LABELS,
    },
    "text_detected": {
        "onset_frames": _ONSET,
        "min_confidence": _CONFIDENCE,
        "min_chars": _Field("int", 0, 100_000),
    },
    "video_unusable": {
        "onset_frames": _ONSET,
        "dwell_s": _Field("number", 0, 3600),
        "reasons": _Field("reasons"),
    },
}


def _check(rule: str, name: str, spec: _Field, value: Any) -> Any:
    where = f"rules.{rule}.{name}"
    if spec.kind in ("number", "int"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RescoreInvalid("invalid_rule_value", f"{where} must be a number")
        if spec.kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
            raise RescoreInvalid("invalid_rule_value", f"{where} must be a whole number")
        if not math.isfinite(value) or not spec.low <= value <= spec.high:
            raise RescoreInvalid(
                "invalid_rule_value", f"{where} must be within {spec.low:g}..{spec.high:g}"
            )
        return int(value) if spec.kind == "int" else float(value)
    if not isinstance(value, list) or len(value) > 200:
        raise RescoreInvalid("invalid_rule_value", f"{where} must be a list (at most 200)")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= 100:
            raise RescoreInvalid(
                "invalid_rule_value", f"{where} must hold names of 1..100 characters"
            )
        if spec.kind == "reasons" and item not in QUALITY_REASONS:
            raise RescoreInvalid(
                "invalid_rule_value",
                f"{where}: {item!r} is not one of {', '.join(sorted(QUALITY_REASONS))}",
            )
    return frozenset(value)


def validate_overrides(raw: Any) -> dict[str, dict[str, Any]]:
    """The operator's `{"rules": {rule: {field: value}}}` part, checked and normalised."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RescoreInvalid("invalid_rule_value", "rules must be an object of rule names")
    out: dict[str, dict[str, Any]] = {}
    for rule, changes in raw.items():
        if rule not in FIELDS:
            raise RescoreInvalid(
                "unknown_rule",
                f"no rule {str(rule)[:60]!r}; rules are {', '.join(FIELDS)}",
            )
        if not isinstance(changes, dict):
            raise RescoreInvalid("invalid_rule_value", f"rules.{rule} must be an object")
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "enabled":
                if not isinstance(value, bool):
                    raise RescoreInvalid(
                        "invalid_rule_value", f"rules.{rule}.enabled must be true or false"
                    )
                checked[name] = value
                continue
            spec = FIELDS[rule].get(name)
            if spec is None:
                allowed = ", ".join(["enabled", *FIELDS[rule]])
                raise RescoreInvalid(
                    "unknown_rule_field",
                    f"rules.{rule} has no field {str(name)[:60]!r}; it has {allowed}",
                )
            checked[name] = _check(rule, name, spec, value)
        out[rule] = checked
    return out


def _build(rule_type: str, values: dict[str, Any]) -> Rule:
    onset = values["onset_frames"]
    if rule_type == "no_face_detected":
        return NoFaceRule(onset_frames=onset)
    if rule_type == "multiple_faces_detected":
        return MultipleFacesRule(onset_frames=onset)
    if rule_type == "looking_away":
        return LookingAwayRule(
            yaw_deg=values["yaw_deg"], pitch_deg=values["pitch_deg"], onset_frames=onset
        )
    if rule_type == "low_engagement":
        return LowEngagementRule(threshold=values["engagement_below"], onset_frames=onset)
    if rule_type == "suspicious_object":
        return SuspiciousObjectRule(
            labels=frozenset(values["labels"]),
            second_device_labels=frozenset(values["second_device_labels"]),
            min_confidence=values["min_confidence"],
            onset_frames=onset,
        )
    if rule_type == "text_detected":
        return TextDetectedRule(
            min_confidence=values["min_confidence"],
            min_chars=values["min_chars"],
            onset_frames=onset,
        )
    if rule_type == "video_unusable":
        return VideoUnusableRule(
            dwell_s=values["dwell_s"], onset_frames=onset, reasons=frozenset(values["reasons"])
        )
    raise KeyError(rule_type)


class RulesUnreadable(ValueError):
    """The session's stored rule record cannot be rebuilt into rules."""


def rules_from_record(record: dict[str, Any]) -> tuple[list[Rule], float | None]:
    """The rules and pacing a session was judged with, from its `sessions.rules` record
    (the same rules in the same order). Raises `RulesUnreadable`."""
    described = record.get("rules")
    if not isinstance(described, dict):
        raise RulesUnreadable("the record has no rules")
    timing = record.get("timing")
    interval = record.get("rule_frame_interval_s")
    if timing == "capture":
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise RulesUnreadable("capture timing without a frame interval")
        dwell: float | None = float(interval)
    elif timing == "frames":
        dwell = None
    else:
        raise RulesUnreadable(f"unknown timing {timing!r}")
    rules: list[Rule] = []
    for rule_type, values in described.items():
        if rule_type not in FIELDS or not isinstance(values, dict):
            raise RulesUnreadable(f"unknown rule {rule_type!r}")
        try:
            checked = {
                name: _check(rule_type, name, spec, values[name])
                for name, spec in FIELDS[rule_type].items()
            }
        except (KeyError, RescoreInvalid) as exc:
            raise RulesUnreadable(f"{rule_type}: {exc}") from None
        rules.append(_build(rule_type, checked))
    return rules, dwell


def effective_rules(
    rules: list[Rule], dwell: float | None, overrides: dict[str, dict[str, Any]]
) -> tuple[list[Rule], list[str]]:
    """`rules` with the (validated) overrides applied; returns them and the types
    switched off. A rule the session did not have cannot be tuned."""
    by_type = {r.type: r for r in rules}
    for rule_type in overrides:
        if rule_type not in by_type:
            raise RescoreInvalid(
                "unknown_rule", f"this session was not judged with a {rule_type} rule"
            )
    out: list[Rule] = []
    disabled: list[str] = []
    for rule in rules:
        changes = dict(overrides.get(rule.type, {}))
        if changes.pop("enabled", True) is False:
            disabled.append(rule.type)
            continue
        if not changes:
            out.append(rule)
            continue
        own = _values(rule)
        out.append(_build(rule.type, {**own, **changes}))
    return out, disabled


def _values(rule: Rule) -> dict[str, Any]:
    """A rule's settings under the names FIELDS uses."""
    values: dict[str, Any] = {"onset_frames": rule.onset_frames, **rule.thresholds()}
    if rule.type == "video_unusable":
        values["dwell_s"] = rule.dwell_s
    return values


@dataclass
class ReplayResult:
    alerts: list[dict[str, Any]]  # episodes as the live engine stores them
    frames: int = 0  # frames replayed
    frames_without_facts: int = 0  # stored before facts were kept, or damaged
    truncated: bool = False  # more than MAX_ALERTS episodes


@dataclass
class Replay:
    """`consume` is a `Store.scan_frames` consumer (it runs in the store's reader thread
    over the streamed rows, holding only the engine's small state and the episodes)."""

    rules: list[Rule]
    dwell_interval_s: float | None
    #: The session's end as the live engine closed it (capture time, last frame index,
    #: reason); None for a session still live or interrupted (episodes stay open).
    end: tuple[float, int | None, str] | None = None
    decode: Callable[[Any], Any] = field(default=frame_facts.decode)

    def consume(self, _span: Any, rows: Iterator[tuple[Any, Any, Any]]) -> ReplayResult:
        engine = AlertEngine(list(self.rules), dwell_interval_s=self.dwell_interval_s)
        episodes: dict[str, dict[str, Any]] = {}
        result = ReplayResult(alerts=[])
        last = -1
        for idx, t, raw in rows:
            try:
                summary = json.loads(raw) if isinstance(raw, str | bytes) else None
                if not isinstance(summary, dict):
                    raise frame_facts.BadFacts("unreadable frame row")
                if isinstance(t, bool) or not isinstance(t, int | float):
                    raise frame_facts.BadFacts("bad frame time")
                obs, metrics = self.decode(summary.get("facts"))
            except (ValueError, frame_facts.BadFacts):
                result.frames_without_facts += 1
                continue
            result.frames += 1
            last = int(idx)
            for ev in engine.evaluate(FrameFacts(last, float(t), obs, metrics)):
                self._keep(episodes, ev, result)
        if self.end is not None:
            when, frame, reason = self.end
            closing = frame if frame is not None else max(0, last)
            for ev in engine.close_all(when, closing, reason):
                self._keep(episodes, ev, result)
        result.alerts = sorted(episodes.values(), key=lambda e: (e["started_at"], e["onset_frame"]))
        return result

    @staticmethod
    def _keep(
        episodes: dict[str, dict[str, Any]], event: dict[str, Any], result: ReplayResult
    ) -> None:
        key = event["episode_id"]
        if key not in episodes and len(episodes) >= MAX_ALERTS:
            result.truncated = True
            return
        episodes[key] = event
