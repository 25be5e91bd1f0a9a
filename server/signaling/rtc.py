"""WebRTC signaling and peers: `POST /api/rtc/offer`, one aiortc peer per live session,
the `proctoring` data channel, reconnect grace, overload protection.

Flow: the page posts an offer (ICE fully gathered: aiortc has no trickle ICE) with either
`job_data` for a new session or the id of a live one. The offer is checked before any
peer exists (malformed SDP, no video, no decodable codec, no data channel → 400), a peer
answers preferring H.264, and only then is the session started, so a bad offer never
leaves a session behind. The peer drains the video track (`TrackDrain`), samples it
(`SampleLoop` + the sampling policy + the server-wide `CallBudget`) into the session
manager, and forwards the session's events to the data channel (`ChannelSender`).

When the peer fails, closes or stops sending media, its session waits
`rtc_reconnect_grace_s` for an offer naming it, then ends and writes its report. While
frames arrive late (aiortc's decode queue is unbounded, so a server that cannot keep up
shows it as growing frame lag) or the event loop lags, pages get `adjust_video` and new
sessions get 503 with Retry-After.

Data channel messages are JSON objects with a `type` (the README's WebRTC section):
server → page: session_started, frame_analysis, alerts, live_metrics, session_ended,
adjust_video, pong, error; page → server: get_live_metrics, end_session, ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import aioice.ice
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSctpTransport,
    RTCSessionDescription,
)
from aiortc.exceptions import InternalError, InvalidStateError, OperationError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from server.config import Settings
from server.errors import Overloaded, ProctorError, SessionEnded, SessionNotFound
from server.media.codecs import (
    MalformedSdp,
    answer_video_codec,
    inspect_offer,
    restrict_candidates,
    strip_abs_send_time,
    video_codec_preferences,
)
from server.media.frames import Frame
from server.media.sampler import (
    AdaptiveSampler,
    AlertState,
    ChangeDetector,
    FixedRateSampler,
    SamplerConfig,
    SamplingPolicy,
)
from server.media.track_drain import SampleLoop, TrackDrain
from server.observability import Instruments, current_session
from server.session.live_session import LiveSession
from server.session.manager import SessionManager
from server.signaling.http_api import Api, json_response, parse_body

log = logging.getLogger(__name__)

CHANNEL_LABEL = "proctoring"
MAX_INBOUND_MESSAGE = 16 * 1024
MONITOR_INTERVAL_S = 1.0
RECENT_FRAMES = 30  # the monitor judges lag over about the last 2 s of frames
#: Metric updates may be coalesced (latest wins) when the channel backs up; everything
#: else — alerts above all — is always sent.
COALESCED_TYPES = frozenset({"frame_analysis", "live_metrics"})
EARLY_MESSAGES_MAX = 512  # essential messages held before the channel opens
REPORT_MAX_BYTES = 60 * 1024  # under every browser's data-channel message limit


# --- host candidate addresses -------------------------------------------------------------
# aioice gathers host candidates from `aioice.ice.get_host_addresses`, which lists every
# interface address except 127.0.0.1 and has no option. When `rtc_host_addresses` is set
# we replace that one function (process-wide, looked up at gather time) with one that
# returns the configured addresses; unpinning restores aioice's own when no server in the
# process still pins.

_aioice_get_host_addresses = aioice.ice.get_host_addresses
_pins: list[list[str]] = []


def _pinned_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if not _pins:
        return _aioice_get_host_addresses(use_ipv4, use_ipv6)
    out = []
    for address in _pins[-1]:
        version = ipaddress.ip_address(address).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(address)
    return out


def pin_host_addresses(addresses: list[str]) -> Callable[[], None]:
    """Make aioice offer exactly `addresses` as host candidates; returns the undo."""
    pinned = [str(ipaddress.ip_address(a)) for a in addresses]
    _pins.append(pinned)
    aioice.ice.get_host_addresses = _pinned_host_addresses

    def unpin() -> None:
        with contextlib.suppress(ValueError):
            _pins.remove(pinned)
        if not _pins:
            aioice.ice.get_host_addresses = _aioice_get_host_addresses

    return unpin


def ice_servers(settings: Settings) -> list[RTCIceServer]:
    """RTC_ICE_SERVERS as aiortc objects; a malformed entry fails at startup, not on the
    first offer."""
    servers = []
    for i, entry in enumerate(settings.rtc_ice_servers):
        urls = entry.get("urls")
        if not urls or not isinstance(urls, str | list):
            raise ValueError(f"RTC_ICE_SERVERS[{i}] needs 'urls' (a string or a list of them)")
        servers.append(
            RTCIceServer(
                urls=urls, username=entry.get("username"), credential=entry.get("credential")
            )
        )
    return servers


# --- request / response models ------------------------------------------------------------


class RtcOfferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sdp: str = Field(description="The SDP offer, ICE gathering complete (no trickle ICE)")
    type: Literal["offer"] = "offer"
    session_id: str | None = Field(
        default=None, description="Reconnect to this live session instead of starting one"
    )
    job_data: dict[str, Any] = Field(
        default_factory=dict, description="For a new session, e.g. {\"jobTitle\": \"...\"}"
    )


class RtcAnswer(BaseModel):
    sdp: str
    type: Literal["answer"]
    session_id: str
    ice_servers: list[dict[str, Any]]
    codec: str | None = Field(default=None, description="The video codec the page will send")


# --- data channel -------------------------------------------------------------------------


class ChannelSender:
    """Sends JSON messages on the data channel. Before the channel is open, essential
    messages wait (bounded) and metric updates keep only their latest; once open, metric
    updates are coalesced (latest wins, one per type) whenever bufferedAmount is above the
    high-water mark, and flushed when it drains."""

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self.channel: Any = None
        self._early: deque[str] = deque()
        self._held: dict[str, str] = {}
        self.sent = 0
        self.coalesced = 0
        self.lost_early = 0

    @property
    def open(self) -> bool:
        return self.channel is not None and self.channel.readyState == "open"

    def attach(self, channel: Any) -> None:
        self.channel = channel
        channel.bufferedAmountLowThreshold = max(1, self.high_water // 4)
        channel.on("bufferedamountlow", self.flush)
        self.flush()

    def send(self, message: dict[str, Any], max_bytes: int | None = None) -> bool:
        """Queue or send one message; False when it is larger than `max_bytes` (then
        nothing is sent and the caller may send a smaller version)."""
        kind = str(message.get("type"))
        text = json.dumps(message, default=str)
        if max_bytes is not None and len(text.encode()) > max_bytes:
            return False
        if not self.open:
            if self.channel is not None:
                return True  # closed: nothing can be delivered any more
            if kind in COALESCED_TYPES:
                self.coalesced += kind in self._held
                self._held[kind] = text
            elif len(self._early) < EARLY_MESSAGES_MAX:
                self._early.append(text)
            else:
                self.lost_early += 1
                log.error("data channel never opened: %s message not delivered", kind)
            return True
        if kind in COALESCED_TYPES and (
            kind in self._held or self.channel.bufferedAmount > self.high_water
        ):
            self.coalesced += kind in self._held
            self._held[kind] = text
            return True
        self._send_text(text)
        return True

    def _send_text(self, text: str) -> None:
        try:
            self.channel.send(text)
            self.sent += 1
        except InvalidStateError:
            pass  # closed under us; the peer is going away
        except ValueError as exc:  # above the page's max-message-size
            log.error("data channel message not sent: %s", exc)

    def flush(self) -> None:
        if not self.open:
            return
        while self._early:
            self._send_text(self._early.popleft())
        for kind in list(self._held):
            if self.channel.bufferedAmount > self.high_water:
                break
            self._send_text(self._held.pop(kind))

    async def drained(self, timeout_s: float) -> None:
        """Wait (bounded) until everything queued has left the channel's buffer."""
        deadline = time.monotonic() + timeout_s
        while self.open and (self.channel.bufferedAmount > 0 or self._held or self._early):
            if time.monotonic() > deadline:
                return
            self.flush()
            await asyncio.sleep(0.02)

    def to_json(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "sent": self.sent,
            "coalesced": self.coalesced,
            "buffered_bytes": self.channel.bufferedAmount if self.channel is not None else 0,
        }


