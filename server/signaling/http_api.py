"""A small route registry for aiohttp: each endpoint declares its request and response
models, so handlers validate with pydantic and `/api/openapi.json` is generated from the
same models. Also the JSON error middleware and bounded, safe body parsing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from server import safe_json
from server.errors import BadRequest, ProctorError, from_frame_error
from server.media.frames import FrameError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

STATUS_TEXT = {
    400: "Malformed request",
    401: "Token missing or not valid",
    403: "Not allowed with this token",
    404: "Unknown session",
    409: "Session already ended / not yet ended",
    413: "Frame or body too large",
    422: "Unreadable video",
    429: "Overloaded",
    503: "Backend unavailable",
}
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "overloaded",
}


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(payload, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: ProctorError) -> web.Response:
    headers = (
        {"Retry-After": str(exc.retry_after_s or 5)} if exc.status in (429, 503) else None
    )
    return json_response(exc.to_json(), status=exc.status, headers=headers)


DEFAULT_BODY_MAX = 8 * 1024  # a JSON body's limit unless its route says otherwise
OFFLOAD_BYTES = 256 * 1024  # larger bodies are parsed in a worker thread


class BodyTooLarge(ProctorError):
    code = "request_too_large"
    status = 413


async def read_body(request: web.Request, max_bytes: int, code: str = "request_too_large") -> bytes:
    """The body, refused (413 `code`) as soon as it is known to exceed `max_bytes`: from
    Content-Length before reading, else while reading (aiohttp's own limit is app-wide)."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(f"request body exceeds {max_bytes} bytes", code=code)
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > max_bytes:
            raise BodyTooLarge(f"request body exceeds {max_bytes} bytes", code=code)
    return bytes(buf)


async def parse_json(raw: bytes) -> Any:
    """Untrusted JSON through `safe_json` (in a thread when large); 400 `invalid_json`."""
    try:
        if len(raw) > OFFLOAD_BYTES:
            return await asyncio.to_thread(safe_json.loads, raw)
        return safe_json.loads(raw)
    except safe_json.JsonRejected as exc:
        raise BadRequest(f"body is not acceptable JSON: {exc}", code="invalid_json") from None


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        code = "missing_field" if first["type"] == "missing" else "invalid_field"
        raise BadRequest(f"{where}: {first['msg']}", code=code) from None


async def parse_body(
    request: web.Request,
    model: type[M],
    max_bytes: int = DEFAULT_BODY_MAX,
    too_large_code: str = "request_too_large",
) -> M:
    """Read (bounded) and validate a JSON body; every failure is a specific 4xx."""
    raw = await read_body(request, max_bytes, too_large_code)
    data: Any = await parse_json(raw) if raw.strip() else {}
    return validate(model, data)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProctorError as exc:
        return error_response(exc)
    except FrameError as exc:
        return error_response(from_frame_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason
        if exc.status == 413:
            code, message = "frame_too_large", "request body exceeds the maximum frame size"
        return json_response({"error": {"code": code, "message": message}}, status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(
            {"error": {"code": "internal_error", "message": "internal error"}}, status=500
        )


@dataclass
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    request: type[BaseModel] | None
    response: type[BaseModel] | None
    errors: tuple[int, ...]
    operator: bool
    public: bool = False
    response_content_type: str = "application/json"


class Api:
    def __init__(self, title: str, version: str) -> None:
        self.title = title
        self.version = version
        self.endpoints: list[Endpoint] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        tag: str = "sessions",
        request: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        errors: tuple[int, ...] = (),
        operator: bool = False,
        public: bool = False,
        response_content_type: str = "application/json",
    ) -> Callable[[Handler], Handler]:
        """`operator`: operator token only; `public`: no token needed even in secured
        mode; otherwise the operator's or, where the handler allows it, a candidate's."""
        def register(handler: Handler) -> Handler:
            self.endpoints.append(
                Endpoint(
                    method,
                    path,
                    handler,
                    summary,
                    tag,
                    request,
                    response,
                    errors,
                    operator,
                    public,
                    response_content_type,
                )
            )
            return handler

        return register

    def attach(self, app: web.Application) -> None:
        for ep in self.endpoints:
            app.router.add_route(ep.method, ep.path, ep.handler)

    def openapi(self) -> dict[str, Any]:
        schemas: dict[str, Any] = {}

        def ref(model: type[BaseModel]) -> dict[str, str]:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas[name] = sub
            schemas[model.__name__] = schema
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        error_ref = ref(_error_model())
        paths: dict[str, Any] = {}
        for ep in self.endpoints:
            op: dict[str, Any] = {
                "summary": ep.summary,
                "tags": [ep.tag],
                "operationId": ep.handler.__name__,
                "responses": {},
            }
            params = [
                {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                for seg in ep.path.split("/")
                if seg.startswith("{")
            ]
            if params:
                op["parameters"] = params
            if ep.request is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref(ep.request)}},
                }
            ok: dict[str, Any] = {"description": "OK"}
            if ep.response is not None:
                ok["content"] = {ep.response_content_type: {"schema": ref(ep.response)}}
            elif ep.response_content_type != "application/json":
                ok["content"] = {ep.response_content_type: {"schema": {"type": "string"}}}
            op["responses"]["200"] = ok
            codes = set(ep.errors) | (set() if ep.public else {401, 403})
            for status in sorted(codes):
                op["responses"][str(status)] = {
                    "description": STATUS_TEXT.get(status, "Error"),
                    "content": {"application/json": {"schema": error_ref}},
                }
            if not ep.public:
                op["security"] = [{"operatorToken": []}, {"candidateToken": []}]
            paths.setdefault(ep.path, {})[ep.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {
                    "operatorToken": {"type": "http", "scheme": "bearer"},
                    "candidateToken": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A session's candidate token: its frames, live "
                        "metrics and end only",
                    },
                },
            },
        }


def _error_model() -> type[BaseModel]:
    from server.signaling.schemas import ErrorBody

    return ErrorBody
