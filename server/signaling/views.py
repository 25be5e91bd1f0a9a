"""What a candidate receives back (`CANDIDATE_VIEW`), one pure function per answer so every
transport — REST, Socket.IO, the WebRTC data channel — shows a candidate the same thing.

`results`: the brief's payloads, unchanged. `status`: the session's state only — no
metrics, emotions, labels, alerts or report a candidate could use to steer their own
proctoring.
"""

from __future__ import annotations

from typing import Any, Literal

View = Literal["results", "status"]


def candidate_payload(event: str, payload: dict[str, Any], view: View) -> dict[str, Any] | None:
    """The payload of session event `event` as a candidate sees it; None: not sent at all.

    Events are the Socket.IO names (`session_started`, `frame_analysis`, `alerts`,
    `live_metrics`, `session_ended`, `error`); the data channel uses the same names as its
    message `type`.
    """
    if view == "results":
        return payload
    session_id = payload.get("session_id")
    if event == "session_started":
        return {
            "session_id": session_id,
            "status": payload.get("status", "live"),
            "started_at": payload.get("started_at"),
        }
    if event == "frame_analysis":
        result = payload.get("result")
        index = result.get("frame_index") if isinstance(result, dict) else None
        return {"session_id": session_id, "status": "analysed", "frame_index": index}
    if event == "live_metrics":
        return {
            key: payload.get(key)
            for key in ("session_id", "status", "started_at", "duration_s", "frames_received")
        }
    if event == "session_ended":
        return {"session_id": session_id, "status": "ended"}
    if event == "error":
        return payload
    return None  # alerts and anything added later: operators only


def frame_answer(answer: dict[str, Any], view: View) -> dict[str, Any]:
    """The REST answer to one frame."""
    if view == "results":
        return answer
    kept = {"session_id": answer.get("session_id"), "status": answer.get("status")}
    if answer.get("status") == "dropped":
        kept["reason"] = answer.get("reason")
    return kept


def end_answer(report: dict[str, Any], view: View) -> dict[str, Any]:
    """The answer to ending a session: the report, or only that it ended."""
    return report if view == "results" else {"status": "ended"}
