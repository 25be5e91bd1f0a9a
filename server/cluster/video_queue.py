"""The recorded-video job queue of a cluster (REDIS_URL), on arq.

A job's entry on the queue is only a pointer: the function name and the job id, under
the arq job id `<job id>:<run>` (run: how many times the job was queued), so enqueueing
the same run twice is a no-op and a resumed job gets a fresh entry. Everything else — the
job's record, progress, who runs it, a cancel — is in the store (`server.video.jobs`),
which also decides who runs a job that arq delivers twice. So Redis may forget
everything (tests run it without persistence): nodes enqueue again what the store says
is queued.

Every node runs one arq worker in process, an owned task started and stopped with the
app, taking up to VIDEO_JOBS jobs at a time. arq's own retries are off (a job cancelled
or failed here is the store's business) and results are not kept. The worker's poll loop
stops when Redis fails under it; the task waits for the link to be up again and restarts
the same worker (its running jobs and counts carry on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func
from redis.asyncio import Redis

from server.cluster.redis_link import PREFIX, REDIS_ERRORS, RedisLink
from server.config import Settings
from server.observability import Instruments

log = logging.getLogger(__name__)

FUNCTION = "proctor_video_job"
QUEUE = PREFIX + "video_jobs"
#: arq gives a job this long before it cancels it; ours run as long as the video needs.
JOB_TIMEOUT_S = 7 * 86_400


class VideoQueue:
    def __init__(self, link: RedisLink, settings: Settings, instruments: Instruments) -> None:
        self.link = link
        self.settings = settings
        self.instruments = instruments
        self.node_id = link.node_id
        self.runner: Callable[[str], Awaitable[str]] | None = None
        self.arq = ArqRedis(connection_pool=link.pool, default_queue_name=QUEUE)
        self.depth: int | None = None  # entries on the queue (waiting or running), cached
        self._worker: Worker | None = None
        self._supervisor: asyncio.Task[None] | None = None
        link.add_probe(self._probe)

    @property
    def up(self) -> bool:
        return self.link.up

    async def _probe(self, client: Redis) -> None:
        self.depth = int(await client.zcard(QUEUE))

    # --- enqueueing ----------------------------------------------------------------------

    @staticmethod
    def arq_id(job_id: str, run: int) -> str:
        return f"{job_id}:{run}"

    async def enqueue(self, job_id: str, run: int, *, how: str = "submitted") -> bool:
        """Put the job's run on the queue; False when it already is (or Redis is down:
        the job stays queued in the store and is enqueued when Redis is back)."""
        if self.link.checked and not self.link.up:
            return False
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s * 4 + 0.5):
                job = await self.arq.enqueue_job(
                    FUNCTION, job_id, _job_id=self.arq_id(job_id, run), _queue_name=QUEUE
                )
        except REDIS_ERRORS as exc:
            self.link.failed("video_queue", exc)
            return False
        if job is None:
            return False
        self.instruments.video_jobs_enqueued.labels(how=how).inc()
        if how != "submitted":
            log.info("video job %s (run %d) put on the queue again from the store", job_id, run)
        return True

    async def release_stuck(self, job_id: str, run: int) -> None:
        """Free an entry marked in progress that nobody runs (the store says queued)."""
        key = in_progress_key_prefix + self.arq_id(job_id, run)
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s * 2 + 0.2):
                removed = await self.link.client.delete(key)
        except REDIS_ERRORS as exc:
            self.link.failed("video_queue", exc)
            return
        if removed:
            log.warning("video job %s: its queue entry was held by a lost delivery: freed", job_id)

    # --- the worker ----------------------------------------------------------------------

    async def _run_job(self, ctx: dict[str, Any], job_id: str) -> str:
        assert self.runner is not None, "VideoJobs sets the runner"
        return await self.runner(job_id)

    async def start(self) -> None:
        self._worker = Worker(
            functions=[
                func(
                    self._run_job,
                    name=FUNCTION,
                    max_tries=1_000,  # redeliveries are harmless: the store claim decides
                    timeout=JOB_TIMEOUT_S,
                    keep_result=0,
                )
            ],
            redis_pool=self.arq,
            queue_name=QUEUE,
            max_jobs=max(1, self.settings.video_jobs),
            handle_signals=False,
            job_timeout=JOB_TIMEOUT_S,
            keep_result=0,
            poll_delay=0.25,
            retry_jobs=False,
            max_tries=1_000,
            health_check_interval=60,
            log_results=False,
        )
        self._supervisor = asyncio.create_task(self._supervise(), name="video-queue-worker")

    async def _supervise(self) -> None:
        assert self._worker is not None
        while True:
            await self.link.wait_up()
            try:
                await self._worker.main()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.link.failed("video_queue", exc)
            except Exception:  # the worker must come back whatever stopped it
                log.exception("video queue worker error; restarting it")
                self.instruments.internal_errors.labels(where="video_queue").inc()
            await asyncio.sleep(self.settings.redis_ping_interval_s)

    @property
    def running(self) -> int:
        return 0 if self._worker is None else sum(
            not t.done() for t in self._worker.tasks.values()
        )

    def pause(self) -> None:
        """Take no more jobs (shutdown: before the running ones are stopped)."""
        if self._worker is not None:
            self._worker.allow_pick_jobs = False
        if self._supervisor is not None:
            self._supervisor.cancel()

    async def stop(self) -> None:
        self.pause()
        if self._supervisor is not None:
            await asyncio.wait({self._supervisor}, timeout=1.0)
            self._supervisor = None
        if self._worker is None:
            return
        tasks = [t for t in self._worker.tasks.values() if not t.done()]
        if tasks:  # their jobs were stopped: what is left is arq's own bookkeeping
            _done, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=0.5)
        for task in tasks:
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.exception()

    def to_json(self) -> dict[str, Any]:
        return {"name": QUEUE, "depth": self.depth, "running_here": self.running}
