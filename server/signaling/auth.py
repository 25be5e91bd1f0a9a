"""Operator access: endpoints that see across sessions (listing, any report, /metrics)
require the server-wide API token when one is configured. A session's own endpoints are
guarded by its unguessable id instead."""

from __future__ import annotations

import hmac

from aiohttp import web

from server.errors import ProctorError, Unauthorized


class Forbidden(ProctorError):
    code = "forbidden"
    status = 403


def presented_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-API-Token")


def require_operator(request: web.Request, api_token: str) -> None:
    if not api_token:
        return
    token = presented_token(request)
    if token is None:
        raise Unauthorized("this endpoint needs the operator token (Authorization: Bearer ...)")
    if not hmac.compare_digest(token.encode(), api_token.encode()):
        raise Forbidden("the operator token is not valid")
