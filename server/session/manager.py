"""Session lifecycle shared by every transport: start, frames in, live metrics, end →
report, reconnect grace, idle timeout, restart recovery.

Data flows one way: a transport puts frames into the session's one-frame slot
(`submit` for push transports, which wait for that frame's answer; `offer` through a
`SessionSink` for sampled streams, which never wait) → the session's worker
(`server.session.worker`) → analyser → rules → store → events to the session's
listeners. Transports never touch the analyser, the budget or the store directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from server.analysis.analyser import Analyser, PoseCalibration
from server.analysis.budget import CallBudget, Priority
from server.analysis.cadence import CheckCadence
from server.analysis.rules import AlertEngine, rules_from_settings
from server.analysis.scoring import Scorer
from server.config import Settings
from server.errors import Overloaded, ReportNotReady, SessionEnded, SessionNotFound
from server.media.frames import Frame
from server.observability import Instruments, current_session
from server.session.live_session import DROPPED, LiveSession, PendingFrame
from server.session.pacing import IdlePacing
from server.session.report import attach_narrative, build_report
from server.session.store import Store
from server.session.worker import SessionPipeline, frame_summary

log = logging.getLogger(__name__)

NarratorFactory = Callable[[], Any]
#: Transports whose frames the server samples itself: rules and cadences follow capture
#: time there (SPEC "Alerts").
CAPTURE_CLOCK_TRANSPORTS = frozenset({"webrtc", "video"})

__all__ = ["SessionManager", "frame_summary"]


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        analyser: Analyser,
        store: Store,
        instruments: Instruments,
        narrator: Any | None = None,
        pose_calibration_factory: Callable[[], PoseCalibration] | None = None,
    ) -> None:
        self.settings = settings
        self.analyser = analyser
        self.store = store
        self.instruments = instruments
        self.narrator = narrator
        self.pose_calibration_factory = pose_calibration_factory
        # Server-wide billed API calls per second (the Rekognition TPS quota), shared
        # round-robin by every session of every transport, live before background.
        self.budget = CallBudget(settings.analyser_calls_per_s)
        billed = bool(getattr(analyser, "billed", False))
        self.pacing = IdlePacing(
            billed,
            cloud_idle_s=settings.sampler_idle_interval_s,
            local_idle_s=settings.sampler_local_idle_interval_s,
            workers=int(getattr(analyser, "workers", 1) or 1),
        )
        self.pipeline = SessionPipeline(
            settings, analyser, store, instruments, self.budget, self.pacing,
            self.internal_error,
        )
        self._live: dict[str, LiveSession] = {}
        self._grace: dict[str, asyncio.Task[None]] = {}
        self._ending: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.interrupted_at_start: list[str] = []

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.interrupted_at_start = await self.store.open()
        await self.analyser.start()
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="idle-sweeper")

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # A graceful stop still gives every live session its report (without the LLM,
        # which could hold shutdown for its whole timeout).
        for sid in list(self._live):
            try:
                await self.end_session(sid, reason="server_shutdown", use_llm=False)
            except Exception:
                log.exception("could not end session %s at shutdown", sid)
        for task in list(self._grace.values()):
            task.cancel()
        for task in list(self._ending.values()) + list(self._background) + list(
            self._grace.values()
        ):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        self.budget.close()
        await self.analyser.close()
        if self.narrator is not None:
            await self.narrator.close()
        await self.store.close()

    @property
    def live_count(self) -> int:
        return len(self._live)

    def live_sessions(self) -> list[LiveSession]:
        return list(self._live.values())

    # --- sessions -----------------------------------------------------------------------

    async def start_session(
        self,
        job_data: dict[str, Any],
        transport: str,
        *,
        started_at: float | None = None,
        priority: Priority = "live",
    ) -> LiveSession:
        """`started_at`: the session's clock origin (a recorded video's own time base);
        `priority`: "background" for work that must not starve live candidates."""
        if len(self._live) >= self.settings.max_live_sessions:
            raise Overloaded(
                f"the server is at its limit of {self.settings.max_live_sessions} live sessions",
                code="too_many_sessions",
            )
        s = self.settings
        # WebRTC and recorded video: the server picks the frames, so rules and cadences
        # count capture time; push clients pick their own pace and keep the per-frame
        # meaning.
        capture_clock = transport in CAPTURE_CLOCK_TRANSPORTS
        sampled = transport == "webrtc"  # the sampler forces slow checks on scene changes
        dwell = s.rule_frame_interval_s if capture_clock else None
        engine = AlertEngine(rules_from_settings(s), dwell_interval_s=dwell)
        session = LiveSession(
            id=secrets.token_urlsafe(16),  # 128 random bits: the session's capability
            transport=transport,
            backend=self.analyser.name,
            job_data=dict(job_data),
            started_at=time.time() if started_at is None else started_at,
            scorer=Scorer(
                yaw_limit=s.looking_away_yaw_deg,
                pitch_limit=s.looking_away_pitch_deg,
                posture_window=s.posture_window_frames,
                positive_emotions=tuple(s.positive_emotions),
                gaze_min_confidence=s.eye_direction_min_confidence,
            ),
            engine=engine,
            cadence=CheckCadence(
                s.sampler_labels_interval_s if sampled else s.labels_interval_s,
                s.sampler_text_interval_s if sampled else s.text_interval_s,
            ),
            pose_calibration=self.pose_calibration_factory()
            if self.pose_calibration_factory
            else None,
            clock="capture" if capture_clock else "arrival",
            priority=priority,
        )
        self._live[session.id] = session
        rules = {
            **engine.describe(),
            "eye_direction_min_confidence": s.eye_direction_min_confidence,
        }
        await self.store.create_session(
            session.id, transport, session.backend, session.job_data, session.started_at,
            rules=rules,
        )
        session.worker = asyncio.create_task(
            self.pipeline.run(session), name=f"session-{session.id[:8]}"
        )
        self.instruments.sessions_started.labels(transport=transport).inc()
        self.instruments.live_sessions.set(len(self._live))
        log.info("session %s started (%s, backend %s)", session.id, transport, session.backend,
                 extra={"session_id": session.id})
        return session

    async def get_live(self, session_id: object) -> LiveSession:
        """The live session with this id, or the right error for an ended/unknown one."""
        if not isinstance(session_id, str) or not session_id:
            raise SessionNotFound("session_id is missing", code="missing_session_id", status=400)
        session = self._live.get(session_id)
        if session is not None and session.status == "live":
            return session
        if session_id in self._ending or session is not None:
            raise SessionEnded(f"session {session_id} has ended")
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        raise SessionEnded(f"session {session_id} has {record['status']}")

    def started_payload(self, session: LiveSession) -> dict[str, Any]:
        return {
            "session_id": session.id,
            "started_at": session.started_at,
            "backend": session.backend,
            "transport": session.transport,
            "job_data": session.job_data,
            "status": session.status,
        }

    # --- frames -------------------------------------------------------------------------

    async def submit(
        self, session: LiveSession, frame: Frame, *, scene_changed: bool = False
    ) -> dict[str, Any]:
        """A push transport's frame: put it in the slot (replacing any frame still
        waiting) and wait for its result; a replaced frame's caller gets `DROPPED`."""
        if not session.accepting:
            raise SessionEnded(f"session {session.id} has ended")
        self.frame_received(session)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        replaced = session.put(PendingFrame(frame, future, scene_changed))
        if replaced is not None:
            self._drop(session, replaced)
        return await future

    def frame_received(self, session: LiveSession) -> None:
        session.counters.received += 1
        session.touch()
        self.instruments.frames_received.labels(transport=session.transport).inc()

    def _drop(
        self, session: LiveSession, pending: PendingFrame, reason: str = "superseded"
    ) -> None:
        if pending.future is None:
            return  # a sampled stream's frame: the stream has newer ones, nothing waits
        session.counters.dropped += 1
        self.instruments.frames_dropped.labels(transport=session.transport).inc()
        pending.answer({**DROPPED, "reason": reason})

    def idle_interval_s(self) -> float:
        """How long a sampled stream with a stable scene waits between analyses now."""
        return self.pacing.interval()

    def internal_error(
        self, where: str, exc: BaseException, session: LiveSession | None = None
    ) -> None:
        """An unexpected error somewhere in a session's pipeline: logged and survived."""
        log.error("internal error in %s", where, exc_info=exc)

    # --- transports coming and going ---------------------------------------------------

    def grace_for(self, transport: str) -> float | None:
        """How long a session whose transport connection was lost waits for it to come
        back; None: the idle timeout decides (push transports)."""
        if transport == "webrtc":
            return self.settings.rtc_reconnect_grace_s
        return None

    def detach(self, session: LiveSession, reason: str) -> None:
        """The session's transport connection is gone (peer failed, closed, no media):
        the session waits `grace_for(transport)` for `attach`, then ends."""
        grace = self.grace_for(session.transport)
        if grace is None or session.status != "live" or session.id in self._grace:
            return
        log.info("session lost its %s connection (%s): %.0f s to reconnect",
                 session.transport, reason, grace, extra={"session_id": session.id})
        self._grace[session.id] = asyncio.create_task(
            self._end_after_grace(session.id, grace), name=f"grace-{session.id[:8]}"
        )

    def attach(self, session: LiveSession) -> None:
        """A transport (re)connected to the session: no grace running any more."""
        self._cancel_grace(session.id)

    def grace_pending(self, session_id: str) -> bool:
        return session_id in self._grace

    def _cancel_grace(self, session_id: str) -> None:
        task = self._grace.pop(session_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _end_after_grace(self, session_id: str, grace_s: float) -> None:
        current_session.set(session_id)
        await asyncio.sleep(grace_s)
        self._grace.pop(session_id, None)
        try:
            await self.end_session(session_id, reason="peer_lost")
        except (SessionEnded, SessionNotFound):
            pass
        except Exception as exc:
            self.internal_error("grace", exc, self._live.get(session_id))

    # --- ending and reports -------------------------------------------------------------

    async def end_session(
        self, session_id: object, reason: str = "client", use_llm: bool = True
    ) -> dict[str, Any]:
        session = await self.get_live(session_id)
        session.status = "ending"
        task = asyncio.create_task(
            self._end(session, reason, use_llm), name=f"end-{session.id[:8]}"
        )
        self._ending[session.id] = task
        try:
            # Shielded: a client that disconnects mid-request must not leave a half-ended
            # session behind.
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._ending.pop(session.id, None)

    async def _end(self, session: LiveSession, reason: str, use_llm: bool) -> dict[str, Any]:
        current_session.set(session.id)
        self._cancel_grace(session.id)
        leftover = session.slot.close()
        if leftover is not None:
            self._drop(session, leftover, "session_ended")
        if session.worker is not None:
            if not session.analysing:
                # Idle or waiting for the budget: nothing to finish (acquire is
                # cancellation-safe and consumes nothing).
                session.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.worker  # finishes the analysis in flight, if any
        now = time.time()
        closing = session.engine.close_all(now, max(0, session.counters.analysed - 1))
        for ev in closing:
            await self.store.save_alert(session.id, ev)
        if closing:
            await session.publish("alerts", {"session_id": session.id, "alerts": closing})
        await self.store.end_session(session.id, now, reason, session.counters.to_json())
        self._live.pop(session.id, None)
        self.instruments.live_sessions.set(len(self._live))
        self.instruments.sessions_ended.labels(reason=reason).inc()
        c = session.counters
        log.info("session ended (%s): %d frames received, %d analysed", reason, c.received,
                 c.analysed, extra={"session_id": session.id})
        report = await self._make_report(session.id, use_llm)
        session.status = "ended"
        await session.publish("session_ended", {"session_id": session.id, "report": report})
        session.listeners.clear()
        self._ending.pop(session.id, None)
        return report

    async def _make_report(self, session_id: str, use_llm: bool) -> dict[str, Any]:
        await self.store.flush()
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        frames, alerts = await self.store.session_data(session_id)
        report = await asyncio.to_thread(build_report, record, frames, alerts)
        if use_llm and self.narrator is not None:
            from server.session.narrative import facts_from_report

            narrative = await self.narrator.narrate(facts_from_report(report))
            attach_narrative(report, narrative.to_json())
        await self.store.save_report(session_id, report)
        await self.store.flush()
        llm = report.get("llm") or {}
        by = f"LLM {llm.get('provider')}" if llm and not llm.get("error") else "rules"
        log.info("report written: %d alerts, narrative by %s", len(report.get("alerts") or []),
                 by, extra={"session_id": session_id})
        return report

    async def report(self, session_id: str) -> dict[str, Any]:
        """The finished report of an ended session; an interrupted session's report is
        produced on first request."""
        if session_id in self._live:
            raise ReportNotReady(f"session {session_id} is still live", code="session_live")
        if session_id in self._ending:
            return await asyncio.shield(self._ending[session_id])
        stored = await self.store.get_report(session_id)
        if stored is not None:
            return stored
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        return await self._make_report(session_id, use_llm=True)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_sweep_interval_s)
            deadline = time.monotonic() - self.settings.session_idle_timeout_s
            for session in list(self._live.values()):
                if (
                    session.status == "live"
                    and not session.analysing
                    and session.last_activity < deadline
                ):
                    task = asyncio.create_task(self._end_idle(session.id))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _end_idle(self, session_id: str) -> None:
        try:
            await self.end_session(session_id, reason="idle_timeout")
        except (SessionEnded, SessionNotFound):
            pass
        except Exception:
            log.exception("idle end of %s failed", session_id)
