"""Errors the product reports to clients: each has a stable code and an HTTP status.

Transports map these to their own form (REST JSON body, Socket.IO `error` event, data
channel `error` message); anything else is a bug and is reported as `internal_error`.
"""

from __future__ import annotations


class ProctorError(Exception):
    code = "error"
    status = 400
    #: Seconds for `Retry-After` on a 429 / 503 (None: the transport's default).
    retry_after_s: int | None = None

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ProctorError):
    code = "bad_request"
    status = 400


class Unauthorized(ProctorError):
    code = "unauthorized"
    status = 401


class SessionNotFound(ProctorError):
    code = "session_not_found"
    status = 404


class SessionEnded(ProctorError):
    code = "session_ended"
    status = 409


class ReportNotReady(ProctorError):
    code = "report_not_ready"
    status = 409


class Overloaded(ProctorError):
    code = "overloaded"
    status = 429


class RateLimited(ProctorError):
    """A spend cap refused the request; `retry_after_s` says when it would pass."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class BackendUnavailable(ProctorError):
    code = "backend_unavailable"
    status = 503


#: HTTP status of each refused-frame code (the rest are 400).
FRAME_ERROR_STATUS = {"frame_too_large": 413}


def from_frame_error(exc: Exception) -> ProctorError:
    """A `server.media.frames.FrameError` as the error transports report."""
    code = getattr(exc, "code", "invalid_frame")
    message = getattr(exc, "message", str(exc))
    return ProctorError(message, code=code, status=FRAME_ERROR_STATUS.get(code, 400))


class InternalError(ProctorError):
    """A bug of ours, already logged and counted; the session goes on."""

    code = "internal_error"
    status = 500
