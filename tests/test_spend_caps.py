"""Spend caps (issue 9): new sessions per client address per minute on every way a session
starts, the daily Rekognition cap (live sessions go on with the offline backend) and the
daily LLM token cap (rule-based narrative), all counted in the store across a restart."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.llm import FakeOpenAI, FakeReply
from tests.fakes.rekognition import FakeRekognition
from tests.media import face_data_url


async def rest_start(http: aiohttp.ClientSession, url: str, **headers: str) -> aiohttp.ClientResponse:
    async with http.post(
        f"{url}/api/sessions/start", json={"job_data": {"jobTitle": "Analyst"}}, headers=headers
    ) as r:
        await r.read()
        return r


async def json_of(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    """The JSON body of a request that must succeed."""
    async with http.request(method, url, **kw) as r:
        body = await r.json()
        assert r.status == 200, body
        return body


async def frame(http: aiohttp.ClientSession, url: str, sid: str) -> dict[str, Any]:
    body = await json_of(
        http, "POST", f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
    )
    return dict(body["result"])


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_rate_limited(status: int, body: Any, headers: Any) -> None:
    assert status == 429, body
    assert body["error"]["code"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 60


async def socketio_start(
    url: str, headers: dict[str, str] | None = None
) -> tuple[list[Any], list[Any]]:
    """start_session over Socket.IO: (session_started events, error events)."""
    sio = socketio.AsyncClient(reconnection=False)
    started: list[Any] = []
    errors: list[Any] = []
    got = asyncio.Event()
    sio.on("session_started", lambda d: (started.append(d), got.set()))
    sio.on("error", lambda d: (errors.append(d), got.set()))
    await sio.connect(url, transports=["websocket"], headers=headers or {})
    try:
        await sio.emit("start_session", {"job_data": {"jobTitle": "Analyst"}})
        await asyncio.wait_for(got.wait(), 5)
    finally:
        await sio.disconnect()
    return started, errors


async def test_starts_over_the_per_address_limit_get_429_everywhere_and_survive_a_restart(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path, session_starts_per_minute=3)
    server = await start_server(settings)
    try:
        for _ in range(2):
            assert (await rest_start(http, server.url)).status == 200
        started, errors = await socketio_start(server.url)  # the third: still allowed
        assert started and not errors

        r = await rest_start(http, server.url)
        async with http.post(
            f"{server.url}/api/sessions/start", json={"job_data": {}}
        ) as resp:
            assert_rate_limited(resp.status, await resp.json(), resp.headers)
        assert r.status == 429

        started, errors = await socketio_start(server.url)
        assert not started
        assert errors[0]["code"] == "rate_limited" and errors[0]["status"] == 429
        assert 1 <= errors[0]["retry_after_s"] <= 60

        # A recorded video starts a session too: refused before its body is looked at.
        async with http.post(f"{server.url}/api/videos", json={"url": "http://x/v.mp4"}) as resp:
            assert_rate_limited(resp.status, await resp.json(), resp.headers)
        hits = 'proctor_spend_cap_hits_total{cap="session_starts"}'
        assert await metric(http, server.url, hits) == 4
    finally:
        await server.stop()

    # Same SQLite file, new process state: the last minute's starts are still counted.
    server = await start_server(settings)
    try:
        async with http.post(f"{server.url}/api/sessions/start", json={}) as resp:
            assert_rate_limited(resp.status, await resp.json(), resp.headers)
        health = await json_of(http, "GET", f"{server.url}/health")
        assert health["spend"]["session_starts_per_minute"] == 3
    finally:
        await server.stop()


async def test_the_limit_is_per_client_address_behind_a_trusted_proxy(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    server = await start_server(
        make_settings(tmp_path, session_starts_per_minute=1, trusted_proxies=["127.0.0.1"])
    )
    try:
        one = {"X-Forwarded-For": "203.0.113.7"}
        two = {"X-Forwarded-For": "203.0.113.8"}
        assert (await rest_start(http, server.url, **one)).status == 200
        assert (await rest_start(http, server.url, **one)).status == 429
        assert (await rest_start(http, server.url, **two)).status == 200  # its own allowance
        # Socket.IO takes the same forwarded address from its connect request.
        started, errors = await socketio_start(server.url, {"X-Forwarded-For": "203.0.113.9"})
        assert started and not errors
        started, errors = await socketio_start(server.url, one)
        assert errors and errors[0]["code"] == "rate_limited"
    finally:
        await server.stop()

    # Without TRUSTED_PROXIES the header is not believed: every start is 127.0.0.1's.
    server = await start_server(make_settings(tmp_path / "b", session_starts_per_minute=1))
    try:
        assert (await rest_start(http, server.url, **one)).status == 200
        assert (await rest_start(http, server.url, **two)).status == 429
    finally:
        await server.stop()


@pytest.mark.netns
@pytest.mark.parametrize("settings_overrides", [{"session_starts_per_minute": 2}])
async def test_an_offer_over_the_limit_gets_429_and_a_reconnect_is_not_limited(
    rtc_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    from tests.rtc_client import OfferRefused, RtcTestClient, SyntheticCamera, face_blank_scenes

    scenes = face_blank_scenes()
    first = RtcTestClient(rtc_server.url, SyntheticCamera(scenes, "face"))
    second = RtcTestClient(rtc_server.url, SyntheticCamera(scenes, "face"))
    again = RtcTestClient(rtc_server.url, SyntheticCamera(scenes, "face"))
    try:
        answer = await first.connect(job_data={"jobTitle": "Analyst"})  # start 1: an offer
        assert (await rest_start(http, rtc_server.url)).status == 200  # start 2
        with pytest.raises(OfferRefused) as refused:
            await second.connect(job_data={"jobTitle": "Analyst"})
        assert_rate_limited(refused.value.status, refused.value.body, refused.value.headers)
        # A reconnect offer for a live session starts nothing: never limited.
        rejoined = await again.connect(session_id=answer["session_id"])
        assert rejoined["session_id"] == answer["session_id"]
    finally:
        for c in (first, second, again):
            await c.close()


async def test_a_live_session_crossing_the_rekognition_cap_goes_on_offline_across_a_restart(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    # Every frame asks faces, labels and text (3 calls): two frames use the cap of 6.
    settings = make_settings(tmp_path, rekognition_daily_calls=6)
    server = await start_server(settings)
    try:
        started = await json_of(
            http, "POST", f"{server.url}/api/sessions/start", json={"job_data": {}}
        )
        sid = started["session_id"]
        assert started["backend"] == "rekognition"
        for _ in range(2):
            assert (await frame(http, server.url, sid))["backend"] == "rekognition"
        assert rekognition.count() == 6

        # The cap is reached: the session is not cut off. The offline backend loads in
        # the background; meanwhile frames are answered degraded, saying why.
        result = await frame(http, server.url, sid)
        assert result["backend"] == "local"
        assert "faces:offline_loading" in result["degraded"]
        for _ in range(200):
            result = await frame(http, server.url, sid)
            if not result["degraded"]:
                break
            await asyncio.sleep(0.05)
        assert result["backend"] == "local" and not result["degraded"]
        assert result["faces_count"] == 1  # really analysed, offline
        assert rekognition.count() == 6  # and Rekognition saw no more calls

        report = await json_of(http, "POST", f"{server.url}/api/sessions/{sid}/end")
        switches = report["summary"]["backend_switches"]
        assert [(s["from"], s["to"], s["reason"]) for s in switches] == [
            ("rekognition", "local", "rekognition_daily_cap")
        ]
        assert switches[0]["at"]  # when (ISO time)
        assert report["summary"]["backend"] == "local"
        assert report["summary"]["analyser_calls"]  # the Rekognition frames' calls

        health = await json_of(http, "GET", f"{server.url}/health")
        assert health["spend"]["rekognition_calls"] == {"used": 6, "cap": 6, "reached": True}
        assert await metric(http, server.url, 'proctor_usage_today{kind="rekognition_calls"}') == 6
        assert await metric(http, server.url, 'proctor_usage_cap{kind="rekognition_calls"}') == 6
        hits = 'proctor_spend_cap_hits_total{cap="rekognition_daily_calls"}'
        assert await metric(http, server.url, hits) == 1
    finally:
        await server.stop()

    # A restart on the same file remembers today's calls: new sessions start offline.
    server = await start_server(settings)
    try:
        health = await json_of(http, "GET", f"{server.url}/health")
        assert health["spend"]["rekognition_calls"]["used"] == 6
        started = await json_of(
            http, "POST", f"{server.url}/api/sessions/start", json={"job_data": {}}
        )
        assert started["backend"] == "local"
        result = await frame(http, server.url, started["session_id"])
        assert result["backend"] == "local"
        assert rekognition.count() == 6
        report = await json_of(
            http, "POST", f"{server.url}/api/sessions/{started['session_id']}/end"
        )
        assert report["summary"]["backend_switches"][0]["reason"] == "rekognition_daily_cap"
    finally:
        await server.stop()


async def test_a_report_past_the_llm_cap_gets_the_rule_based_narrative(
    tmp_path: Path,
    rekognition: FakeRekognition,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    fake.reply = FakeReply(prompt_tokens=300, completion_tokens=50)
    settings = make_settings(tmp_path, openai_api_key="sk-test", llm_daily_tokens=300)
    server = await start_server(settings)

    async def session_report(srv: RunningServer) -> dict[str, Any]:
        started = await json_of(
            http, "POST", f"{srv.url}/api/sessions/start", json={"job_data": {}}
        )
        await frame(http, srv.url, started["session_id"])
        report = await json_of(
            http, "POST", f"{srv.url}/api/sessions/{started['session_id']}/end"
        )
        return dict(report)

    try:
        first = await session_report(server)  # under the cap: narrated, 350 tokens counted
        assert first["ai_summary"] and first["llm"]["error"] is None
        assert len(fake.requests) == 1

        second = await session_report(server)
        assert second["llm"]["error"] == "daily_token_cap"
        assert second["ai_summary"] is None
        assert second["narrative"]["source"] == "rules" and second["narrative"]["summary"]
        assert second["token_usage"]["total_tokens"] == 0
        assert len(fake.requests) == 1  # the LLM was not asked
        assert await metric(http, server.url, 'proctor_usage_today{kind="llm_tokens"}') == 350
        hits = 'proctor_spend_cap_hits_total{cap="llm_daily_tokens"}'
        assert await metric(http, server.url, hits) == 1
    finally:
        await server.stop()

    server = await start_server(settings)  # the day's tokens survive a restart
    try:
        health = await json_of(http, "GET", f"{server.url}/health")
        assert health["spend"]["llm_tokens"] == {"used": 350, "cap": 300, "reached": True}
        assert (await session_report(server))["llm"]["error"] == "daily_token_cap"
        assert len(fake.requests) == 1
    finally:
        await server.stop()
        await fake.stop()


async def test_an_accepted_video_job_counts_as_a_start_and_a_refused_one_does_not(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    from tests.video_media import make_video

    video = make_video(tmp_path / "clip.mp4", [(1, "face")]).read_bytes()
    server = await start_server(
        make_settings(tmp_path, session_starts_per_minute=2, video_work_dir=tmp_path / "videos")
    )

    async def upload(with_file: bool) -> int:
        form = aiohttp.FormData()
        form.add_field("interval_seconds", "1.0")
        if with_file:
            form.add_field("file", video, filename="clip.mp4", content_type="video/mp4")
        async with http.post(f"{server.url}/api/videos", data=form) as r:
            await r.read()
            return r.status

    try:
        assert await upload(with_file=False) == 400  # refused: not counted
        assert await upload(with_file=True) == 202  # start 1
        assert (await rest_start(http, server.url)).status == 200  # start 2
        assert (await rest_start(http, server.url)).status == 429
    finally:
        await server.stop()
