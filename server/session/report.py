"""The final session report, built from what the store holds (frames, alert episodes),
so a live session's report and an interrupted one's come from one code path.

The narrative parts are always written by rules; an LLM narrative, when configured, is
added beside them (`ai_summary`) and never replaces the facts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from server.session.aggregate import SessionAggregate

TIMELINE_MAX_POINTS = 120
REPORT_VERSION = 1


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _band(value: float | None) -> str:
    if value is None:
        return "not measured"
    if value >= 75:
        return "high"
    if value >= 50:
        return "moderate"
    return "low"


def emotion_timeline(
    frames: list[tuple[int, float, dict[str, Any]]], started_at: float
) -> list[dict[str, Any]]:
    """Dominant apparent expression per time bucket, at most TIMELINE_MAX_POINTS buckets."""
    with_emotion = [(t, s) for _i, t, s in frames if s.get("dominant_emotion")]
    if not with_emotion:
        return []
    span = max(1e-6, with_emotion[-1][0] - started_at)
    bucket_s = max(1.0, span / TIMELINE_MAX_POINTS)
    buckets: dict[int, dict[str, float]] = {}
    for t, s in with_emotion:
        b = int((t - started_at) // bucket_s)
        acc = buckets.setdefault(b, {})
        for name, value in (s.get("emotions") or {}).items():
            acc[name] = acc.get(name, 0.0) + float(value)
        if not s.get("emotions"):
            acc[s["dominant_emotion"]] = acc.get(s["dominant_emotion"], 0.0) + 100.0
    out = []
    for b in sorted(buckets):
        acc = buckets[b]
        total = sum(acc.values()) or 1.0
        dom = max(acc.items(), key=lambda kv: kv[1])[0]
        out.append(
            {
                "t_offset_s": round(b * bucket_s, 1),
                "time": _iso(started_at + b * bucket_s),
                "dominant_emotion": dom,
                "share": round(acc[dom] / total, 3),
            }
        )
    return out


def body_language(agg: SessionAggregate) -> dict[str, Any]:
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
    expr = avg["facial_expression"]
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
        "expression": _band(expr),
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


def build_report(
    session: dict[str, Any],
    frames: list[tuple[int, float, dict[str, Any]]],
    alerts: list[dict[str, Any]],
) -> dict[str, Any]:
    """`session` is the store's session record (with counters); pure and CPU-bound: run it
    in a worker thread for long sessions."""
    started = float(session["started_at"])
    ended = session.get("ended_at") or (frames[-1][1] if frames else started)
    agg = SessionAggregate(started_at=started)
    for _i, t, summary in frames:
        agg.add(t, summary)
    counters = session.get("counters") or {}
    duration = max(0.0, float(ended) - started)
    # Episodes still open when the process died end where the evidence ends.
    alerts = [
        a
        if a.get("ended_at") is not None
        else {
            **a,
            "ended_at": ended,
            "end_reason": "interrupted",
            "duration_s": round(max(0.0, float(ended) - a["started_at"]), 3),
        }
        for a in alerts
    ]
    summary_text = rule_based_summary(agg, alerts, duration)
    return {
        "report_version": REPORT_VERSION,
        "session_id": session["session_id"],
        "status": session.get("status"),
        "job_data": session.get("job_data") or {},
        "summary": {
            "started_at": _iso(started),
            "ended_at": _iso(ended),
            "duration_seconds": round(duration, 3),
            "end_reason": session.get("end_reason"),
            "transport": session.get("transport"),
            "backend": session.get("backend"),
            "frames_received": int(counters.get("frames_received", agg.frames)),
            "frames_analysed": agg.frames,
            "frames_dropped": int(counters.get("frames_dropped", 0)),
            "frames_insufficient": agg.insufficient,
            "frames_degraded": agg.degraded,
            "frames_with_face": agg.frames_with_face,
            "analyser_calls": dict(agg.calls),
            "interrupted": session.get("status") == "interrupted",
        },
        "behavioural_scores": agg.scores_json(),
        "body_language": body_language(agg),
        "cultural_fit": cultural_fit(agg, session.get("job_data") or {}),
        "emotion_distribution": agg.emotion_distribution(),
        "dominant_emotion_counts": dict(agg.dominant_counts),
        "emotion_timeline": emotion_timeline(frames, started),
        "emotion_note": "Emotions are apparent facial expressions, not inner states.",
        "alerts": alerts,
        "alert_summary": alert_summary(alerts),
        # The settings the alerts were judged with (None for sessions stored before).
        "rules": session.get("rules"),
        "narrative": {"source": "rules", "summary": summary_text},
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
