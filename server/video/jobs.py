"""The recorded-video job runner: a bounded queue, `VIDEO_JOBS` workers, every job
persisted in the store so a restart resumes queued jobs and marks running ones
`interrupted`.

A job is fetch (URL jobs) → probe → a `video` session whose clock is the video's: frame
k's capture time is `session.started_at + its video time`, so rules, report and evidence
count video time. Frames are submitted one at a time and each result awaited before the
next, so none is dropped; the session has `background` priority, so live candidates get
the analyser budget first.

Resumption: an interrupted job keeps its session (`interrupted` in the store) and its
file. `resume` reopens that same session in the manager (`reopen_session`: same id, clock
and counters, aggregate rebuilt from the stored frames) and the sampler continues at the
first sample after the last stored frame, so the job still has one session and one report.

In a cluster (a `JobQueue`, REDIS_URL: `server.cluster.video_queue`) jobs are not queued
in this process: a job is written to the store, then put on the Redis queue, and whichever
node's worker takes it runs it here (`run_from_queue`). The store stays the record of
every job and the arbiter between nodes:
- a node runs a job only after claiming it with a conditional UPDATE (`queued` → running,
  with its owner token), so a job delivered twice (a Redis restart, a re-enqueue) runs
  once;
- the owner renews a lease on it (NODE_LEASE_S) and checks, at each renewal, for a cancel
  asked from another node; every node sweeps for running jobs whose lease lapsed (their
  node died) and makes them `interrupted`, resumable from any node;
- progress is written by the owner only while it holds the job, so any node's GET
  answers from the store;
- queued jobs are (re-)enqueued from the store at start, on every Redis reconnect and at
  each sweep, under the job's id and run number, so Redis may lose everything.
An upload is written to VIDEO_WORK_DIR on the node that receives it and read by the node
that runs it: in a cluster that directory must be shared by the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from server.config import Settings
from server.errors import BackendUnavailable, Overloaded, ProctorError
from server.media.frames import Frame, FrameError
from server.session.live_session import LiveSession
from server.session.manager import SessionManager
from server.session.store import StoreError
from server.video.errors import JobNotFound, JobStateConflict, UnreadableVideo, VideoTooLarge
from server.video.fetch import FetchLimits, FetchProgress, UrlGuard, fetch_to_file
from server.video.frames import FrameSampler, VideoInfo, probe, sample_count
from server.video.report import video_report

log = logging.getLogger(__name__)
T = TypeVar("T")

State = Literal["queued", "downloading", "analysing", "done", "failed", "cancelled", "interrupted"]
RUNNING: frozenset[str] = frozenset({"downloading", "analysing"})
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled"})
ProgressCallback = Callable[["Job"], Awaitable[None] | None]


class JobQueue(Protocol):
    """The cluster's job queue (`server.cluster.video_queue.VideoQueue`)."""

    node_id: str
    #: Set by `VideoJobs`: runs a job the queue delivered (its id); answers what it did.
    runner: Callable[[str], Awaitable[str]] | None

    async def enqueue(self, job_id: str, run: int, *, how: str = "submitted") -> bool: ...

    async def release_stuck(self, job_id: str, run: int) -> None: ...

    def pause(self) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Progress:
    frames_done: int = 0
    frames_total: int = 0
    video_seconds_done: float = 0.0
    video_seconds_total: float = 0.0
    bytes_done: int = 0
    bytes_total: int | None = None
    eta_s: float | None = None

    @property
    def percent(self) -> float:
        if self.frames_total:
            return round(100.0 * self.frames_done / self.frames_total, 1)
        return 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "percent": self.percent}


