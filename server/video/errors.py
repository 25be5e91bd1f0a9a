"""Errors of the recorded-video service, with the stable codes the API and jobs report."""

from __future__ import annotations

from server.errors import ProctorError


class InvalidUrl(ProctorError):
    """Bad syntax or scheme, or an address the SSRF rules refuse."""

    code = "invalid_url"
    status = 400


class VideoTooLarge(ProctorError):
    code = "video_too_large"
    status = 413


class UnreadableVideo(ProctorError):
    code = "unreadable_video"
    status = 422


class VideoUnreachable(ProctorError):
    """The URL could not be fetched (connection refused, timeout, an HTTP error)."""

    code = "video_unreachable"
    status = 502


class JobNotFound(ProctorError):
    code = "job_not_found"
    status = 404


class JobStateConflict(ProctorError):
    code = "job_state_conflict"
    status = 409
