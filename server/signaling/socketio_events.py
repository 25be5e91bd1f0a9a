"""The legacy Socket.IO contract (fixed event names), on the shared session model, plus
the proctor's console events (`watch_session`, `watch_all`, `unwatch_*`).

Each session has two rooms for those taking part: operators' (named by the session id)
and candidates' (`candidate:<id>`); a socket joins one by starting the session or by
naming its id, as its role allows, and the candidates' room gets what `CANDIDATE_VIEW`
lets it see. Watchers join `watch:<id>` or `watch:all` (see `watchers`). A socket's role
comes from the token it sent at connect (`auth: {token}`) or, for old clients, a `token`
in the payload. Errors go to the offending client only, as an `error` event; neither the
connection nor the session ends. Every event passes a per-connection rate limit, and
every payload was parsed by `safe_json` (see `socketio_json`).

A client that does not read what it is sent cannot hold memory or the pipeline: emits
only queue packets (engine.io's per-client queue, which is unbounded), so `GuardedServer`
caps that queue — past SOCKETIO_SEND_QUEUE_MAX packets the client's `frame_analysis` and
`live_metrics` are dropped, at twice that it is disconnected.

In a cluster, an event naming a session another node runs is passed to that node as
its REST request (server/cluster/routing.py), and this node answers its client from the
owner's answer; the session's events reach the client's rooms here over Redis
(server/cluster/fanout.py), since the owner emits every session's events to its rooms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import socketio
from engineio.async_socket import AsyncSocket
from socketio.async_pubsub_manager import AsyncPubSubManager

from server import safe_json
from server.config import Settings
from server.errors import BadRequest, ProctorError, SessionEnded, SessionNotFound, from_frame_error
from server.media.frames import FrameError
from server.session.live_session import LiveSession
from server.session.manager import SessionManager
from server.signaling.auth import Access, Action, Principal, fingerprint, join_url, socket_token
from server.signaling.frame_intake import frame_from_client
from server.signaling.socketio_json import REJECTED_EVENT
from server.signaling.views import candidate_payload
from server.signaling.watchers import (
    WATCH_ALL_ROOM,
    WATCHED_SESSIONS_MAX,
    WatchFeeds,
    candidate_room,
    watch_room,
)

if TYPE_CHECKING:
    from server.cluster.leases import Peer
    from server.cluster.routing import ClusterNode

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


#: Events a lagging client can miss without losing anything: the next one replaces them.
COALESCABLE_PREFIXES = ('2["frame_analysis"', '2["live_metrics"')


class _WholeBody:
    """engine.io reads a long-polling POST with one `read(Content-Length)`, which on
    aiohttp's stream returns only what has arrived so far: a packet that reaches us in
    pieces (through a proxy, or a slow network) was cut short and refused as bad JSON.
    This reads until it has all the bytes (or the stream ends)."""

    def __init__(self, content: Any) -> None:
        self._content = content

    async def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return bytes(await self._content.read())
        try:
            return bytes(await self._content.readexactly(n))
        except asyncio.IncompleteReadError as exc:
            return bytes(exc.partial)


class GuardedServer(socketio.AsyncServer):
    """python-socketio's server, with event packets shaped before dispatch: its own code
    indexes `data[0]` (a crash on `42{}` or `42[]`) and dispatches a client-sent `connect`
    or `disconnect` event to the connection handlers. Those become `REJECTED_EVENT`.

    And a bounded send queue per client: python-socketio's emit puts each packet on the
    recipient's engine.io queue (an unbounded asyncio.Queue drained by its writer, which
    waits on the socket) and returns, so a client that stops reading never blocks an emit
    but would grow that queue for as long as it stays connected. Past `send_queue_max`
    packets waiting, coalescable packets to it are dropped; at twice that it is
    disconnected and its queue freed. Every emit path (rooms, one client, pub/sub
    managers delivering on this node) goes through `_send_eio_packet`.

    Long-polling bodies are read whole (`_WholeBody`)."""

    def __init__(
        self,
        *args: Any,
        send_queue_max: int = 0,
        on_backpressure: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        drivers = dict(self.eio._async)  # the module's own dict: copied, not changed
        translate = drivers["translate_request"]

        def translate_request(request: Any) -> dict[str, Any]:
            environ = dict(translate(request))
            environ["wsgi.input"] = _WholeBody(environ["wsgi.input"])
            return environ

        drivers["translate_request"] = translate_request
        self.eio._async = drivers
        self.send_queue_max = send_queue_max
        self._on_backpressure = on_backpressure
        self._cut: weakref.WeakSet[AsyncSocket] = weakref.WeakSet()
        self._closing: set[asyncio.Task[Any]] = set()

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        limit = self.send_queue_max
        if limit > 0:
            sock = self.eio.sockets.get(eio_sid)
            if sock is None or sock.closed or sock in self._cut:
                return  # gone: engine.io would only log (or raise) for it
            depth = sock.queue.qsize()
            if depth >= limit:
                data = eio_pkt.data
                if isinstance(data, str) and data.startswith(COALESCABLE_PREFIXES):
                    self._note("dropped")
                    return
                if depth >= 2 * limit:
                    self._disconnect_lagging(eio_sid, sock, depth)
                    return
        await super()._send_eio_packet(eio_sid, eio_pkt)

    def _note(self, action: str) -> None:
        if self._on_backpressure is not None:
            self._on_backpressure(action)

    def _disconnect_lagging(self, eio_sid: str, sock: AsyncSocket, depth: int) -> None:
        log.warning("socket.io client %s is %d packets behind: disconnected", eio_sid[:8], depth)
        self._note("disconnected")
        self._cut.add(sock)
        while not sock.queue.empty():  # free what waits: it will never be read
            sock.queue.get_nowait()
            sock.queue.task_done()
        sock.queue.put_nowait(None)  # ends its writer once the send it is in returns
        task = asyncio.create_task(sock.close(wait=False, abort=True), name="sio-cut")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        # A websocket whose peer stopped reading blocks its writer on the TCP buffer:
        # abort the connection so its handler ends now, not at the ping timeout.
        environ = self.environ.get(eio_sid) or {}
        request = environ.get("aiohttp.request")
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket" and request is not None:
            transport = request.transport
            if transport is not None:
                transport.abort()

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
        cluster: ClusterNode | None = None,
    ) -> None:
        super().__init__(namespace)
        self.manager = manager
        self.settings = settings
        self.access = access
        self.feeds = WatchFeeds(
            manager,
            settings,
            self.emit,
            self._local_participants,
            local_rooms_only=self._rooms_are_local,
        )
        self.cluster = cluster
        self._tokens: dict[str, str | None] = {}
        self._bases: dict[str, str] = {}
        self._addresses: dict[str, str | None] = {}  # the client address (spend caps)
        self._hosts: dict[str, tuple[str, str]] = {}  # (host, scheme) the client used
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
            await self._resolve_tokens(sid, data)
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

    async def _resolve_tokens(self, sid: str, data: Any) -> None:
        """Cluster: load tokens another node issued before `_authorize` looks at them."""
        if self.cluster is None:
            return
        from server.errors import BackendUnavailable
        from server.session.store import StoreError

        token = None
        if isinstance(data, str) and '"token"' in data:  # a JSON.stringify()'d payload
            try:
                data = safe_json.loads(data)
            except safe_json.JsonRejected:
                data = None
        if isinstance(data, dict) and isinstance(data.get("token"), str):
            token = data["token"]
        try:
            for t in (self._tokens.get(sid), token):
                await self.access.resolve(t)
        except StoreError:
            raise BackendUnavailable(
                "the session store cannot be read", code="store_unavailable"
            ) from None

    def _token(self, sid: str, payload: dict[str, Any]) -> str | None:
        token = payload.get("token")
        return token if isinstance(token, str) and token else self._tokens.get(sid)

    def _authorize(
        self, sid: str, payload: dict[str, Any], action: Action, session_id: object = None
    ) -> Principal:
        token = payload.get("token")
        if not isinstance(token, str) or not token:
            token = self._tokens.get(sid)
        return self.access.authorize(token, action, session_id)

    async def _join(self, sid: str, session: LiveSession, who: Principal) -> None:
        # One feed per session, whichever transport started it, sends to its rooms (the
        # feeds follow every session from its start: in a cluster its watchers may be on
        # any node).
        self.feeds.feed(session)
        await self._enter(sid, session.id, who)

    async def _enter(self, sid: str, session_id: str, who: Principal) -> None:
        if session_id not in self.rooms(sid):
            log.info("socket %s connected to the session", sid, extra={"session_id": session_id})
        await self.enter_room(sid, session_id if who.is_operator else candidate_room(session_id))

    # --- sessions another node runs (cluster) -----------------------------------------

    async def _owner(self, session_id: object) -> Peer | None:
        if self.cluster is None:
            return None
        return await self.cluster.owner_of(session_id)

    async def _on_owner(
        self, sid: str, payload: dict[str, Any], peer: Peer, method: str, action: str,
        kind: str, body: dict[str, Any] | None = None,
    ) -> Any:
        """The event as its REST request to the session's owner; its answer's JSON, or
        the owner's error raised as ours."""
        assert self.cluster is not None
        session_id = str(payload.get("session_id"))
        raw = None
        if body is not None:
            big = len(str(body.get("frame", ""))) > self.settings.offload_bytes
            raw = (await asyncio.to_thread(json.dumps, body) if big else json.dumps(body)).encode()
        host, scheme = self._hosts.get(sid, ("localhost", "http"))
        answer = await self.cluster.call(
            peer, method, f"/api/sessions/{quote(session_id, safe='')}/{action}", kind=kind,
            token=self._token(sid, payload), client=self._addresses.get(sid), host=host,
            scheme=scheme, body=raw,
        )
        data = answer.json()
        if answer.status == 200 and isinstance(data, dict):
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            error = {"code": "owner_unavailable", "message": "the session's node failed"}
        exc = ProctorError(
            str(error.get("message", "")), code=str(error.get("code", "error")),
            status=answer.status if answer.status >= 400 else 502,
        )
        retry = answer.headers.get("Retry-After", "")
        if retry.isdigit():
            exc.retry_after_s = int(retry)
        raise exc

    def _local_participants(self, room: str) -> list[str]:
        assert self.server is not None
        return [sid for sid, _eio in self.server.manager.get_participants(self.namespace, room)]

    def _rooms_are_local(self) -> bool:
        assert self.server is not None
        return not isinstance(self.server.manager, AsyncPubSubManager)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = socket_token(auth)
        self._tokens[sid] = token
        self._bases[sid] = self.settings.public_url or (
            f"{environ.get('wsgi.url_scheme', 'http')}://{environ.get('HTTP_HOST', 'localhost')}"
        )
        # The aiohttp request, after web_guard's proxy rule (its REMOTE_ADDR is a constant).
        request = environ.get("aiohttp.request")
        self._addresses[sid] = getattr(request, "remote", None)
        if request is not None:
            self._hosts[sid] = (request.host, request.scheme)
        s = self.settings
        self._events[sid] = TokenBucket(s.socketio_events_per_s, s.socketio_event_burst)
        self._errors[sid] = TokenBucket(s.socketio_errors_per_s, s.socketio_errors_per_s)
        log.debug("socket %s connected (token %s)", sid, fingerprint(token))

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        for table in (
            self._tokens, self._bases, self._events, self._errors, self._addresses, self._hosts,
        ):
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
        token = await self.access.issue(session.id)
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
            if (peer := await self._owner(payload.get("session_id"))) is not None:
                if "frame" not in payload:
                    raise BadRequest("frame is missing", code="missing_field")
                await self._enter(sid, str(payload["session_id"]), who)
                body = {"frame": payload["frame"]}
                if payload.get("timestamp") is not None:
                    body["timestamp"] = payload["timestamp"]
                return dict(await self._on_owner(sid, payload, peer, "POST", "frame", "frame",
                                                 body))
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
            if (peer := await self._owner(payload.get("session_id"))) is not None:
                await self._enter(sid, str(payload["session_id"]), who)
                # The owner shapes it for this token's view.
                metrics = await self._on_owner(sid, payload, peer, "GET", "metrics", "metrics")
                await self.emit("live_metrics", metrics, to=sid)
                return {"status": "ok"}
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
            if (peer := await self._owner(payload.get("session_id"))) is not None:
                # In the rooms first: `session_ended` comes back from the owner over Redis.
                await self._enter(sid, str(payload["session_id"]), who)
                await self._on_owner(sid, payload, peer, "POST", "end", "end")
                return {"status": "ok"}
            session = await self.manager.get_live(payload.get("session_id"))
            await self._join(sid, session, who)
            # `session_ended` reaches the rooms (this client included) from the session.
            await self.manager.end_session(session.id)
        except ProctorError as exc:
            return await self._error(sid, "end_session", exc, payload)
        return {"status": "ok"}

    # --- the proctor's console ----------------------------------------------------------

    async def _watchable(self, session_id: object) -> str:
        """The id of a session that can be watched: live here, or live on another node
        (the store says so); 404 / 409 otherwise."""
        if not isinstance(session_id, str) or not session_id:
            raise SessionNotFound("session_id is missing", code="missing_session_id", status=400)
        if len(session_id) > 64:
            raise SessionNotFound(f"no session with id {session_id[:64]}")
        try:
            session = await self.manager.get_live(session_id)
        except SessionEnded:
            record = await self.manager.store.get_session(session_id)
            if record is None or record.get("status") != "live":
                raise
            return session_id  # another node runs it; its emits reach us through the manager
        self.feeds.feed(session)
        return session.id

    async def on_watch_session(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        try:
            self._authorize(sid, payload, "operator")
            session_id = await self._watchable(payload.get("session_id"))
            watched = [r for r in self.rooms(sid) if r.startswith("watch:") and r != WATCH_ALL_ROOM]
            if watch_room(session_id) not in watched and len(watched) >= WATCHED_SESSIONS_MAX:
                raise BadRequest(
                    f"a connection watches at most {WATCHED_SESSIONS_MAX} sessions",
                    code="too_many_watched",
                )
        except ProctorError as exc:
            return await self._error(sid, "watch_session", exc, payload)
        await self.enter_room(sid, watch_room(session_id))
        log.info("socket %s watches the session", sid, extra={"session_id": session_id})
        live = self.manager.live_sessions()
        session = next((s for s in live if s.id == session_id), None)
        if session is not None:  # the state at once, the next pushes follow
            await self.emit("live_metrics", self.feeds.live_metrics(session), to=sid)
        return {"status": "ok", "session_id": session_id}

    async def on_unwatch_session(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        session_id = payload.get("session_id")
        if not isinstance(session_id, str) or not session_id or len(session_id) > 64:
            return await self._error(
                sid,
                "unwatch_session",
                BadRequest("session_id is missing", code="missing_session_id"),
                payload,
            )
        await self.leave_room(sid, watch_room(session_id))
        return {"status": "ok", "session_id": session_id}

    async def on_watch_all(self, sid: str, data: Any = None) -> dict[str, Any]:
        payload = _payload(data)
        try:
            self._authorize(sid, payload, "operator")
        except ProctorError as exc:
            return await self._error(sid, "watch_all", exc, payload)
        await self.enter_room(sid, WATCH_ALL_ROOM)
        log.info("socket %s watches every session", sid)
        return {"status": "ok"}

    async def on_unwatch_all(self, sid: str, data: Any = None) -> dict[str, Any]:
        _payload(data)
        await self.leave_room(sid, WATCH_ALL_ROOM)
        return {"status": "ok"}
