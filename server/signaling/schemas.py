"""Request and response models of the REST API; the handlers validate with them and the
OpenAPI document is generated from them."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import BadRequest


def frame_timestamp(value: object, max_skew_s: float) -> float | None:
    """A frame's capture time from an untrusted client: a finite Unix time (seconds)
    within `max_skew_s` of our clock, else 400 `invalid_field` (REST and Socket.IO)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest("timestamp must be a number (Unix seconds)", code="invalid_field")
    stamp = float(value)
    if not math.isfinite(stamp) or abs(stamp - time.time()) > max_skew_s:
        raise BadRequest(
            f"timestamp must be Unix seconds within {max_skew_s:g} s of the server's clock",
            code="invalid_field",
        )
    return stamp


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class StartSessionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    job_data: dict[str, Any] = Field(
        default_factory=dict, description='Free-form job description, e.g. {"jobTitle": "..."}'
    )


class SessionStarted(BaseModel):
    session_id: str
    started_at: float
    backend: str
    transport: str
    job_data: dict[str, Any]
    status: str
    candidate_token: str | None = Field(
        default=None,
        description="The candidate's token: may send this session's frames or media, read "
        "its live metrics and end it",
    )
    join_url: str | None = Field(
        default=None, description="The candidate page for this session (token in the fragment)"
    )


class FrameRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    frame: str = Field(
        description="data:image/jpeg;base64,... URL (JPEG or PNG); bare base64 accepted"
    )
    timestamp: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Capture time (Unix seconds, within a day of the server's clock); "
        "defaults to arrival time",
    )


class FrameResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_id: str
    status: Literal["analysed", "dropped"]
    reason: str | None = Field(default=None, description="Why a frame was dropped")
    result: dict[str, Any] | None = Field(
        default=None,
        description="metrics{eye_contact,engagement,facial_expression,posture,confidence}, "
        "faces_count, dominant_emotion, emotions, labels, text, alerts, timings, ...",
    )


class LiveMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_id: str
    status: str
    metrics: dict[str, Any]
    frames_received: int
    frames_analysed: int
    frames_dropped: int
    active_alerts: list[dict[str, Any]]


