"""Faults degrade results but never lose a session or its report: Rekognition throttling,
LLM errors and timeouts, and a server killed mid-session."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import RunningServer, make_settings, serve_subprocess, start_server
from tests.fakes.llm import FakeAnthropic, FakeOpenAI, FakeReply
from tests.fakes.rekognition import FakeRekognition, error, fake_face, fake_label
from tests.media import face_data_url

ROOT = Path(__file__).resolve().parent.parent


async def start(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(
        f"{url}/api/sessions/start", json={"job_data": {"jobTitle": "Data Analyst"}}
    ) as r:
        return str((await r.json())["session_id"])


async def frame(http: aiohttp.ClientSession, url: str, sid: str) -> dict:
    async with http.post(f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}) as r:
        assert r.status == 200
        return await r.json()


async def test_throttling_degrades_the_frame_and_the_session_goes_on(
    tmp_path: Path, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    # Faces only: after a throttle, botocore's adaptive mode paces this client's later
    # calls (down to 0.5/s at this test's low rate), which is what it is for.
    server = await start_server(
        make_settings(tmp_path, labels_interval_s=3600, text_interval_s=3600)
    )
    try:
        await _throttling_scenario(server, http, rekognition)
    finally:
        await server.stop()


async def _throttling_scenario(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid = await start(http, server.url)
    rekognition.set_scene(faces=[])
    await frame(http, server.url, sid)
    await frame(http, server.url, sid)  # two faceless frames: one more raises the alert
    rekognition.push("DetectFaces", error("ThrottlingException"))
    body = await frame(http, server.url, sid)
    result = body["result"]
    assert "faces:throttled" in result["degraded"]
    assert result["faces_count"] is None  # unknown, not "no face"
    assert result["alerts"] == []  # a throttled frame is not a faceless frame
    body = await frame(http, server.url, sid)
    assert [a["type"] for a in body["result"]["alerts"]] == ["no_face_detected"]

    async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
        report = await r.json()
    assert report["summary"]["frames_analysed"] == 4
    assert report["summary"]["frames_degraded"] == 1
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    assert (
        'proctor_rekognition_calls_total{operation="DetectFaces",outcome="throttled"} 1.0' in text
    )


async def test_rekognition_down_degrades_every_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    fake = FakeRekognition()
    await fake.start()
    for k, v in fake.env().items():
        monkeypatch.setenv(k, v)
    srv = await start_server(make_settings(tmp_path))
    try:
        sid = await start(http, srv.url)
        await fake.stop()  # the service disappears mid-session
        async with http.post(
            f"{srv.url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
        ) as r:
            assert r.status == 503 and r.headers["Retry-After"]
            err = (await r.json())["error"]
        assert err["code"] == "backend_unavailable"
        assert all(f"{c}:unavailable" in err["message"] for c in ("faces", "labels", "text"))
        async with http.post(f"{srv.url}/api/sessions/{sid}/end") as r:
            assert r.status == 200
            assert (await r.json())["summary"]["frames_degraded"] == 1
    finally:
        await srv.stop()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_llm_writes_the_summary_and_usage_is_recorded(
    tmp_path: Path,
    rekognition: FakeRekognition,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
    provider: str,
) -> None:
    fake: FakeOpenAI | FakeAnthropic = FakeOpenAI() if provider == "openai" else FakeAnthropic()
    base = await fake.start()
    monkeypatch.setenv("OPENAI_BASE_URL" if provider == "openai" else "ANTHROPIC_BASE_URL", base)
    fake.reply = FakeReply(
        content='{"summary": "Calm and attentive throughout.", "cultural_fit": "Attentive, as the role needs."}',
        prompt_tokens=321,
        completion_tokens=54,
    )
    srv = await start_server(make_settings(tmp_path, **{f"{provider}_api_key": "sk-test"}))
    try:
        sid = await start(http, srv.url)
        await frame(http, srv.url, sid)
        async with http.post(f"{srv.url}/api/sessions/{sid}/end") as r:
            report = await r.json()
        assert report["ai_summary"]["text"] == "Calm and attentive throughout."
        assert report["ai_summary"]["provider"] == provider
        assert report["cultural_fit"]["ai_assessment"] == "Attentive, as the role needs."
        assert report["token_usage"]["prompt_tokens"] == 321
        assert report["token_usage"]["completion_tokens"] == 54
        assert report["token_usage"]["total_tokens"] == 375
        assert report["token_usage"]["by_provider"][provider]["total_tokens"] == 375
        assert "Data Analyst" in fake.requests[-1].prompt_text()
        # The rule-based parts are still there.
        assert report["narrative"]["source"] == "rules" and report["body_language"]["assessment"]
    finally:
        await srv.stop()
        await fake.stop()


async def test_llm_failure_leaves_a_complete_report_with_the_error_noted(
    tmp_path: Path,
    rekognition: FakeRekognition,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    fake.reply = FakeReply(status=500, error_message="upstream exploded")
    srv = await start_server(make_settings(tmp_path, openai_api_key="sk-test", llm_timeout_s=3))
    try:
        sid = await start(http, srv.url)
        await frame(http, srv.url, sid)
        async with http.post(f"{srv.url}/api/sessions/{sid}/end") as r:
            assert r.status == 200
            report = await r.json()
        assert report["ai_summary"] is None
        assert report["llm"]["error"].startswith("api_error")
        assert report["token_usage"]["total_tokens"] == 0
        assert report["summary"]["frames_analysed"] == 1
        assert report["narrative"]["summary"]
    finally:
        await srv.stop()
        await fake.stop()


async def test_llm_timeout_is_bounded(
    tmp_path: Path,
    rekognition: FakeRekognition,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    fake = FakeAnthropic()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", await fake.start())
    fake.reply = FakeReply(delay_s=10)
    srv = await start_server(
        make_settings(tmp_path, anthropic_api_key="sk-test", llm_timeout_s=0.5)
    )
    try:
        sid = await start(http, srv.url)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with http.post(f"{srv.url}/api/sessions/{sid}/end") as r:
            report = await r.json()
        assert loop.time() - t0 < 3.0
        assert report["llm"]["error"].startswith("timeout")
        assert report["session_id"] == sid and report["summary"]["frames_analysed"] == 0
    finally:
        await srv.stop()
        await fake.stop()


async def test_server_killed_mid_session_shows_interrupted_and_reports(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    db = tmp_path / "proctor.sqlite3"
    proc, url = await serve_subprocess(tmp_path, http, {
        **rekognition.env(),
        "DATABASE_PATH": str(db),
        "ANALYSER_BACKEND": "rekognition",
        "LABELS_INTERVAL_S": "0",
        "TEXT_INTERVAL_S": "0",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
    })
    try:
        sid = await start(http, url)
        rekognition.set_scene(faces=[fake_face()], labels=[fake_label("Book", 88)])
        for _ in range(3):
            await frame(http, url, sid)
        await asyncio.sleep(0.3)  # the store commits as it goes; well under a second
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    srv = await start_server(make_settings(tmp_path, database_path=db))
    try:
        assert srv.manager.interrupted_at_start == [sid]
        async with http.get(f"{srv.url}/api/sessions") as r:
            sessions = (await r.json())["sessions"]
        assert [(s["session_id"], s["status"]) for s in sessions] == [(sid, "interrupted")]
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            assert r.status == 200
            report = await r.json()
        assert report["summary"]["interrupted"] is True
        assert report["summary"]["frames_analysed"] == 3
        assert report["job_data"] == {"jobTitle": "Data Analyst"}
        [book] = report["alerts"]
        assert book["type"] == "suspicious_object" and book["end_reason"] == "interrupted"
        # Frames for an interrupted session are refused as ended, not lost silently.
        async with http.post(
            f"{srv.url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
        ) as r:
            assert r.status == 409
    finally:
        await srv.stop()


async def test_graceful_stop_ends_live_sessions_with_reports(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path))
    sid = await start(http, srv.url)
    await frame(http, srv.url, sid)
    await srv.stop()
    srv = await start_server(make_settings(tmp_path))
    try:
        assert srv.manager.interrupted_at_start == []
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            report = await r.json()
        assert report["summary"]["end_reason"] == "server_shutdown"
        assert report["summary"]["frames_analysed"] == 1
    finally:
        await srv.stop()