@dataclass
class Job:
    id: str
    source: Literal["url", "upload", "file"]  # "file": a local path (CLI), never deleted
    interval_seconds: float
    job_data: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    state: State = "queued"
    url: str | None = None
    filename: str | None = None
    file: str | None = None  # the downloaded or uploaded file while the job needs it
    video: dict[str, Any] | None = None
    session_id: str | None = None
    progress: Progress = field(default_factory=Progress)
    error: dict[str, str] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    node: str | None = None  # the node running it, or that ran it last (cluster)
    runs: int = 0  # times it was queued to run (cluster: its queue id is id:runs)
    # Not persisted: this process's bookkeeping.
    cancel_requested: bool = field(default=False, repr=False)
    owner: str | None = field(default=None, repr=False)  # claim token while it runs here
    lease_lost: bool = field(default=False, repr=False)
    run_started: float = field(default=0.0, repr=False)
    run_first_frame: int = field(default=0, repr=False)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "interval_seconds": self.interval_seconds,
            "job_data": self.job_data,
            "created_at": self.created_at,
            "state": self.state,
            "url": self.url,
            "filename": self.filename,
            "file": self.file,
            "video": self.video,
            "session_id": self.session_id,
            "progress": self.progress.to_json(),
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
            "node": self.node,
            "runs": self.runs,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Job:
        p = dict(r.get("progress") or {})
        p.pop("percent", None)
        return cls(
            id=r["id"],
            source=r["source"],
            interval_seconds=float(r["interval_seconds"]),
            job_data=r.get("job_data") or {},
            created_at=float(r["created_at"]),
            state=r["state"],
            url=r.get("url"),
            filename=r.get("filename"),
            file=r.get("file"),
            video=r.get("video"),
            session_id=r.get("session_id"),
            progress=Progress(**p),
            error=r.get("error"),
            started_at=r.get("started_at"),
            finished_at=r.get("finished_at"),
            updated_at=float(r.get("updated_at") or r["created_at"]),
            node=r.get("node"),
            runs=int(r.get("runs") or 0),
        )


def public_job(record: dict[str, Any], base: str = "/api/videos") -> dict[str, Any]:
    """A job as the API shows it (no server paths)."""
    out = {k: v for k, v in record.items() if k != "file"}
    jid = record["id"]
    out["links"] = {
        "self": f"{base}/{jid}",
        "report": f"{base}/{jid}/report",
        "resume": f"{base}/{jid}/resume",
        "session_report": f"/api/sessions/{record['session_id']}/report"
        if record.get("session_id")
        else None,
    }
    return out