class Report(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_id: str
    summary: dict[str, Any]
    behavioural_scores: dict[str, Any]
    body_language: dict[str, Any]
    cultural_fit: dict[str, Any]
    emotion_timeline: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    ai_summary: dict[str, Any] | None
    token_usage: dict[str, Any]
    partial: bool = Field(
        default=False, description="Some stored data was damaged or missing; see partial_reasons"
    )
    partial_reasons: list[str] = Field(
        default_factory=list,
        description="e.g. bad_frame_timestamp, corrupt_frame_row, corrupt_alert_row, "
        "store_write_failed, store_unreadable, report_failed",
    )
    not_computed: list[str] = Field(
        default_factory=list,
        description="Parts this session did not compute (EMOTION_ANALYSIS=off: "
        "facial_expression, dominant_emotion, emotion_distribution, "
        "dominant_emotion_counts, emotion_timeline)",
    )
    review_status: Literal["not_reviewed", "reviewed", "confirmed_alerts"] | None = Field(
        default=None, description="Human review of the session's alerts (each alert's review)"
    )


class Ended(BaseModel):
    """What a candidate gets for ending its session with CANDIDATE_VIEW=status."""

    status: Literal["ended"]


class SessionRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_id: str
    status: Literal["live", "ended", "interrupted"]
    transport: str
    backend: str
    started_at: float
    ended_at: float | None
    end_reason: str | None
    alert_count: int = Field(default=0, description="Alert episodes raised so far")
    live: dict[str, Any] | None = Field(
        default=None,
        description="A session live on this node: health {status: ok|warning|bad, "
        "reasons}, backend, duration_s, frames_analysed, alerts_active",
    )
    node_id: str | None = Field(default=None, description="The node that runs (ran) it")
    review_status: Literal["not_reviewed", "reviewed", "confirmed_alerts"] | None = Field(
        default=None,
        description="not_reviewed | reviewed (every alert reviewed, all dismissed) | "
        "confirmed_alerts (at least one alert confirmed)",
    )


class SessionList(BaseModel):
    sessions: list[SessionRecord]
    count: int


# --- review, audit, erasure (operator) ------------------------------------------------------

NOTE_MAX_CHARS = 2000


class ReviewCounts(BaseModel):
    alerts: int
    confirmed: int
    dismissed: int


class SessionDetail(SessionRecord):
    review_counts: ReviewCounts


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: Literal["confirmed", "dismissed"]
    note: str | None = Field(default=None, max_length=NOTE_MAX_CHARS)


class Review(BaseModel):
    verdict: Literal["confirmed", "dismissed"]
    note: str | None
    at: float = Field(description="Unix seconds")
    by: str = Field(description="The operator token's name (API_TOKENS; API_TOKEN: operator)")


class ReviewedAlert(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: str | None
    severity: str | None
    category: str | None
    started_at: float | None
    ended_at: float | None
    duration_s: float | None
    message: str | None
    details: dict[str, Any]
    evidence_url: str | None
    review: Review


class Erased(BaseModel):
    session_id: str
    status: Literal["erased"]
    audit_id: str = Field(description="The audit log entry that records the erasure")


class AuditEntry(BaseModel):
    id: str
    at: float = Field(description="Unix seconds")
    actor: str = Field(description="Operator token name, or system")
    action: str = Field(description="review | rescore | erase | retention_sweep")
    session_id: str | None
    details: dict[str, Any]


class AuditList(BaseModel):
    entries: list[AuditEntry]
    count: int


class StoreHealth(BaseModel):
    status: Literal["ok", "degraded"]
    engine: str = Field(
        description="where the store lives: sqlite:PATH or postgresql://user@host:port/db "
        "(never a password)"
    )
    reasons: list[str] = Field(description="writes_failing, queue_full")
    failed_writes: int = Field(description="Statements lost after every retry, since start")
    failed_batches: int
    retried_batches: int
    last_error: str | None
    last_error_at: float | None
    queue_depth: int
    queue_capacity: int


class RedisHealth(BaseModel):
    url: str = Field(description="REDIS_URL without its password")
    status: Literal["ok", "down"]
    node: str = Field(description="this node's id in the cluster")
    nodes_seen: int = Field(description="nodes that pinged Redis lately (this one too)")
    last_error: str | None
    last_error_at: float | None
    down_since: float | None
    outages: int = Field(description="times this node lost Redis")
    data_losses: int = Field(
        description="times Redis was found without its data (a restart between two pings)"
    )
    budget: dict[str, Any] = Field(
        description="the Rekognition call budget: mode shared | local-fallback, its rate, "
        "the local share used while Redis is down, fallbacks so far"
    )
    spend: Literal["shared", "local-fallback"]
    video_queue: dict[str, Any] = Field(
        description="the Redis job queue: name, depth (entries waiting or running, as of "
        "the last ping), jobs running on this node"
    )


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="degraded while store writes fail or Redis (REDIS_URL) is unreachable "
        "(still HTTP 200: the server serves)"
    )
    store: StoreHealth
    redis: RedisHealth | None = Field(
        default=None, description="the cluster's Redis link (null without REDIS_URL)"
    )
    backend: str
    live_sessions: int
    auth: Literal["token", "none"] = Field(
        description="token: secured mode (API_TOKEN set); none: development mode"
    )
    spend: dict[str, Any] = Field(
        description="today's (UTC) Rekognition calls and LLM tokens against their daily "
        "caps, and the per-address session start limit"
    )
    uptime_s: float
    version: str
    cluster: dict[str, Any] | None = Field(
        default=None,
        description="With REDIS_URL: this node (node_id, address, tag), redis ok|down, its "
        "lease (state held|lapsed|conflict, age_s, expires_in_s) and peers (alive, "
        "lease_age_s); status is degraded while Redis is down or the lease is not held",
    )


class AlertRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = Field(description="The alert episode's id (null for a re-scored one)")
    type: str
    severity: str
    category: str
    object: str | None = Field(default=None, description="suspicious_object: the label")
    status: Literal["active", "ended"]
    started_at: float | None
    ended_at: float | None
    duration_s: float | None
    message: str | None
    details: dict[str, Any] = Field(
        description="The numbers that made the rule fire, beside its thresholds (face count; "
        "yaw and pitch; label and confidence; text)"
    )
    evidence_url: str | None = Field(
        description="The snapshot of the frame that raised it (operator only); null when "
        "there is none (EVIDENCE=none, not rendered yet, or dropped)"
    )
    review: dict[str, Any] | None = Field(
        default=None, description="The operator's review: {verdict, note, at}; null when none"
    )


class AlertList(BaseModel):
    session_id: str
    alerts: list[AlertRecord]


class RescoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: dict[str, Any] = Field(
        default_factory=dict,
        description='Per rule, the settings to change, e.g. {"looking_away": {"yaw_deg": 40}, '
        '"text_detected": {"enabled": false}}; names as the report\'s `rules` record gives '
        "them (onset_frames, yaw_deg, pitch_deg, engagement_below, min_confidence, labels, "
        "second_device_labels, min_chars, dwell_s, reasons) plus `enabled`",
    )


class RescoreResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    session_id: str
    alerts: list[AlertRecord] = Field(
        description="The alert history recomputed from the stored per-frame facts; "
        "`original_id` names the original alert that opened at the same frame"
    )
    original: list[AlertRecord] = Field(description="The session's own alerts (unchanged)")
    rules: dict[str, Any] = Field(description="The rules as applied (disabled: rules off)")
    frames: dict[str, int]
