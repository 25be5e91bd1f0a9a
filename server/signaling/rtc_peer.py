"""One aiortc peer for one live session: drain the camera track, sample it into the
session's slot, and forward the session's events to the `proctoring` data channel.

The peer owns its tasks (drain, sampler, metrics push, end request) and cancels them all
on close. It never waits on analysis: the sample loop offers frames to the session
(`SessionSink`) and learns their results from the session's `frame_analysis` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiortc import RTCPeerConnection

from server.errors import ProctorError
from server.media.sample_loop import SampleLoop
from server.media.sampler import ChangeDetector, SamplingState
from server.media.track_drain import TrackDrain
from server.observability import current_session
from server.session.live_session import LiveSession, SessionSink
from server.signaling.datachannel import (
    CHANNEL_LABEL,
    ChannelMessageError,
    ChannelSender,
    error_message,
    fit_report,
    parse_inbound,
    sctp_settled,
)
from server.signaling.views import View, candidate_payload

if TYPE_CHECKING:
    from server.signaling.rtc import RtcGateway

log = logging.getLogger(__name__)


class RtcPeer:
    def __init__(
        self, gateway: RtcGateway, pc: RTCPeerConnection, video_track: Any,
        view: View = "results",
    ) -> None:
        self.gateway = gateway
        self.view: View = view  # what the page is shown: results, or state only
        self.pc = pc
        self.id = secrets.token_hex(6)
        self.video_track = video_track
        self.session: LiveSession | None = None
        self.codec: str | None = None
        self.sender = ChannelSender(gateway.settings.rtc_channel_high_water_bytes)
        self.channel_ready = asyncio.Event()
        self.drain: TrackDrain | None = None
        self.loop: SampleLoop | None = None
        self.closing = False
        self.close_reason: str | None = None
        self.created_mono = time.monotonic()
        self.last_adjust_mono = 0.0
        self.adjustments = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = asyncio.Event()
        self._ending = False

        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)

    # --- start -------------------------------------------------------------------------

    def start(self, session: LiveSession) -> None:
        gw = self.gateway
        manager = gw.manager
        self.session = session
        self._unsubscribe = session.subscribe(self._on_session_event)
        session.transport_stats = self.stats
        self._send_event("session_started", manager.started_payload(session))
        self.drain = TrackDrain(self.video_track, on_frame=lambda: manager.frame_received(session))
        self.loop = SampleLoop(
            self.drain,
            gw.policy_factory(),
            SessionSink(session),
            self._sampling_state,
            detector=ChangeDetector.from_settings(gw.settings),
            ready=self.channel_ready,
            ready_timeout_s=gw.settings.rtc_channel_open_timeout_s,
            on_age=lambda ms: gw.frame_age.observe(ms / 1000),
            on_error=lambda where, exc: manager.internal_error(where, exc, session),
            probe_interval_s=gw.settings.sampler_probe_interval_s,
        )
        self._spawn(self._run_drain(), "drain")
        self._spawn(self.loop.run(), "sampler")
        self._spawn(self._push_metrics(), "metrics")

    def _spawn(self, coro: Any, what: str) -> None:
        assert self.session is not None
        task = asyncio.create_task(coro, name=f"rtc-{what}-{self.session.id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.gateway.manager.internal_error(f"rtc_{task.get_name()}", exc, self.session)

    def _sampling_state(self, captured_at: float) -> SamplingState:
        assert self.session is not None
        engine = self.session.engine
        due_at = engine.pending_due_at()  # capture time, the same clock as `captured_at`
        horizon = self.gateway.settings.sampler_pending_horizon_s
        return SamplingState(
            # A long dwell (a dark camera's 10 s) is not boosted all along: only its last
            # seconds, and one sample when it completes.
            pending=due_at is not None and due_at - captured_at <= horizon,
            active=any(ep.category != "technical" for ep in engine.active()),
            due=due_at is not None and captured_at >= due_at,
            idle_interval_s=self.gateway.manager.idle_interval_s(),
        )

    async def _run_drain(self) -> None:
        assert self.drain is not None and self.session is not None
        current_session.set(self.session.id)
        try:
            await self.drain.run()
        finally:
            if not self.closing:
                self.gateway.peer_lost(self, "track_ended")

    async def _push_metrics(self) -> None:
        assert self.session is not None and self.drain is not None
        settings = self.gateway.settings
        while True:
            await asyncio.sleep(settings.rtc_metrics_interval_s)
            if self.session.status != "live":
                return
            if self.drain.idle_s() > settings.rtc_media_timeout_s:
                self.gateway.peer_lost(self, "media_timeout")
                return
            self.send_live_metrics()

    def send_live_metrics(self) -> None:
        if self.session is None:
            return
        self._send_event("live_metrics", {**self.session.live_metrics(), "rtc": self.stats()})

    def _send_event(self, event: str, payload: dict[str, Any]) -> None:
        """A session event as the page may see it (CANDIDATE_VIEW)."""
        shown = candidate_payload(event, payload, self.view)
        if shown is None:
            return
        message = {"type": event, **shown}
        self.sender.send(fit_report(message) if event == "session_ended" else message)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peer_id": self.id,
            "codec": self.codec,
            "connection_state": self.pc.connectionState,
            "channel": self.sender.to_json(),
            "adjustments": self.adjustments,
        }
        if self.drain is not None:
            out.update(self.drain.to_json())
        if self.loop is not None:
            out.update(self.loop.to_json())
            if self.session is not None:
                out["sampling_interval_s"] = self.loop.policy.interval(
                    self._sampling_state(time.time())
                )
                out["budget_wait_ms"] = round(self.session.budget_wait_s * 1000, 1)
        return out

    # --- events ------------------------------------------------------------------------

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        about = {"session_id": self.session.id if self.session else ""}
        if state == "connected":
            log.info("WebRTC peer %s connected (%s)", self.id, self.codec, extra=about)
        else:
            log.debug("peer %s connection %s", self.id, state, extra=about)
        if state in ("failed", "closed") and not self.closing:
            self.gateway.peer_lost(self, f"connection_{state}")

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != CHANNEL_LABEL or self.sender.channel is not None:
            log.info("closing unexpected data channel %r", channel.label)
            channel.close()
            return
        channel.on("message", self._on_message)
        self.sender.attach(channel)
        self.channel_ready.set()
        self.send_live_metrics()

    def _on_message(self, data: object) -> None:
        try:
            message = parse_inbound(data)
            self._handle(message)
        except ChannelMessageError as exc:
            self.sender.send(error_message(exc.code, exc.message))
        except Exception as exc:  # whatever the page sent, the peer and session go on
            self.gateway.manager.internal_error("rtc_message", exc, self.session)
            self.sender.send(error_message("internal_error", "the message could not be handled"))

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ping":
            t = message.get("t")
            self.sender.send({
                "type": "pong",
                "t": t if isinstance(t, int | float | str) else None,
                "server_time": time.time(),
            })
        elif kind == "get_live_metrics":
            self.send_live_metrics()
        elif kind == "end_session":
            if self.session is not None and not self._ending:
                self._ending = True  # repeated requests while it ends are ignored
                self._spawn(self._end_session(), "end")

    async def _end_session(self) -> None:
        assert self.session is not None
        try:
            await self.gateway.manager.end_session(self.session.id, reason="client")
        except ProctorError as exc:
            self.sender.send(error_message(exc.code, exc.message))
        finally:
            self._ending = False

    async def _on_session_event(self, event: str, payload: dict[str, Any]) -> None:
        if event == "frame_analysis" and self.loop is not None:
            timings = (payload.get("result") or {}).get("timings") or {}
            started = timings.get("analysis_started_at")
            self.loop.analysed(started if isinstance(started, int | float) else None)
        self._send_event(event, payload)
        if event == "session_ended":
            self.gateway.session_over(self)

    # --- adjust / close ---------------------------------------------------------------

    def adjust_video(self, reason: str) -> None:
        s = self.gateway.settings
        drain = self.drain
        width = drain.latest.frame.width if drain is not None and drain.latest is not None else None
        fps = drain.fps() if drain is not None else 0.0
        if self.adjustments == 0 or width is None:
            max_width, max_fps = s.rtc_adjust_max_width, s.rtc_adjust_max_fps
        else:  # already asked once and still behind: a quarter less each time
            max_width = max(160, int(min(width, s.rtc_adjust_max_width) * 0.75))
            max_fps = max(5, int(min(fps or s.rtc_adjust_max_fps, s.rtc_adjust_max_fps) * 0.75))
        self.adjustments += 1
        self.last_adjust_mono = time.monotonic()
        self.sender.send(
            {"type": "adjust_video", "max_width": max_width, "max_fps": max_fps, "reason": reason}
        )
        log.info("peer %s asked for ≤ %d px, ≤ %d fps (%s)", self.id, max_width, max_fps, reason,
                 extra={"session_id": self.session.id if self.session else ""})

    async def _linger(self, linger_s: float) -> None:
        """Wait (bounded) until the last messages — the report above all, often tens of kB
        — have reached the page: the page has closed its side (it does as soon as the
        report arrives) or SCTP has every chunk acknowledged."""
        deadline = time.monotonic() + linger_s
        await self.sender.drained(linger_s)
        while (
            self.sender.open
            and self.pc.connectionState not in ("failed", "closed")
            and not sctp_settled(self.pc.sctp)
        ):
            if time.monotonic() >= deadline:
                log.warning("peer %s: closing with data-channel messages not yet delivered",
                            self.id)
                return
            await asyncio.sleep(0.02)

    async def close(self, reason: str, linger_s: float = 0.0) -> None:
        """Release everything this peer holds; idempotent."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        self.close_reason = reason
        try:
            if linger_s > 0:
                await self._linger(linger_s)
            if self._unsubscribe is not None:
                self._unsubscribe()
            if self.session is not None and self.session.transport_stats == self.stats:
                self.session.transport_stats = None  # a reconnect's peer may have replaced it
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            await self.pc.close()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            self._closed.set()
        log.info("WebRTC peer %s closed (%s)", self.id, reason,
                 extra={"session_id": self.session.id if self.session else ""})
