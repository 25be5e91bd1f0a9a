"""Prometheus instruments and session-aware logging.

One `Instruments` per application (own registry), so several servers in one test process
never share counters.
"""

from __future__ import annotations

import contextvars
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: The session a log line is about; set by whoever works on a session's behalf.
current_session: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_session", default="-"
)


class SessionLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = current_session.get()[:8]  # shortened: ids are capabilities
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(SessionLogFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [session=%(session_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


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
        self.llm_calls = Counter(
            "proctor_llm_calls", "LLM narrative calls", ["provider", "outcome"], registry=r
        )