class VideoJobs:
    def __init__(
        self,
        manager: SessionManager,
        settings: Settings,
        guard: UrlGuard | None = None,
        on_progress: ProgressCallback | None = None,
        queue: JobQueue | None = None,
    ) -> None:
        """`queue`: the cluster's job queue (REDIS_URL); None: this process' own."""
        self.manager = manager
        self.settings = settings
        self.guard = guard or UrlGuard(settings.video_url_allow)
        self.on_progress = on_progress
        self.work_dir = Path(settings.video_work_dir)
        self._jobs: dict[str, Job] = {}  # every job not finished, plus those that ran here
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=max(1, settings.video_queue_max))
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.queue = queue
        if queue is not None:
            queue.runner = self.run_from_queue
        self._sweeper: asyncio.Task[None] | None = None
        self.lease_s = max(1.0, settings.node_lease_s)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """After the manager started: queued jobs go back in the queue, jobs that were
        running when the last process stopped become `interrupted`. In a cluster: jobs
        whose node stopped renewing its lease become `interrupted` (now and at every
        sweep); queued ones are enqueued when Redis answers (`requeue_from_store`)."""
        await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True)
        if self.queue is not None:
            await self._interrupt_lapsed()
            await self.queue.start()
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="video-sweeper")
            return
        store = self.manager.store
        pending = await store.list_video_jobs(
            limit=100_000, states=("queued", "downloading", "analysing")
        )
        for record in reversed(pending):  # oldest first
            job = Job.from_record(record)
            self._jobs[job.id] = job
            if job.state in RUNNING:
                job.state = "interrupted"
                job.progress.eta_s = None
                await self._save(job)
                log.warning("video job %s was running at the last stop: interrupted", job.id)
            elif not self._queue.full():
                self._queue.put_nowait(job.id)
        for record in await store.list_video_jobs(limit=100_000, states=("interrupted",)):
            self._jobs.setdefault(record["id"], Job.from_record(record))
        for i in range(max(1, self.settings.video_jobs)):
            self._workers.append(asyncio.create_task(self._worker(), name=f"video-worker-{i}"))

    async def stop(self) -> None:
        """Before the manager stops: running jobs become `interrupted` (their sessions
        too), resumable after the restart."""
        self._stopping = True
        if self.queue is not None:
            await self._stop_cluster()
            return
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()

    # --- submitting -----------------------------------------------------------------

    def check_interval(self, value: float | None) -> float:
        s = self.settings
        interval = s.video_interval_default_s if value is None else value
        if not isinstance(interval, int | float) or not math.isfinite(interval):
            raise ProctorError("interval_seconds must be a number", code="invalid_field")
        if not s.video_interval_min_s <= interval <= s.video_interval_max_s:
            raise ProctorError(
                f"interval_seconds must be {s.video_interval_min_s}..{s.video_interval_max_s}",
                code="invalid_field",
            )
        return float(interval)

    async def admit(self) -> None:
        """Raise 429 `too_many_jobs` when the queue is full (in a cluster: the jobs
        queued or running on every node, from the store)."""
        await self._admit()

    async def _admit(self) -> None:
        if self.queue is not None:
            active = await self.manager.store.count_video_jobs(("queued", *sorted(RUNNING)))
            if active >= self.settings.video_queue_max:
                raise Overloaded(
                    f"{active} video jobs are queued or running in the cluster; the limit is "
                    f"{self.settings.video_queue_max}",
                    code="too_many_jobs",
                )
            return
        active = sum(1 for j in self._jobs.values() if j.state == "queued" or j.state in RUNNING)
        if active >= self.settings.video_queue_max or self._queue.full():
            raise Overloaded(
                f"{active} video jobs are queued or running; the limit is "
                f"{self.settings.video_queue_max}",
                code="too_many_jobs",
            )

    async def submit_url(
        self, url: str, interval: float | None, job_data: dict[str, Any]
    ) -> dict[str, Any]:
        interval = self.check_interval(interval)
        await self._admit()
        checked = await self.guard.check(url)  # 400 invalid_url before anything is queued
        job = Job(secrets.token_urlsafe(12), "url", interval, job_data, url=checked.url)
        return await self._enqueue(job)

    def upload_path(self) -> tuple[str, Path]:
        job_id = secrets.token_urlsafe(12)
        return job_id, self.work_dir / f"{job_id}.video"

    async def submit_upload(
        self,
        job_id: str,
        path: Path,
        filename: str | None,
        interval: float | None,
        job_data: dict[str, Any],
    ) -> dict[str, Any]:
        """The upload is already on disk under the size cap; it is probed here so an
        unreadable file is refused (422) before the answer."""
        try:
            interval = self.check_interval(interval)
            await self._admit()
            info = await asyncio.to_thread(probe, path)
            self._check_duration(info)
        except BaseException:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise
        job = Job(job_id, "upload", interval, job_data, filename=filename, file=str(path))
        self._set_video(job, info)
        return await self._enqueue(job)

    async def submit_local(
        self, path: Path, interval: float | None, job_data: dict[str, Any]
    ) -> dict[str, Any]:
        """A video already on this machine (`proctor analyze FILE`): read in place."""
        interval = self.check_interval(interval)
        await self._admit()
        info = await asyncio.to_thread(probe, path)
        self._check_duration(info)
        job = Job(
            secrets.token_urlsafe(12),
            "file",
            interval,
            job_data,
            filename=path.name,
            file=str(path),
        )
        self._set_video(job, info)
        return await self._enqueue(job)

    async def _enqueue(self, job: Job) -> dict[str, Any]:
        job.runs += 1
        if self.queue is not None:
            # In the store (committed) before any node can take it from the queue; if
            # Redis is down it stays queued there and is enqueued when Redis is back.
            await self._save(job)
            await self._flush_or_503()
            await self.queue.enqueue(job.id, job.runs)
            return job.to_record()
        self._jobs[job.id] = job
        await self._save(job)
        self._queue.put_nowait(job.id)  # _admit made room
        return job.to_record()

    async def _flush_or_503(self) -> None:
        try:
            await self.manager.store.flush()
        except StoreError as exc:
            raise BackendUnavailable(
                "the job could not be stored yet; retry", code="store_unavailable"
            ) from exc

    # --- queries and control --------------------------------------------------------------

    async def get(self, job_id: str) -> dict[str, Any]:
        job = self._jobs.get(job_id)
        if job is not None:
            return job.to_record()
        record = await self.manager.store.get_video_job(job_id)
        if record is None:
            raise JobNotFound(f"no video job with id {job_id}")
        return record

    async def list_jobs(self, limit: int, offset: int) -> list[dict[str, Any]]:
        await self.manager.store.flush()
        records = await self.manager.store.list_video_jobs(limit=limit, offset=offset)
        # The in-memory state of a running job is newer than its last saved progress.
        return [self._jobs[r["id"]].to_record() if r["id"] in self._jobs else r for r in records]

    async def report(self, job_id: str) -> dict[str, Any]:
        record = await self.get(job_id)
        if record["state"] != "done" and record["state"] not in ("cancelled", "interrupted"):
            raise JobStateConflict(
                f"video job {job_id} is {record['state']}; its report is not ready",
                code="report_not_ready",
            )
        if not record.get("session_id"):
            raise JobStateConflict(f"video job {job_id} analysed no frame", code="report_not_ready")
        report = await self.manager.report(record["session_id"])
        session = await self.manager.store.get_session(record["session_id"])
        started = float(session["started_at"]) if session else float(record["started_at"] or 0)
        return video_report(report, record, started)

    async def cancel_or_erase(self, job_id: str, actor: str = "operator") -> dict[str, Any]:
        """Cancel a queued or running job; erase a finished or interrupted one (its
        session, frames, alerts and report too; audited under `actor`)."""
        if self.queue is not None and job_id not in self._running:
            return await self._cancel_or_erase_anywhere(job_id, actor)
        record = await self.get(job_id)
        job = self._jobs.get(job_id) or Job.from_record(record)
        if job.state == "queued":
            self._finish(job, "cancelled")
            await self._discard_file(job)
            await self._save(job)
            return job.to_record()
        if job.state in RUNNING:
            job.cancel_requested = True
            task = self._running.get(job.id)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            return job.to_record()
        await self._discard_file(job)
        if job.session_id:
            await self.manager.store.erase_session(job.session_id)
            await self.manager.audit.record(
                actor, "erase", job.session_id, {"video_job": job.id, "state": job.state}
            )
        await self.manager.store.delete_video_job(job.id)
        self._jobs.pop(job.id, None)
        # Answer "erased" only once it is: a GET right after must not find the job.
        try:
            await self.manager.store.flush()
        except StoreError as exc:
            raise BackendUnavailable(
                "the erase could not be stored yet; retry", code="store_unavailable"
            ) from exc
        return {**job.to_record(), "state": "erased"}

    async def forget_session(self, session_id: str) -> None:
        """The session is being erased (DELETE /api/sessions/{id}, retention): its job
        stops if it runs and is forgotten; its row goes with the session's data."""
        for job in [j for j in self._jobs.values() if j.session_id == session_id]:
            if job.state == "queued":
                self._finish(job, "cancelled")
            elif job.state in RUNNING:
                job.cancel_requested = True
                task = self._running.get(job.id)
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(task)
            await self._discard_file(job)
            self._jobs.pop(job.id, None)

    async def resume(self, job_id: str) -> dict[str, Any]:
        record = await self.get(job_id)
        if record["state"] != "interrupted":
            raise JobStateConflict(
                f"video job {job_id} is {record['state']}; only an interrupted job resumes"
            )
        await self._admit()
        job = self._jobs.get(job_id) or Job.from_record(record)
        job.state, job.error = "queued", None
        if self.queue is not None:
            return await self._resume_anywhere(job)
        return await self._enqueue(job)

    # --- running --------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            job = self._jobs.get(job_id)
            if job is None or job.state != "queued":
                continue
            task = asyncio.create_task(self._run(job), name=f"video-{job.id[:8]}")
            self._running[job.id] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is None or not me.cancelling():
                    continue  # the job was cancelled (DELETE), not this worker
                # The worker is being stopped (shutdown): the job stops too.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise
            finally:
                self._running.pop(job.id, None)

    async def _run(self, job: Job) -> None:
        session: LiveSession | None = None
        try:
            path = await self._ensure_file(job)
            info = await asyncio.to_thread(probe, path)
            self._check_duration(info)
            self._set_video(job, info)
            session, start_index = await self._open_session(job, info)
            await self._analyse(job, session, path, info, start_index)
            await self.manager.end_session(
                session.id, reason="video_complete", ended_at=session.started_at + info.duration_s
            )
            self._finish(job, "done")
            await self._discard_file(job)
        except asyncio.CancelledError:
            if job.cancel_requested or not (self._stopping or job.lease_lost):
                self._finish(job, "cancelled")
                if session is not None:
                    await self._end_quietly(session, "video_cancelled", job)
                await self._discard_file(job)
            else:
                job.state = "interrupted"
                job.progress.eta_s = None
                if session is not None:
                    await self.manager.suspend_session(session.id)
            await self._save(job)
            raise
        except ProctorError as exc:
            self._fail(job, exc.code, exc.message)
            if session is not None:
                await self._end_quietly(session, "video_failed", job)
            await self._discard_file(job)
        except Exception as exc:  # a bug in one job must not touch another
            log.exception("video job %s failed", job.id)
            self._fail(job, "internal_error", f"internal error: {type(exc).__name__}")
            if session is not None:
                await self._end_quietly(session, "video_failed", job)
            await self._discard_file(job)
        await self._save(job)

    async def _ensure_file(self, job: Job) -> Path:
        if job.file is not None:
            kept = Path(job.file)
            if await asyncio.to_thread(kept.is_file):
                return kept
        if job.source != "url" or not job.url:
            raise UnreadableVideo("the uploaded file is no longer available")
        job.state = "downloading"
        job.started_at = job.started_at or time.time()
        await self._save(job)
        dest = self.work_dir / f"{job.id}.video"
        fetched = FetchProgress()

        async def report_bytes() -> None:
            while True:
                await asyncio.sleep(self.settings.video_progress_save_s)
                job.progress.bytes_done = fetched.bytes_done
                job.progress.bytes_total = fetched.bytes_total
                await self._notify(job)

        reporter = asyncio.create_task(report_bytes())
        try:
            limits = FetchLimits(self.settings.video_max_bytes, self.settings.video_fetch_timeout_s)
            await fetch_to_file(job.url, dest, self.guard, limits, fetched)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        job.progress.bytes_done = fetched.bytes_done
        job.progress.bytes_total = fetched.bytes_total or fetched.bytes_done
        job.file = str(dest)
        await self._save(job)
        return dest

    def _check_duration(self, info: VideoInfo) -> None:
        if info.duration_s > self.settings.video_max_duration_s:
            raise VideoTooLarge(
                f"the video lasts {info.duration_s:.0f} s; the limit is "
                f"{self.settings.video_max_duration_s:.0f} s"
            )

    def _set_video(self, job: Job, info: VideoInfo) -> None:
        job.video = info.to_json()
        job.progress.frames_total = sample_count(info.duration_s, job.interval_seconds)
        job.progress.video_seconds_total = round(info.duration_s, 3)

    async def _open_session(self, job: Job, info: VideoInfo) -> tuple[LiveSession, int]:
        if job.session_id is None:
            session = await self.manager.start_session(
                job.job_data, transport="video", started_at=time.time(), priority="background"
            )
            job.session_id = session.id
            return session, 0
        session = await self.manager.reopen_session(job.session_id, priority="background")
        if session.last_frame_at is None:
            return session, 0
        # Sample k shows the frame on screen at k·interval, so its time lies in
        # ((k-1)·interval, k·interval]. The saved progress (written after its frames, on
        # the same ordered store queue) covers a frame shown at several sample times.
        last_video_t = session.last_frame_at - session.started_at
        last_k = math.ceil(last_video_t / job.interval_seconds - 1e-6)
        return session, max(last_k + 1, job.progress.frames_done)

    async def _analyse(
        self, job: Job, session: LiveSession, path: Path, info: VideoInfo, start_index: int
    ) -> None:
        job.state = "analysing"
        job.started_at = job.started_at or time.time()
        job.run_started, job.run_first_frame = time.monotonic(), start_index
        job.progress.frames_done = start_index
        await self._save(job)
        sampler = FrameSampler(
            path,
            info,
            job.interval_seconds,
            start_index=start_index,
            seek_min_gap_s=self.settings.video_seek_min_gap_s,
        )
        samples = ThreadIterator(iter(sampler))
        last_save = time.monotonic()
        try:
            while True:
                sample = await samples.next()
                if sample is None:
                    break
                frame = Frame.from_bgr(
                    sample.image, captured_at=session.started_at + sample.video_time_s
                )
                try:
                    await self.manager.submit(session, frame)
                except FrameError as exc:  # one bad frame does not fail the video
                    log.warning("video job %s: frame %d refused: %s", job.id, sample.index, exc)
                self._advance(job, sample.index + 1, sample.video_time_s)
                if time.monotonic() - last_save >= self.settings.video_progress_save_s:
                    last_save = time.monotonic()
                    await self._save(job)
        finally:
            await samples.close()
        job.progress.frames_total = max(job.progress.frames_done, 1)
        job.progress.video_seconds_done = job.progress.video_seconds_total
        job.progress.eta_s = 0.0

    def _advance(self, job: Job, frames_done: int, video_t: float) -> None:
        p = job.progress
        p.frames_done = frames_done
        p.frames_total = max(p.frames_total, frames_done)
        p.video_seconds_done = round(min(video_t + job.interval_seconds, p.video_seconds_total), 3)
        done_here = frames_done - job.run_first_frame
        elapsed = time.monotonic() - job.run_started
        remaining = p.frames_total - frames_done
        p.eta_s = round(elapsed / done_here * remaining, 1) if done_here else None

    async def _end_quietly(self, session: LiveSession, reason: str, job: Job) -> None:
        """End a cancelled or failed job's session: what was analysed keeps a report."""
        try:
            await self.manager.end_session(session.id, reason=reason, use_llm=False)
        except ProctorError:
            pass
        except Exception:
            log.exception("video job %s: ending its session failed", job.id)

    def _finish(self, job: Job, state: State) -> None:
        job.state = state
        job.finished_at = time.time()
        job.progress.eta_s = None if state != "done" else 0.0

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._finish(job, "failed")
        job.error = {"code": code, "message": message}
        log.info("video job %s failed: %s (%s)", job.id, code, message)

    async def _discard_file(self, job: Job) -> None:
        if job.source == "file":
            return  # the user's own file
        if job.file:
            await asyncio.to_thread(Path(job.file).unlink, missing_ok=True)
            job.file = None
        if job.source == "url":  # a partial download
            await asyncio.to_thread((self.work_dir / f"{job.id}.video").unlink, missing_ok=True)

    async def _save(self, job: Job) -> None:
        job.updated_at = time.time()
        if job.owner is not None:  # running here in a cluster: only while it holds the job
            await self.manager.store.save_owned_video_job(job.to_record(), job.owner)
        else:
            await self.manager.store.save_video_job(job.to_record())
        await self._notify(job)

    async def _notify(self, job: Job) -> None:
        if self.on_progress is not None:
            result = self.on_progress(job)
            if result is not None:
                await result

    # --- the cluster (a JobQueue) --------------------------------------------------------

    async def run_from_queue(self, job_id: str) -> str:
        """Run a job the cluster's queue delivered to this node, if this node is the one
        that claims it in the store (a job delivered twice runs once). What happened."""
        assert self.queue is not None
        if self._stopping:
            return "stopping"  # still queued in the store: the next sweep enqueues it again
        store = self.manager.store
        try:
            record = await store.get_video_job(job_id)
            if record is None or record["state"] != "queued":
                return "gone" if record is None else f"not queued ({record['state']})"
            job = Job.from_record(record)
            job.owner = f"{self.queue.node_id}/{secrets.token_hex(4)}"
            job.node = self.queue.node_id
            job.state = "downloading" if job.source == "url" and not job.file else "analysing"
            job.updated_at = time.time()
            if not await store.claim_video_job(
                job.to_record(), job.owner, time.time() + self.lease_s
            ):
                return "taken"
        except StoreError as exc:  # stays queued: enqueued again at the next sweep
            log.warning("video job %s could not be claimed: %s", job_id, exc)
            return "store_unavailable"
        log.info("video job %s runs on this node (%s)", job.id, job.node)
        self._jobs[job.id] = job
        task = asyncio.create_task(self._run(job), name=f"video-{job.id[:8]}")
        self._running[job.id] = task
        holder = asyncio.create_task(self._hold_lease(job, task), name=f"lease-{job.id[:8]}")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # the queue's worker is being stopped
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise
            # Otherwise the job itself was cancelled (DELETE, lease lost, shutdown).
        except Exception as exc:  # _run handles its own failures: a bug, counted
            self.manager.internal_error("video_job", exc)
        finally:
            holder.cancel()
            self._running.pop(job.id, None)
            self._jobs.pop(job.id, None)
        with contextlib.suppress(StoreError):  # other nodes read the outcome from the store
            await store.flush()
        return job.state

    async def _hold_lease(self, job: Job, task: asyncio.Task[None]) -> None:
        """Renew the job's lease while it runs; a cancel asked from any node, or the
        lease taken away (this node was thought dead), stops it here."""
        assert job.owner is not None
        store = self.manager.store
        every = max(0.2, min(1.0, self.lease_s / 3))
        renewed = time.monotonic()
        while not task.done():
            await asyncio.sleep(every)
            try:
                held, cancel = await store.renew_video_lease(
                    job.id, job.owner, time.time() + self.lease_s
                )
                renewed = time.monotonic()
            except StoreError as exc:
                log.warning("video job %s: lease not renewed: %s", job.id, exc)
                if time.monotonic() - renewed < self.lease_s:
                    continue
                held, cancel = False, False
            except Exception as exc:  # the holder must not die silently: stop the job
                self.manager.internal_error("video_lease", exc)
                held, cancel = False, False
            if cancel:
                job.cancel_requested = True
                task.cancel()
                return
            if not held:
                job.lease_lost = True
                log.warning("video job %s: its lease was lost; stopped on this node", job.id)
                task.cancel()
                return

    async def _interrupt_lapsed(self) -> None:
        """Running jobs whose node stopped renewing their lease (it died) become
        `interrupted`, their sessions too: resumable from any node."""
        store = self.manager.store
        now = time.time()
        for record, owner in await store.lapsed_video_jobs(now):
            if record["id"] in self._running:
                continue  # ours: the renewal is only late
            job = Job.from_record(record)
            was = job.state
            job.state = "interrupted"
            job.progress.eta_s = None
            job.updated_at = now
            if not await store.replace_video_job(job.to_record(), was, owner):
                continue  # renewed, finished or taken by another node's sweep meanwhile
            if job.session_id:
                # At once, as the session reaper does (the job already reads `interrupted`,
                # and a resume from any node must find its session so too); if this fails,
                # the reaper marks it when the dead node's lease lapses.
                try:
                    await store.interrupt_sessions([job.session_id], "node_lost")
                except StoreError as exc:
                    log.warning("video job %s: its session not marked yet: %s", job.id, exc)
            log.warning(
                "video job %s: node %s stopped renewing its lease: interrupted (resumable)",
                job.id,
                job.node or "?",
            )

    async def requeue_from_store(self) -> None:
        """Put every job the store says is queued on the Redis queue (at start, on every
        Redis reconnect, at each sweep): idempotent, one queue entry per job and run."""
        if self.queue is None or self._stopping:
            return
        now = time.time()
        records = await self.manager.store.list_video_jobs(limit=100_000, states=("queued",))
        for record in reversed(records):  # oldest first
            job = Job.from_record(record)
            added = await self.queue.enqueue(job.id, job.runs, how="reenqueued")
            if not added and now - job.updated_at > self.lease_s:
                # On the queue, queued in the store for a whole lease: a delivery that
                # was lost half-way (Redis failed under it) may hold it.
                await self.queue.release_stuck(job.id, job.runs)

    async def _sweep_loop(self) -> None:
        every = max(0.5, self.lease_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self._interrupt_lapsed()
                await self.requeue_from_store()
            except StoreError as exc:
                log.warning("video job sweep: %s", exc)
            except Exception as exc:  # the sweeper must keep sweeping
                self.manager.internal_error("video_sweeper", exc)

    async def _stored(self, job_id: str) -> dict[str, Any]:
        await self.manager.store.flush()
        record = await self.manager.store.get_video_job(job_id)
        if record is None:
            raise JobNotFound(f"no video job with id {job_id}")
        return record

    async def _cancel_or_erase_anywhere(self, job_id: str, actor: str) -> dict[str, Any]:
        """A job not running on this node: cancel it in the store if queued, ask its node
        to cancel it if running (it notices at its next lease renewal), else erase it."""
        store = self.manager.store
        record = await self._stored(job_id)
        if record["state"] == "queued":
            job = Job.from_record(record)
            self._finish(job, "cancelled")
            job.updated_at = time.time()
            if await store.replace_video_job(job.to_record(), "queued"):
                await self._discard_file(job)
                await store.save_video_job(job.to_record())  # without its file
                await self._flush_or_503()
                return job.to_record()
            record = await self._stored(job_id)  # claimed meanwhile: it runs somewhere
        if record["state"] in RUNNING:
            await store.request_video_cancel(job_id)
            deadline = time.monotonic() + max(10.0, 2 * self.lease_s)
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                now = await store.get_video_job(job_id)
                if now is None:
                    raise JobNotFound(f"no video job with id {job_id}")
                record = now
                if record["state"] not in RUNNING:
                    break
            return record
        job = Job.from_record(record)
        await self._discard_file(job)
        if job.session_id:
            await store.erase_session(job.session_id)
            await self.manager.audit.record(
                actor, "erase", job.session_id, {"video_job": job.id, "state": job.state}
            )
        await store.delete_video_job(job.id)
        try:
            await store.flush()
        except StoreError as exc:
            raise BackendUnavailable(
                "the erase could not be stored yet; retry", code="store_unavailable"
            ) from exc
        return {**job.to_record(), "state": "erased"}

    async def _resume_anywhere(self, job: Job) -> dict[str, Any]:
        """Queue an interrupted job again, once however many nodes are asked at once."""
        assert self.queue is not None
        job.runs += 1
        job.node = None
        job.updated_at = time.time()
        if not await self.manager.store.replace_video_job(job.to_record(), "interrupted"):
            raise JobStateConflict(f"video job {job.id} was resumed or erased meanwhile")
        await self.queue.enqueue(job.id, job.runs)
        return job.to_record()

    async def _stop_cluster(self) -> None:
        """Running jobs become `interrupted` (resumable on any node); the queue's worker
        stops taking jobs first."""
        assert self.queue is not None
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper}, timeout=1.0)
            self._sweeper = None
        self.queue.pause()
        running = list(self._running.values())
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=self.settings.shutdown_timeout_s)
        await self.queue.stop()


class ThreadIterator(Generic[T]):
    """A blocking iterator stepped in worker threads. A cancelled `next()` leaves its
    step running in the thread; `close()` waits for it before closing the generator
    (the sampler holds the file and the decoder)."""

    def __init__(self, iterator: Iterator[T]) -> None:
        self._it = iterator
        self._step: asyncio.Future[T | None] | None = None

    async def next(self) -> T | None:
        loop = asyncio.get_running_loop()
        self._step = loop.run_in_executor(None, next, self._it, None)
        return await asyncio.shield(self._step)

    async def close(self) -> None:
        step = self._step
        if step is not None and not step.done():
            await asyncio.wait([step])
        close = getattr(self._it, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
