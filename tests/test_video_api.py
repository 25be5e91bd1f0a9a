"""Recorded-video analysis through the real server: URL and upload jobs, alert episodes in
video time, failures with clear reasons, cancel, restart with resumption."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer, make_settings, serve_subprocess, start_server
from tests.fakes.rekognition import FakeRekognition
from tests.video_media import make_video
from tests.video_server import VideoHost

TERMINAL = {"done", "failed", "cancelled", "interrupted"}
ROOT = Path(__file__).resolve().parent.parent


async def stored_frames(store: Any, session_id: str) -> list[tuple[int, float, Any]]:
    """The session's stored frame rows (index, time, summary), in order."""
    from server.session.report import TIMESTAMP_RANGE

    def collect(span: Any, rows: Any) -> list[tuple[int, float, Any]]:
        return [(int(i), float(t), json.loads(summary)) for i, t, summary in rows]

    result: list[tuple[int, float, Any]] = await store.scan_frames(
        session_id, collect, TIMESTAMP_RANGE
    )
    return result


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[VideoHost]:
    root = tmp_path / "served"
    root.mkdir()
    served = VideoHost(root)
    await served.start()
    yield served
    await served.stop()


def video_settings(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "video_url_allow": ["127.0.0.1"],
        "video_work_dir": tmp_path / "work",
        "analyser_calls_per_s": 0.0,
        "video_progress_save_s": 0.05,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@pytest.fixture
async def video_server(
    tmp_path: Path, rekognition: FakeRekognition
) -> AsyncIterator[RunningServer]:
    rekognition.faces_from_image = True  # textured frame: a face; uniform grey: none
    running = await start_server(video_settings(tmp_path))
    yield running
    await running.stop()


async def wait_state(
    http: aiohttp.ClientSession, base: str, job_id: str, states: set[str], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{base}/api/videos/{job_id}") as r:
            assert r.status == 200
            job = await r.json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['state']}: {job}"
        await asyncio.sleep(0.05)


async def post_url(
    http: aiohttp.ClientSession, base: str, url: str, interval: float = 1.0, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {"url": url, "interval_seconds": interval, "job_data": {"jobTitle": "Analyst"}, **extra}
    async with http.post(f"{base}/api/videos", json=body) as r:
        return r.status, await r.json()


async def post_upload(
    http: aiohttp.ClientSession,
    base: str,
    data: bytes,
    interval: str = "1.0",
    job_data: str = '{"jobTitle": "Analyst"}',
    filename: str = "interview.webm",
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("interval_seconds", interval)
    form.add_field("job_data", job_data)
    form.add_field("file", data, filename=filename, content_type="video/webm")
    async with http.post(f"{base}/api/videos", data=form) as r:
        return r.status, await r.json()


async def test_url_job_reports_alert_episodes_in_video_time(
    video_server: RunningServer, host: VideoHost, http: aiohttp.ClientSession
) -> None:
    # Face 0–3 s, nobody 3–8 s, face again 8–10 s; one frame a second.
    make_video(host.root / "interview.mp4", [(3, "face"), (5, "blank"), (2, "face")])
    status, job = await post_url(http, video_server.url, f"{host.url}/v/interview.mp4")
    assert status == 202, job
    assert job["state"] == "queued" and job["links"]["self"] == f"/api/videos/{job['id']}"
    done = await wait_state(http, video_server.url, job["id"], TERMINAL)
    assert done["state"] == "done", done
    progress = done["progress"]
    assert progress["frames_done"] == progress["frames_total"] == 10
    assert progress["percent"] == 100.0 and progress["video_seconds_done"] == pytest.approx(10.0)
    assert done["video"]["codec"] == "h264" and done["session_id"]

    async with http.get(f"{video_server.url}/api/videos/{job['id']}/report") as r:
        assert r.status == 200
        report = await r.json()
    assert report["summary"]["transport"] == "video"
    assert report["summary"]["frames_analysed"] == 10
    assert report["summary"]["duration_seconds"] == pytest.approx(10.0, abs=0.01)
    assert report["summary"]["end_reason"] == "video_complete"
    assert report["video"]["duration"] == "00:10" and report["video"]["frames_sampled"] == 10
    no_face = [a for a in report["alerts"] if a["type"] == "no_face_detected"]
    assert len(no_face) == 1
    episode = no_face[0]
    assert episode["video_time_start"] == "00:03" and episode[
        "video_time_start_s"
    ] == pytest.approx(3.0)
    assert episode["video_time_end"] == "00:08"
    assert episode["duration_s"] == pytest.approx(5.0, abs=0.01)
    # The session's own report and alerts are those of a normal session.
    async with http.get(f"{video_server.url}/api/sessions/{done['session_id']}/report") as r:
        assert r.status == 200
        assert (await r.json())["summary"]["frames_analysed"] == 10
    # Temporary file removed.
    assert list((video_server.settings.video_work_dir).iterdir()) == []


@pytest.mark.parametrize("codec", ["vp9", "vp8"])
async def test_upload_job(
    video_server: RunningServer, http: aiohttp.ClientSession, tmp_path: Path, codec: str
) -> None:
    path = make_video(tmp_path / "up.webm", [(4, "face")], codec=codec)
    status, job = await post_upload(http, video_server.url, path.read_bytes(), interval="2")
    assert status == 202, job
    assert job["source"] == "upload" and job["filename"] == "interview.webm"
    assert job["progress"]["frames_total"] == 2  # probed before the answer
    done = await wait_state(http, video_server.url, job["id"], TERMINAL)
    assert done["state"] == "done" and done["progress"]["frames_done"] == 2
    assert done["video"]["codec"] == codec
    async with http.get(f"{video_server.url}/api/videos") as r:
        listing = await r.json()
    assert [j["id"] for j in listing["jobs"]] == [job["id"]]
    assert list(video_server.settings.video_work_dir.iterdir()) == []


async def test_post_errors(
    video_server: RunningServer, http: aiohttp.ClientSession, host: VideoHost
) -> None:
    base = video_server.url
    cases = [
        ({"url": "http://10.0.0.1/v.mp4"}, 400, "invalid_url"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, 400, "invalid_url"),
        ({"url": "http://[::1]/v.mp4"}, 400, "invalid_url"),
        ({"url": "ftp://example.com/v.mp4"}, 400, "invalid_url"),
        ({"url": f"{host.url}/v/x.mp4", "interval_seconds": 0}, 400, "invalid_field"),
        ({"url": f"{host.url}/v/x.mp4", "interval_seconds": "soon"}, 400, "invalid_field"),
        ({"interval_seconds": 2}, 400, "missing_field"),
    ]
    for body, status, code in cases:
        async with http.post(f"{base}/api/videos", json=body) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (status, code), body
    async with http.post(f"{base}/api/videos", data=b'{"url": NaN}') as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    status, body = await post_upload(http, base, b"this is not a video at all" * 100)
    assert (status, body["error"]["code"]) == (422, "unreadable_video")
    assert str(video_server.settings.video_work_dir) not in body["error"]["message"]
    status, body = await post_upload(http, base, b"x", job_data="[1, 2")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    form = aiohttp.FormData()
    form.add_field("interval_seconds", "2")
    async with http.post(f"{base}/api/videos", data=form()) as r:
        assert r.status == 400
    assert host.requests == []  # nothing refused was fetched
    assert list(video_server.settings.video_work_dir.iterdir()) == []
    async with http.get(f"{base}/api/videos/nope") as r:
        assert (r.status, (await r.json())["error"]["code"]) == (404, "job_not_found")


async def test_oversized_upload_is_refused_while_streaming(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    running = await start_server(video_settings(tmp_path, video_max_bytes=20_000))
    try:
        path = make_video(tmp_path / "big.mp4", [(3, "face")], size=(640, 480))
        assert path.stat().st_size > 20_000
        status, body = await post_upload(http, running.url, path.read_bytes())
        assert (status, body["error"]["code"]) == (413, "video_too_large")
        assert list(running.settings.video_work_dir.iterdir()) == []
    finally:
        await running.stop()


async def test_url_failures_end_the_job_with_a_reason(
    tmp_path: Path, rekognition: FakeRekognition, host: VideoHost, http: aiohttp.ClientSession
) -> None:
    running = await start_server(video_settings(tmp_path, video_max_bytes=60_000))
    try:
        make_video(host.root / "big.mp4", [(3, "face")], size=(640, 480))
        make_video(host.root / "ok.mp4", [(2, "face")])
        (host.root / "junk.mp4").write_bytes(b"\x00junk" * 2000)
        cases = {
            f"{host.url}/v/big.mp4": "video_too_large",
            f"{host.url}/truncated/ok.mp4": "unreadable_video",
            f"{host.url}/v/junk.mp4": "unreadable_video",
            f"{host.url}/page": "unreadable_video",
            f"{host.url}/missing": "video_unreachable",
            f"{host.url}/redirect?to=http://169.254.169.254/": "invalid_url",
        }
        ids = {}
        for url in cases:
            status, job = await post_url(http, running.url, url)
            assert status == 202, job
            ids[url] = job["id"]
        for url, code in cases.items():
            job = await wait_state(http, running.url, ids[url], TERMINAL)
            assert job["state"] == "failed", (url, job)
            assert job["error"]["code"] == code, (url, job["error"])
            assert job["error"]["message"]
        assert list(running.settings.video_work_dir.iterdir()) == []
    finally:
        await running.stop()


async def test_cancel_a_running_job_and_erase_it(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    rekognition.latency_s = 0.1
    running = await start_server(video_settings(tmp_path, video_jobs=1))
    try:
        path = make_video(tmp_path / "v.mp4", [(30, "face")], fps=5)
        status, job = await post_upload(http, running.url, path.read_bytes(), interval="0.5")
        assert status == 202
        await wait_state(http, running.url, job["id"], {"analysing"})
        async with http.delete(f"{running.url}/api/videos/{job['id']}") as r:
            assert r.status == 200
            assert (await r.json())["state"] == "cancelled"
        final = await wait_state(http, running.url, job["id"], TERMINAL)
        assert final["state"] == "cancelled"
        assert final["progress"]["frames_done"] < final["progress"]["frames_total"]
        assert list(running.settings.video_work_dir.iterdir()) == []
        session = await running.manager.store.get_session(final["session_id"])
        assert session is not None and session["status"] == "ended"
        assert session["end_reason"] == "video_cancelled"
        # The worker that ran it goes on with the next job.
        _s, second = await post_upload(http, running.url, path.read_bytes(), interval="10")
        assert (await wait_state(http, running.url, second["id"], TERMINAL))["state"] == "done"
        # A second DELETE erases the finished job and its session.
        async with http.delete(f"{running.url}/api/videos/{job['id']}") as r:
            assert (await r.json())["state"] == "erased"
        async with http.get(f"{running.url}/api/videos/{job['id']}") as r:
            assert r.status == 404
        await running.manager.store.flush()
        assert await running.manager.store.get_session(final["session_id"]) is None
    finally:
        await running.stop()


async def test_too_many_jobs(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    rekognition.latency_s = 0.1
    running = await start_server(video_settings(tmp_path, video_jobs=1, video_queue_max=2))
    try:
        data = make_video(tmp_path / "v.mp4", [(10, "face")], fps=5).read_bytes()
        for _ in range(2):
            status, _job = await post_upload(http, running.url, data, interval="0.5")
            assert status == 202
        status, body = await post_upload(http, running.url, data, interval="0.5")
        assert (status, body["error"]["code"]) == (429, "too_many_jobs")
    finally:
        await running.stop()


async def test_restart_resumes_queued_and_interrupted_jobs(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    rekognition.faces_from_image = True
    rekognition.latency_s = 0.05
    settings = video_settings(tmp_path, video_jobs=1)
    data = make_video(tmp_path / "v.mp4", [(6, "face"), (6, "blank")], fps=4).read_bytes()
    first = await start_server(settings)
    try:
        _s, running_job = await post_upload(http, first.url, data, interval="0.5")
        _s, queued_job = await post_upload(http, first.url, data, interval="2")
        job = await wait_state(http, first.url, running_job["id"], {"analysing"})
        while job["progress"]["frames_done"] < 4:
            job = await wait_state(http, first.url, running_job["id"], {"analysing"})
    finally:
        await first.stop()  # a shutdown in the middle of the first job

    second = await start_server(settings)
    try:
        job = await wait_state(http, second.url, running_job["id"], TERMINAL)
        assert job["state"] == "interrupted"
        done_before = job["progress"]["frames_done"]
        interrupted_session = job["session_id"]
        record = await second.manager.store.get_session(interrupted_session)
        assert record is not None and record["status"] == "interrupted"
        assert 4 <= done_before < 24
        # The queued one resumes by itself.
        queued = await wait_state(http, second.url, queued_job["id"], {"done", "failed"})
        assert queued["state"] == "done" and queued["progress"]["frames_done"] == 6
        async with http.post(f"{second.url}/api/videos/{queued_job['id']}/resume") as r:
            assert (r.status, (await r.json())["error"]["code"]) == (409, "job_state_conflict")
        async with http.post(f"{second.url}/api/videos/{running_job['id']}/resume") as r:
            assert r.status == 202, await r.text()
        job = await wait_state(http, second.url, running_job["id"], {"done", "failed"})
        assert job["state"] == "done", job
        assert job["session_id"] == interrupted_session  # one session across the restart
        frames = await stored_frames(second.manager.store, job["session_id"])
        # Every sample analysed exactly once, in order, across the two processes.
        assert [i for i, _t, _s in frames] == list(range(24))
        started = (await second.manager.store.get_session(job["session_id"]))["started_at"]
        assert [round(t - started, 2) for _i, t, _s in frames] == [k * 0.5 for k in range(24)]
        async with http.get(f"{second.url}/api/videos/{running_job['id']}/report") as r:
            report = await r.json()
        assert report["summary"]["frames_analysed"] == 24
        assert report["summary"]["end_reason"] == "video_complete"
        no_face = [a for a in report["alerts"] if a["type"] == "no_face_detected"]
        # Nobody from 6 s on; rule streaks restart after a resume, so the last episode
        # begins at 6 s or a little later.
        assert no_face and 6.0 <= no_face[-1]["video_time_start_s"] < 10.0
        assert no_face[-1]["video_time_end"] == "00:12"
        assert list(settings.video_work_dir.iterdir()) == []
    finally:
        await second.stop()


async def test_secured_mode_needs_the_operator_token(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    running = await start_server(video_settings(tmp_path, api_token="op-token-0123456789"))
    try:
        async with http.get(f"{running.url}/api/videos") as r:
            assert (r.status, (await r.json())["error"]["code"]) == (401, "unauthorized")
        async with http.post(
            f"{running.url}/api/videos",
            json={"url": "http://example.com/v.mp4"},
            headers={"Authorization": "Bearer wrong"},
        ) as r:
            assert r.status == 401  # an unknown token is no token
        async with http.post(
            f"{running.url}/api/sessions/start", json={},
            headers={"Authorization": "Bearer op-token-0123456789"},
        ) as r:
            candidate = (await r.json())["candidate_token"]
        async with http.get(
            f"{running.url}/api/videos", headers={"Authorization": f"Bearer {candidate}"}
        ) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (403, "forbidden")
        async with http.get(
            f"{running.url}/api/videos", headers={"Authorization": "Bearer op-token-0123456789"}
        ) as r:
            assert r.status == 200 and (await r.json())["jobs"] == []
    finally:
        await running.stop()


async def test_server_killed_mid_job_resumes_from_the_last_stored_frame(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    """SIGKILL, not a graceful stop: the job row still says `analysing` and the session
    `live`; the next process makes both `interrupted`, and resume completes the job."""
    import signal

    rekognition.latency_s = 0.05
    settings = video_settings(tmp_path)
    proc, url = await serve_subprocess(tmp_path, http, {
        **rekognition.env(),
        "DATABASE_PATH": str(settings.database_path),
        "VIDEO_WORK_DIR": str(settings.video_work_dir),
        "ANALYSER_BACKEND": "rekognition",
        "ANALYSER_CALLS_PER_S": "0",
        "VIDEO_PROGRESS_SAVE_S": "0.05",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
    })
    data = make_video(tmp_path / "v.mp4", [(10, "face")], fps=4).read_bytes()
    try:
        _s, job = await post_upload(http, url, data, interval="0.5")
        seen = await wait_state(http, url, job["id"], {"analysing"})
        while seen["progress"]["frames_done"] < 5:
            seen = await wait_state(http, url, job["id"], {"analysing"})
        await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    srv = await start_server(settings)
    try:
        job_now = await wait_state(http, srv.url, job["id"], TERMINAL)
        assert job_now["state"] == "interrupted"
        record = await srv.manager.store.get_session(job_now["session_id"])
        assert record is not None and record["status"] == "interrupted"
        async with http.post(f"{srv.url}/api/videos/{job['id']}/resume") as r:
            assert r.status == 202
        done = await wait_state(http, srv.url, job["id"], {"done", "failed"})
        assert done["state"] == "done", done
        frames = await stored_frames(srv.manager.store, done["session_id"])
        assert [i for i, _t, _s in frames] == list(range(20))
        async with http.get(f"{srv.url}/api/videos/{job['id']}/report") as r:
            report = await r.json()
        assert report["summary"]["frames_analysed"] == 20 and report["alerts"] == []
        assert list(settings.video_work_dir.iterdir()) == []
    finally:
        await srv.stop()
