"""The legacy Socket.IO contract (fixed event names), on the shared session model.

Each session has a room named by its id; a client joins it by starting the session or by
naming its id, and only that room receives the session's events. Errors go to the
offending client only, as an `error` event; neither the connection nor the session ends.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

import socketio

from server.config import Settings
from server.errors import BadRequest, ProctorError, from_frame_error
from server.media.frames import Frame, FrameError
from server.session.live_session import LiveSession
from server.session.manager import SessionManager

log = logging.getLogger(__name__)


def _payload(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if isinstance(data, str):  # some clients send JSON.stringify()'d payloads
        try:
            data = json.loads(data)
        except json.JSONDecodeError:
            raise BadRequest("payload is not a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("payload must be an object", code="invalid_json")
    return data


class ProctorNamespace(socketio.AsyncNamespace):
    def __init__(self, manager: SessionManager, settings: Settings, namespace: str = "/") -> None:
        super().__init__(namespace)
        self.manager = manager
        self.settings = settings
        self._forwarding: weakref.WeakSet[LiveSession] = weakref.WeakSet()

    async def _error(
        self, sid: str, event: str, exc: ProctorError, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = {
            "code": exc.code,
            "message": exc.message,
            "status": exc.status,
            "event": event,
            "session_id": (data or {}).get("session_id") if isinstance(data, dict) else None,
        }
        await self.emit("error", body, to=sid)
        return {"status": "error", "error": body}

    async def _join(self, sid: str, session: LiveSession) -> None:
        # One forwarder per session, whichever transport started it, sends to its room.
        if session not in self._forwarding:
            self._forwarding.add(session)
            session.subscribe(self._room_listener(session.id))
        if session.id not in self.rooms(sid):
            log.info("socket %s connected to the session", sid, extra={"session_id": session.id})
        await self.enter_room(sid, session.id)

    def _room_listener(self, session_id: str) -> Any:
        async def forward(event: str, payload: dict[str, Any]) -> None:
            await self.emit(event, payload, room=session_id)

        return forward

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        log.debug("socket %s connected", sid)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        log.debug("socket %s disconnected", sid)
        for room in self.rooms(sid):
            if room != sid:  # the socket's own room; the others are sessions
                log.info("socket %s disconnected (%s)", sid, reason, extra={"session_id": room})

    async def on_start_session(self, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            payload = _payload(data)
            job_data = payload.get("job_data", {})
            if not isinstance(job_data, dict):
                raise BadRequest("job_data must be an object", code="invalid_field")
            session = await self.manager.start_session(job_data, transport="socketio")
        except ProctorError as exc:
            return await self._error(sid, "start_session", exc)
        await self._join(sid, session)
        started = self.manager.started_payload(session)
        await self.emit("session_started", started, to=sid)
        return {"status": "ok", **started}

    async def on_analyze_frame(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        try:
            payload = _payload(data)
            session = await self.manager.get_live(payload.get("session_id"))
            await self._join(sid, session)
            if "frame" not in payload:
                raise BadRequest("frame is missing", code="missing_field")
            timestamp = payload.get("timestamp")
            frame = Frame.from_data_url(
                payload["frame"],
                self.settings.max_frame_bytes,
                float(timestamp) if isinstance(timestamp, int | float) else None,
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
        payload: dict[str, Any] = {}
        try:
            payload = _payload(data)
            session = await self.manager.get_live(payload.get("session_id"))
        except ProctorError as exc:
            return await self._error(sid, "get_live_metrics", exc, payload)
        await self._join(sid, session)
        metrics = session.live_metrics()
        await self.emit("live_metrics", metrics, to=sid)
        return {"status": "ok"}

    async def on_end_session(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        try:
            payload = _payload(data)
            session = await self.manager.get_live(payload.get("session_id"))
            await self._join(sid, session)
            # `session_ended` reaches the room (this client included) from the session.
            await self.manager.end_session(session.id)
        except ProctorError as exc:
            return await self._error(sid, "end_session", exc, payload)
        return {"status": "ok"}
