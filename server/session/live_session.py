"""One live session's in-memory state: counters, scorer, alert engine, cadence, aggregate,
its one-frame slot and the listeners that transports attach to receive its events.

Transports only ever put frames into the slot (`put`, or `FrameSink.offer` for a sampled
stream); the session's worker (`server.session.worker`) takes them. Results flow back to
transports as events (`publish`), or, for a push transport that answers each frame, as
the waiter of the frame it put."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.analysis.analyser import PoseCalibration
from server.analysis.budget import Priority
from server.analysis.cadence import CheckCadence
from server.analysis.rules import AlertEngine
from server.analysis.scoring import Scorer
from server.media.frames import Frame
from server.media.latest_slot import LatestSlot
from server.session.aggregate import SessionAggregate

log = logging.getLogger(__name__)

#: Transports whose frames the server samples itself: rules and cadences follow capture
#: time there (SPEC "Alerts").
CAPTURE_CLOCK_TRANSPORTS = frozenset({"webrtc", "video"})

#: A transport's subscriber: receives (event name, payload) — the Socket.IO event names.
Listener = Callable[[str, dict[str, Any]], Awaitable[None]]
#: Told about a listener that raised: (where, exception, event being published).
ErrorHook = Callable[[str, BaseException, str], None]
DROPPED: dict[str, Any] = {"status": "dropped", "reason": "superseded"}


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
    #: A push transport's waiter for this frame's result; None for sampled streams,
    #: whose results arrive as session events.
    future: asyncio.Future[dict[str, Any]] | None = None
    scene_changed: bool = False

    def answer(self, result: dict[str, Any]) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class LastResult:
    """The latest analysed frame, as the console's health column needs it."""

    at: float  # time.monotonic() when it was analysed
    degraded: bool  # a check failed (throttled, unreachable backend, timeout)
    insufficient: bool  # too dark, washed out or blurred to judge


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
    #: "capture": the server chose which frames to analyse (WebRTC, recorded video), so
    #: cadences follow capture time; "arrival": the client pushes at its own pace.
    clock: Literal["capture", "arrival"] = "arrival"
    #: Budget priority: live candidates before background work (recorded videos).
    priority: Priority = "live"
    status: Literal["live", "ending", "ended"] = "live"
    counters: Counters = field(default_factory=Counters)
    last_activity: float = field(default_factory=time.monotonic)
    slot: LatestSlot[PendingFrame] = field(default_factory=LatestSlot)
    listeners: list[Listener] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None
    analysing: bool = False
    budget_wait_s: float = 0.0  # the last analysis' wait for the analyser budget
    #: Capture time of the last stored frame when a session is reopened (resumed video).
    last_frame_at: float | None = None
    on_error: ErrorHook | None = None  # set by the manager: counts and reports the error
    internal_errors: deque[float] = field(default_factory=deque)  # monotonic times, recent
    #: Moves to another backend (a spend cap): [{"at", "from", "to", "reason"}]; once
    #: moved, the session stays on the offline backend.
    backend_switches: list[dict[str, Any]] = field(default_factory=list)
    last_result: LastResult | None = None
    #: Set by a transport that has its own numbers (the WebRTC peer: connection state,
    #: fps, decode lag...); read for live metrics and the console's health column.
    transport_stats: Callable[[], dict[str, Any]] | None = None
    #: EMOTION_ANALYSIS: off, nothing about emotions or expressions is inferred or kept.
    emotion_analysis: bool = True
    aggregate: SessionAggregate = field(init=False)

    def __post_init__(self) -> None:
        self.aggregate = SessionAggregate(started_at=self.started_at)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def clock_now(self, frame: Frame) -> float:
        """The session's clock for cadences: capture time for server-sampled streams; for
        push transports the arrival clock (a client's own timestamps cannot be trusted to
        be monotonic, and must not be able to postpone the slower checks)."""
        return frame.captured_at if self.clock == "capture" else time.monotonic()

    def put(self, pending: PendingFrame) -> PendingFrame | None:
        """Put a frame in the slot; returns the frame it replaced (still to be answered).
        A scene change flagged on the replaced frame carries over: the slower checks it
        asked for are still due."""
        replaced = self.slot.put(pending)
        if replaced is not None and replaced.scene_changed:
            pending.scene_changed = True
        return replaced

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self.listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)

        return unsubscribe

    async def publish(self, event: str, payload: dict[str, Any]) -> None:
        # A failing subscriber must neither stop analysis nor the other subscribers.
        for listener in list(self.listeners):
            try:
                await listener(event, payload)
            except Exception as exc:
                if self.on_error is None:
                    log.exception("listener failed on %s", event)
                else:
                    self.on_error("listener", exc, event)

    @property
    def accepting(self) -> bool:
        return self.status == "live" and not self.slot.closed

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
            "emotion_distribution": self.aggregate.emotion_distribution()
            if self.emotion_analysis
            else None,
            "active_alerts": [ep.event("onset") for ep in self.engine.active()],
            "pending_alerts": self.engine.pending(),
            "analyser_calls": dict(self.aggregate.calls),
        }


class SessionSink:
    """The session's slot as a `server.media.sample_loop.FrameSink` for a sampled stream:
    offering never waits, a newer frame replaces a waiting one (not counted as dropped:
    the stream has frames to spare, unlike a push client's)."""

    def __init__(self, session: LiveSession) -> None:
        self.session = session

    def offer(self, frame: Frame, scene_changed: bool) -> bool:
        if not self.session.accepting:
            return False
        self.session.put(PendingFrame(frame, None, scene_changed))
        return True

    @property
    def waiting(self) -> bool:
        return self.session.slot.has_item

    @property
    def in_flight(self) -> bool:
        return self.session.analysing
