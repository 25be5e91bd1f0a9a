"""Recorded-video jobs on the cluster's Redis queue (REDIS_URL, arq): two nodes sharing one
store and one real Redis. The store is the arbiter between the nodes, so each test runs
on both engines: PostgreSQL (what a cluster runs) and one SQLite file (WAL works across
processes on one machine).
A job submitted on one node runs on some node and is readable from both; a cancel from
the other node reaches it; a Redis restart loses the queue but not the queued job (the
store re-enqueues it); a node SIGKILLed mid-job leaves its job `interrupted` once its
lease lapses, resumable from the survivor."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.app import REDIS
from tests.cluster_kit import SECRET, start_node
from tests.conftest import RunningServer, serve_subprocess
from tests.fakes.rekognition import FakeRekognition
from tests.services import RedisServer
from tests.test_video_api import (
    TERMINAL,
    post_upload,
    stored_frames,
    video_settings,
    wait_state,
)
from tests.video_media import make_video

LEASE_S = 1.5


@pytest.fixture(params=["postgresql", "sqlite"])
def store_engine(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The nodes' shared store: a fresh PostgreSQL database, or the test's SQLite file."""
    if request.param == "postgresql":
        return {"database_url": request.getfixturevalue("postgres_url")}
    return {}


def node_settings(
    tmp_path: Path, redis: RedisServer, store_engine: dict[str, Any], **overrides: Any
) -> Any:
    """Every node: the same store, work directory and Redis."""
    values: dict[str, Any] = {
        **store_engine,
        "redis_url": redis.url,
        "node_lease_s": LEASE_S,
        "redis_ping_interval_s": 0.2,
        "video_jobs": 1,
    }
    values.update(overrides)
    return video_settings(tmp_path, **values)


@pytest.fixture
async def nodes(
    tmp_path: Path,
    rekognition: FakeRekognition,
    redis_server: RedisServer,
    store_engine: dict[str, Any],
) -> AsyncIterator[list[RunningServer]]:
    rekognition.faces_from_image = True
    rekognition.latency_s = 0.03
    settings = node_settings(tmp_path, redis_server, store_engine)
    started = [await start_node(settings, "node-a"), await start_node(settings, "node-b")]
    yield started
    for node in started:
        await node.stop()


