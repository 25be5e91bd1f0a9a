"""Prometheus instruments and session-aware logging.

One `Instruments` per application (own registry), so several servers in one test process
never share counters.
"""

from __future__ import annotations

import contextvars
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: The session a log line is about; set by whoever works on a session's behalf. A line
#: about a session logged from elsewhere names it with `extra={"session_id": id}`.
current_session: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_session", default=""
)

#: Characters of a session id shown in log tags: enough to tell sessions apart, short
#: enough to read. A session id is its capability: never logged in full.
SHORT_ID_CHARS = 8

#: Our own loggers. At INFO they tell the story of each session; every other logger
#: (aioice's ICE checks, aiortc, aiohttp, socketio/engineio, botocore, httpx…) is chatter
#: and shows only from WARNING unless LOG_LEVEL=DEBUG.
OWN_LOGGERS = ("server", "proctor")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(session_tag)s%(message)s"


def short_id(session_id: str) -> str:
    return session_id[:SHORT_ID_CHARS]


class SessionLogFilter(logging.Filter):
    """Adds `session_tag`: `[session=<short id>] ` for a line about a session, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        sid = getattr(record, "session_id", None) or current_session.get()
        record.session_tag = f"[session={short_id(sid)}] " if sid and sid != "-" else ""
        return True


def configure_logging(level: str = "INFO") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"LOG_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ...)")
    handler = logging.StreamHandler()
    handler.addFilter(SessionLogFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)


class Instruments:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.live_sessions = Gauge("proctor_live_sessions", "Sessions currently live", registry=r)
        self.sessions_started = Counter(
            "proctor_sessions_started", "Sessions started", ["transport"], registry=r
        )
        self.sessions_ended = Counter(
            "proctor_sessions_ended", "Sessions ended", ["reason"], registry=r
        )
        self.frames_received = Counter(
            "proctor_frames_received", "Frames received", ["transport"], registry=r
        )
        self.frames_analysed = Counter(
            "proctor_frames_analysed", "Frames analysed", ["transport"], registry=r
        )
        self.frames_dropped = Counter(
            "proctor_frames_dropped",
            "Frames dropped because a newer frame replaced them",
            ["transport"],
            registry=r,
        )
        self.analyser_latency = Histogram(
            "proctor_analyser_latency_seconds",
            "Time inside the analyser backend per frame",
            ["backend"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.rekognition_calls = Counter(
            "proctor_rekognition_calls",
            "Rekognition API calls by operation and outcome",
            ["operation", "outcome"],
            registry=r,
        )
        self.alerts_raised = Counter(
            "proctor_alerts_raised", "Alert episodes opened", ["type"], registry=r
        )
        self.internal_errors = Counter(
            "proctor_internal_errors",
            "Unexpected errors caught and survived, by where they happened",
            ["where"],
            registry=r,
        )
        self.store_queue_depth = Gauge(
            "proctor_store_queue_depth", "Writes waiting for the store's writer", registry=r
        )
        self.llm_calls = Counter(
            "proctor_llm_calls", "LLM narrative calls", ["provider", "outcome"], registry=r
        )
        self.spend_cap_hits = Counter(
            "proctor_spend_cap_hits",
            "Spend caps reached: session starts refused (session_starts), sessions moved to "
            "or started on the offline backend (rekognition_daily_calls), reports narrated "
            "by rules (llm_daily_tokens)",
            ["cap"],
            registry=r,
        )
        self.usage_today = Gauge(
            "proctor_usage_today",
            "Spend counted today (UTC): rekognition_calls, llm_tokens",
            ["kind"],
            registry=r,
        )
        self.usage_cap = Gauge(
            "proctor_usage_cap", "Daily cap per kind of spend (0 = none)", ["kind"], registry=r
        )
        self.socketio_backpressure = Counter(
            "proctor_socketio_backpressure",
            "Socket.IO clients too far behind (SOCKETIO_SEND_QUEUE_MAX): frame_analysis / "
            "live_metrics packets dropped for them, and clients disconnected",
            ["action"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "proctor_webhook_deliveries",
            "Webhook deliveries by final outcome: delivered, rejected (a 4xx or redirect, "
            "not retried), failed (attempts exhausted), dropped (queue full), abandoned "
            "(still queued at shutdown)",
            ["outcome"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "proctor_webhook_attempts",
            "Webhook POST attempts by result: ok, rejected, http_5xx, http_429, timeout, "
            "connection_error",
            ["result"],
            registry=r,
        )
        self.webhook_queue_depth = Gauge(
            "proctor_webhook_queue_depth", "Webhook deliveries waiting to be sent", registry=r
        )
        self.sessions_erased = Counter(
            "proctor_sessions_erased",
            "Sessions erased: by an operator (request) or the retention sweep (retention)",
            ["reason"],
            registry=r,
        )
        self.evidence = Counter(
            "proctor_evidence",
            "Alert evidence snapshots by outcome: stored, dropped (writer queue full), "
            "session_limit (EVIDENCE_MAX_PER_SESSION reached), too_large (could not fit "
            "EVIDENCE_MAX_BYTES), failed",
            ["outcome"],
            registry=r,
        )
        self.evidence_bytes = Histogram(
            "proctor_evidence_bytes",
            "Size of the stored evidence snapshots",
            buckets=(5e3, 10e3, 20e3, 40e3, 60e3, 80e3, 120e3, 200e3),
            registry=r,
        )
        self.evidence_render = Histogram(
            "proctor_evidence_render_seconds",
            "Time to render one evidence snapshot (in the evidence thread)",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        # --- cluster (REDIS_URL) ---------------------------------------------------------
        self.redis_up = Gauge(
            "proctor_redis_up", "1 while this node reaches Redis (REDIS_URL), else 0", registry=r
        )
        self.redis_errors = Counter(
            "proctor_redis_errors",
            "Redis commands that failed, by what asked (budget, spend, video_queue, link)",
            ["where"],
            registry=r,
        )
        self.budget_shared = Gauge(
            "proctor_budget_shared",
            "1 while the Rekognition call budget is the cluster's shared one in Redis, 0 "
            "while this node falls back to its local share",
            registry=r,
        )
        self.budget_fallbacks = Counter(
            "proctor_budget_fallbacks",
            "Times the shared call budget fell back to the local share (Redis unreachable)",
            registry=r,
        )
        self.video_jobs_enqueued = Counter(
            "proctor_video_jobs_enqueued",
            "Video jobs put on the Redis job queue: submitted (new or resumed) or "
            "reenqueued (from the store, after a start or a Redis reconnect)",
            ["how"],
            registry=r,
        )
