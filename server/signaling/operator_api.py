"""The operator's endpoints for human review, who-did-what and erasure (SPEC "Evidence,
review and re-scoring"): review an alert, read a session, erase it, read the audit log.
Operator token only; every change is audited under the token's name."""

from __future__ import annotations

from aiohttp import web

from server.cluster.routing import forward_to_owner
from server.errors import BackendUnavailable, BadRequest
from server.session.manager import SessionManager
from server.session.store import StoreError
from server.signaling.auth import actor_of, authorize_request
from server.signaling.http_api import Api, json_response, parse_body
from server.signaling.schemas import (
    AuditList,
    Erased,
    ReviewedAlert,
    ReviewRequest,
    SessionDetail,
)

AUDIT_LIMIT_MAX = 1000
#: A review's body: a note of NOTE_MAX_CHARS, each character possibly a 6-byte escape.
REVIEW_BODY_MAX = 16 * 1024


def register_operator_routes(api: Api, manager: SessionManager) -> None:
    @api.route(
        "POST",
        "/api/sessions/{session_id}/alerts/{alert_id}/review",
        summary="Confirm or dismiss an alert, with a note (a later review replaces it)",
        tag="review",
        request=ReviewRequest,
        response=ReviewedAlert,
        errors=(400, 404, 413, 503),
        operator=True,
    )
    async def review_alert(request: web.Request) -> web.Response:
        who = authorize_request(request, "operator")
        body = await parse_body(request, ReviewRequest, REVIEW_BODY_MAX)
        alert = await manager.review_alert(
            request.match_info["session_id"],
            request.match_info["alert_id"],
            body.verdict,
            body.note or None,
            actor_of(who),
        )
        return json_response(alert)

    @api.route(
        "GET",
        "/api/sessions/{session_id}",
        summary="A session's record, with its review status",
        response=SessionDetail,
        errors=(404, 503),
        operator=True,
    )
    async def get_session(request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        if session_id == "start":  # POST /api/sessions/start's path, never a session id
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        authorize_request(request, "operator")
        return json_response(await manager.session_record(session_id))

    @api.route(
        "DELETE",
        "/api/sessions/{session_id}",
        summary="Erase a session (a live one is ended first): frames, alerts, evidence, "
        "reviews, report; audited",
        tag="review",
        response=Erased,
        errors=(404, 503),
        operator=True,
    )
    async def erase_session(request: web.Request) -> web.Response:
        who = authorize_request(request, "operator")
        # A live session is ended first, by the node that runs it.
        if (remote := await forward_to_owner(request, "erase")) is not None:
            return remote
        erased = await manager.erase_session(request.match_info["session_id"], actor_of(who))
        return json_response(erased)

    @api.route(
        "GET",
        "/api/audit",
        summary="Who did what (newest first); ?session_id=&limit=&offset=",
        tag="review",
        response=AuditList,
        errors=(400, 503),
        operator=True,
    )
    async def audit_log(request: web.Request) -> web.Response:
        authorize_request(request, "operator")
        session_id = request.query.get("session_id") or None
        try:
            limit = int(request.query.get("limit", "100"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise BadRequest("limit and offset must be integers", code="invalid_field") from None
        if not (1 <= limit <= AUDIT_LIMIT_MAX) or offset < 0:
            raise BadRequest(
                f"limit must be 1..{AUDIT_LIMIT_MAX}, offset ≥ 0", code="invalid_field"
            )
        try:
            entries = await manager.audit.entries(session_id, limit, offset)
        except StoreError as exc:
            raise BackendUnavailable(
                "the audit log cannot be read", code="store_unavailable"
            ) from exc
        return json_response({"entries": entries, "count": len(entries)})
