"""A recorded video's report: the session report plus the video's facts, with every
timestamp also given as video time (`mm:ss`), which is what a reviewer seeks to."""

from __future__ import annotations

import copy
from typing import Any


def mmss(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    total = max(0, int(seconds + 1e-6))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def video_report(report: dict[str, Any], job: dict[str, Any], started_at: float) -> dict[str, Any]:
    """`started_at`: the session's clock origin (video time 0)."""
    out = copy.deepcopy(report)
    for alert in out.get("alerts", []):
        start = float(alert["started_at"]) - started_at
        alert["video_time_start_s"] = round(start, 3)
        alert["video_time_start"] = mmss(start)
        end = alert.get("ended_at")
        if end is not None:
            alert["video_time_end_s"] = round(float(end) - started_at, 3)
            alert["video_time_end"] = mmss(float(end) - started_at)
    for point in [*out.get("emotion_timeline", []), *out.get("metrics_timeline", [])]:
        point["video_time"] = mmss(point.get("t_offset_s"))
    out["video"] = {
        "job_id": job["id"],
        "source": job["source"],
        "url": job.get("url"),
        "filename": job.get("filename"),
        "interval_seconds": job["interval_seconds"],
        **(job.get("video") or {}),
        "duration": mmss((job.get("video") or {}).get("duration_s")),
        "frames_sampled": job["progress"]["frames_done"],
    }
    return out
