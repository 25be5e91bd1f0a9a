"""The REST contract end to end against a real server, real boto3 and the fake Rekognition."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import astronaut_bgr, blank_data_url, data_url, face_data_url


async def start(http: aiohttp.ClientSession, server: RunningServer, **job: Any) -> str:
    async with http.post(f"{server.url}/api/sessions/start", json={"job_data": job}) as r:
        assert r.status == 200
        body = await r.json()
    return str(body["session_id"])


async def post_frame(
    http: aiohttp.ClientSession, server: RunningServer, sid: str, frame: str
) -> tuple[int, dict]:
    async with http.post(f"{server.url}/api/sessions/{sid}/frame", json={"frame": frame}) as r:
        return r.status, await r.json()


async def test_seed_curl_flow(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    rekognition.set_scene(faces=[fake_face(yaw=5, pitch=-3, emotions={"HAPPY": 80, "CALM": 20})])
    sid = await start(http, server, jobTitle="Software Engineer")
    assert len(base64.urlsafe_b64decode(sid + "==")) >= 16  # ≥ 128 random bits

    status, body = await post_frame(http, server, sid, face_data_url())
    assert status == 200 and body["status"] == "analysed"
    result = body["result"]
    assert result["faces_count"] == 1
    assert result["dominant_emotion"] == "HAPPY"
    assert 80 < result["metrics"]["eye_contact"] <= 100
    assert result["metrics"]["engagement"] is not None
    assert result["backend"] == "rekognition"

    async with http.get(f"{server.url}/api/sessions/{sid}/metrics") as r:
        metrics = await r.json()
    assert r.status == 200
    assert metrics["frames_analysed"] == 1 and metrics["frames_received"] == 1
    assert metrics["metrics"]["eye_contact"]["average"] == result["metrics"]["eye_contact"]

    async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
        report = await r.json()
    assert r.status == 200
    assert report["summary"]["frames_analysed"] == 1
    assert report["job_data"] == {"jobTitle": "Software Engineer"}
    for part in (
        "behavioural_scores",
        "body_language",
        "cultural_fit",
        "emotion_timeline",
        "alerts",
        "token_usage",
        "narrative",
    ):
        assert part in report
    assert report["ai_summary"] is None  # no LLM configured: rule-based narrative only
    assert "Software Engineer" in report["cultural_fit"]["assessment"]

    async with http.get(f"{server.url}/api/sessions/{sid}/report") as r:
        assert r.status == 200
        assert (await r.json())["session_id"] == sid


async def test_alerts_are_returned_with_the_frame_that_raised_them(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid = await start(http, server)
    rekognition.set_scene(faces=[], labels=[fake_label("Cell Phone", 95)])
    alerts: list[dict] = []
    for _ in range(3):
        _, body = await post_frame(http, server, sid, face_data_url())
        alerts += body["result"]["alerts"]
    assert sorted(a["type"] for a in alerts) == ["no_face_detected", "suspicious_object"]
    rekognition.set_scene(faces=[fake_face()], labels=[])
    _, body = await post_frame(http, server, sid, face_data_url())
    assert sorted((a["type"], a["status"]) for a in body["result"]["alerts"]) == [
        ("no_face_detected", "ended"),
        ("suspicious_object", "ended"),
    ]
    async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
        report = await r.json()
    assert [a["type"] for a in report["alerts"]] == [
        "no_face_detected",
        "suspicious_object",
    ] or sorted(a["type"] for a in report["alerts"]) == ["no_face_detected", "suspicious_object"]
    assert all(a["ended_at"] is not None for a in report["alerts"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"{}", 400, "missing_field"),
        (b'{"frame": 42}', 400, "invalid_field"),
        (b'{"frame": "data:image/jpeg;base64,%%%%"}', 400, "malformed_frame"),
        (
            b'{"frame": "' + base64.b64encode(b"GIF89a" + bytes(30)) + b'"}',
            400,
            "unsupported_image",
        ),
        (
            b'{"frame": "' + base64.b64encode(b"\xff\xd8\xff" + bytes(30)) + b'"}',
            400,
            "malformed_frame",
        ),
    ],
)
async def test_bad_frame_requests_get_specific_400s(
    server: RunningServer, http: aiohttp.ClientSession, body: bytes, status: int, code: str
) -> None:
    sid = await start(http, server)
    async with http.post(
        f"{server.url}/api/sessions/{sid}/frame",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == status
        err = await r.json()
    assert err["error"]["code"] == code and err["error"]["message"]
    # The session survives bad input.
    status_ok, ok = await post_frame(http, server, sid, face_data_url())
    assert status_ok == 200 and ok["status"] == "analysed"


async def test_unknown_and_ended_sessions(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    status, body = await post_frame(http, server, "no-such-session", face_data_url())
    assert (status, body["error"]["code"]) == (404, "session_not_found")
    async with http.get(f"{server.url}/api/sessions/nope/metrics") as r:
        assert r.status == 404
    sid = await start(http, server)
    async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
        assert r.status == 200
    status, body = await post_frame(http, server, sid, face_data_url())
    assert (status, body["error"]["code"]) == (409, "session_ended")
    async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
        assert r.status == 409
    async with http.get(f"{server.url}/api/sessions/{sid}/metrics") as r:
        assert r.status == 409


async def test_unknown_route_and_method_are_json(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.url}/api/nothing-here") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with http.get(f"{server.url}/api/sessions/start") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_oversized_frame_is_413_whatever_the_backend(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path, max_frame_bytes=50_000))
    try:
        sid = await start(http, srv)
        noisy = data_url(
            __import__("numpy")
            .random.default_rng(0)
            .integers(0, 255, (480, 640, 3), dtype="uint8"),
            95,
        )
        status, body = await post_frame(http, srv, sid, noisy)
        assert (status, body["error"]["code"]) == (413, "frame_too_large")
        # Far over the limit: refused by the body-size guard, still JSON and 413.
        async with http.post(
            f"{srv.url}/api/sessions/{sid}/frame", json={"frame": "A" * 2_000_000}
        ) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "frame_too_large"
        assert rekognition.count() == 0
        status, _ = await post_frame(http, srv, sid, face_data_url())
        assert status == 200
    finally:
        await srv.stop()


async def test_latest_frame_wins_and_drops_are_counted(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    rekognition.latency_s = 0.3
    sid = await start(http, server)
    first = asyncio.create_task(post_frame(http, server, sid, face_data_url()))
    await asyncio.sleep(0.1)  # the first frame is now in the analyser
    rest = [asyncio.create_task(post_frame(http, server, sid, face_data_url())) for _ in range(4)]
    await asyncio.sleep(0)
    results = [await first] + [await t for t in rest]
    statuses = [body["status"] for _, body in results]
    assert statuses.count("analysed") == 2
    assert statuses.count("dropped") == 3
    assert statuses[0] == "analysed"
    async with http.get(f"{server.url}/api/sessions/{sid}/metrics") as r:
        m = await r.json()
    assert (m["frames_received"], m["frames_analysed"], m["frames_dropped"]) == (5, 2, 3)


async def test_live_session_cap_gives_429(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path, max_live_sessions=2))
    try:
        await start(http, srv)
        await start(http, srv)
        async with http.post(f"{srv.url}/api/sessions/start", json={}) as r:
            assert r.status == 429
            assert r.headers.get("Retry-After")
            assert (await r.json())["error"]["code"] == "too_many_sessions"
    finally:
        await srv.stop()


async def test_idle_sessions_end_with_a_report(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(
        make_settings(tmp_path, session_idle_timeout_s=0.3, idle_sweep_interval_s=0.05)
    )
    try:
        sid = await start(http, srv)
        await post_frame(http, srv, sid, face_data_url())
        for _ in range(60):
            await asyncio.sleep(0.05)
            if srv.manager.live_count == 0:
                break
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            assert r.status == 200
            report = await r.json()
        assert report["summary"]["end_reason"] == "idle_timeout"
        assert report["summary"]["frames_analysed"] == 1
    finally:
        await srv.stop()


async def test_list_sessions_filters_and_validates(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    a = await start(http, server)
    b = await start(http, server)
    async with http.post(f"{server.url}/api/sessions/{a}/end") as r:
        assert r.status == 200
    async with http.get(f"{server.url}/api/sessions?status=ended") as r:
        assert [s["session_id"] for s in (await r.json())["sessions"]] == [a]
    async with http.get(f"{server.url}/api/sessions?status=live") as r:
        assert [s["session_id"] for s in (await r.json())["sessions"]] == [b]
    async with http.get(f"{server.url}/api/sessions?limit=zero") as r:
        assert r.status == 400


async def test_report_of_a_live_session_is_409(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    sid = await start(http, server)
    async with http.get(f"{server.url}/api/sessions/{sid}/report") as r:
        assert r.status == 409
    async with http.get(f"{server.url}/api/sessions/unknown/report") as r:
        assert r.status == 404


async def test_openapi_is_generated_from_the_models(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.url}/api/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.")
    frame_op = doc["paths"]["/api/sessions/{session_id}/frame"]["post"]
    schema_ref = frame_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    frame_schema = doc["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert "frame" in frame_schema["required"]
    assert {"400", "404", "409", "413"} <= set(frame_op["responses"])
    assert {"operatorToken": []} in doc["paths"]["/api/sessions"]["get"]["security"]
    for path in (
        "/api/sessions/start",
        "/api/sessions/{session_id}/metrics",
        "/api/sessions/{session_id}/end",
        "/health",
    ):
        assert path in doc["paths"]


async def test_health_and_cors(server: RunningServer, http: aiohttp.ClientSession) -> None:
    """Default CORS_ORIGINS is empty: same origin only (roles and origins: test_access.py)."""
    async with http.get(f"{server.url}/health") as r:
        body = await r.json()
        assert "Access-Control-Allow-Origin" not in r.headers
    assert body["status"] == "ok" and body["backend"] == "rekognition"
    async with http.get(f"{server.url}/health", headers={"Origin": server.url}) as r:
        assert r.status == 200  # the server's own pages
    async with http.options(
        f"{server.url}/api/sessions/start",
        headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"},
    ) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "origin_not_allowed"


async def test_blank_frames_raise_no_face_through_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    """The fake decides from the pixels (faces_from_image), as a real service would."""
    fake = FakeRekognition(faces_from_image=True)
    await fake.start()
    for k, v in fake.env().items():
        monkeypatch.setenv(k, v)
    srv = await start_server(make_settings(tmp_path))
    try:
        sid = await start(http, srv)
        _, body = await post_frame(http, srv, sid, data_url(astronaut_bgr()))
        assert body["result"]["faces_count"] == 1
        types = []
        for _ in range(3):
            _, body = await post_frame(http, srv, sid, blank_data_url())
            types += [a["type"] for a in body["result"]["alerts"]]
        assert types == ["no_face_detected"]
    finally:
        await srv.stop()
        await fake.stop()


async def test_the_server_wide_budget_paces_push_transports_latest_wins(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    """2 analyses/s server-wide: two sessions pushing as fast as they can share it; frames
    that arrive while waiting replace each other and are counted as dropped."""
    srv = await start_server(make_settings(tmp_path, analyser_calls_per_s=2))
    try:
        sids = [await start(http, srv), await start(http, srv)]

        async def push(sid: str, n: int) -> list[str]:
            out = []
            for _ in range(n):
                _, body = await post_frame(http, srv, sid, face_data_url())
                out.append(body["status"])
            return out

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        a, b = await asyncio.gather(push(sids[0], 3), push(sids[1], 3))
        elapsed = loop.time() - t0
        # 6 analyses at 2 per rolling second: the last grants come after ≥ 2 s.
        assert a.count("analysed") == 3 and b.count("analysed") == 3
        assert elapsed >= 1.9
        assert rekognition.count("DetectFaces") == 6
        # Concurrent pushes into one waiting session: latest wins while it waits.
        results = await asyncio.gather(
            *(post_frame(http, srv, sids[0], face_data_url()) for _ in range(4))
        )
        statuses = [body["status"] for _, body in results]
        assert statuses.count("analysed") >= 1 and statuses.count("dropped") >= 2
    finally:
        await srv.stop()