def node_of(nodes: list[RunningServer], job: dict[str, Any]) -> int:
    """Which of `nodes` the job's record says runs it."""
    ids = [n.app[REDIS].link.node_id for n in nodes]
    assert job["node"] in ids, (job["node"], ids)
    return ids.index(job["node"])


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_a_job_submitted_on_one_node_is_run_once_and_readable_from_both(
    nodes: list[RunningServer], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a, b = nodes
    data = make_video(tmp_path / "v.mp4", [(2, "face"), (3, "blank")], fps=4).read_bytes()
    status, job = await post_upload(http, a.url, data, interval="0.5")
    assert status == 202, job
    assert job["state"] == "queued" and job["runs"] == 1
    done = await wait_state(http, b.url, job["id"], TERMINAL)  # polled on the other node
    assert done["state"] == "done", done
    assert done["node"] in {n.app[REDIS].link.node_id for n in nodes}
    for node in nodes:
        seen = await get_json(http, f"{node.url}/api/videos/{job['id']}")
        assert seen["state"] == "done" and seen["progress"]["frames_done"] == 10
        report = await get_json(http, f"{node.url}/api/videos/{job['id']}/report")
        assert report["summary"]["frames_analysed"] == 10
        assert [x["type"] for x in report["alerts"]] == ["no_face_detected"]
        listing = await get_json(http, f"{node.url}/api/videos")
        assert [j["id"] for j in listing["jobs"]] == [job["id"]]
    # Every sample analysed exactly once, by one node.
    frames = await stored_frames(a.manager.store, done["session_id"])
    assert [i for i, _t, _s in frames] == list(range(10))
    queued = sum(
        n.app[REDIS].queue.instruments.video_jobs_enqueued.labels(how="submitted")._value.get()
        for n in nodes
    )
    assert queued == 1
    health = await get_json(http, f"{b.url}/health")
    assert health["redis"]["status"] == "ok" and health["redis"]["video_queue"]["name"]
    assert list(a.settings.video_work_dir.iterdir()) == []


async def test_a_cancel_from_the_other_node_stops_the_running_job(
    nodes: list[RunningServer], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = make_video(tmp_path / "v.mp4", [(30, "face")], fps=4).read_bytes()
    _s, job = await post_upload(http, nodes[0].url, data, interval="0.5")
    running = await wait_state(http, nodes[0].url, job["id"], {"analysing"})
    while running["progress"]["frames_done"] < 2:
        running = await wait_state(http, nodes[0].url, job["id"], {"analysing"})
    runner = node_of(nodes, running)
    other = nodes[1 - runner]
    async with http.delete(f"{other.url}/api/videos/{job['id']}") as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["state"] == "cancelled", answer
    final = await wait_state(http, nodes[runner].url, job["id"], TERMINAL)
    assert final["state"] == "cancelled"
    assert final["progress"]["frames_done"] < final["progress"]["frames_total"]
    session = await other.manager.store.get_session(final["session_id"])
    assert session is not None and session["status"] == "ended"
    assert session["end_reason"] == "video_cancelled"
    assert nodes[runner].manager.live_count == 0
    # A queued job cancelled from a node that does not run it never runs.
    _s, busy = await post_upload(http, nodes[0].url, data, interval="0.5")
    _s, spare = await post_upload(http, nodes[0].url, data, interval="0.5")
    _s, queued = await post_upload(http, nodes[0].url, data, interval="0.5")
    for j in (busy, spare):
        await wait_state(http, nodes[0].url, j["id"], {"analysing"})
    async with http.delete(f"{nodes[1].url}/api/videos/{queued['id']}") as r:
        assert (await r.json())["state"] == "cancelled"
    for j in (busy, spare):
        async with http.delete(f"{nodes[1].url}/api/videos/{j['id']}") as r:
            assert (await r.json())["state"] == "cancelled"
    await asyncio.sleep(1.0)  # a worker freed by the cancels would take it now
    record = await get_json(http, f"{nodes[0].url}/api/videos/{queued['id']}")
    assert record["state"] == "cancelled" and record["session_id"] is None
    assert list(nodes[0].settings.video_work_dir.iterdir()) == []


async def test_a_redis_restart_loses_the_queue_but_the_store_requeues_the_job(
    nodes: list[RunningServer],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    data = make_video(tmp_path / "v.mp4", [(6, "face")], fps=4).read_bytes()
    # One job per node (VIDEO_JOBS=1), so the third waits on the queue.
    jobs = [(await post_upload(http, nodes[0].url, data, interval="0.5"))[1] for _ in range(3)]
    for j in jobs[:2]:
        await wait_state(http, nodes[0].url, j["id"], {"analysing"})
    record = await get_json(http, f"{nodes[0].url}/api/videos/{jobs[2]['id']}")
    assert record["state"] == "queued"
    await asyncio.to_thread(redis_server.restart)  # no persistence: every queue entry is gone
    for j in jobs:
        done = await wait_state(http, nodes[1].url, j["id"], {"done", "failed"}, timeout=60)
        assert done["state"] == "done", done
        frames = await stored_frames(nodes[0].manager.store, done["session_id"])
        assert [i for i, _t, _s in frames] == list(range(12)), j["id"]  # each frame once
    requeued = sum(
        n.app[REDIS].queue.instruments.video_jobs_enqueued.labels(how="reenqueued")._value.get()
        for n in nodes
    )
    assert requeued >= 1
    health = await get_json(http, f"{nodes[1].url}/health")
    assert health["redis"]["status"] == "ok"
    # Each node noticed: a failed command, or the data gone at its next ping.
    for node in nodes:
        link = node.app[REDIS].link
        assert link.outages + link.data_losses >= 1

    # A job accepted while Redis is down waits in the store, and runs once it is back.
    await asyncio.to_thread(redis_server.stop)
    for node in nodes:
        await until_down(http, node.url)
    status, late = await post_upload(http, nodes[1].url, data, interval="2")
    assert status == 202 and late["state"] == "queued"
    await asyncio.sleep(1.0)
    assert (await get_json(http, f"{nodes[0].url}/api/videos/{late['id']}"))["state"] == "queued"
    await asyncio.to_thread(redis_server.start)
    done = await wait_state(http, nodes[0].url, late["id"], {"done", "failed"}, timeout=60)
    assert done["state"] == "done" and done["progress"]["frames_done"] == 3


async def until_healthy(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with http.get(f"{url}/health") as r:
                if r.status == 200 and (await r.json())["redis"]["status"] == "ok":
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the node did not start"
        await asyncio.sleep(0.1)


async def until_down(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        health = await get_json(http, f"{url}/health")
        if health["redis"]["status"] == "down":
            assert health["status"] == "degraded"
            return
        assert time.monotonic() < deadline, "Redis was not seen down"
        await asyncio.sleep(0.05)


async def test_a_node_killed_mid_job_leaves_it_interrupted_and_resumable_elsewhere(
    tmp_path: Path,
    rekognition: FakeRekognition,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    store_engine: dict[str, Any],
) -> None:
    rekognition.latency_s = 0.05
    settings = node_settings(tmp_path, redis_server, store_engine)
    store_env = (
        {"DATABASE_URL": settings.database_url}
        if settings.database_url
        else {"DATABASE_PATH": str(settings.database_path)}
    )
    proc, url = await serve_subprocess(
        tmp_path,
        http,
        {
            **rekognition.env(),
            **store_env,
            "NODE_ID": "node-a",
            "CLUSTER_SECRET": SECRET,
            "VIDEO_WORK_DIR": str(settings.video_work_dir),
            "REDIS_URL": redis_server.url,
            "NODE_LEASE_S": str(LEASE_S),
            "REDIS_PING_INTERVAL_S": "0.2",
            "ANALYSER_BACKEND": "rekognition",
            "ANALYSER_CALLS_PER_S": "0",
            "VIDEO_PROGRESS_SAVE_S": "0.05",
            "OPENAI_API_KEY": "",
            "ANTHROPIC_API_KEY": "",
        },
    )
    data = make_video(tmp_path / "v.mp4", [(10, "face")], fps=4).read_bytes()
    survivor: RunningServer | None = None
    try:
        await until_healthy(http, url)  # a loaded machine can take a while to start it
        _s, job = await post_upload(http, url, data, interval="0.5")
        seen = await wait_state(http, url, job["id"], {"analysing"})
        # The other node starts while the job runs on the first: it leaves it alone.
        survivor = await start_node(settings, "node-b")
        while seen["progress"]["frames_done"] < 5:
            seen = await wait_state(http, url, job["id"], {"analysing"})
        assert seen["node"] != survivor.app[REDIS].link.node_id
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    try:
        assert survivor is not None
        killed_at = time.monotonic()
        job_now = await wait_state(http, survivor.url, job["id"], TERMINAL, timeout=30)
        assert job_now["state"] == "interrupted", job_now
        assert time.monotonic() - killed_at < 30
        record = await survivor.manager.store.get_session(job_now["session_id"])
        # Marked by the lapsed job lease, committed before the job reads `interrupted`
        # (or by the session lease's reaper, whichever comes first: both say node_lost).
        assert record is not None and record["status"] == "interrupted"
        assert record["end_reason"] == "node_lost"
        async with http.post(f"{survivor.url}/api/videos/{job['id']}/resume") as r:
            assert r.status == 202, await r.text()
            assert (await r.json())["runs"] == 2
        done = await wait_state(http, survivor.url, job["id"], {"done", "failed"}, timeout=60)
        assert done["state"] == "done", done
        assert done["node"] == survivor.app[REDIS].link.node_id
        assert done["session_id"] == job_now["session_id"]  # one session across nodes
        frames = await stored_frames(survivor.manager.store, done["session_id"])
        assert [i for i, _t, _s in frames] == list(range(20))
        report = await get_json(http, f"{survivor.url}/api/videos/{job['id']}/report")
        assert report["summary"]["frames_analysed"] == 20
        assert list(settings.video_work_dir.iterdir()) == []
    finally:
        if survivor is not None:
            await survivor.stop()