def sctp_settled(sctp: RTCSctpTransport | None) -> bool:
    """True when the SCTP association has nothing left to send or to get acknowledged (or
    is gone). aiortc has no public API for this: a data channel's `bufferedAmount` drops
    as soon as a message is cut into chunks on the transport's outbound queue, long before
    they are sent and SACKed, and `pc.close()` aborts the association, dropping whatever
    is still queued. So this reads aiortc 1.x's private queues (rtcsctptransport.py):
    messages not yet chunked, chunks not yet sent, chunks sent but not acknowledged.
    tests/test_webrtc_lifecycle.py checks the fields still exist."""
    if sctp is None or sctp.state == "closed":
        return True
    return not (sctp._data_channel_queue or sctp._outbound_queue or sctp._sent_queue)


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


# --- one peer -----------------------------------------------------------------------------


class RtcPeer:
    def __init__(self, gateway: RtcGateway, pc: RTCPeerConnection, video_track: Any) -> None:
        self.gateway = gateway
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
        self.session = session
        self._unsubscribe = session.subscribe(self._on_session_event)
        self.sender.send({"type": "session_started", **gw.manager.started_payload(session)})
        self.drain = TrackDrain(
            self.video_track, on_frame=lambda: gw.manager.frame_received(session)
        )
        self.loop = SampleLoop(
            self.drain,
            gw.policy_factory(),
            self._submit,
            self._alert_state,
            gw.budget,
            detector=ChangeDetector.from_settings(gw.settings),
            ready=self.channel_ready,
            ready_timeout_s=gw.settings.rtc_channel_open_timeout_s,
            on_age=lambda ms: gw.frame_age.observe(ms / 1000),
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
        if not task.cancelled() and task.exception() is not None:
            log.error("peer task %s failed", task.get_name(), exc_info=task.exception())

    async def _submit(self, frame: Frame, scene_changed: bool) -> dict[str, Any]:
        assert self.session is not None
        # The sample loop already waited for the budget before picking this frame.
        return await self.gateway.manager.submit(
            self.session, frame, scene_changed=scene_changed, count_received=False, budgeted=True
        )

    def _alert_state(self) -> AlertState:
        assert self.session is not None
        engine = self.session.engine
        return AlertState(pending=bool(engine.pending()), active=bool(engine.active()))

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
        payload = {"type": "live_metrics", **self.session.live_metrics(), "rtc": self.stats()}
        self.sender.send(payload)

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
                out["sampling_interval_s"] = self.loop.policy.interval(self._alert_state())
        return out

    # --- events ------------------------------------------------------------------------

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.debug("peer %s connection %s", self.id, state)
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

    def _on_message(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.sender.send(error_message("binary_not_supported", "send JSON text messages"))
            return
        if len(data) > MAX_INBOUND_MESSAGE:
            limit = f"messages are limited to {MAX_INBOUND_MESSAGE} characters"
            self.sender.send(error_message("message_too_large", limit))
            return
        try:
            message = json.loads(data)
        except json.JSONDecodeError as exc:
            self.sender.send(error_message("invalid_json", f"message is not valid JSON: {exc.msg}"))
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.sender.send(error_message(
                "invalid_message", "a message must be a JSON object with a string 'type'"
            ))
            return
        kind = message["type"]
        if kind == "ping":
            self.sender.send({"type": "pong", "t": message.get("t"), "server_time": time.time()})
        elif kind == "get_live_metrics":
            self.send_live_metrics()
        elif kind == "end_session":
            if self.session is not None and not self._ending:
                self._ending = True  # repeated requests while it ends are ignored
                self._spawn(self._end_session(), "end")
        else:
            self.sender.send(
                error_message(
                    "unknown_type",
                    f"unknown message type {kind[:40]!r}; "
                    "expected get_live_metrics, end_session or ping",
                )
            )

    async def _end_session(self) -> None:
        assert self.session is not None
        try:
            await self.gateway.manager.end_session(self.session.id, reason="client")
        except ProctorError as exc:
            self.sender.send(error_message(exc.code, exc.message))
        finally:
            self._ending = False

    async def _on_session_event(self, event: str, payload: dict[str, Any]) -> None:
        if event != "session_ended":
            self.sender.send({"type": event, **payload})
            return
        message = {"type": event, **payload}
        if not self.sender.send(message, max_bytes=REPORT_MAX_BYTES):
            # Browsers take data-channel messages up to 256 KiB (64 KiB when they do not
            # say): a very long session's report goes without its per-alert detail and
            # timeline, which stay available from GET /api/sessions/{id}/report.
            report = dict(payload.get("report") or {})
            alerts = report.pop("alerts", None) or []
            report.pop("emotion_timeline", None)
            report["alerts_count"] = len(alerts)
            report["truncated"] = True
            self.sender.send({**message, "report": report})
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
        log.info("peer %s asked for ≤ %d px, ≤ %d fps (%s)", self.id, max_width, max_fps, reason)

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
        log.info("peer %s closed (%s)", self.id, reason)


# --- the gateway: routes, peers, grace, overload ------------------------------------------


class RtcGateway:
    def __init__(
        self,
        manager: SessionManager,
        settings: Settings,
        instruments: Instruments,
        policy_factory: Callable[[], SamplingPolicy] | None = None,
    ) -> None:
        self.manager = manager
        self.settings = settings
        # One budget for every transport: the manager's (the quota is per account).
        self.budget = manager.budget
        self._ice_servers = ice_servers(settings)
        self.policy_factory = policy_factory or self._default_policy
        self._peers: dict[str, RtcPeer] = {}  # by session id: one peer per session
        self._negotiating = 0
        self._grace: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        self._unpin = (
            pin_host_addresses(settings.rtc_host_addresses) if settings.rtc_host_addresses else None
        )
        self.overloaded_until = 0.0
        self._behind_ticks = 0
        self.loop_lag_ms = 0.0
        self.median_frame_lag_ms: float | None = None
        r = instruments.registry
        self.peers_gauge = Gauge("proctor_rtc_peers", "Live WebRTC peers", registry=r)
        self.offers = Counter(
            "proctor_rtc_offers", "WebRTC offers by outcome", ["outcome"], registry=r
        )
        self.overloaded_gauge = Gauge(
            "proctor_rtc_overloaded", "1 while new WebRTC sessions are refused", registry=r
        )
        self.frame_age = Histogram(
            "proctor_rtc_frame_age_seconds",
            "Age of a sampled frame when its analysis starts",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )

    def _default_policy(self) -> SamplingPolicy:
        s = self.settings
        if s.sampler_policy == "fixed":
            return FixedRateSampler(s.sampler_fixed_interval_s)
        return AdaptiveSampler(SamplerConfig.from_settings(s))

    # --- routes ---------------------------------------------------------------------------

    def register(self, api: Api) -> None:
        @api.route(
            "POST", "/api/rtc/offer",
            summary="WebRTC offer → answer; results on the 'proctoring' data channel",
            tag="webrtc", request=RtcOfferRequest, response=RtcAnswer,
            errors=(400, 404, 409, 429, 503),
        )
        async def rtc_offer(request: web.Request) -> web.Response:
            from server.signaling.auth import authorize_request

            body = await parse_body(
                request, RtcOfferRequest, self.settings.offer_body_max_bytes
            )
            # A new session is the operator's to start; joining one takes its candidate
            # token (or the operator's).
            if body.session_id is None:
                authorize_request(request, "start")
            else:
                authorize_request(request, "frame", body.session_id)
            try:
                answer = await self.answer(body)
            except ProctorError as exc:
                self.offers.labels(outcome=exc.code).inc()
                headers = None
                if exc.status == 503:
                    headers = {"Retry-After": str(self.settings.rtc_overload_retry_after_s)}
                elif exc.status == 429:
                    headers = {"Retry-After": "5"}
                return json_response(exc.to_json(), status=exc.status, headers=headers)
            self.offers.labels(outcome="answered").inc()
            return json_response(answer)

    # --- offers ---------------------------------------------------------------------------

    @property
    def overloaded(self) -> bool:
        return time.monotonic() < self.overloaded_until

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def peers(self) -> list[RtcPeer]:
        return list(self._peers.values())

    async def answer(self, body: RtcOfferRequest) -> dict[str, Any]:
        if self._closed:
            raise ProctorError("the server is shutting down", code="shutting_down", status=503)
        reconnect = body.session_id is not None
        if not reconnect and self.overloaded:
            raise ProctorError(
                "the server cannot keep up with its current video streams; retry later",
                code="server_busy", status=503,
            )
        if not reconnect and len(self._peers) + self._negotiating >= self.settings.rtc_max_peers:
            raise Overloaded(
                f"the server is at its limit of {self.settings.rtc_max_peers} WebRTC peers",
                code="too_many_peers",
            )
        info = inspect_offer(body.sdp)
        if reconnect:
            await self.manager.get_live(body.session_id)  # 404 / 409 before any peer exists
        self._negotiating += 1
        # Never None: aiortc would then use a public Google STUN server.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self._ice_servers)))
        peer: RtcPeer | None = None
        try:
            video = None
            for i, kind in enumerate(info.kinds):
                if kind not in ("audio", "video"):
                    continue
                if i == info.video_index:
                    video = pc.addTransceiver("video", direction="recvonly")
                    video.setCodecPreferences(video_codec_preferences(self.settings.rtc_prefer_codecs))
                else:  # never decode what we do not analyse (audio, extra cameras)
                    pc.addTransceiver(kind, direction="inactive")
            assert video is not None
            sdp = restrict_candidates(body.sdp, self.settings.rtc_remote_candidate_addresses)
            sdp = strip_abs_send_time(sdp)  # no REMB, which starves the browser's send rate
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except (ValueError, OperationError, InternalError, InvalidStateError) as exc:
                raise MalformedSdp(f"the offer was refused: {exc}") from None
            await pc.setLocalDescription(await pc.createAnswer())
            local = pc.localDescription
            peer = RtcPeer(self, pc, video.receiver.track)
            peer.codec = answer_video_codec(local.sdp)
            async with self._lock:
                if self._closed:
                    raise ProctorError("the server is shutting down", code="shutting_down",
                                       status=503)
                if reconnect:
                    session = await self.manager.get_live(body.session_id)
                    self._cancel_grace(session.id)
                    old = self._peers.pop(session.id, None)
                    if old is not None:
                        self._background_task(old.close("replaced"))
                else:
                    session = await self.manager.start_session(body.job_data, transport="webrtc")
                self._peers[session.id] = peer
                try:
                    peer.start(session)
                except BaseException:
                    del self._peers[session.id]
                    if not reconnect:  # a session nobody can reach: end it now
                        self._background_task(self._end_quietly(session.id, "offer_failed"))
                    raise
            self.peers_gauge.set(len(self._peers))
            self._ensure_monitor()
            log.info(
                "peer %s for session %s (%s, %s)", peer.id, session.id,
                "reconnect" if reconnect else "new", peer.codec,
            )
            return {
                "sdp": local.sdp,
                "type": "answer",
                "session_id": session.id,
                "ice_servers": self.settings.rtc_ice_servers,
                "codec": peer.codec,
            }
        except BaseException:
            if peer is not None and peer.session is not None:
                await peer.close("offer_failed")
            else:
                await pc.close()
            raise
        finally:
            self._negotiating -= 1

    # --- peer lifecycle -------------------------------------------------------------------

    def _background_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def peer_lost(self, peer: RtcPeer, reason: str) -> None:
        """The peer failed, closed or stopped sending: close it; its session waits for a
        reconnect during the grace period."""
        if peer.closing:
            return
        self._background_task(peer.close(reason))
        session = peer.session
        if session is None or self._peers.get(session.id) is not peer:
            return
        del self._peers[session.id]
        self.peers_gauge.set(len(self._peers))
        if self._closed or session.status != "live":
            return
        log.info("session %s lost its peer (%s): %.0f s to reconnect", session.id, reason,
                 self.settings.rtc_reconnect_grace_s)
        sid = session.id
        task = asyncio.create_task(self._end_after_grace(sid), name=f"rtc-grace-{sid[:8]}")
        self._grace[sid] = task

        async def ended_elsewhere(event: str, payload: dict[str, Any]) -> None:
            if event == "session_ended":  # by REST, Socket.IO or the idle timeout
                self._cancel_grace(sid)

        unsubscribe = session.subscribe(ended_elsewhere)
        task.add_done_callback(lambda _: unsubscribe())

    def session_over(self, peer: RtcPeer) -> None:
        """The session ended (any transport): let its last messages out, then close."""
        session = peer.session
        if session is not None and self._peers.get(session.id) is peer:
            del self._peers[session.id]
            self.peers_gauge.set(len(self._peers))
        if session is not None:
            self._cancel_grace(session.id)
        if not peer.closing:
            self._background_task(peer.close("session_ended", linger_s=2.0))

    def _cancel_grace(self, session_id: str) -> None:
        task = self._grace.pop(session_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _end_after_grace(self, session_id: str) -> None:
        await asyncio.sleep(self.settings.rtc_reconnect_grace_s)
        self._grace.pop(session_id, None)
        await self._end_quietly(session_id, "peer_lost")

    async def _end_quietly(self, session_id: str, reason: str) -> None:
        try:
            await self.manager.end_session(session_id, reason=reason)
        except (SessionEnded, SessionNotFound):
            pass
        except Exception:
            log.exception("ending session %s (%s) failed", session_id, reason)

    def grace_pending(self, session_id: str) -> bool:
        return session_id in self._grace

    # --- overload -------------------------------------------------------------------------

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch_load(), name="rtc-load-monitor")

    async def _watch_load(self) -> None:
        s = self.settings
        while self._peers:
            before = time.monotonic()
            await asyncio.sleep(MONITOR_INTERVAL_S)
            now = time.monotonic()
            self.loop_lag_ms = max(0.0, (now - before - MONITOR_INTERVAL_S) * 1000)
            lags: list[float] = []
            for peer in list(self._peers.values()):
                drain = peer.drain
                if drain is None or drain.decoded < 15:
                    continue
                lag = drain.lag_ms(0.5, last=RECENT_FRAMES)
                if lag is None:
                    continue
                lags.append(lag)
                cooled = now - peer.last_adjust_mono > s.rtc_overload_cooldown_s
                if lag > s.rtc_overload_frame_lag_ms and cooled:
                    peer.adjust_video("frames_late")
            self.median_frame_lag_ms = statistics.median(lags) if lags else None
            behind = self.loop_lag_ms > s.rtc_overload_loop_lag_ms or (
                self.median_frame_lag_ms is not None
                and self.median_frame_lag_ms > s.rtc_overload_frame_lag_ms
            )
            # One slow tick (a GC pause, a first import) is not overload; two in a row are.
            self._behind_ticks = self._behind_ticks + 1 if behind else 0
            if self._behind_ticks >= 2:
                if not self.overloaded:
                    log.warning(
                        "WebRTC overload (loop lag %.0f ms, median frame lag %s ms): "
                        "refusing new sessions, asking pages for less video",
                        self.loop_lag_ms, self.median_frame_lag_ms,
                    )
                    for peer in list(self._peers.values()):
                        if now - peer.last_adjust_mono > s.rtc_overload_cooldown_s:
                            peer.adjust_video("server_overloaded")
                self.overloaded_until = now + s.rtc_overload_cooldown_s
            self.overloaded_gauge.set(1 if self.overloaded else 0)
        self.overloaded_gauge.set(1 if self.overloaded else 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "peers": len(self._peers),
            "overloaded": self.overloaded,
            "loop_lag_ms": round(self.loop_lag_ms, 1),
            "median_frame_lag_ms": self.median_frame_lag_ms,
            "grace_pending": len(self._grace),
            "budget": self.budget.to_json(),
        }

    # --- shutdown -------------------------------------------------------------------------

    async def close(self, app: web.Application | None = None) -> None:
        """Close every peer and release every task (aiohttp on_shutdown signature)."""
        self._closed = True
        for task in list(self._grace.values()):
            task.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
        peers = list(self._peers.values())
        self._peers.clear()
        await asyncio.gather(*(p.close("server_shutdown") for p in peers), return_exceptions=True)
        pending = [*self._grace.values(), *self._background]
        if self._monitor is not None:
            pending.append(self._monitor)
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._grace.clear()
        self.peers_gauge.set(0)
        if self._unpin is not None:
            self._unpin()
            self._unpin = None

