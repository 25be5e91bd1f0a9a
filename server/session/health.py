"""A live session's health, as the proctor's console shows it in its sessions table and
live metrics: can this session be judged right now, and if not, why.

`ok`: frames arrive and are analysed. `warning`: something degrades the judgement
(throttled or failing checks, a camera too dark to judge, the offline backend after a
spend cap, internal errors). `bad`: nothing is being judged (no frames for a while, the
WebRTC peer is gone or not connected)."""

from __future__ import annotations

import time
from typing import Any, Literal

from server.session.live_session import LiveSession

#: No frame received or analysed for this long: the session is not being watched.
NO_FRAMES_S = 10.0
ERRORS_RECENT_S = 60.0  # an internal error this recent shows
BAD_REASONS = frozenset(
    {"no_frames", "no_peer", "connection_failed", "connection_closed", "connection_disconnected"}
)
HealthStatus = Literal["ok", "warning", "bad"]


def session_health(session: LiveSession, now: float | None = None) -> dict[str, Any]:
    """`{"status": ok|warning|bad, "reasons": [...]}`; cheap (no I/O), never raises for
    a transport's missing numbers."""
    now = time.monotonic() if now is None else now
    reasons: list[str] = []
    if session.transport == "webrtc":
        stats: dict[str, Any] | None = None
        if session.transport_stats is not None:
            try:
                stats = session.transport_stats()
            except Exception:  # a closing peer: report what is known
                stats = None
        state = (stats or {}).get("connection_state")
        if state is None:
            reasons.append("no_peer")  # between peers (reconnect grace)
        elif state != "connected":
            reasons.append(f"connection_{state}")
    if now - session.last_activity > NO_FRAMES_S:
        reasons.append("no_frames")
    last = session.last_result
    if last is not None:
        if last.degraded:
            reasons.append("analysis_degraded")
        if last.insufficient:
            reasons.append("video_unusable")
    if session.backend_switches:
        reasons.append("offline_backend")
    if any(t > now - ERRORS_RECENT_S for t in session.internal_errors):
        reasons.append("internal_errors")
    status: HealthStatus = (
        "bad" if any(r in BAD_REASONS for r in reasons) else "warning" if reasons else "ok"
    )
    return {"status": status, "reasons": reasons}


def live_overview(session: LiveSession) -> dict[str, Any]:
    """What the console's sessions table shows of a live session on this node."""
    return {
        "health": session_health(session),
        "backend": session.backend,
        "duration_s": round(max(0.0, time.time() - session.started_at), 1),
        "frames_analysed": session.counters.analysed,
        "alerts_active": len(session.engine.active()),
    }
