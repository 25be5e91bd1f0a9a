"""Session lifecycle shared by every transport: start, analyse (one frame in flight per
session, latest wins), live metrics, end → report, idle timeout, restart recovery.

Data flows one way: transport → `submit()` → analyser → scorer → alert engine → store and
listeners. Transports never touch the analyser or the store directly.
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
from server.analysis.budget import CallBudget
from server.analysis.cadence import CheckCadence
from server.analysis.observation import Observation
from server.analysis.rules import AlertEngine, FrameFacts, rules_from_settings
from server.analysis.scoring import FrameMetrics, Scorer
from server.config import Settings
from server.errors import Overloaded, ReportNotReady, SessionEnded, SessionNotFound
from server.media.frames import Frame, FrameError
from server.media.latest_slot import SlotClosed
from server.observability import Instruments, current_session
from server.session.live_session import DROPPED, LiveSession, PendingFrame, Priority
from server.session.report import attach_narrative, build_report
from server.session.store import Store

log = logging.getLogger(__name__)

NarratorFactory = Callable[[], Any]


def frame_summary(obs: Observation, metrics: FrameMetrics) -> dict[str, Any]:
    """What the store keeps per frame: numbers and names, never pixels."""
    face = obs.primary_face
    return {
        "metrics": metrics.to_json(),
        "faces": None if obs.faces is None else len(obs.faces),
        "dominant_emotion": face.dominant_emotion if face else None,
        "emotions": {k: round(v, 1) for k, v in face.emotions.items()} if face else {},
        "pose": None
        if face is None or face.pose is None
        else [round(face.pose.yaw, 1), round(face.pose.pitch, 1), round(face.pose.roll, 1)],
        "labels": None if obs.labels is None else [lb.name for lb in obs.labels],
        "text_lines": None if obs.text is None else len(obs.text),
        "insufficient": obs.insufficient,
        "quality_reason": obs.quality.reason if obs.quality else None,
        "degraded": list(obs.degraded),
        "calls": dict(obs.calls),
        "latency_ms": round(obs.latency_ms, 2),
    }


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
        # Server-wide analyses per second (the Rekognition TPS quota), shared round-robin
        # by every session of every transport.
        self.budget = CallBudget(settings.analyser_calls_per_s)
        self._live: dict[str, LiveSession] = {}
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
        for task in list(self._ending.values()) + list(self._background):
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
        """`started_at`: the session clock's origin (a recorded video's sessions start at
        the epoch its video time is counted from); `priority`: "background" sessions
        (recorded videos) yield the analyser budget to live ones."""
        if len(self._live) >= self.settings.max_live_sessions:
            raise Overloaded(
                f"the server is at its limit of {self.settings.max_live_sessions} live sessions",
                code="too_many_sessions",
            )
        session = self._new_session(
            secrets.token_urlsafe(16),  # 128 random bits: the session's capability
            transport,
            dict(job_data),
            time.time() if started_at is None else started_at,
            priority,
        )
        self._live[session.id] = session
        await self.store.create_session(
            session.id, transport, session.backend, session.job_data, session.started_at
        )
        session.worker = asyncio.create_task(self._work(session), name=f"session-{session.id[:8]}")
        self.instruments.sessions_started.labels(transport=transport).inc()
        self.instruments.live_sessions.set(len(self._live))
        log.info("session %s started (%s, backend %s)", session.id, transport, session.backend)
        return session

    def _new_session(
        self,
        session_id: str,
        transport: str,
        job_data: dict[str, Any],
        started_at: float,
        priority: Priority,
    ) -> LiveSession:
        s = self.settings
        return LiveSession(
            id=session_id,
            transport=transport,
            backend=self.analyser.name,
            job_data=job_data,
            started_at=started_at,
            priority=priority,
            scorer=Scorer(
                yaw_limit=s.looking_away_yaw_deg,
                pitch_limit=s.looking_away_pitch_deg,
                posture_window=s.posture_window_frames,
                positive_emotions=tuple(s.positive_emotions),
            ),
            engine=AlertEngine(rules_from_settings(s)),
            cadence=CheckCadence(s.labels_interval_s, s.text_interval_s),
            pose_calibration=self.pose_calibration_factory()
            if self.pose_calibration_factory
            else None,
        )

    async def suspend_session(self, session_id: str, reason: str = "server_shutdown") -> None:
        """Stop a session without ending it: it becomes `interrupted`, as if the process
        had died, so `reopen_session` can continue it (recorded videos at shutdown)."""
        session = self._live.get(session_id)
        if session is None or session.status != "live":
            return
        session.status = "ending"
        leftover = session.slot.close()
        if leftover is not None:
            self._drop(session, leftover, "session_suspended")
        if session.worker is not None:
            if not session.analysing:
                session.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.worker
        await self.store.update_counters(session.id, session.counters.to_json(), time.time())
        await self.store.set_session_status(session.id, "interrupted", reason)
        self._live.pop(session.id, None)
        session.status = "ended"
        self.instruments.live_sessions.set(len(self._live))
        log.info("session %s suspended (%s)", session.id, reason)

    async def reopen_session(
        self, session_id: str, *, priority: Priority = "background"
    ) -> LiveSession:
        """Continue an `interrupted` session after its last stored frame: same id, clock
        and counters, aggregate rebuilt from the stored frames. Alert episodes left open
        end at the last stored frame (`interrupted`), and rule streaks start afresh."""
        if session_id in self._live:
            raise SessionEnded(f"session {session_id} is already live", code="session_live")
        if len(self._live) >= self.settings.max_live_sessions:
            raise Overloaded(
                f"the server is at its limit of {self.settings.max_live_sessions} live sessions",
                code="too_many_sessions",
            )
        await self.store.flush()
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        if record["status"] != "interrupted":
            raise SessionEnded(f"session {session_id} has {record['status']}")
        frames, alerts = await self.store.session_data(session_id)
        session = self._new_session(
            session_id, record["transport"], record["job_data"], record["started_at"], priority
        )
        c = record["counters"]
        session.counters.received = int(c.get("frames_received", len(frames)))
        session.counters.dropped = int(c.get("frames_dropped", 0))
        session.counters.insufficient = int(c.get("frames_insufficient", 0))
        session.counters.degraded = int(c.get("frames_degraded", 0))
        session.counters.analysed = frames[-1][0] + 1 if frames else 0
        for _i, t, summary in frames:
            session.aggregate.add(t, summary)
        last_t = frames[-1][1] if frames else record["started_at"]
        last_i = frames[-1][0] if frames else 0
        for a in alerts:
            if a.get("ended_at") is None:
                await self.store.save_alert(
                    session_id,
                    {
                        **a,
                        "status": "ended",
                        "ended_at": last_t,
                        "end_frame": last_i,
                        "end_reason": "interrupted",
                        "duration_s": round(max(0.0, last_t - a["started_at"]), 3),
                    },
                )
        self._live[session.id] = session
        await self.store.set_session_status(session.id, "live", None)
        session.worker = asyncio.create_task(self._work(session), name=f"session-{session.id[:8]}")
        self.instruments.live_sessions.set(len(self._live))
        log.info("session %s reopened after frame %d", session.id, last_i)
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
        self,
        session: LiveSession,
        frame: Frame,
        *,
        scene_changed: bool = False,
        count_received: bool = True,
        budgeted: bool = False,
    ) -> dict[str, Any]:
        """Queue a frame for analysis (replacing any frame still waiting) and wait for its
        result; a replaced frame's caller gets `DROPPED`. `budgeted`: the caller already
        waited for the server-wide budget (the WebRTC sampler does, before it picks the
        newest frame)."""
        if session.status != "live":
            raise SessionEnded(f"session {session.id} has ended")
        if count_received:
            self.frame_received(session)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        replaced = session.slot.put(PendingFrame(frame, future, scene_changed, budgeted))
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
        session.counters.dropped += 1
        self.instruments.frames_dropped.labels(transport=session.transport).inc()
        if not pending.future.done():
            pending.future.set_result({**DROPPED, "reason": reason})

    async def _work(self, session: LiveSession) -> None:
        current_session.set(session.id)
        while True:
            try:
                head = await session.slot.wait_ready()
                if not head.budgeted:
                    # While this waits, newer frames still replace the waiting one.
                    await self.budget.acquire()
            except SlotClosed:
                return
            pending = session.slot.take_nowait()
            if pending is None:  # the session ended while waiting for the budget
                return
            session.analysing = True
            try:
                result = await self._analyse(session, pending.frame, pending.scene_changed)
            except FrameError as exc:
                if not pending.future.done():
                    pending.future.set_exception(exc)
                continue
            except Exception as exc:  # a bug must not kill the session's worker
                log.exception("analysis failed")
                if not pending.future.done():
                    pending.future.set_exception(exc)
                continue
            finally:
                session.analysing = False
            if not pending.future.done():
                pending.future.set_result(result)

    async def _observe(
        self, frame: Frame, session: LiveSession, scene_changed: bool
    ) -> Observation:
        # A recorded video runs faster than real time: its cadence counts video time.
        clock = frame.captured_at if session.transport == "video" else time.monotonic()
        checks = session.cadence.next(clock, scene_changed)
        try:
            return await asyncio.wait_for(
                self.analyser.analyse(frame, checks), self.settings.analyser_timeout_s
            )
        except FrameError:
            raise
        except TimeoutError:
            reason = "timeout"
        except Exception:
            log.exception("analyser %s failed", self.analyser.name)
            reason = "error"
        return Observation(
            backend=self.analyser.name,
            checks=checks,
            degraded=tuple(f"{c}:{reason}" for c in checks.names()),
            width=frame.width,
            height=frame.height,
        )

    async def _analyse(
        self, session: LiveSession, frame: Frame, scene_changed: bool
    ) -> dict[str, Any]:
        started = time.time()
        t0 = time.perf_counter()
        obs = await self._observe(frame, session, scene_changed)
        analyser_s = time.perf_counter() - t0
        self.instruments.analyser_latency.labels(backend=obs.backend).observe(analyser_s)
        session.cadence.missed(obs.degraded)
        if session.pose_calibration is not None:
            obs = session.pose_calibration.apply(obs, frame.captured_at)
        metrics = session.scorer.score(obs)
        index = session.counters.analysed
        session.counters.analysed += 1
        session.counters.insufficient += obs.insufficient
        session.counters.degraded += bool(obs.degraded)
        self.instruments.frames_analysed.labels(transport=session.transport).inc()
        events = session.engine.evaluate(FrameFacts(index, frame.captured_at, obs, metrics))
        summary = frame_summary(obs, metrics)
        session.aggregate.add(frame.captured_at, summary)
        session.touch()

        await self.store.add_frame(session.id, index, frame.captured_at, summary)
        for ev in events:
            await self.store.save_alert(session.id, ev)
            if ev["status"] == "onset":
                self.instruments.alerts_raised.labels(type=ev["type"]).inc()
        await self.store.update_counters(session.id, session.counters.to_json(), time.time())

        face = obs.primary_face
        ended = time.time()
        result = {
            "frame_index": index,
            "timestamp": frame.captured_at,
            "metrics": metrics.to_json(),
            "faces_count": None if obs.faces is None else len(obs.faces),
            "dominant_emotion": face.dominant_emotion if face else None,
            "emotions": {k: round(v, 2) for k, v in face.emotions.items()} if face else {},
            "pose": summary["pose"],
            "labels": None
            if obs.labels is None
            else [{"name": lb.name, "confidence": round(lb.confidence, 1)} for lb in obs.labels],
            "text": None if obs.text is None else [t.text for t in obs.text],
            "alerts": events,
            "active_alerts": [ep.type for ep in session.engine.active()],
            "insufficient": obs.insufficient,
            "quality": None if obs.quality is None else obs.quality.to_json(),
            "degraded": list(obs.degraded),
            "backend": obs.backend,
            "checks": obs.checks.names(),
            "calls": dict(obs.calls),
            "timings": {
                "captured_at": frame.captured_at,
                "analysis_started_at": started,
                "analysis_ended_at": ended,
                "analyser_ms": round(analyser_s * 1000, 2),
            },
        }
        await session.publish("frame_analysis", {"session_id": session.id, "result": result})
        if events:
            await session.publish("alerts", {"session_id": session.id, "alerts": events})
        return result

    # --- ending and reports -------------------------------------------------------------

    async def end_session(
        self,
        session_id: object,
        reason: str = "client",
        use_llm: bool = True,
        *,
        ended_at: float | None = None,
    ) -> dict[str, Any]:
        """`ended_at`: the end on the session's own clock (a recorded video ends at its
        start + duration, not when the analysis finished); default now."""
        session = await self.get_live(session_id)
        session.status = "ending"
        task = asyncio.create_task(
            self._end(session, reason, use_llm, ended_at), name=f"end-{session.id[:8]}"
        )
        self._ending[session.id] = task
        try:
            # Shielded: a client that disconnects mid-request must not leave a half-ended
            # session behind.
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._ending.pop(session.id, None)

    async def _end(
        self, session: LiveSession, reason: str, use_llm: bool, ended_at: float | None = None
    ) -> dict[str, Any]:
        current_session.set(session.id)
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
        now = time.time() if ended_at is None else ended_at
        closing = session.engine.close_all(now, max(0, session.counters.analysed - 1))
        for ev in closing:
            await self.store.save_alert(session.id, ev)
        if closing:
            await session.publish("alerts", {"session_id": session.id, "alerts": closing})
        await self.store.end_session(session.id, now, reason, session.counters.to_json())
        self._live.pop(session.id, None)
        self.instruments.live_sessions.set(len(self._live))
        self.instruments.sessions_ended.labels(reason=reason).inc()
        report = await self._make_report(session.id, use_llm)
        session.status = "ended"
        await session.publish("session_ended", {"session_id": session.id, "report": report})
        session.listeners.clear()
        log.info("session %s ended (%s)", session.id, reason)
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
