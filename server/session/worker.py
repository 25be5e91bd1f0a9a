"""A session's worker: the one owner of everything between a frame in the session's slot
and the events that go out.

Per session, one task (`SessionPipeline.run`) loops: wait for a frame in the slot → plan
the checks (faces always; labels and text at their cadence) → wait for the server-wide
budget for exactly those API calls (billed backends only; a newer frame replaces the
waiting one meanwhile) → take the newest frame → analyse (one in flight) → pose baseline
→ score → alert rules → store → publish `frame_analysis` / `alerts` to the session's
listeners, and answer the push transport's waiter if there is one.

An analysis that times out is answered at once as degraded, but it keeps the session's
in-flight slot until the backend's thread has really returned, so timed-out analyses
never overlap with the next one (a thread cannot be cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from server.analysis import facts
from server.analysis.analyser import Analyser
from server.analysis.budget import Budget
from server.analysis.observation import Checks, Observation
from server.analysis.rules import FrameFacts
from server.analysis.scoring import FrameMetrics
from server.config import Settings
from server.errors import InternalError
from server.media.frames import Frame, FrameError
from server.media.latest_slot import SlotClosed
from server.observability import Instruments, current_session
from server.session.analyser_router import AnalyserRouter, Route
from server.session.evidence import EvidenceJob, EvidenceWriter
from server.session.live_session import LastResult, LiveSession, PendingFrame
from server.session.pacing import IdlePacing
from server.session.store import Store

log = logging.getLogger(__name__)

#: Called with (where, exception, session) for an unexpected error; it logs and counts.
ErrorHook = Callable[[str, BaseException, LiveSession | None], None]


def frame_summary(
    obs: Observation, metrics: FrameMetrics, emotions: bool = True
) -> dict[str, Any]:
    """What the store keeps per frame: numbers and names, never pixels; `facts` are what
    the alert rules read, so the session's alerts can be replayed (re-scoring).
    `emotions` False (EMOTION_ANALYSIS=off): no emotion, not even an empty distribution."""
    face = obs.primary_face
    distribution: dict[str, float] | None = None
    if emotions:
        distribution = {k: round(v, 1) for k, v in face.emotions.items()} if face else {}
    return {
        "metrics": metrics.to_json(),
        "faces": None if obs.faces is None else len(obs.faces),
        "dominant_emotion": face.dominant_emotion if face and emotions else None,
        "emotions": distribution,
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
        "facts": facts.encode(obs, metrics),
    }


def _story(obs: Observation, metrics: FrameMetrics) -> str:
    """One log line's worth of a frame's result."""
    face = obs.primary_face
    faces = "faces not checked" if obs.faces is None else f"{len(obs.faces)} face(s)"
    parts = [faces]
    if face is not None and metrics.eye_contact is not None:
        parts.append(f"eye contact {metrics.eye_contact:.0f}")
    if face is not None and face.dominant_emotion:
        parts.append(face.dominant_emotion)
    if obs.insufficient:
        parts.append(f"insufficient ({obs.quality.reason if obs.quality else 'quality'})")
    if obs.degraded:
        parts.append(f"degraded: {', '.join(obs.degraded)}")
    return f"{'; '.join(parts)} ({obs.backend}, {obs.latency_ms:.0f} ms)"


def _calls(checks: Checks) -> int:
    return len(checks.names())


class SessionPipeline:
    """What every session's worker shares: analyser router, budget, store, pacing."""

    def __init__(
        self,
        settings: Settings,
        router: AnalyserRouter,
        store: Store,
        instruments: Instruments,
        budget: Budget,
        pacing: IdlePacing,
        on_error: ErrorHook,
        evidence: EvidenceWriter | None = None,
    ) -> None:
        self.settings = settings
        #: Picks each analysis' backend: the server's own, or the offline one for a
        #: session moved there by the daily Rekognition cap.
        self.router = router
        self.store = store
        self.instruments = instruments
        self.budget = budget
        self.pacing = pacing
        self.on_error = on_error
        #: Renders each onset's snapshot off the live path (None: no evidence).
        self.evidence = evidence

    @property
    def analyser(self) -> Analyser:
        return self.router.primary

    def _billed(self, session: LiveSession) -> bool:
        """Only billed (cloud) analyses spend the API budget; the offline backend is
        bounded by its own worker pool."""
        return self.router.billed_for(session) and not self.budget.unlimited

    # --- the loop ------------------------------------------------------------------------

    async def run(self, session: LiveSession) -> None:
        current_session.set(session.id)
        while True:
            try:
                head = await session.slot.wait_ready()
            except SlotClosed:
                return
            try:
                pending, checks = await self._take(session, head)
            except SlotClosed:
                return
            if pending is None:
                continue
            session.analysing = True
            straggler: asyncio.Future[Observation] | None = None
            try:
                result, straggler = await self._analyse(session, pending.frame, checks)
            except FrameError as exc:
                pending.fail(exc)
                if pending.future is None:
                    log.warning("frame refused by the analyser: %s", exc)
                continue
            except Exception as exc:  # a bug must not kill the session's worker
                self.on_error("worker", exc, session)
                error = InternalError(
                    "the frame could not be analysed (internal error); the session goes on"
                )
                error.__cause__ = exc
                pending.fail(error)
                continue
            finally:
                if straggler is None:
                    session.analysing = False
            pending.answer(result)
            if straggler is not None:
                # The timed-out analysis still holds the in-flight slot until its
                # thread returns.
                with contextlib.suppress(Exception):
                    await straggler
                session.analysing = False

    async def _take(
        self, session: LiveSession, head: PendingFrame
    ) -> tuple[PendingFrame | None, Checks]:
        """Plan the checks, wait for their budget, take the newest frame."""
        checks = session.cadence.plan(session.clock_now(head.frame), head.scene_changed)
        granted = 0
        billed = self._billed(session)
        if billed:
            t0 = time.monotonic()
            await self.budget.acquire(_calls(checks), session.priority)
            granted = _calls(checks)
            session.budget_wait_s = time.monotonic() - t0
        pending = session.slot.take_nowait()
        if pending is None:
            if session.slot.closed:
                raise SlotClosed("session ended while waiting for the budget")
            return None, checks
        now = session.clock_now(pending.frame)
        checks = session.cadence.plan(now, pending.scene_changed)
        extra = _calls(checks) - granted
        if billed and extra > 0:
            # A newer frame with a scene change replaced the one planned for.
            await self.budget.acquire(extra, session.priority)
        session.cadence.commit(checks, now)
        return pending, checks

    # --- one analysis --------------------------------------------------------------------

    async def _observe(
        self, session: LiveSession, frame: Frame, checks: Checks
    ) -> tuple[Observation, asyncio.Future[Observation] | None]:
        """The analyser's observation; on timeout a degraded one plus the still-running
        analysis, which the caller must wait for before the next one."""
        route = await self.router.route(session, checks)
        analyser = route.analyser
        if analyser is None:  # the offline backend is still loading
            return self._degraded(frame, checks, route.reason, route.backend), None
        task = asyncio.ensure_future(analyser.analyse(frame, checks))
        task.add_done_callback(_retrieve)
        # Counted when the analysis really ends (a timed-out one may still bill calls).
        task.add_done_callback(functools.partial(self._settle, route))
        try:
            return await asyncio.wait_for(
                asyncio.shield(task), self.settings.analyser_timeout_s
            ), None
        except FrameError:
            raise
        except TimeoutError:
            return self._degraded(frame, checks, "timeout", analyser.name), task
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception:
            log.exception("analyser %s failed", analyser.name)
            return self._degraded(frame, checks, "error", analyser.name), None

    def _settle(self, route: Route, task: asyncio.Future[Observation]) -> None:
        ok = not task.cancelled() and task.exception() is None
        self.router.settle(route, task.result() if ok else None)

    def _degraded(self, frame: Frame, checks: Checks, reason: str, backend: str) -> Observation:
        return Observation(
            backend=backend,
            checks=checks,
            degraded=tuple(f"{c}:{reason}" for c in checks.names()),
            width=frame.width,
            height=frame.height,
        )

    async def _analyse(
        self, session: LiveSession, frame: Frame, checks: Checks
    ) -> tuple[dict[str, Any], asyncio.Future[Observation] | None]:
        started = time.time()
        t0 = time.perf_counter()
        obs, straggler = await self._observe(session, frame, checks)
        analyser_s = time.perf_counter() - t0
        self.pacing.record(analyser_s)
        self.instruments.analyser_latency.labels(backend=obs.backend).observe(analyser_s)
        session.cadence.missed(obs.degraded)
        if session.pose_calibration is not None:
            obs = session.pose_calibration.apply(obs, frame.captured_at)
        if not session.emotion_analysis:  # nothing inferred passes this point
            obs = obs.without_emotions()
        metrics = session.scorer.score(obs)
        index = session.counters.analysed
        session.counters.analysed += 1
        session.counters.insufficient += obs.insufficient
        session.counters.degraded += bool(obs.degraded)
        self.instruments.frames_analysed.labels(transport=session.transport).inc()
        events = session.engine.evaluate(FrameFacts(index, frame.captured_at, obs, metrics))
        summary = frame_summary(obs, metrics, session.emotion_analysis)
        session.aggregate.add(frame.captured_at, summary)
        session.touch()

        await self.store.add_frame(session.id, index, frame.captured_at, summary)
        if index == 0:
            log.info("first analysis: %s", _story(obs, metrics), extra={"session_id": session.id})
        for ev in events:
            await self.store.save_alert(session.id, ev)
            if ev["status"] == "onset":
                if self.evidence is not None:
                    # This frame confirmed the onset: its snapshot, never waited for.
                    self.evidence.offer(EvidenceJob(session.id, dict(ev), frame, obs))
                self.instruments.alerts_raised.labels(type=ev["type"]).inc()
                log.info("alert %s (%s): %s", ev["type"], ev["severity"], ev["message"],
                         extra={"session_id": session.id})
        await self.store.update_counters(session.id, session.counters.to_json(), time.time())

        face = obs.primary_face
        result = {
            "frame_index": index,
            "timestamp": frame.captured_at,
            "metrics": metrics.to_json(),
            "faces_count": None if obs.faces is None else len(obs.faces),
            "dominant_emotion": summary["dominant_emotion"],
            "emotions": None
            if not session.emotion_analysis
            else ({k: round(v, 2) for k, v in face.emotions.items()} if face else {}),
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
                "analysis_ended_at": time.time(),
                "analyser_ms": round(analyser_s * 1000, 2),
                "budget_wait_ms": round(session.budget_wait_s * 1000, 2),
            },
        }
        session.last_result = LastResult(time.monotonic(), bool(obs.degraded), obs.insufficient)
        await session.publish("frame_analysis", {"session_id": session.id, "result": result})
        if events:
            await session.publish("alerts", {"session_id": session.id, "alerts": events})
        return result, straggler


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished analysis' exception as seen (it was reported, or it finished after
    its timeout was answered)."""
    if not task.cancelled():
        task.exception()
