"""WebRTC signaling: `POST /api/rtc/offer` and the registry of live peers (one per
session).

Flow: the page posts an offer (ICE fully gathered: aiortc has no trickle ICE) with either
`job_data` for a new session or the id of a live one. The offer is checked before any
peer exists (malformed SDP, no video, no decodable codec, no data channel → 400,
`server.signaling.sdp`), a peer answers preferring H.264, and only then is the session
started, so a bad offer never leaves a session behind. The peer (`rtc_peer.RtcPeer`)
drains, samples and forwards; the data channel protocol is `datachannel`, ICE settings
`ice`, overload protection `load_monitor`.

When a peer fails, closes or stops sending media, the gateway closes it and tells the
session manager (`detach`): the session waits its transport's reconnect grace
(`RTC_RECONNECT_GRACE_S`) for an offer naming it, then ends and writes its report.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InternalError, InvalidStateError, OperationError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from server.config import Settings
from server.errors import Overloaded, ProctorError, SessionEnded, SessionNotFound
from server.media.sampler import (
    AdaptiveSampler,
    FixedRateSampler,
    SamplerConfig,
    SamplingPolicy,
)
from server.observability import Instruments
from server.session.manager import SessionManager
from server.signaling.auth import ACCESS, authorize_request, presented_token, short_id
from server.signaling.http_api import Api, json_response, parse_json, read_body, validate
from server.signaling.ice import (
    CandidatePolicy,
    ice_servers,
    pin_host_addresses,
    server_host_addresses,
)
from server.signaling.load_monitor import LoadMonitor
from server.signaling.rtc_peer import RtcPeer
from server.signaling.sdp import (
    MalformedSdp,
    answer_video_codec,
    filter_candidates,
    inspect_offer,
    strip_abs_send_time,
    video_codec_preferences,
)
from server.signaling.turn import client_ice_servers
from server.signaling.views import View

if TYPE_CHECKING:
    from server.cluster.routing import ClusterNode

log = logging.getLogger(__name__)


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


class IceServers(BaseModel):
    ice_servers: list[dict[str, Any]]
    ttl_s: int | None = Field(default=None, description="Lifetime of the TURN credentials")


class RtcAnswer(BaseModel):
    sdp: str
    type: Literal["answer"]
    session_id: str
    ice_servers: list[dict[str, Any]]
    codec: str | None = Field(default=None, description="The video codec the page will send")



class RtcGateway:
    def __init__(
        self,
        manager: SessionManager,
        settings: Settings,
        instruments: Instruments,
        policy_factory: Callable[[], SamplingPolicy] | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        """`cluster`: an offer naming a session another node runs goes to that node (its
        answer's ICE candidates are the owner's, so the media goes there directly)."""
        self.manager = manager
        self.cluster = cluster
        self.settings = settings
        self._ice_servers = ice_servers(settings)
        self.policy_factory = policy_factory or self._default_policy
        self._peers: dict[str, RtcPeer] = {}  # by session id: one peer per session
        self._negotiating = 0
        #: The newest negotiation per session id: an older one still running is superseded.
        self._latest_offer: dict[str, int] = {}
        self._offer_seq = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._closed = False
        self._unpin = (
            pin_host_addresses(settings.rtc_host_addresses) if settings.rtc_host_addresses else None
        )
        self.candidates = CandidatePolicy.for_server(
            server_host_addresses(settings), settings.rtc_remote_candidate_addresses
        )
        r = instruments.registry
        self.monitor = LoadMonitor(
            settings, lambda: self._peers.values(), r, on_overload=manager.pacing.overloaded_for
        )
        self.peers_gauge = Gauge("proctor_rtc_peers", "Live WebRTC peers", registry=r)
        self.offers = Counter(
            "proctor_rtc_offers", "WebRTC offers by outcome", ["outcome"], registry=r
        )
        self.candidates_dropped = Counter(
            "proctor_rtc_remote_candidates_dropped",
            "Remote ICE candidates the server will not send checks to (policy)",
            registry=r,
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
        async def rtc_ice_servers(request: web.Request) -> web.Response:
            # Credentials are handed to token holders only (the operator's or a
            # candidate's in secured mode; anyone in development mode).
            who = request.app[ACCESS].identify(presented_token(request))
            name = short_id(who.session_id) if who.session_id else secrets.token_hex(4)
            return json_response({
                "ice_servers": client_ice_servers(self.settings, name),
                "ttl_s": self.settings.turn_ttl_s if self.settings.turn_secret else None,
            })

        api.route(
            "GET", "/api/rtc/ice-servers",
            summary="STUN/TURN servers for the page, with ephemeral TURN credentials",
            tag="webrtc", response=IceServers, errors=(401, 403),
        )(rtc_ice_servers)

        @api.route(
            "POST", "/api/rtc/offer",
            summary="WebRTC offer → answer; results on the 'proctoring' data channel",
            tag="webrtc", request=RtcOfferRequest, response=RtcAnswer,
            errors=(400, 404, 409, 429, 503),
        )
        async def rtc_offer(request: web.Request) -> web.Response:
            raw = await read_body(request, self.settings.offer_body_max_bytes)
            body = validate(RtcOfferRequest, await parse_json(raw) if raw.strip() else {})
            # A new session is the operator's to start; joining one takes its candidate
            # token (or the operator's).
            if body.session_id is None:
                who = authorize_request(request, "start")
            else:
                who = authorize_request(request, "frame", body.session_id)
                if self.cluster is not None and not self.manager.has_live(body.session_id):
                    peer = await self.cluster.owner_of(body.session_id, request)
                    if peer is not None:
                        return await self.cluster.proxy(request, peer, raw, "offer")
            try:
                answer = await self.answer(body, who.view(self.settings), request.remote)
            except ProctorError as exc:
                self.offers.labels(outcome=exc.code).inc()
                headers = None
                if exc.status == 503:
                    headers = {"Retry-After": str(self.settings.rtc_overload_retry_after_s)}
                elif exc.status == 429:
                    headers = {"Retry-After": str(exc.retry_after_s or 5)}
                return json_response(exc.to_json(), status=exc.status, headers=headers)
            self.offers.labels(outcome="answered").inc()
            return json_response(answer)

    # --- offers ---------------------------------------------------------------------------

    @property
    def overloaded(self) -> bool:
        return self.monitor.overloaded

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def peers(self) -> list[RtcPeer]:
        return list(self._peers.values())

    async def answer(
        self, body: RtcOfferRequest, view: View = "results", client_address: str | None = None
    ) -> dict[str, Any]:
        """Negotiate `body`; `view` is what the page is shown (CANDIDATE_VIEW);
        `client_address` starts a new session under SESSION_STARTS_PER_MINUTE."""
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
        if not reconnect:  # before any negotiation work (counted when the session starts)
            await self.manager.spend.check_start(client_address)
        info = inspect_offer(body.sdp)
        self._offer_seq += 1
        seq = self._offer_seq
        if reconnect:
            await self.manager.get_live(body.session_id)  # 404 / 409 before any peer exists
            assert body.session_id is not None
            self._latest_offer[body.session_id] = seq
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
            sdp, dropped = filter_candidates(body.sdp, self.candidates.allows)
            if dropped:
                self.candidates_dropped.inc(dropped)
            sdp = strip_abs_send_time(sdp)  # no REMB, which starves the browser's send rate
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                await pc.setLocalDescription(await pc.createAnswer())
            except (ValueError, OperationError, InternalError, InvalidStateError) as exc:
                raise MalformedSdp(f"the offer was refused: {exc}") from None
            except (AttributeError, KeyError, IndexError, TypeError) as exc:
                # aiortc trips over some crafted offers that its parser let through.
                name = type(exc).__name__
                raise MalformedSdp(f"the offer cannot be negotiated: {name}") from None
            local = pc.localDescription
            peer = RtcPeer(self, pc, video.receiver.track, view)
            peer.codec = answer_video_codec(local.sdp)
            async with self._lock:
                if self._closed:
                    raise ProctorError("the server is shutting down", code="shutting_down",
                                       status=503)
                if reconnect:
                    session = await self.manager.get_live(body.session_id)
                    if self._latest_offer.get(session.id) != seq:
                        raise ProctorError(
                            "a newer offer for this session replaced this one",
                            code="offer_superseded", status=409,
                        )
                    old = self._peers.pop(session.id, None)
                    if old is not None:
                        self._background_task(old.close("replaced"))
                    # The operator's session, joined from its link: a WebRTC session now.
                    await self.manager.adopt_transport(session, "webrtc")
                else:
                    session = await self.manager.start_session(
                        body.job_data, transport="webrtc", client_address=client_address
                    )
                self._peers[session.id] = peer
                try:
                    peer.start(session)
                except BaseException:
                    del self._peers[session.id]
                    if not reconnect:  # a session nobody can reach: end it now
                        self._background_task(self._end_quietly(session.id, "offer_failed"))
                    raise
                self.manager.attach(session)
            self.peers_gauge.set(len(self._peers))
            self.monitor.ensure_running()
            log.info(
                "WebRTC offer answered: peer %s (%s, %s)", peer.id,
                "reconnect" if reconnect else "new", peer.codec, extra={"session_id": session.id},
            )
            return {
                "sdp": local.sdp,
                "type": "answer",
                "session_id": session.id,
                "ice_servers": client_ice_servers(self.settings, session.id[:12]),
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
            if body.session_id is not None and self._latest_offer.get(body.session_id) == seq:
                del self._latest_offer[body.session_id]

    # --- peer lifecycle -------------------------------------------------------------------

    def _background_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def peer_lost(self, peer: RtcPeer, reason: str) -> None:
        """The peer failed, closed or stopped sending: close it; its session waits for a
        reconnect during its grace period (the session manager's)."""
        if peer.closing:
            return
        self._background_task(peer.close(reason))
        session = peer.session
        if session is None or self._peers.get(session.id) is not peer:
            return
        del self._peers[session.id]
        self.peers_gauge.set(len(self._peers))
        if not self._closed:
            self.manager.detach(session, reason)

    def session_over(self, peer: RtcPeer) -> None:
        """The session ended (any transport): let its last messages out, then close."""
        session = peer.session
        if session is not None and self._peers.get(session.id) is peer:
            del self._peers[session.id]
            self.peers_gauge.set(len(self._peers))
        if not peer.closing:
            self._background_task(peer.close("session_ended", linger_s=2.0))

    async def _end_quietly(self, session_id: str, reason: str) -> None:
        try:
            await self.manager.end_session(session_id, reason=reason)
        except (SessionEnded, SessionNotFound):
            pass
        except Exception as exc:
            self.manager.internal_error("rtc_end", exc)

    def grace_pending(self, session_id: str) -> bool:
        return self.manager.grace_pending(session_id)

    def to_json(self) -> dict[str, Any]:
        m = self.monitor
        return {
            "peers": len(self._peers),
            "overloaded": m.overloaded,
            "loop_lag_ms": round(m.loop_lag_ms, 1),
            "median_frame_lag_ms": m.median_frame_lag_ms,
            "budget": self.manager.budget.to_json(),
        }

    # --- shutdown -------------------------------------------------------------------------

    async def close(self, app: web.Application | None = None) -> None:
        """Close every peer and release every task (aiohttp on_shutdown signature)."""
        self._closed = True
        await self.monitor.close()
        peers = list(self._peers.values())
        self._peers.clear()
        await asyncio.gather(*(p.close("server_shutdown") for p in peers), return_exceptions=True)
        for task in list(self._background):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.peers_gauge.set(0)
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
