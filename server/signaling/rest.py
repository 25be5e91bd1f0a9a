"""REST endpoints (fixed paths from the product contract), on the shared session model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.cluster.forwarding import forwarded
from server.cluster.routing import ClusterNode, forward_to_owner
from server.config import Settings
from server.errors import BackendUnavailable, BadRequest
from server.observability import Instruments
from server.session.health import live_overview
from server.session.live_session import LiveSession
from server.session.manager import SessionManager
from server.signaling.auth import ACCESS, authorize_request, join_url
from server.signaling.frame_intake import frame_from_client
from server.signaling.http_api import (
    DEFAULT_BODY_MAX,
    Api,
    json_response,
    parse_body,
)
from server.signaling.schemas import (
    FrameRequest,
    FrameResult,
    Health,
    LiveMetrics,
    Report,
    SessionList,
    SessionStarted,
    StartSessionRequest,
)
from server.signaling.views import candidate_payload, end_answer, frame_answer

LIST_LIMIT_MAX = 1000
#: Degradations meaning the backend itself is unreachable or refusing us (not throttling).
DOWN_REASONS = frozenset({"unavailable", "auth", "timeout", "error"})


def backend_down(result: dict[str, Any]) -> bool:
    """Every requested check failed for a reason other than throttling."""
    reasons = [d.split(":", 1)[1] for d in result.get("degraded", [])]
    return len(reasons) == len(result.get("checks", [])) > 0 and all(
        r in DOWN_REASONS for r in reasons
    )


def build_api(
    manager: SessionManager,
    settings: Settings,
    instruments: Instruments,
    redis_health: Callable[[], dict[str, Any]] | None = None,
    cluster: ClusterNode | None = None,
) -> Api:
    """`redis_health`: the cluster's Redis block of /health (REDIS_URL), if any.
    `cluster`: this node's cluster membership; requests for a session another node runs
    are forwarded to it (after this node has authorised them)."""
    api = Api("Proctoring server", __version__)
    started = time.monotonic()

    async def forward(
        request: web.Request,
        kind: str,
        max_body: int = DEFAULT_BODY_MAX,
        too_large_code: str = "request_too_large",
    ) -> web.Response | None:
        return await forward_to_owner(request, kind, max_body, too_large_code)

    # Room for base64 (4/3) and the JSON around the largest allowed frame.
    frame_body_max = settings.max_frame_bytes * 4 // 3 + 4096

    async def live(request: web.Request) -> LiveSession:
        return await manager.get_live(request.match_info["session_id"])

    @api.route(
        "GET", "/health", summary="Health check", tag="operations", response=Health, public=True
    )
    async def health(request: web.Request) -> web.Response:
        # 200 even when degraded: the process serves, and restarting it (what a failing
        # liveness probe does) would interrupt every live session without mending a disk.
        # Monitoring alerts on `status` and on proctor_internal_errors_total{where="store"}.
        store = manager.store.health()
        status = store["status"]
        redis = redis_health() if redis_health is not None else None
        if redis is not None and redis["status"] != "ok":
            status = "degraded"
        extra: dict[str, Any] = {}
        if cluster is not None:
            extra["cluster"] = await cluster.health()
            if not extra["cluster"]["healthy"]:
                status = "degraded"
        return json_response(
            {
                "status": status,
                **extra,
                "store": store,
                "redis": redis,
                "backend": manager.analyser.name,
                "live_sessions": manager.live_count,
                # Whether clients need a token (the console asks before it signs in).
                "auth": "token" if request.app[ACCESS].secured else "none",
                "spend": manager.spend.to_json(),
                "uptime_s": round(time.monotonic() - started, 3),
                "version": __version__,
            }
        )

    @api.route(
        "POST",
        "/api/sessions/start",
        summary="Start a session",
        request=StartSessionRequest,
        response=SessionStarted,
        errors=(400, 413, 429),
        operator=True,
    )
    async def start_session(request: web.Request) -> web.Response:
        authorize_request(request, "start")
        body = await parse_body(request, StartSessionRequest, settings.start_body_max_bytes)
        session = await manager.start_session(
            body.job_data, transport="rest", client_address=request.remote
        )
        token = await request.app[ACCESS].issue(session.id)
        base = settings.public_url or f"{request.scheme}://{request.host}"
        return json_response(
            {
                **manager.started_payload(session),
                "candidate_token": token,
                "join_url": join_url(base, session.id, token),
            }
        )

    @api.route(
        "POST",
        "/api/sessions/{session_id}/frame",
        summary="Analyse one frame",
        request=FrameRequest,
        response=FrameResult,
        errors=(400, 404, 409, 413, 503),
    )
    async def analyse_frame(request: web.Request) -> web.Response:
        who = authorize_request(request, "frame", request.match_info["session_id"])
        remote = await forward(request, "frame", frame_body_max, "frame_too_large")
        if remote is not None:
            return remote
        session = await live(request)
        body = await parse_body(request, FrameRequest, frame_body_max, "frame_too_large")
        frame = await frame_from_client(body.frame, body.timestamp, settings)
        result = await manager.submit(session, frame)
        via = forwarded(request)
        if via is not None and via.via == "socketio":
            # A Socket.IO client on another node: its acknowledgement, whatever the
            # backend did (Socket.IO reports outages in the result, not as an error).
            if result.get("status") == "dropped":
                return json_response(dict(result))
            return json_response({"status": "analysed", "frame_index": result["frame_index"]})
        view = who.view(settings)
        if result.get("status") == "dropped":
            return json_response(frame_answer({"session_id": session.id, **result}, view))
        if backend_down(result):
            raise BackendUnavailable(
                "the analyser backend could not answer ("
                + ", ".join(result["degraded"])
                + "); the frame was counted as degraded and the session goes on"
            )
        answer = {"session_id": session.id, "status": "analysed", "result": result}
        return json_response(frame_answer(answer, view))

    @api.route(
        "GET",
        "/api/sessions/{session_id}/metrics",
        summary="Aggregated live metrics",
        response=LiveMetrics,
        errors=(404, 409),
    )
    async def session_metrics(request: web.Request) -> web.Response:
        who = authorize_request(request, "live_metrics", request.match_info["session_id"])
        if (remote := await forward(request, "metrics")) is not None:
            return remote
        metrics = (await live(request)).live_metrics()
        return json_response(candidate_payload("live_metrics", metrics, who.view(settings)))

    @api.route(
        "POST",
        "/api/sessions/{session_id}/end",
        summary="End a session and get its report",
        response=Report,
        errors=(404, 409),
    )
    async def end_session(request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        who = authorize_request(request, "end", session_id)
        if (remote := await forward(request, "end")) is not None:
            return remote
        report = await manager.end_session(session_id)
        return json_response(end_answer(report, who.view(settings)))

    @api.route(
        "GET",
        "/api/sessions/{session_id}/report",
        summary="The report of an ended or interrupted session",
        response=Report,
        errors=(404, 409),
        operator=True,
    )
    async def session_report(request: web.Request) -> web.Response:
        authorize_request(request, "operator")
        return json_response(await manager.report(request.match_info["session_id"]))

    @api.route(
        "GET",
        "/api/sessions",
        summary="List sessions (newest first) with their alert counts, and the health of "
        "live ones; ?status=live|ended|interrupted&limit=&offset=",
        response=SessionList,
        errors=(400,),
        operator=True,
    )
    async def list_sessions(request: web.Request) -> web.Response:
        authorize_request(request, "operator")
        status = request.query.get("status")
        if status not in (None, "live", "ended", "interrupted"):
            raise BadRequest("status must be live, ended or interrupted", code="invalid_field")
        try:
            limit = int(request.query.get("limit", "100"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise BadRequest("limit and offset must be integers", code="invalid_field") from None
        if not (1 <= limit <= LIST_LIMIT_MAX) or offset < 0:
            raise BadRequest(f"limit must be 1..{LIST_LIMIT_MAX}, offset ≥ 0", code="invalid_field")
        sessions = await manager.list_sessions(status, limit, offset)
        live = {s.id: s for s in manager.live_sessions()}
        for record in sessions:
            record["alert_count"] = (record.get("review_counts") or {}).get("alerts", 0)
            session = live.get(record["session_id"])
            if session is not None:  # live on this node: what the console's table shows
                record["live"] = live_overview(session)
        return json_response({"sessions": sessions, "count": len(sessions)})

    @api.route(
        "GET",
        "/metrics",
        summary="Prometheus metrics",
        tag="operations",
        operator=True,
        response_content_type=CONTENT_TYPE_LATEST,
    )
    async def prometheus_metrics(request: web.Request) -> web.Response:
        authorize_request(request, "operator")
        body = generate_latest(instruments.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @api.route(
        "GET",
        "/api/openapi.json",
        summary="This API's OpenAPI document",
        tag="operations",
        public=True,
    )
    async def openapi(request: web.Request) -> web.Response:
        return json_response(api.openapi())

    return api
