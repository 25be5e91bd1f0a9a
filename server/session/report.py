"""The final session report, built from what the store holds (frames, alert episodes),
so a live session's report and an interrupted one's come from one code path. Frame rows
are streamed through the running aggregate, never held in memory all at once, and damaged
rows make a `partial` report, never a failed one.

The narrative parts are always written by rules; an LLM narrative, when configured, is
added beside them (`ai_summary`) and never replaces the facts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from server.session.aggregate import SessionAggregate
from server.session.store import FrameSpan, StoreError

log = logging.getLogger(__name__)

TIMELINE_MAX_POINTS = 120
REPORT_VERSION = 1
#: What a session with EMOTION_ANALYSIS=off never computed (the report's `not_computed`).
EMOTION_PARTS: tuple[str, ...] = (
    "facial_expression",
    "dominant_emotion",
    "emotion_distribution",
    "dominant_emotion_counts",
    "emotion_timeline",
)
EMOTION_NOTE = "Emotions are apparent facial expressions, not inner states."
NO_EMOTION_NOTE = (
    "Emotion analysis was off (EMOTION_ANALYSIS=off): no emotion or facial expression was "
    "inferred or stored; engagement is computed from eye contact alone."
)


def emotion_analysis_of(session: dict[str, Any]) -> bool:
    """Whether the session was analysed with emotions (sessions stored before the
    setting existed were)."""
    rules = session.get("rules")
    return not (isinstance(rules, dict) and rules.get("emotion_analysis") is False)
#: Frame and alert times outside this range (Unix seconds) are damaged data: 9999-12-31
#: is the last instant a datetime can show.
TIMESTAMP_RANGE = (0.0, 253402300799.0)


def _timestamp(value: Any) -> float | None:
    """A usable Unix time, or None for NaN, infinity, text or a year past 9999."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None
    lo, hi = TIMESTAMP_RANGE
    return t if math.isfinite(t) and lo <= t <= hi else None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def _band(value: float | None) -> str:
    if value is None:
        return "not measured"
    if value >= 75:
        return "high"
    if value >= 50:
        return "moderate"
    return "low"


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class EmotionTimeline:
    """Dominant apparent expression per time bucket, at most about TIMELINE_MAX_POINTS
    buckets, fed one frame at a time: the bucket size comes from the session's time span,
    known before the frames are read."""

    def __init__(self, started_at: float, t_min: float | None, t_max: float | None) -> None:
        self.started_at = started_at
        lo = min(started_at, t_min) if t_min is not None else started_at
        span = max(1e-6, (t_max if t_max is not None else started_at) - lo)
        self.bucket_s = max(1.0, span / TIMELINE_MAX_POINTS)
        self.buckets: dict[int, dict[str, float]] = {}

    def add(self, t: float, summary: dict[str, Any]) -> None:
        dominant = summary.get("dominant_emotion")
        if not isinstance(dominant, str) or not dominant:
            return
        emotions = summary.get("emotions")
        scores = {
            str(k): v
            for k, raw in (emotions.items() if isinstance(emotions, dict) else ())
            if (v := _number(raw)) is not None and v >= 0
        }
        acc = self.buckets.setdefault(int((t - self.started_at) // self.bucket_s), {})
        for name, value in scores.items():
            acc[name] = acc.get(name, 0.0) + value
        if not scores:
            acc[dominant] = acc.get(dominant, 0.0) + 100.0

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for b in sorted(self.buckets):
            acc = self.buckets[b]
            if not acc:
                continue
            total = sum(acc.values()) or 1.0
            dom = max(acc.items(), key=lambda kv: kv[1])[0]
            out.append(
                {
                    "t_offset_s": round(b * self.bucket_s, 1),
                    "time": _iso(self.started_at + b * self.bucket_s),
                    "dominant_emotion": dom,
                    "share": round(acc[dom] / total, 3),
                }
            )
        return out


#: The metrics the report charts over time (the console's live chart shows the first two).
TIMELINE_METRICS = ("eye_contact", "engagement", "facial_expression", "posture")


class MetricsTimeline:
    """Average of each charted metric per time bucket (the emotion timeline's buckets),
    fed one frame at a time; a bucket without a face has no values (a gap in the chart)."""

    def __init__(self, like: EmotionTimeline) -> None:
        self.started_at = like.started_at
        self.bucket_s = like.bucket_s
        self.buckets: dict[int, dict[str, list[float]]] = {}
        self.frames: dict[int, int] = {}

    def add(self, t: float, summary: dict[str, Any]) -> None:
        b = int((t - self.started_at) // self.bucket_s)
        self.frames[b] = self.frames.get(b, 0) + 1
        metrics = summary.get("metrics")
        if not isinstance(metrics, dict):
            return
        acc = self.buckets.setdefault(b, {})
        for name in TIMELINE_METRICS:
            v = _number(metrics.get(name))
            if v is not None:
                pair = acc.setdefault(name, [0.0, 0.0])
                pair[0] += v
                pair[1] += 1

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for b in sorted(self.frames):
            acc = self.buckets.get(b, {})
            point: dict[str, Any] = {
                "t_offset_s": round(b * self.bucket_s, 1),
                "time": _iso(self.started_at + b * self.bucket_s),
                "frames": self.frames[b],
            }
            for name in TIMELINE_METRICS:
                total, n = acc.get(name, (0.0, 0.0))
                point[name] = round(total / n, 1) if n else None
            out.append(point)
        return out


def body_language(agg: SessionAggregate, emotions: bool = True) -> dict[str, Any]:
    avg = {name: stat.average for name, stat in agg.metrics.items()}
    parts = []
    eye = avg["eye_contact"]
    if eye is not None:
        parts.append(
            {
                "high": "kept the head oriented towards the screen most of the time",
                "moderate": "turned the head away from the screen at times",
                "low": "often had the head turned away from the screen",
            }[_band(eye)]
            + f" (eye contact {eye:.0f}/100)"
        )
    posture = avg["posture"]
    if posture is not None:
        parts.append(
            {
                "high": "head position was steady",
                "moderate": "head position moved moderately",
                "low": "head position moved a lot",
            }[_band(posture)]
            + f" (posture {posture:.0f}/100)"
        )
    expr = avg["facial_expression"] if emotions else None
    if expr is not None:
        parts.append(
            {
                "high": "apparent facial expression was mostly positive or calm",
                "moderate": "apparent facial expression was mixed",
                "low": "apparent facial expression was rarely positive or calm",
            }[_band(expr)]
            + f" (expression {expr:.0f}/100)"
        )
    face_share = agg.frames_with_face / agg.frames if agg.frames else 0.0
    text = (
        "The candidate " + "; ".join(parts) + "."
        if parts
        else "Not enough frames with a visible face to assess body language."
    )
    return {
        "source": "rules",
        "assessment": text,
        "face_visible_share": round(face_share, 3),
        "eye_contact": _band(eye),
        "posture": _band(posture),
        "expression": _band(expr) if emotions else "not computed",
        "engagement": _band(avg["engagement"]),
    }


def cultural_fit(agg: SessionAggregate, job_data: dict[str, Any]) -> dict[str, Any]:
    """Rule-based: only observable interview behaviour, against the role named in job data.
    It deliberately says nothing about personality, values or protected traits."""
    role = (
        job_data.get("jobTitle") or job_data.get("job_title") or job_data.get("title") or "the role"
    )
    engagement = agg.metrics["engagement"].average
    eye = agg.metrics["eye_contact"].average
    signals = {"engagement": _band(engagement), "eye_contact": _band(eye)}
    if engagement is None:
        text = f"Not enough observed behaviour to relate to {role}."
    else:
        text = (
            f"For {role}: observed engagement was {_band(engagement)} ({engagement:.0f}/100) and "
            f"attention to the screen {_band(eye)}. These are behavioural signals from video only; "
            "fit for the role should be judged on the interview content."
        )
    return {"source": "rules", "role": role, "assessment": text, "signals": signals}


def alert_summary(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for a in alerts:
        entry = out.setdefault(
            a["type"],
            {
                "count": 0,
                "total_duration_s": 0.0,
                "severity": a["severity"],
                "category": a.get("category", "behaviour"),
            },
        )
        entry["count"] += 1
        entry["total_duration_s"] = round(
            entry["total_duration_s"] + (a.get("duration_s") or 0.0), 3
        )
    return out


def rule_based_summary(
    agg: SessionAggregate, alerts: list[dict[str, Any]], duration_s: float
) -> str:
    technical = sum(1 for a in alerts if a.get("category") == "technical")
    behaviour = [a for a in alerts if a.get("category", "behaviour") != "technical"]
    critical = sum(1 for a in behaviour if a["severity"] == "critical")
    warnings = sum(1 for a in behaviour if a["severity"] == "warning")
    eng = agg.metrics["engagement"].average
    eng_text = (
        "engagement could not be measured" if eng is None else f"average engagement {eng:.0f}/100"
    )
    return (
        f"{duration_s / 60:.1f}-minute session, {agg.frames} frames analysed, {eng_text}. "
        f"{len(behaviour)} alert episode(s): {critical} critical, {warnings} warning."
        + (
            f" {technical} time(s) the video could not be judged (technical)."
            if technical
            else ""
        )
        + (f" {agg.insufficient} frame(s) were too poor to judge." if agg.insufficient else "")
    )


class ReportBuilder:
    """Builds one session's report from its stored rows, streamed one at a time.

    Never fails for the data it is given: a damaged row is skipped or repaired and the
    report is then marked `partial`, with a reason code per kind of damage. CPU-bound:
    run it in a worker thread (the store's `scan_frames` does).
    """

    def __init__(self, session: dict[str, Any], aggregate: SessionAggregate | None = None):
        self.session = session
        self.reasons: dict[str, int] = {}  # damage kind → how many times
        self.unexpected: BaseException | None = None  # first error that was not bad data
        self.frame_rows = 0
        self.unreadable_frames = 0
        self._last_t: float | None = None
        self._t_max: float | None = None
        # Frames read from memory (the store could not be read): no timeline then.
        self._aggregate = aggregate
        self.started_at = _timestamp(session.get("started_at"))
        if session.get("started_at") is not None and self.started_at is None:
            self.note("bad_session_times")
        if session.get("corrupt_fields"):
            self.note("corrupt_session_row")
        self.agg = aggregate or SessionAggregate(started_at=self.started_at or 0.0)
        self.timeline: EmotionTimeline | None = None
        self.metrics_timeline: MetricsTimeline | None = None

    def note(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n

    def _unexpected(self, reason: str, exc: Exception) -> None:
        self.note(reason)
        if self.unexpected is None:
            self.unexpected = exc
            log.warning("report of %s: %s", self.session.get("session_id"), reason, exc_info=exc)

    # --- frames ---------------------------------------------------------------------

    def consume(self, span: FrameSpan, rows: Iterator[tuple[Any, Any, Any]]) -> None:
        """Feed every frame row; `span` (the time range of the usable rows) sizes the
        timeline's buckets before the first row arrives."""
        if self.started_at is None:  # repair a damaged start from the evidence
            self.started_at = span.t_min
            self.agg.started_at = span.t_min or 0.0
        self._t_max = span.t_max
        self.timeline = EmotionTimeline(self.started_at or 0.0, span.t_min, span.t_max)
        self.metrics_timeline = MetricsTimeline(self.timeline)
        for row in rows:
            try:
                self.add_row(*row)
            except Exception as exc:  # a bug here must cost one row, not the report
                self.unreadable_frames += 1
                self._unexpected("frame_row_failed", exc)

    def feed(self, span: FrameSpan, rows: Iterator[tuple[Any, Any, Any]]) -> BaseException | None:
        """`consume`, for the store's reader thread: a failure of the builder is returned,
        told apart from the store's own (StoreError propagates)."""
        try:
            self.consume(span, rows)
        except StoreError:
            raise
        except Exception as exc:
            return exc
        return None

    def add_row(self, idx: Any, t: Any, summary_json: Any) -> None:
        self.frame_rows += 1
        summary = None
        try:
            summary = json.loads(summary_json)
        except (TypeError, ValueError):
            pass
        if not isinstance(summary, dict):
            self.unreadable_frames += 1
            self.note("corrupt_frame_row")
            return
        ts = _timestamp(t)
        if ts is None:
            # The frame's facts still count; only its place in time is unknown.
            self.note("bad_frame_timestamp")
            ts = self._last_t if self._last_t is not None else (self.started_at or 0.0)
        else:
            self._last_t = ts
            if self.timeline is not None:
                self.timeline.add(ts, summary)
            if self.metrics_timeline is not None:
                self.metrics_timeline.add(ts, summary)
        self.agg.add(ts, summary)

    # --- alerts ---------------------------------------------------------------------

    def _alert(self, raw: Any, ended: float) -> dict[str, Any] | None:
        try:
            a = json.loads(raw) if isinstance(raw, str | bytes) else raw
        except ValueError:
            a = None
        if not isinstance(a, dict) or not isinstance(a.get("type"), str):
            self.note("corrupt_alert_row")
            return None
        a = dict(a)
        if not isinstance(a.get("severity"), str):
            a["severity"] = "unknown"
            self.note("corrupt_alert_row")
        started = _timestamp(a.get("started_at"))
        if started is None:
            self.note("bad_alert_timestamp")
        a["started_at"] = started
        if a.get("ended_at") is None:
            # Episodes still open when the process died end where the evidence ends.
            a["ended_at"] = ended
            a["end_reason"] = "interrupted"
            a["duration_s"] = None if started is None else round(max(0.0, ended - started), 3)
        else:
            if _timestamp(a.get("ended_at")) is None:
                a["ended_at"] = None
                self.note("bad_alert_timestamp")
            duration = _number(a.get("duration_s"))
            a["duration_s"] = None if duration is None else max(0.0, duration)
        return a

    # --- the report -----------------------------------------------------------------

    def finish(self, alert_rows: Iterable[Any]) -> dict[str, Any]:
        session = self.session
        agg = self.agg
        now = time.time()
        if self.started_at is None:  # no usable start anywhere: the report's own time
            self.started_at = _timestamp(session.get("ended_at")) or now
            agg.started_at = self.started_at
        started = self.started_at
        ended = _timestamp(session.get("ended_at"))
        if ended is None:
            if session.get("ended_at") is not None:
                self.note("bad_session_times")
            ended = self._t_max if self._t_max is not None else started
        duration = max(0.0, ended - started)
        alerts = [a for raw in alert_rows if (a := self._alert(raw, ended)) is not None]
        raw_counters, raw_job = session.get("counters"), session.get("job_data")
        counters: dict[str, Any] = raw_counters if isinstance(raw_counters, dict) else {}
        job_data: dict[str, Any] = raw_job if isinstance(raw_job, dict) else {}

        def count(name: str, default: int) -> int:
            value = _number(counters.get(name))
            return default if value is None else int(value)

        emotions = emotion_analysis_of(session)

        report: dict[str, Any] = {
            "report_version": REPORT_VERSION,
            "session_id": session.get("session_id"),
            "status": session.get("status"),
            "job_data": job_data,
            "summary": {
                "started_at": _iso(started),
                "ended_at": _iso(ended),
                "duration_seconds": round(duration, 3),
                "end_reason": session.get("end_reason"),
                "transport": session.get("transport"),
                "backend": session.get("backend"),
                "frames_received": count("frames_received", agg.frames),
                "frames_analysed": agg.frames,
                "frames_dropped": count("frames_dropped", 0),
                "frames_insufficient": agg.insufficient,
                "frames_degraded": agg.degraded,
                "frames_with_face": agg.frames_with_face,
                "frames_unreadable": self.unreadable_frames,
                "analyser_calls": dict(agg.calls),
                # Moves to the offline backend when the daily Rekognition cap was reached.
                "backend_switches": _switches(session.get("backend_switches")),
                "interrupted": session.get("status") == "interrupted",
            },
            "behavioural_scores": self._part("scores", agg.scores_json, {}),
            "body_language": self._part(
                "body_language",
                lambda: body_language(agg, emotions),
                {"source": "rules", "assessment": "Body language could not be assessed."},
            ),
            "cultural_fit": self._part(
                "cultural_fit",
                lambda: cultural_fit(agg, job_data),
                {"source": "rules", "assessment": "Not assessed.", "signals": {}},
            ),
            "emotion_distribution": self._part("emotions", agg.emotion_distribution, {}),
            "dominant_emotion_counts": dict(agg.dominant_counts),
            "emotion_timeline": self._part(
                "emotion_timeline",
                lambda: [] if self.timeline is None else self.timeline.to_json(),
                [],
            ),
            "metrics_timeline": self._part(
                "metrics_timeline",
                lambda: [] if self.metrics_timeline is None else self.metrics_timeline.to_json(),
                [],
            ),
            "emotion_note": EMOTION_NOTE,
            # Metrics this session never computed (EMOTION_ANALYSIS=off); [] otherwise.
            "not_computed": [],
            "alerts": alerts,
            "alert_summary": self._part("alert_summary", lambda: alert_summary(alerts), {}),
            # The settings the alerts were judged with (None for sessions stored before).
            "rules": session.get("rules") if isinstance(session.get("rules"), dict) else None,
            "narrative": {
                "source": "rules",
                "summary": self._part(
                    "narrative",
                    lambda: rule_based_summary(agg, alerts, duration),
                    "The session summary could not be written.",
                ),
            },
            "ai_summary": None,
            "llm": None,
            "token_usage": {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "by_provider": {},
            },
            "generated_at": datetime.now(UTC).isoformat(),
        }
        if not emotions:
            without_emotions(report)
        if self._aggregate is not None:
            self.note("frames_from_memory")
        replaced = _finite_only(report)
        if replaced:
            self.note("non_finite_values", replaced)
        return mark_partial(report, self.reasons)

    def _part(self, name: str, make: Any, fallback: Any) -> Any:
        try:
            return make()
        except Exception as exc:
            self._unexpected(f"{name}_failed", exc)
            return fallback


def without_emotions(report: dict[str, Any]) -> dict[str, Any]:
    """A report of a session analysed with EMOTION_ANALYSIS=off: the emotion parts are
    empty (null, or [] for the timeline) and `not_computed` names them. In place."""
    scores = report.get("behavioural_scores")
    if isinstance(scores, dict) and "facial_expression" in scores:
        scores["facial_expression"] = None
    report["emotion_distribution"] = None
    report["dominant_emotion_counts"] = None
    report["emotion_timeline"] = []
    report["emotion_note"] = NO_EMOTION_NOTE
    report["not_computed"] = list(EMOTION_PARTS)
    return report


def _switches(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    out = []
    for sw in value:
        if isinstance(sw, dict):
            at = _timestamp(sw.get("at"))
            out.append({**sw, "at": _iso(at) if at is not None else None})
    return out


def mark_partial(report: dict[str, Any], reasons: Iterable[str]) -> dict[str, Any]:
    """Add reasons why a report is incomplete (kept sorted and unique)."""
    merged = sorted(set(report.get("partial_reasons") or []) | set(reasons))
    report["partial"] = bool(merged)
    report["partial_reasons"] = merged
    return report


def fallback_report(session: dict[str, Any], reasons: Iterable[str]) -> dict[str, Any]:
    """The least a session gets when its report could not be built: its identity and
    times, no facts, and why."""
    try:
        report = ReportBuilder(
            {
                k: session.get(k)
                for k in (
                    "session_id",
                    "status",
                    "transport",
                    "backend",
                    "started_at",
                    "ended_at",
                    "end_reason",
                    "backend_switches",
                    "rules",  # EMOTION_ANALYSIS=off still says what was not computed
                )
            }
        ).finish([])
    except Exception:  # pragma: no cover - the empty report is plain data
        log.exception("even the empty report failed")
        report = {
            "report_version": REPORT_VERSION,
            "session_id": session.get("session_id"),
            "status": session.get("status"),
            "summary": {},
            "behavioural_scores": {},
            "body_language": {},
            "cultural_fit": {},
            "emotion_timeline": [],
            "metrics_timeline": [],
            "alerts": [],
            "ai_summary": None,
            "llm": None,
            "token_usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "generated_at": datetime.now(UTC).isoformat(),
        }
    return mark_partial(report, reasons)


def _finite_only(value: Any) -> int:
    """Replace NaN and infinities in place by None (JSON has neither); returns how many."""
    replaced = 0
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return 0
    for key, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            value[key] = None
            replaced += 1
        else:
            replaced += _finite_only(v)
    return replaced


def attach_narrative(report: dict[str, Any], narrative: dict[str, Any]) -> dict[str, Any]:
    """Add an LLM narrative (Narrative.to_json()) beside the rule-based parts."""
    usage = narrative.get("usage") or {}
    provider = narrative.get("provider") or "unknown"
    report["llm"] = {
        "provider": provider,
        "model": narrative.get("model"),
        "error": narrative.get("error"),
        "latency_ms": narrative.get("latency_ms"),
    }
    if narrative.get("summary"):
        report["ai_summary"] = {
            "provider": provider,
            "model": narrative.get("model"),
            "text": narrative["summary"],
        }
    if narrative.get("cultural_fit"):
        report["cultural_fit"]["ai_assessment"] = narrative["cultural_fit"]
    report["token_usage"] = {
        "prompt_tokens": int(usage.get("prompt_tokens", 0)),
        "completion_tokens": int(usage.get("completion_tokens", 0)),
        "total_tokens": int(usage.get("total_tokens", 0)),
        "by_provider": {provider: dict(usage)},
    }
    return report
