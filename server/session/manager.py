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
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

from server.analysis.analyser import Analyser, PoseCalibration
from server.analysis.backends import pose_calibration_factory as backend_pose_factory
from server.analysis.budget import Budget, CallBudget, Priority
from server.analysis.cadence import CheckCadence
from server.analysis.rules import AlertEngine, rules_from_settings
from server.analysis.scoring import Scorer
from server.cluster.node import new_session_id
from server.config import Settings
from server.errors import (
    BackendUnavailable,
    Overloaded,
    ProctorError,
    ReportNotReady,
    SessionEnded,
    SessionNotFound,
)
from server.media.frames import Frame
from server.observability import Instruments, current_session, short_id
from server.session.alerts import evidence_url, public_alert
from server.session.analyser_router import AnalyserRouter
from server.session.audit import SYSTEM, AuditLog
from server.session.evidence import EvidenceWriter
from server.session.live_session import CAPTURE_CLOCK_TRANSPORTS, DROPPED, LiveSession, PendingFrame
from server.session.pacing import IdlePacing
from server.session.report import (
    TIMESTAMP_RANGE,
    ReportBuilder,
    attach_narrative,
    fallback_report,
    mark_partial,
)
from server.session.reviews import VERDICTS, apply_reviews, review_status
from server.session.spend import LLM_CAP, SpendCaps
from server.session.store import Store, StoreError, StoreTimeout, loads_object
from server.session.webhooks import WebhookSender
from server.session.worker import SessionPipeline

if TYPE_CHECKING:
    from server.cluster.shared_spend import SharedCounters

log = logging.getLogger(__name__)

NarratorFactory = Callable[[], Any]
#: Told of every session that goes live on this node, whatever its transport (started or
#: reopened), before its first frame: the Socket.IO watchers attach here.
SessionObserver = Callable[[LiveSession], Awaitable[None]]
#: Told that a session is about to be erased (after it was found, before its rows go):
#: e.g. the video jobs stop and forget the session's job.
EraseHook = Callable[[str], Awaitable[None]]

