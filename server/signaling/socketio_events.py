"""The legacy Socket.IO contract (fixed event names), on the shared session model.

Each session has two rooms: operators' (named by the session id) and candidates'
(`candidate:<id>`); a socket joins one by starting the session or by naming its id, as its
role allows, and the candidates' room gets what `CANDIDATE_VIEW` lets it see. A socket's
role comes from the token it sent at connect (`auth: {token}`) or, for old clients, a
`token` in the payload. Errors go to the offending client only, as an `error` event;
neither the connection nor the session ends. Every event passes a per-connection rate
limit, and every payload was parsed by `safe_json` (see `socketio_json`).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import socketio

from server import safe_json
from server.config import Settings
from server.errors import BadRequest, ProctorError, from_frame_error
from server.media.frames import FrameError
from server.session.live_session import LiveSession
from server.session.manager import SessionManager
from server.signaling.auth import Access, Action, Principal, fingerprint, join_url, socket_token
from server.signaling.frame_intake import frame_from_client
from server.signaling.socketio_json import REJECTED_EVENT
from server.signaling.views import candidate_payload

log = logging.getLogger(__name__)


def _payload(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if isinstance(data, str):  # some clients send JSON.stringify()'d payloads
        try:
            data = safe_json.loads(data)
        except safe_json.JsonRejected as exc:
            raise BadRequest(
                f"payload is not acceptable JSON: {exc}", code="invalid_json"
            ) from None
    if not isinstance(data, dict):
        raise BadRequest("payload must be an object", code="invalid_json")
    return data


def candidate_room(session_id: str) -> str:
    return f"candidate:{session_id}"


class GuardedServer(socketio.AsyncServer):
    """python-socketio's server, with event packets shaped before dispatch: its own code
    indexes `data[0]` (a crash on `42{}` or `42[]`) and dispatches a client-sent `connect`
    or `disconnect` event to the connection handlers. Those become `REJECTED_EVENT`."""

    async def _handle_event(self, eio_sid: str, namespace: str, id: Any, data: Any) -> None:
        if not isinstance(data, list) or not data or not isinstance(data[0], str):
            data = [REJECTED_EVENT, "an event must be a JSON array that starts with its name"]
        elif data[0] in ("connect", "disconnect", REJECTED_EVENT):
            data = [REJECTED_EVENT, f"{data[0]!r} is not an event a client may send"]
        await super()._handle_event(eio_sid, namespace, id, data)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ProctorNamespace(socketio.AsyncNamespace):
    def __init__(
        self,
        manager: SessionManager,
        settings: Settings,
        access: Access,
        namespace: str = "/",
    ) -> None:
        super().__init__(namespace)
        self.manager = manager
        self.settings = settings
        self.access = access
        self._forwarding: weakref.WeakSet[LiveSession] = weakref.WeakSet()
        self._tokens: dict[str, str | None] = {}
        self._bases: dict[str, str] = {}
        self._addresses: dict[str, str | None] = {}  # the client address (spend caps)
        self._events: dict[str, TokenBucket] = {}
        self._errors: dict[str, TokenBucket] = {}

    # --- plumbing ---------------------------------------------------------------------

    async def trigger_event(self, event: str, *args: Any) -> Any:
        if event in ("connect", "disconnect"):
            return await super().trigger_event(event, *args)
        sid = args[0] if args else ""
        bucket = self._events.get(sid)
        if bucket is not None and not bucket.take():
            return await self._limited_error(sid, event)
        data = args[1] if len(args) > 1 else None
        try:
            if event == REJECTED_EVENT:
                raise BadRequest(f"message refused: {data}", code="invalid_json")
            if not isinstance(event, str) or not hasattr(self, f"on_{event}"):
                raise BadRequest(f"unknown event {str(event)[:40]!r}", code="unknown_event")
            return await getattr(self, f"on_{event}")(sid, data)
        except ProctorError as exc:
            return await self._error(sid, str(event)[:40], exc)
        except Exception:  # a bug must not reach python-socketio (or stop the session)
            log.exception("socket.io %s failed", str(event)[:40])
            return await self._error(
                sid,
                str(event)[:40],
                ProctorError("internal error", code="internal_error", status=500),
            )

    async def _limited_error(self, sid: str, event: str) -> dict[str, Any]:
        exc = ProctorError(
            f"more than {self.settings.socketio_events_per_s:g} events a second",
            code="rate_limited",
            status=429,
        )
        errors = self._errors.get(sid)
        if errors is not None and errors.take():
            return await self._error(sid, str(event)[:40], exc)
        return {"status": "error", "error": {"code": exc.code, "message": exc.message}}

    async def _error(
        self, sid: str, event: str, exc: ProctorError, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        session_id = (data or {}).get("session_id") if isinstance(data, dict) else None
        if not (isinstance(session_id, str) and len(session_id) <= 64):
            session_id = None  # echo only what could be an id
        body = {
            "code": exc.code,
            "message": exc.message,
            "status": exc.status,
            "event": event,
            **({"retry_after_s": exc.retry_after_s} if exc.retry_after_s else {}),
            "session_id": session_id
            if isinstance(session_id, str) and len(session_id) <= 64
            else None,
        }
        await self.emit("error", body, to=sid)
        return {"status": "error", "error": body}

    def _authorize(
        self, sid: str, payload: dict[str, Any], action: Action, session_id: object = None
    ) -> Principal:
        token = payload.get("token")
        if not isinstance(token, str) or not token:
            token = self._tokens.get(sid)
        return self.access.authorize(token, action, session_id)

    async def _join(self, sid: str, session: LiveSession, who: Principal) -> None:
        # One forwarder per session, whichever transport started it, sends to its rooms.
        if session not in self._forwarding:
            self._forwarding.add(session)
            session.subscribe(self._room_listener(session.id))
        if session.id not in self.rooms(sid):
            log.info("socket %s connected to the session", sid, extra={"session_id": session.id})
        await self.enter_room(sid, session.id if who.is_operator else candidate_room(session.id))

    def _room_listener(self, session_id: str) -> Any:
        view = self.settings.resolved_candidate_view
        room = candidate_room(session_id)

        async def forward(event: str, payload: dict[str, Any]) -> None:
            await self.emit(event, payload, room=session_id)
            seen = candidate_payload(event, payload, view)
            if seen is not None:
                await self.emit(event, seen, room=room)

        return forward

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = socket_token(auth)
        self._tokens[sid] = token
        self._bases[sid] = self.settings.public_url or (
            f"{environ.get('wsgi.url_scheme', 'http')}://{environ.get('HTTP_HOST', 'localhost')}"
        )
        # The aiohttp request, after web_guard's proxy rule (its REMOTE_ADDR is a constant).
        request = environ.get("aiohttp.request")
        self._addresses[sid] = getattr(request, "remote", None)
        s = self.settings
        self._events[sid] = TokenBucket(s.socketio_events_per_s, s.socketio_event_burst)
        self._errors[sid] = TokenBucket(s.socketio_errors_per_s, s.socketio_errors_per_s)
        log.debug("socket %s connected (token %s)", sid, fingerprint(token))

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        for table in (self._tokens, self._bases, self._events, self._errors, self._addresses):
            table.pop(sid, None)
        log.debug("socket %s disconnected", sid)
        for room in self.rooms(sid):
            if room != sid:  # the socket's own room; the others are sessions
                log.info("socket %s disconnected (%s)", sid, reason, extra={"session_id": room})

    # --- the brief's events -----------------------------------------------------------

    async def on_start_session(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        who = self._authorize(sid, payload, "start")
        job_data = payload.get("job_data", {})
        if job_data is None:
            job_data = {}
        if not isinstance(job_data, dict):
            raise BadRequest("job_data must be an object", code="invalid_field")
        session = await self.manager.start_session(
            job_data, transport="socketio", client_address=self._addresses.get(sid)
        )
        token = self.access.issue_candidate_token(session.id)
        await self._join(sid, session, who)
        started = {
            **self.manager.started_payload(session),
            "candidate_token": token,
            "join_url": join_url(self._bases.get(sid, ""), session.id, token),
        }
        await self.emit("session_started", started, to=sid)
        return {"status": "ok", **started}

    async def on_analyze_frame(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        try:
            who = self._authorize(sid, payload, "frame", payload.get("session_id"))
            session = await self.manager.get_live(payload.get("session_id"))
            await self._join(sid, session, who)
            if "frame" not in payload:
                raise BadRequest("frame is missing", code="missing_field")
            frame = await frame_from_client(
                payload["frame"], payload.get("timestamp"), self.settings
            )
            result = await self.manager.submit(session, frame)
        except FrameError as exc:
            return await self._error(sid, "analyze_frame", from_frame_error(exc), payload)
        except ProctorError as exc:
            return await self._error(sid, "analyze_frame", exc, payload)
        if result.get("status") == "dropped":
            return dict(result)
        return {"status": "analysed", "frame_index": result["frame_index"]}

    async def on_get_live_metrics(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        try:
            who = self._authorize(sid, payload, "live_metrics", payload.get("session_id"))
            session = await self.manager.get_live(payload.get("session_id"))
        except ProctorError as exc:
            return await self._error(sid, "get_live_metrics", exc, payload)
        await self._join(sid, session, who)
        metrics = candidate_payload("live_metrics", session.live_metrics(), who.view(self.settings))
        await self.emit("live_metrics", metrics, to=sid)
        return {"status": "ok"}

    async def on_end_session(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        try:
            who = self._authorize(sid, payload, "end", payload.get("session_id"))
            session = await self.manager.get_live(payload.get("session_id"))
            await self._join(sid, session, who)
            # `session_ended` reaches the rooms (this client included) from the session.
            await self.manager.end_session(session.id)
        except ProctorError as exc:
            return await self._error(sid, "end_session", exc, payload)
        return {"status": "ok"}
