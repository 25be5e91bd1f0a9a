"""REST endpoints of the operator's alert tools: the alert list with evidence links, the
evidence snapshots and re-scoring (SPEC "Evidence, review and re-scoring"). Every one needs
the operator token in secured mode: evidence shows the candidate's face.

In a cluster, a session another node runs live is asked of that node: its latest alerts,
evidence and frames may still be in that node's write queue."""

from __future__ import annotations

from aiohttp import web

from server.cluster.routing import forward_to_owner
from server.session.alerts import AlertService
from server.signaling.auth import actor_of, authorize_request
from server.signaling.http_api import Api, json_response, parse_body
from server.signaling.schemas import AlertList, RescoreRequest, RescoreResult

#: A rescore body names a few rules and fields: a small limit.
RESCORE_BODY_MAX = 16 * 1024


def register_alert_routes(api: Api, alerts: AlertService) -> None:
    @api.route(
        "GET",
        "/api/sessions/{session_id}/alerts",
        summary="A session's alerts (live or ended), each with its evidence_url",
        response=AlertList,
        errors=(404,),
        operator=True,
    )
    async def list_alerts(request: web.Request) -> web.Response:
        authorize_request(request, "operator")
        if (remote := await forward_to_owner(request, "alerts")) is not None:
            return remote
        return json_response(await alerts.list_alerts(request.match_info["session_id"]))

    @api.route(
        "GET",
        "/api/sessions/{session_id}/alerts/{alert_id}/evidence",
        summary="The alert's evidence snapshot: the frame that raised it, at most 640 px "
        "wide, faces and objects boxed, its numbers beneath (404 no_evidence when none)",
        errors=(404,),
        operator=True,
        response_content_type="image/jpeg",
    )
    async def alert_evidence(request: web.Request) -> web.Response:
        authorize_request(request, "operator")
        if (remote := await forward_to_owner(request, "evidence")) is not None:
            return remote
        jpeg = await alerts.evidence(
            request.match_info["session_id"], request.match_info["alert_id"]
        )
        return web.Response(
            body=jpeg,
            content_type="image/jpeg",
            # A face: never in a shared cache, nor kept by the browser.
            headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"},
        )

    @api.route(
        "POST",
        "/api/sessions/{session_id}/rescore",
        summary="Recompute the alert history from the stored per-frame facts with other "
        "thresholds or rules switched off; the session's own alerts are unchanged",
        request=RescoreRequest,
        response=RescoreResult,
        errors=(400, 404, 409, 413),
        operator=True,
    )
    async def rescore(request: web.Request) -> web.Response:
        who = authorize_request(request, "operator")
        if (remote := await forward_to_owner(request, "rescore", RESCORE_BODY_MAX)) is not None:
            return remote
        body = await parse_body(request, RescoreRequest, RESCORE_BODY_MAX)
        sid = request.match_info["session_id"]
        return json_response(await alerts.rescore(sid, body.rules, actor_of(who)))
