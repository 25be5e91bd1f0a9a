"""REST endpoints of recorded-video analysis (`/api/videos`), on the job runner.

Every endpoint needs the operator token in secured mode: a job reads a URL of the
operator's choosing or holds an uploaded recording.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field

from server.config import Settings
from server.errors import BadRequest
from server.safe_json import JsonRejected, loads
from server.signaling.auth import Principal, authorize_request
from server.signaling.http_api import Api, json_response, validate
from server.video.errors import VideoTooLarge
from server.video.fetch import save_stream
from server.video.jobs import VideoJobs, public_job

LIST_LIMIT_MAX = 200
TEXT_FIELD_MAX = 64 * 1024


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(description="http(s) URL of the video")
    interval_seconds: float | None = Field(
        default=None, description="Seconds of video between analysed frames (default 2)"
    )
    job_data: dict[str, Any] = Field(default_factory=dict)


class VideoJobView(BaseModel):
    id: str
    state: str = Field(
        description="queued | downloading | analysing | done | failed | cancelled | interrupted"
    )
    source: str
    interval_seconds: float
    session_id: str | None
    progress: dict[str, Any]
    error: dict[str, str] | None
    links: dict[str, str | None]


class VideoJobList(BaseModel):
    jobs: list[VideoJobView]
    count: int


async def _read_text(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(8192):
        data += chunk
        if len(data) > TEXT_FIELD_MAX:
            raise BadRequest(f"field {part.name} is too long", code="invalid_field")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"field {part.name} is not UTF-8 text", code="invalid_field") from None


async def _part_chunks(part: BodyPartReader) -> Any:
    while chunk := await part.read_chunk(256 * 1024):
        yield chunk


def register_video_routes(api: Api, jobs: VideoJobs, settings: Settings) -> None:
    def operator(request: web.Request) -> Principal:
        return authorize_request(request, "operator")

    async def upload(request: web.Request) -> dict[str, Any]:
        length = request.content_length
        if length is not None and length > settings.video_max_bytes + TEXT_FIELD_MAX * 4:
            raise VideoTooLarge(f"the upload exceeds the limit of {settings.video_max_bytes} bytes")
        await jobs.admit()  # before receiving a file that could not be queued
        reader = await request.multipart()
        job_id, path = jobs.upload_path()
        saved = False
        filename: str | None = None
        fields: dict[str, str] = {}
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise BadRequest("nested multipart is not supported", code="invalid_field")
                if part.name == "file":
                    if saved:
                        raise BadRequest("only one file per job", code="invalid_field")
                    filename = (part.filename or "")[:255] or None
                    await save_stream(_part_chunks(part), path, settings.video_max_bytes)
                    saved = True
                elif part.name in ("interval_seconds", "job_data"):
                    fields[part.name] = await _read_text(part)
                else:
                    await part.release()
            if not saved:
                raise BadRequest("the upload has no file field", code="missing_field")
            interval: float | None = None
            if "interval_seconds" in fields:
                try:
                    interval = float(fields["interval_seconds"])
                except ValueError:
                    raise BadRequest(
                        "interval_seconds must be a number", code="invalid_field"
                    ) from None
            job_data: Any = {}
            if fields.get("job_data", "").strip():
                try:
                    job_data = loads(fields["job_data"])
                except JsonRejected as exc:
                    raise BadRequest(f"job_data: {exc}", code="invalid_json") from None
                if not isinstance(job_data, dict):
                    raise BadRequest("job_data must be a JSON object", code="invalid_field")
        except BaseException:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise
        return await jobs.submit_upload(job_id, path, filename, interval, job_data)

    @api.route(
        "POST",
        "/api/videos",
        summary="Analyse a recorded video: JSON {url, interval_seconds, job_data} or a "
        "multipart upload (file, interval_seconds, job_data as JSON text)",
        tag="videos",
        request=VideoRequest,
        response=VideoJobView,
        errors=(400, 413, 422, 429),
        operator=True,
    )
    async def create_video_job(request: web.Request) -> web.Response:
        operator(request)
        # Each job starts a session: it counts against SESSION_STARTS_PER_MINUTE, checked
        # before an upload is received, counted once the job is accepted.
        spend = jobs.manager.spend
        await spend.check_start(request.remote)
        if request.content_type.startswith("multipart/"):
            record = await upload(request)
        else:
            raw = await request.read()
            try:
                data = loads(raw) if raw else {}
            except JsonRejected as exc:
                raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None
            body = validate(VideoRequest, data)
            record = await jobs.submit_url(body.url, body.interval_seconds, body.job_data)
        await spend.record_start(request.remote)
        return json_response(public_job(record), status=202)

    @api.route(
        "GET",
        "/api/videos",
        summary="Video jobs, newest first; ?limit=&offset=",
        tag="videos",
        response=VideoJobList,
        errors=(400,),
        operator=True,
    )
    async def list_video_jobs(request: web.Request) -> web.Response:
        operator(request)
        try:
            limit = int(request.query.get("limit", "50"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise BadRequest("limit and offset must be integers", code="invalid_field") from None
        if not (1 <= limit <= LIST_LIMIT_MAX) or offset < 0:
            raise BadRequest(f"limit must be 1..{LIST_LIMIT_MAX}, offset ≥ 0", code="invalid_field")
        records = await jobs.list_jobs(limit, offset)
        return json_response({"jobs": [public_job(r) for r in records], "count": len(records)})

    @api.route(
        "GET",
        "/api/videos/{job_id}",
        summary="A video job: state, progress, failure reason",
        tag="videos",
        response=VideoJobView,
        errors=(404,),
        operator=True,
    )
    async def get_video_job(request: web.Request) -> web.Response:
        operator(request)
        return json_response(public_job(await jobs.get(request.match_info["job_id"])))

    @api.route(
        "GET",
        "/api/videos/{job_id}/report",
        summary="The report of a finished video job (timestamps also in video time)",
        tag="videos",
        errors=(404, 409),
        operator=True,
    )
    async def video_job_report(request: web.Request) -> web.Response:
        operator(request)
        return json_response(await jobs.report(request.match_info["job_id"]))

    @api.route(
        "DELETE",
        "/api/videos/{job_id}",
        summary="Cancel a queued or running job; erase a finished one",
        tag="videos",
        response=VideoJobView,
        errors=(404,),
        operator=True,
    )
    async def delete_video_job(request: web.Request) -> web.Response:
        who = operator(request)
        erased = await jobs.cancel_or_erase(request.match_info["job_id"], who.name or "operator")
        return json_response(public_job(erased))

    @api.route(
        "POST",
        "/api/videos/{job_id}/resume",
        summary="Resume an interrupted job from its last analysed frame",
        tag="videos",
        response=VideoJobView,
        errors=(404, 409, 429),
        operator=True,
    )
    async def resume_video_job(request: web.Request) -> web.Response:
        operator(request)
        record = await jobs.resume(request.match_info["job_id"])
        return json_response(public_job(record), status=202)
