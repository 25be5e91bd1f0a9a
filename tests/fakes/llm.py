"""Local fakes of the OpenAI and Anthropic HTTP APIs, speaking their real wire protocols.

The official SDKs talk to them unchanged once their base-URL variables point here:

    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())   # http://127.0.0.1:P/v1
    fake.reply = FakeReply(content='{"summary": "..."}', prompt_tokens=321)
    fake.push(FakeReply(status=500))            # the next request fails, then `reply`
    ...
    fake.requests[-1].body["model"]
    await fake.stop()

    fake = FakeAnthropic()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", await fake.start())  # http://127.0.0.1:P

Served: OpenAI `POST /v1/chat/completions` (a `chat.completion` object with `usage`),
Anthropic `POST /v1/messages` (a `message` object with `usage.input_tokens` /
`output_tokens`). Errors use each provider's real body shape. The fakes also refuse what
the real services refuse and a client is likely to get wrong: a missing API key, a missing
`model` / `messages` / `max_tokens`, and OpenAI's `response_format: json_object` without
the word "json" in the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

DEFAULT_CONTENT = json.dumps(
    {
        "summary": "The candidate kept steady eye contact and appeared engaged.",
        "cultural_fit": "Observed attentiveness is consistent with the role's demands.",
    }
)


@dataclass
class FakeReply:
    """One scripted answer. `status` != 200 makes it an error with the provider's body."""

    content: str = DEFAULT_CONTENT
    prompt_tokens: int = 120  # Anthropic: input_tokens
    completion_tokens: int = 45  # Anthropic: output_tokens
    delay_s: float = 0.0  # before answering (the request is recorded at once)
    status: int = 200
    error_message: str | None = None
    retry_after_ms: int | None = None  # `retry-after-ms` header on an error (the SDKs honour it)
    finish_reason: str | None = None  # default: "stop" (OpenAI) / "end_turn" (Anthropic)


@dataclass
class RecordedRequest:
    path: str
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    body: Any  # parsed JSON, or the raw text when it was not JSON
    at: float = field(default_factory=time.monotonic)

    def prompt_text(self) -> str:
        """All message text of the request (system prompt and messages), for assertions."""
        if not isinstance(self.body, dict):
            return ""
        parts = [_text_of(self.body.get("system"))]
        parts += [_text_of(m.get("content")) for m in self.body.get("messages") or []]
        return "\n".join(p for p in parts if p)


def _text_of(content: Any) -> str:
    """Text of a message content: a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(b.get("text")) for b in content if isinstance(b, dict))
    return ""


class _FakeLLM:
    route = ""
    base_path = ""

    def __init__(self) -> None:
        self.reply = FakeReply()
        self.requests: list[RecordedRequest] = []
        self._queue: deque[FakeReply] = deque()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.base_url = ""

    def push(self, *replies: FakeReply) -> None:
        """Answer the next requests with these, in order; then fall back to `reply`."""
        self._queue.extend(replies)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(self.route, self._handle)
        # A short shutdown grace: delayed handlers are woken by `_stopping` anyway.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}{self.base_path}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> _FakeLLM:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        self.requests.append(RecordedRequest(request.path, CIMultiDict(request.headers), body))
        reply = self._queue.popleft() if self._queue else self.reply
        if reply.delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay_s)
        refusal = self._refuse(request, body)
        if refusal is not None:
            return refusal
        if reply.status != 200:
            headers = {}
            if reply.retry_after_ms is not None:
                headers["retry-after-ms"] = str(reply.retry_after_ms)
            return self._error(reply.status, reply.error_message, headers)
        return web.json_response(self._success(body, reply), headers=self._headers())

    def _headers(self) -> dict[str, str]:
        return {}

    def _refuse(self, request: web.Request, body: Any) -> web.Response | None:
        raise NotImplementedError

    def _error(
        self, status: int, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        raise NotImplementedError

    def _success(self, body: dict[str, Any], reply: FakeReply) -> dict[str, Any]:
        raise NotImplementedError


# --- OpenAI -----------------------------------------------------------------------------------

# status -> (error.type, error.code, message) as api.openai.com sends them
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-fake. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3, "
        "Requested 1. Please try again in 20s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}


class FakeOpenAI(_FakeLLM):
    route = "/v1/chat/completions"
    base_path = "/v1"

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_{uuid.uuid4().hex}", "openai-processing-ms": "42"}

    def _error(
        self, status: int, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        etype, code, default = _OPENAI_ERRORS.get(status, ("server_error", None, "Error."))
        payload = {
            "error": {"message": message or default, "type": etype, "param": None, "code": code}
        }
        return web.json_response(
            payload, status=status, headers={**self._headers(), **(headers or {})}
        )

    def _refuse(self, request: web.Request, body: Any) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return self._error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if not isinstance(body, dict):
            return self._error(400, "We could not parse the JSON body of your request.")
        for name in ("model", "messages"):
            if not body.get(name):
                return self._error(400, f"Missing required parameter: '{name}'.")
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_object" and "json" not in json.dumps(body["messages"]).lower():
            return self._error(
                400,
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.",
            )
        return None

    def _success(self, body: dict[str, Any], reply: FakeReply) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply.content,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": reply.finish_reason or "stop",
                }
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_fake0000",
        }


# --- Anthropic --------------------------------------------------------------------------------

# status -> (error.type, message) as api.anthropic.com sends them
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "model: not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per minute.",
    ),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


class FakeAnthropic(_FakeLLM):
    route = "/v1/messages"
    base_path = ""

    def _headers(self) -> dict[str, str]:
        return {"request-id": f"req_{uuid.uuid4().hex[:24]}"}

    def _error(
        self, status: int, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        etype, default = _ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        payload = {
            "type": "error",
            "error": {"type": etype, "message": message or default},
            "request_id": request_id,
        }
        return web.json_response(
            payload, status=status, headers={"request-id": request_id, **(headers or {})}
        )

    def _refuse(self, request: web.Request, body: Any) -> web.Response | None:
        if not request.headers.get("x-api-key") and not request.headers.get("Authorization"):
            return self._error(401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required")
        if not isinstance(body, dict):
            return self._error(400, "There was an issue with the format of the request body.")
        for name in ("model", "messages", "max_tokens"):
            if not body.get(name):
                return self._error(400, f"{name}: Field required")
        return None

    def _success(self, body: dict[str, Any], reply: FakeReply) -> dict[str, Any]:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": reply.content}],
            "stop_reason": reply.finish_reason or "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": reply.prompt_tokens,
                "output_tokens": reply.completion_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "standard",
            },
        }
