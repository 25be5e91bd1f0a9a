"""One live session's in-memory state: counters, scorer, alert engine, cadence, aggregate,
its one-frame slot and the listeners that transports attach to receive its events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.analysis.analyser import PoseCalibration
from server.analysis.cadence import CheckCadence
from server.analysis.rules import AlertEngine
from server.analysis.scoring import Scorer
from server.media.frames import Frame
from server.media.latest_slot import LatestSlot
from server.session.aggregate import SessionAggregate

log = logging.getLogger(__name__)

#: A transport's subscriber: receives (event name, payload) — the Socket.IO event names.
Listener = Callable[[str, dict[str, Any]], Awaitable[None]]
DROPPED: dict[str, Any] = {"status": "dropped", "reason": "superseded"}
#: "live": a candidate is on camera; "background": a recorded video, served after live ones.
Priority = Literal["live", "background"]


@dataclass
class Counters:
    received: int = 0
    analysed: int = 0
    dropped: int = 0
    insufficient: int = 0
    degraded: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "frames_received": self.received,
            "frames_analysed": self.analysed,
            "frames_dropped": self.dropped,
            "frames_insufficient": self.insufficient,
            "frames_degraded": self.degraded,
        }


@dataclass(eq=False)
class PendingFrame:
    frame: Frame
    future: asyncio.Future[dict[str, Any]]
    scene_changed: bool = False
    budgeted: bool = False  # the caller already holds a budget grant (WebRTC sampler)


@dataclass(eq=False)
class LiveSession:
    id: str
    transport: str
    backend: str
    job_data: dict[str, Any]
    started_at: float
    scorer: Scorer
    engine: AlertEngine
    cadence: CheckCadence
    pose_calibration: PoseCalibration | None = None
    priority: Priority = "live"
    status: Literal["live", "ending", "ended"] = "live"
    counters: Counters = field(default_factory=Counters)
    last_activity: float = field(default_factory=time.monotonic)
    slot: LatestSlot[PendingFrame] = field(default_factory=LatestSlot)
    listeners: list[Listener] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None
    analysing: bool = False
    aggregate: SessionAggregate = field(init=False)

    def __post_init__(self) -> None:
        self.aggregate = SessionAggregate(started_at=self.started_at)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self.listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)

        return unsubscribe

    async def publish(self, event: str, payload: dict[str, Any]) -> None:
        # A failing subscriber (a closed socket, a full channel) must not stop analysis.
        for listener in list(self.listeners):
            try:
                await listener(event, payload)
            except Exception:
                log.exception("listener failed on %s", event)

    @property
    def alerts_pending_or_active(self) -> bool:
        """True while any rule has a streak under way or an open episode (samplers go
        faster then, so onsets and ends are confirmed quickly)."""
        return bool(self.engine.pending() or self.engine.active())

    def live_metrics(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "status": self.status,
            "backend": self.backend,
            "transport": self.transport,
            "started_at": self.started_at,
            "duration_s": round(time.time() - self.started_at, 3),
            "metrics": self.aggregate.scores_json(),
            **self.counters.to_json(),
            "emotion_distribution": self.aggregate.emotion_distribution(),
            "active_alerts": [ep.event("onset") for ep in self.engine.active()],
            "pending_alerts": self.engine.pending(),
            "analyser_calls": dict(self.aggregate.calls),
        }