class SessionManager:
    def __init__(
        self,
        settings: Settings,
        analyser: Analyser,
        store: Store,
        instruments: Instruments,
        narrator: Any | None = None,
        pose_calibration_factory: Callable[[], PoseCalibration] | None = None,
        *,
        offline_analyser: Analyser | None = None,
        budget: Budget | None = None,
        shared_counters: SharedCounters | None = None,
    ) -> None:
        """`offline_analyser`: an offline backend already started, for sessions moved off
        a capped Rekognition (the caller owns it); default: one made when first needed.
        `budget`, `shared_counters`: the cluster's call budget and spend counters
        (REDIS_URL); default: this node's own."""
        self.settings = settings
        self.analyser = analyser
        self.store = store
        self.instruments = instruments
        self.narrator = narrator
        self.pose_calibration_factory = pose_calibration_factory
        # Server-wide billed API calls per second (the Rekognition TPS quota), shared
        # round-robin by every session of every transport, live before background.
        self.budget: Budget = budget or CallBudget(settings.analyser_calls_per_s)
        billed = bool(getattr(analyser, "billed", False))
        self.pacing = IdlePacing(
            billed,
            cloud_idle_s=settings.sampler_idle_interval_s,
            local_idle_s=settings.sampler_local_idle_interval_s,
            workers=int(getattr(analyser, "workers", 1) or 1),
        )
        self.spend = SpendCaps(settings, store, instruments, shared_counters)
        self.router = AnalyserRouter(
            settings, analyser, self.spend, store, instruments,
            offline=offline_analyser,
            pose_calibration_factory=lambda a: backend_pose_factory(a, settings),
        )
        #: Alert evidence snapshots, rendered in their own thread (EVIDENCE).
        self.evidence = EvidenceWriter(settings, store, instruments, self.internal_error)
        self.pipeline = SessionPipeline(
            settings, self.router, store, instruments, self.budget, self.pacing,
            self.internal_error, self.evidence,
        )
        self._live: dict[str, LiveSession] = {}
        self._grace: dict[str, asyncio.Task[None]] = {}
        self._ending: dict[str, asyncio.Task[dict[str, Any]]] = {}
        # One report build per ended/interrupted session id, shared by concurrent requests.
        self._reports: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: Who did what (reviews, re-scorings, erasures, retention sweeps).
        self.audit = AuditLog(store)
        #: Set by the app (which owns its sender task): sessions' alerts and ends go out.
        self.webhooks: WebhookSender | None = None
        self.erase_hooks: list[EraseHook] = []
        self.interrupted_at_start: list[str] = []
        #: This node (sessions.node_id), and in a cluster the tag its session ids carry.
        self.node_id: str | None = None
        self.session_id_tag: str | None = None
        #: In a cluster the store is shared: open() interrupts only this node's sessions,
        #: and a start is committed before it is answered (another node may be asked
        #: about the session, or its candidate token, right after).
        self.clustered = False
        #: Awaited at stop once sessions have ended, before the store closes.
        self.before_store_close: list[Callable[[], Awaitable[None]]] = []
        #: What builds reports (a subclass can be swapped in, e.g. by tests).
        self.report_builder: type[ReportBuilder] = ReportBuilder
        self.session_observers: list[SessionObserver] = []
        store.on_write_error = self._store_write_failed
        instruments.store_queue_depth.set_function(lambda: store.queue_depth)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.interrupted_at_start = await self.store.open(
            self.node_id if self.clustered else None
        )
        await self.spend.start()
        await self.analyser.start()
        self.evidence.start()
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="idle-sweeper")
        if self.settings.retention_days > 0:
            self._retention = asyncio.create_task(
                self._sweep_retention(), name="retention-sweeper"
            )

    async def stop(self) -> None:
        """Ends every live session concurrently (each gets its report, without the LLM,
        which could hold shutdown for its whole timeout) and closes everything, within
        SHUTDOWN_TIMEOUT_S whatever hangs: a session whose end does not finish in time is
        logged and left `interrupted`."""
        loop = asyncio.get_running_loop()
        timeout_s = self.settings.shutdown_timeout_s
        deadline = loop.time() + timeout_s
        for sweeper in (self._sweeper, self._retention):
            if sweeper is not None:
                sweeper.cancel()
                await asyncio.wait({sweeper}, timeout=1.0)
        for task in list(self._grace.values()):
            task.cancel()  # ending now: no reconnect to wait for
        live = list(self._live)
        for sid in live:
            self._spawn(self._end_quietly(sid, "server_shutdown", use_llm=False), f"stop-{sid[:8]}")
        await asyncio.sleep(0)  # let each end start, so it is in self._ending
        # Closing the store and the analyser gets the last part of the time.
        reserve = min(2.0, timeout_s / 4)
        work = (
            set(self._ending.values()) | set(self._reports.values()) | set(self._background)
            | set(self._grace.values())
        )
        if work:
            await asyncio.wait(work, timeout=max(0.0, deadline - reserve - loop.time()))
        hung = [sid for sid, task in self._ending.items() if not task.done()]
        hung += [sid for sid in self._live if sid not in hung]
        leftovers = [
            t
            for t in (*self._ending.values(), *self._reports.values(), *self._background)
            if not t.done()
        ]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=max(0.0, min(0.5, deadline - loop.time())))
        for sid in hung:
            log.error(
                "session %s did not end within SHUTDOWN_TIMEOUT_S (%.1f s): left interrupted",
                sid,
                timeout_s,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self.store.mark_interrupted(sid, "shutdown_timeout")
        self.budget.close()
        # Snapshots still queued get what is left of a second, then are given up.
        await self.evidence.stop(timeout_s=max(0.0, min(1.0, deadline - loop.time() - reserve / 2)))
        await self._close_within(self.spend.stop(), deadline, "spend counters")
        for hook in self.before_store_close:
            await self._close_within(hook(), deadline, "cluster lease")
        await self.store.close(timeout_s=max(0.1, deadline - loop.time()))
        await self._close_within(self.analyser.close(), deadline, "analyser")
        await self._close_within(self.router.close(), deadline, "offline analyser")
        if self.narrator is not None:
            await self._close_within(self.narrator.close(), deadline, "narrator")

    async def _close_within(self, aw: Any, deadline: float, what: str) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(0.1, remaining)):  # a moment to release threads
                await aw
        except TimeoutError:
            log.error("%s did not close within the shutdown timeout", what)
        except Exception as exc:
            self.internal_error("shutdown", exc)

    @property
    def live_count(self) -> int:
        return len(self._live)

    def live_sessions(self) -> list[LiveSession]:
        return list(self._live.values())

    def has_live(self, session_id: str) -> bool:
        """Whether this node runs the session (live or ending) in memory."""
        return session_id in self._live or session_id in self._ending

    # --- sessions -----------------------------------------------------------------------

    async def start_session(
        self,
        job_data: dict[str, Any],
        transport: str,
        *,
        started_at: float | None = None,
        priority: Priority = "live",
        client_address: str | None = None,
    ) -> LiveSession:
        """`started_at`: the session's clock origin (a recorded video's own time base);
        `priority`: "background" for work that must not starve live candidates;
        `client_address`: who asks (SESSION_STARTS_PER_MINUTE; None: not limited)."""
        size = len(json.dumps(job_data, separators=(",", ":"), default=str).encode())
        if size > self.settings.job_data_max_bytes:
            raise ProctorError(
                f"job_data is {size} bytes as JSON; the limit is "
                f"{self.settings.job_data_max_bytes}",
                code="job_data_too_large",
                status=413,
            )
        self._check_capacity()
        # Checked and counted in one step (in a cluster, one Redis script for all nodes).
        await self.spend.admit_start(client_address)
        self._check_capacity()  # again: others may have started meanwhile
        session = self._new_session(
            new_session_id(self.session_id_tag),  # 128 random bits: its capability
            transport,
            dict(job_data),
            time.time() if started_at is None else started_at,
            priority,
        )
        self.router.starting(session)  # past the Rekognition cap: on the offline backend
        self._live[session.id] = session
        await self.store.create_session(
            session.id, transport, session.backend, session.job_data, session.started_at,
            rules=self._rules_record(session),
            backend_switches=session.backend_switches,
            node_id=self.node_id,
        )
        if self.clustered:
            try:
                await self.store.flush(session.id)
            except StoreError as exc:  # the session runs; other nodes learn of it late
                self.internal_error("store", exc, session)
        await self._announce(session)
        self._start_worker(session)
        self.instruments.sessions_started.labels(transport=transport).inc()
        log.info("session %s started (%s, backend %s)", short_id(session.id), transport,
                 session.backend, extra={"session_id": session.id})
        return session

    async def _announce(self, session: LiveSession) -> None:
        for observer in list(self.session_observers):
            try:
                await observer(session)
            except Exception as exc:  # an observer's bug must not refuse the session
                self.internal_error("session_observer", exc, session)

    def _check_capacity(self) -> None:
        if len(self._live) >= self.settings.max_live_sessions:
            raise Overloaded(
                f"the server is at its limit of {self.settings.max_live_sessions} live sessions",
                code="too_many_sessions",
            )

    def _new_session(
        self,
        session_id: str,
        transport: str,
        job_data: dict[str, Any],
        started_at: float,
        priority: Priority,
    ) -> LiveSession:
        s = self.settings
        engine, cadence, clock = self._transport_parts(transport)
        session = LiveSession(
            id=session_id,
            transport=transport,
            backend=self.analyser.name,
            job_data=job_data,
            started_at=started_at,
            scorer=Scorer(
                yaw_limit=s.looking_away_yaw_deg,
                pitch_limit=s.looking_away_pitch_deg,
                posture_window=s.posture_window_frames,
                positive_emotions=tuple(s.positive_emotions),
                gaze_min_confidence=s.eye_direction_min_confidence,
            ),
            engine=engine,
            cadence=cadence,
            pose_calibration=self.pose_calibration_factory()
            if self.pose_calibration_factory
            else None,
            clock=clock,
            priority=priority,
            emotion_analysis=s.emotion_analysis,
        )
        session.on_error = functools.partial(self._listener_failed, session)
        if self.webhooks is not None and self.webhooks.enabled:
            session.subscribe(functools.partial(self.webhooks.on_session_event, session_id))
        return session

    def _rules_record(self, session: LiveSession) -> dict[str, Any]:
        """The alert settings a session is judged with, as its report states them."""
        return {
            **session.engine.describe(),
            "eye_direction_min_confidence": self.settings.eye_direction_min_confidence,
            # Off: the report lists what was not computed (EMOTION_ANALYSIS).
            "emotion_analysis": self.settings.emotion_analysis,
        }

    def _transport_parts(
        self, transport: str
    ) -> tuple[AlertEngine, CheckCadence, Literal["capture", "arrival"]]:
        """What depends on who picks the frames. WebRTC and recorded video: the server
        does, so rules and cadences count capture time; push clients pick their own pace
        and keep the per-frame meaning."""
        s = self.settings
        capture_clock = transport in CAPTURE_CLOCK_TRANSPORTS
        sampled = transport == "webrtc"  # the sampler forces slow checks on scene changes
        dwell = s.rule_frame_interval_s if capture_clock else None
        return (
            AlertEngine(rules_from_settings(s), dwell_interval_s=dwell),
            CheckCadence(
                s.sampler_labels_interval_s if sampled else s.labels_interval_s,
                s.sampler_text_interval_s if sampled else s.text_interval_s,
            ),
            "capture" if capture_clock else "arrival",
        )

    async def adopt_transport(self, session: LiveSession, transport: str) -> bool:
        """A session started by the operator (REST, Socket.IO) for a candidate who then
        joins over `transport` (the join link's WebRTC page): before its first frame it
        becomes that transport's session, so its rules count time as that transport's
        do. Once frames have arrived nothing changes (False)."""
        if session.transport == transport:
            return True
        if session.counters.received or session.counters.analysed or session.analysing:
            return False
        previous = session.transport
        session.engine, session.cadence, session.clock = self._transport_parts(transport)
        session.transport = transport
        await self.store.set_transport(session.id, transport, self._rules_record(session))
        log.info("session joined over %s (started over %s)", transport, previous,
                 extra={"session_id": session.id})
        return True

    def _start_worker(self, session: LiveSession) -> None:
        session.worker = asyncio.create_task(
            self.pipeline.run(session), name=f"session-{session.id[:8]}"
        )
        session.worker.add_done_callback(functools.partial(self._worker_done, session))
        self.instruments.live_sessions.set(len(self._live))

    async def suspend_session(self, session_id: str, reason: str = "server_shutdown") -> None:
        """Stop a session without ending it: it becomes `interrupted`, as if the process
        had died, so `reopen_session` can continue it (recorded videos at shutdown)."""
        session = self._live.get(session_id)
        if session is None or session.status != "live":
            return
        session.status = "ending"
        await self._stop_worker(session)
        await self.store.update_counters(session.id, session.counters.to_json(), time.time())
        await self.store.set_session_status(session.id, "interrupted", reason)
        self._release(session)
        session.status = "ended"
        session.listeners.clear()
        log.info("session suspended (%s)", reason, extra={"session_id": session.id})

    async def reopen_session(
        self, session_id: str, *, priority: Priority = "background"
    ) -> LiveSession:
        """Continue an `interrupted` session after its last stored frame: same id, clock
        and counters, aggregate rebuilt from the stored frames (streamed). Alert episodes
        left open end at the last stored frame (`interrupted`), rule streaks start afresh."""
        if session_id in self._live:
            raise SessionEnded(f"session {session_id} is already live", code="session_live")
        self._check_capacity()
        await self.store.flush()
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        if record["status"] != "interrupted":
            raise SessionEnded(f"session {session_id} has {record['status']}")
        session = self._new_session(
            session_id, record["transport"], record["job_data"], record["started_at"], priority
        )
        session.backend_switches = list(record.get("backend_switches") or [])
        moved = bool(session.backend_switches)
        self.router.starting(session)
        if session.backend_switches and not moved:
            await self.store.set_backend(session.id, session.backend, session.backend_switches)

        def rebuild(span: Any, rows: Any) -> tuple[int, float | None]:
            last_i, last_t = -1, None
            for idx, t, summary in rows:
                parsed = loads_object(summary)
                if parsed is None or not isinstance(t, int | float):
                    continue
                session.aggregate.add(float(t), parsed)
                last_i, last_t = int(idx), float(t)
            return last_i, last_t

        last_i, last_t = await self.store.scan_frames(session_id, rebuild, TIMESTAMP_RANGE)
        c = record["counters"]
        session.counters.received = int(c.get("frames_received", last_i + 1))
        session.counters.dropped = int(c.get("frames_dropped", 0))
        session.counters.insufficient = int(c.get("frames_insufficient", 0))
        session.counters.degraded = int(c.get("frames_degraded", 0))
        session.counters.analysed = last_i + 1
        session.last_frame_at = last_t
        end_t = record["started_at"] if last_t is None else last_t
        for raw in await self.store.alert_rows(session_id):
            episode = loads_object(raw)
            if episode is None or episode.get("ended_at") is not None:
                continue
            started = episode.get("started_at")
            await self.store.save_alert(session_id, {
                **episode,
                "status": "ended",
                "ended_at": end_t,
                "end_frame": max(0, last_i),
                "end_reason": "interrupted",
                "duration_s": round(max(0.0, end_t - started), 3)
                if isinstance(started, int | float) else None,
            })
        self._live[session.id] = session
        await self.store.set_session_status(session.id, "live", None)
        await self._announce(session)
        self._start_worker(session)
        log.info("session reopened after frame %d", last_i, extra={"session_id": session.id})
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
        try:
            record = await self.store.get_session(session_id)
        except StoreError as exc:
            raise _store_unavailable() from exc
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
        await self._end_quietly(session_id, "peer_lost", where="grace")

    # --- internal errors ---------------------------------------------------------------

    def internal_error(
        self, where: str, exc: BaseException, session: LiveSession | None = None
    ) -> None:
        """An unexpected error that was caught and survived: logged with its traceback,
        counted in `proctor_internal_errors_total{where}` and, for a session, announced to
        its listeners as an `error` event. INTERNAL_ERRORS_MAX of them within
        INTERNAL_ERRORS_WINDOW_S end the session (reason `internal_error`, with its
        report). Never raises."""
        self._record_error(where, exc, session)

    def _record_error(self, where: str, exc: BaseException, session: LiveSession | None) -> None:
        try:
            sid = session.id if session is not None else current_session.get()
            log.error("internal error in %s (session %s)", where, sid, exc_info=exc)
            self.instruments.internal_errors.labels(where=where).inc()
            if session is not None:
                self._session_error(session, where)
        except Exception:  # the error path itself must not fail its caller
            log.exception("could not record an internal error")

    def _session_error(self, session: LiveSession, where: str) -> None:
        s = self.settings
        now = time.monotonic()
        recent = session.internal_errors
        recent.append(now)
        while recent and recent[0] <= now - s.internal_errors_window_s:
            recent.popleft()
        ending = session.status == "live" and len(recent) >= s.internal_errors_max
        if session.status != "ended":
            message = f"internal error ({where}); " + (
                "too many in a row: the session is ending" if ending else "the session goes on"
            )
            payload = {
                "session_id": session.id,
                "code": "internal_error",
                "message": message,
                "where": where,
            }
            self._spawn(session.publish("error", payload), f"error-{session.id[:8]}")
        if ending:
            log.error(
                "%d internal errors within %.0f s: ending session %s",
                len(recent),
                s.internal_errors_window_s,
                session.id,
            )
            self._spawn(
                self._end_quietly(session.id, "internal_error", where="end"),
                f"end-errors-{session.id[:8]}",
            )

    def _listener_failed(
        self, session: LiveSession, where: str, exc: BaseException, event: str
    ) -> None:
        # An `error` announcement that fails is counted, but neither announced again (that
        # would loop) nor held against the session (the failure it announces already is).
        self._record_error(where, exc, session if event != "error" else None)

    def _store_write_failed(self, exc: BaseException, session_ids: set[str], lost: int) -> None:
        self.internal_error("store", exc)  # one failure, counted once
        for sid in session_ids:
            session = self._live.get(sid)
            if session is not None:
                self._session_error(session, "store")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _end_quietly(
        self, session_id: str, reason: str, use_llm: bool = True, where: str = "end"
    ) -> None:
        try:
            await self.end_session(session_id, reason=reason, use_llm=use_llm)
        except (SessionEnded, SessionNotFound):
            pass  # someone else ended it first
        except Exception as exc:
            self.internal_error(where, exc)

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
        """Whatever fails on the way, the session ends ended (in memory and in the store)
        with a report, possibly partial; only a cancelled end (a shutdown that ran out of
        time) leaves it to be marked interrupted. `ended_at`: the end on the session's own
        clock (a recorded video's start + duration); default now."""
        current_session.set(session.id)
        self._cancel_grace(session.id)
        own_clock = ended_at
        ended_at = time.time() if own_clock is None else own_clock
        try:
            try:
                await self._stop_worker(session)
                if own_clock is None:
                    ended_at = time.time()  # after the analysis in flight, if any
                closing = session.engine.close_all(ended_at, max(0, session.counters.analysed - 1))
                for ev in closing:
                    await self.store.save_alert(session.id, ev)
                if closing:
                    await session.publish("alerts", {"session_id": session.id, "alerts": closing})
            except Exception as exc:
                self.internal_error("end", exc, session)
            await self.store.end_session(session.id, ended_at, reason, session.counters.to_json())
            self._release(session)
            self.instruments.sessions_ended.labels(reason=reason).inc()
            c = session.counters
            log.info("session ended (%s): %d frames received, %d analysed", reason, c.received,
                     c.analysed, extra={"session_id": session.id})
            memory = self._memory_record(session, reason, ended_at)
            try:
                report = await self._make_report(session.id, use_llm, session, memory)
            except Exception as exc:  # _make_report has its own fallbacks: a last resort
                self.internal_error("report", exc, session)
                report = fallback_report(memory, ["report_failed"])
            session.status = "ended"
            await session.publish("session_ended", {"session_id": session.id, "report": report})
            return report
        finally:
            self._release(session)
            session.status = "ended"
            session.listeners.clear()
            self._ending.pop(session.id, None)

    def _worker_done(self, session: LiveSession, worker: asyncio.Task[None]) -> None:
        if worker.cancelled():
            return
        if (exc := worker.exception()) is not None:
            self.internal_error("worker", exc, session)
        if session.status == "live":  # no worker, no analysis: end it, with its report
            log.error("the worker of session %s stopped: ending the session", session.id)
            self._spawn(
                self._end_quietly(session.id, "internal_error"), f"end-worker-{session.id[:8]}"
            )

    def _release(self, session: LiveSession) -> None:
        if self._live.pop(session.id, None) is not None:
            self.instruments.live_sessions.set(len(self._live))
            self.evidence.forget(session.id)

    async def _stop_worker(self, session: LiveSession) -> None:
        leftover = session.slot.close()
        if leftover is not None:
            self._drop(session, leftover, "session_ended")
        worker = session.worker
        if worker is None or worker.done():
            return
        if not session.analysing:
            # Idle or waiting for the budget: nothing to finish (acquire is
            # cancellation-safe and consumes nothing).
            worker.cancel()
        # Otherwise it finishes the analysis in flight, which its own timeouts bound.
        limit = self.settings.analyser_timeout_s + self.settings.store_flush_timeout_s
        done, _ = await asyncio.wait({worker}, timeout=limit)
        if not done:
            log.error("session worker did not finish within %.1f s: cancelled", limit)
            worker.cancel()
            await asyncio.wait({worker}, timeout=1.0)

    @staticmethod
    def _memory_record(session: LiveSession, reason: str, ended_at: float) -> dict[str, Any]:
        """The session's record as this process knows it, for when the store's is missing
        or behind (its writes failed)."""
        return {
            "session_id": session.id,
            "status": "ended",
            "transport": session.transport,
            "backend": session.backend,
            "job_data": session.job_data,
            "started_at": session.started_at,
            "ended_at": ended_at,
            "end_reason": reason,
            "counters": session.counters.to_json(),
            "backend_switches": list(session.backend_switches),
        }

    async def _make_report(
        self,
        session_id: str,
        use_llm: bool,
        live: LiveSession | None = None,
        memory: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Never fails for what is (or is not) stored: at worst the report is partial."""
        reasons: list[str] = []
        try:
            await self.store.flush(session_id)
        except StoreTimeout as exc:
            self.internal_error("store", exc, live)
            reasons.append("store_write_failed")
        except StoreError as exc:  # already counted when the write was lost
            log.warning("report of %s: %s", session_id, exc)
            reasons.append("store_write_failed")
        record: dict[str, Any] | None = None
        try:
            record = await self.store.get_session(session_id)
        except StoreError as exc:
            if memory is None:
                raise _store_unavailable() from exc
            self.internal_error("store", exc, live)
            reasons.append("store_unreadable")
        if record is None:
            if memory is None:
                raise SessionNotFound(f"no session with id {session_id}")
            record = memory
            reasons.append("store_missing_session")
        elif memory is not None and record.get("status") == "live":
            record = {**record, **memory}  # its end was not stored (yet)

        builder = self.report_builder(record)
        alert_rows: list[Any] = []
        report: dict[str, Any] | None = None
        try:
            failure = await self.store.scan_frames(session_id, builder.feed, TIMESTAMP_RANGE)
            alert_rows = await self.store.alert_rows(session_id)
        except StoreError as exc:
            self.internal_error("store", exc, live)
            reasons.append("store_unreadable")
            failure = None
            if live is not None:  # the live aggregate holds the same facts
                builder = self.report_builder(record, aggregate=live.aggregate)
        if failure is None:
            try:
                report = await asyncio.to_thread(builder.finish, alert_rows)
            except Exception as exc:
                failure = exc
        if failure is not None or report is None:
            self.internal_error("report", failure or Exception("no report"), live)
            report = fallback_report(record, ["report_failed"])
        elif builder.unexpected is not None:
            self.internal_error("report", builder.unexpected, live)
        mark_partial(report, reasons)

        if use_llm and self.narrator is not None:
            await self._narrate(report, live)
        await self._with_reviews(session_id, report)
        mark = self.store.mark()
        try:
            await self.store.save_report(session_id, report)
            await self.store.flush(session_id, since=mark)
        except StoreTimeout as exc:
            self.internal_error("store", exc, live)
        except StoreError as exc:  # counted when lost; the caller still gets the report
            log.error("report of %s was not stored: %s", session_id, exc)
        else:
            llm = report.get("llm") or {}
            by = f"LLM {llm.get('provider')}" if llm and not llm.get("error") else "rules"
            log.info("report written: %d alerts, narrative by %s",
                     len(report.get("alerts") or []), by, extra={"session_id": session_id})
        return report

    async def _narrate(self, report: dict[str, Any], live: LiveSession | None) -> None:
        """The LLM's narrative, while today's tokens are under LLM_DAILY_TOKENS; past it
        the rule-based narrative stays, and `llm.error` says why."""
        from server.session.narrative import Narrative, facts_from_report

        assert self.narrator is not None
        if await self.spend.reached_now("llm_tokens"):
            self.spend.hit("llm_daily_tokens")
            log.warning("daily LLM token cap reached: rule-based narrative",
                        extra={"session_id": report.get("session_id")})
            capped = Narrative(
                provider=getattr(self.narrator, "provider", "unknown"),
                model=getattr(self.narrator, "model", ""),
                summary=None,
                cultural_fit=None,
                error=LLM_CAP,
            )
            attach_narrative(report, capped.to_json())
            return
        try:
            narrative = await self.narrator.narrate(facts_from_report(report))
            self.spend.add("llm_tokens", int(narrative.usage.total_tokens))
            attach_narrative(report, narrative.to_json())
        except Exception as exc:  # the facts stand without the narrative
            self.internal_error("narrative", exc, live)

    async def report(self, session_id: str) -> dict[str, Any]:
        """The finished report of an ended session; an interrupted session's report is
        produced on first request, once however many ask at the same time."""
        if session_id in self._live:
            raise ReportNotReady(f"session {session_id} is still live", code="session_live")
        if session_id in self._ending:
            return await asyncio.shield(self._ending[session_id])
        task = self._reports.get(session_id)
        if task is None:
            task = asyncio.create_task(
                self._stored_or_new_report(session_id), name=f"report-{session_id[:8]}"
            )
            self._reports[session_id] = task
            task.add_done_callback(functools.partial(self._report_done, session_id))
        # Reviews are read afresh: a report stored before a review shows it too.
        return await self._with_reviews(session_id, await asyncio.shield(task))

    async def _with_reviews(self, session_id: str, report: dict[str, Any]) -> dict[str, Any]:
        try:
            reviews = await self.store.reviews(session_id)
        except StoreError as exc:  # the report stands without them
            log.warning("reviews of %s unreadable: %s", short_id(session_id), exc)
            mark_partial(report, ["reviews_unreadable"])
            return report
        return apply_reviews(report, reviews)

    def _report_done(self, session_id: str, task: asyncio.Task[dict[str, Any]]) -> None:
        if self._reports.get(session_id) is task:
            del self._reports[session_id]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already

    async def _stored_or_new_report(self, session_id: str) -> dict[str, Any]:
        try:
            stored = await self.store.get_report(session_id)
        except StoreError as exc:
            raise _store_unavailable() from exc
        if stored is not None:
            return stored
        try:
            record = await self.store.get_session(session_id)
        except StoreError as exc:
            raise _store_unavailable() from exc
        if record is not None and record["status"] == "live":
            # Live on another node of the cluster (this node's own are in self._live).
            raise ReportNotReady(f"session {session_id} is still live", code="session_live")
        return await self._make_report(session_id, use_llm=True)

    # --- review, erasure, retention ----------------------------------------------------

    async def _settled(self, session_id: str) -> None:
        """Wait until every write queued so far (e.g. an alert just raised) is committed,
        without raising for writes lost before (those were counted already)."""
        try:
            await self.store.flush(session_id, since=self.store.mark())
        except StoreError as exc:
            raise _store_unavailable() from exc

    async def session_record(self, session_id: str) -> dict[str, Any]:
        """The stored session with its review status; 404 for an unknown id."""
        await self._settled(session_id)
        try:
            record = await self.store.get_session(session_id)
            counts = (await self.store.review_counts([session_id]))[session_id]
        except StoreError as exc:
            raise _store_unavailable() from exc
        if record is None:
            raise SessionNotFound(f"no session with id {session_id}")
        live = self._live.get(session_id)
        if live is not None:
            record["counters"] = live.counters.to_json()  # newer than the stored ones
        return {**record, "review_status": review_status(counts), "review_counts": counts}

    async def list_sessions(
        self, status: str | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        """Stored sessions (newest first), each with its review status."""
        try:
            sessions = await self.store.list_sessions(status, limit, offset)
            counts = await self.store.review_counts([s["session_id"] for s in sessions])
        except StoreError as exc:
            raise _store_unavailable() from exc
        for record in sessions:
            c = counts[record["session_id"]]
            record["review_status"] = review_status(c)
            record["review_counts"] = c
        return sessions

    async def review_alert(
        self, session_id: str, alert_id: str, verdict: str, note: str | None, actor: str
    ) -> dict[str, Any]:
        """Record an operator's verdict on one alert of a live or ended session (a later
        review replaces it; the audit log keeps both). Returns the alert with its review,
        once stored. 404 `session_not_found` / `alert_not_found`."""
        if verdict not in VERDICTS:
            raise ProctorError(f"verdict must be one of {', '.join(VERDICTS)}",
                               code="invalid_field", status=400)
        await self._settled(session_id)  # an alert just raised is found
        try:
            if await self.store.get_session(session_id) is None:
                raise SessionNotFound(f"no session with id {session_id}")
            episode = await self.store.get_alert(session_id, alert_id)
            previous = (await self.store.reviews(session_id)).get(alert_id)
        except StoreError as exc:
            raise _store_unavailable() from exc
        if episode is None:
            raise ProctorError(f"session {session_id} has no alert {alert_id}",
                               code="alert_not_found", status=404)
        at = time.time()
        review = {"verdict": verdict, "note": note, "at": at, "by": actor}
        mark = self.store.mark()
        await self.store.save_review(session_id, alert_id, verdict, note, actor, at)
        await self.audit.record(actor, "review", session_id, {
            "alert_id": alert_id,
            "alert_type": episode.get("type"),
            "verdict": verdict,
            "note": note,
            "previous_verdict": previous["verdict"] if previous else None,
        })
        try:
            await self.store.flush(session_id, since=mark)
        except StoreError as exc:
            raise BackendUnavailable(
                "the review could not be stored; retry", code="store_unavailable"
            ) from exc
        log.info("alert %s %s by %s", episode.get("type"), verdict, actor,
                 extra={"session_id": session_id})
        try:
            has_evidence = self.settings.evidence != "none" and (
                await self.store.get_evidence(session_id, alert_id)
            ) is not None
        except StoreError:
            has_evidence = False  # the review is stored; only the link is missing
        url = evidence_url(session_id, alert_id) if has_evidence else None
        return public_alert(episode, evidence=url, review=dict(review))

    async def erase_session(self, session_id: str, actor: str) -> dict[str, Any]:
        """Erase a session: a live one is ended first (without the LLM: its report is
        erased at once), then its frames, alerts, evidence, reviews, report, video job and
        the session itself are deleted, committed before this returns. The audit entry
        (no personal data) is what remains. 404 for an unknown id."""
        if session_id not in self._live and session_id not in self._ending:
            await self._settled(session_id)
            try:
                found = await self.store.get_session(session_id)
            except StoreError as exc:
                raise _store_unavailable() from exc
            if found is None:
                raise SessionNotFound(f"no session with id {session_id}")
        was_live = session_id in self._live
        await self._erase_one(session_id, "erased")
        try:
            await self.store.flush(session_id, since=self.store.mark())  # its end, if live
            record = await self.store.get_session(session_id)
        except StoreError:
            record = None  # the audit entry says less; the erasure goes on
        mark = self.store.mark()
        await self.store.erase_session(session_id)
        await self.audit.forget_notes(session_id)
        entry = await self.audit.record(actor, "erase", session_id, {
            "was_live": was_live,
            **_erased_facts(record),
        })
        try:
            await self.store.flush(session_id, since=mark)
        except StoreError as exc:
            raise BackendUnavailable(
                "the erasure could not be stored yet; retry", code="store_unavailable"
            ) from exc
        self.instruments.sessions_erased.labels(reason="request").inc()
        log.info("session erased by %s", actor, extra={"session_id": session_id})
        return {"session_id": session_id, "status": "erased", "audit_id": entry["id"]}

    async def _erase_one(self, session_id: str, reason: str) -> None:
        """What must happen before a session's rows are deleted: its owners let go (video
        job), a live session ends, a report being built is finished (it would write the
        report back)."""
        for hook in list(self.erase_hooks):
            await hook(session_id)
        if session_id in self._live:
            await self._end_quietly(session_id, reason, use_llm=False, where="erase")
        for tasks in (self._ending, self._reports):
            task = tasks.get(session_id)
            if task is not None:
                await asyncio.wait({task})

    async def sweep_retention(self, now: float | None = None) -> int:
        """Erase the ended and interrupted sessions older than RETENTION_DAYS, in batches
        of RETENTION_BATCH_SESSIONS (each committed before the next, so a backlog never
        fills the write queue); never a live one. Returns how many were erased."""
        days = self.settings.retention_days
        if days <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - days * 86_400.0
        batch = max(1, self.settings.retention_batch_sessions)
        erased = 0
        while True:
            ids = [
                sid
                for sid in await self.store.sessions_ended_before(cutoff, batch)
                if sid not in self._live and sid not in self._ending
            ]
            if not ids:
                break
            mark = self.store.mark()
            for sid in ids:
                await self._erase_one(sid, "retention")
                await self.store.erase_session(sid)
                await self.audit.forget_notes(sid)
                await self.audit.record(SYSTEM, "retention_sweep", sid, {
                    "retention_days": days, "cutoff": round(cutoff, 3),
                })
            await self.store.flush(since=mark)  # raises if lost: the next sweep retries
            erased += len(ids)
            self.instruments.sessions_erased.labels(reason="retention").inc(len(ids))
            if len(ids) < batch:
                break
        if erased:
            log.info("retention sweep: %d session(s) older than %g day(s) erased", erased, days)
        return erased

    async def _sweep_retention(self) -> None:
        interval = self.settings.retention_sweep_interval_s
        # The first sweep soon after start (not an interval later), once start-up is over.
        await asyncio.sleep(min(interval, 10.0))
        while True:
            try:
                await self.sweep_retention()
            except Exception as exc:  # the sweeper must keep sweeping
                self.internal_error("retention_sweeper", exc)
            await asyncio.sleep(interval)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_sweep_interval_s)
            try:
                deadline = time.monotonic() - self.settings.session_idle_timeout_s
                for session in list(self._live.values()):
                    if (
                        session.status == "live"
                        and not session.analysing
                        and session.last_activity < deadline
                    ):
                        self._spawn(
                            self._end_quietly(session.id, "idle_timeout", where="idle_sweeper"),
                            f"idle-end-{session.id[:8]}",
                        )
            except Exception as exc:  # the sweeper must keep sweeping
                self.internal_error("idle_sweeper", exc)


def _store_unavailable() -> BackendUnavailable:
    return BackendUnavailable("the session store cannot be read", code="store_unavailable")


def _erased_facts(record: dict[str, Any] | None) -> dict[str, Any]:
    """What an erasure's audit entry keeps of the session: its shape, never its content
    (no job data)."""
    if record is None:
        return {}
    counters = record.get("counters") or {}
    return {
        "status": record.get("status"),
        "transport": record.get("transport"),
        "started_at": record.get("started_at"),
        "ended_at": record.get("ended_at"),
        "frames_analysed": counters.get("frames_analysed"),
    }
