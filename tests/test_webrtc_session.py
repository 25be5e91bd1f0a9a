"""A real aiortc peer sends a synthetic camera (real face imagery, then a blank scene) to
the real server; results come back on the `proctoring` data channel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from server.app import RTC
from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition
from tests.rtc_client import (
    RtcTestClient,
    SyntheticCamera,
    alert_events,
    face_blank_scenes,
    start_rtc_server,
    until,
)

pytestmark = pytest.mark.netns


async def test_face_then_blank_raises_no_face_over_the_data_channel(
    rtc_server: RunningServer, rekognition: FakeRekognition
) -> None:
    camera = SyntheticCamera(face_blank_scenes(), "face", fps=15)
    client = RtcTestClient(rtc_server.url, camera)
    try:
        answer = await client.connect(job_data={"jobTitle": "Engineer"})
        assert answer["type"] == "answer" and answer["session_id"]
        assert answer["codec"] == "H264"  # preferred over VP8, which aiortc offers first
        assert answer["ice_servers"] == []
        # aiortc offers abs-send-time; the server strips it, so no REMB (see codecs.py).
        assert client.pc is not None
        assert "abs-send-time" in client.pc.localDescription.sdp
        assert "abs-send-time" not in answer["sdp"]
        started = await client.wait_for("session_started")
        assert started["session_id"] == answer["session_id"]
        assert started["transport"] == "webrtc"
        assert started["job_data"] == {"jobTitle": "Engineer"}

        first = await client.wait_for("frame_analysis")
        result = first["result"]
        assert result["faces_count"] == 1
        assert set(result["metrics"]) >= {
            "eye_contact",
            "engagement",
            "facial_expression",
            "posture",
            "confidence",
        }
        t = result["timings"]
        assert t["captured_at"] <= t["analysis_started_at"] <= t["analysis_ended_at"]
        assert set(result["checks"]) == {"faces", "labels", "text"}  # first frame: all

        await asyncio.sleep(1.0)  # a stable scene: the idle rate, no more analyses
        stable = len(client.of_type("frame_analysis"))
        assert stable == 1

        mark = len(client.messages)
        camera.show("blank")
        onset = await client.wait_for(
            "alerts",
            lambda m: bool(alert_events(m, "no_face_detected", "onset")),
            within=5,
            start=mark,
        )
        # WebRTC rules count capture time: NO_FACE_FRAMES=3 is 2 s of absence.
        [episode] = alert_events(onset, "no_face_detected", "onset")
        onset_frame = next(
            m["result"] for m in client.of_type("frame_analysis")
            if m["result"]["frame_index"] == episode["frame_index"]
        )
        assert onset_frame["timestamp"] - episode["started_at"] >= 2.0
        blanks = [m["result"] for m in client.of_type("frame_analysis")[stable:]]
        assert len(blanks) >= 3 and all(r["faces_count"] == 0 for r in blanks[-3:])

        mark = len(client.messages)
        camera.show("face")
        await client.wait_for(
            "alerts",
            lambda m: bool(alert_events(m, "no_face_detected", "ended")),
            within=5,
            start=mark,
        )

        # The answer to this request, not a metrics push from the middle of the scene.
        mark = len(client.messages)
        client.send({"type": "get_live_metrics"})
        metrics = await client.wait_for(
            "live_metrics", lambda m: m["frames_analysed"] >= 5, start=mark
        )
        rtc = metrics["rtc"]
        assert rtc["codec"] == "H264"
        assert rtc["frames_decoded"] > 15 and rtc["frames_skipped"] > 0
        assert rtc["frames_analysed"] == metrics["frames_analysed"]
        assert metrics["frames_received"] == rtc["frames_decoded"]
        assert rtc["reasons"].get("scene_change", 0) >= 2
        assert rtc["reasons"].get("alert_pending", 0) >= 1
        # The newest frame is analysed: at most one frame interval (67 ms) + scheduling.
        assert rtc["frame_age_ms_p95"] is not None and rtc["frame_age_ms_p95"] < 67 + 50

        client.send({"type": "end_session"})
        ended = await client.wait_for("session_ended", within=15)
        report = ended["report"]
        analyses = [m["result"] for m in client.of_type("frame_analysis")]
        assert report["summary"]["frames_analysed"] == len(analyses)
        # The fake saw exactly the calls the analyses say they made.
        assert rekognition.count("DetectFaces") == len(analyses)
        assert rekognition.count("DetectLabels") == sum("labels" in r["checks"] for r in analyses)
        assert rekognition.count("DetectText") == sum("text" in r["checks"] for r in analyses)
        assert len(analyses) < 20  # ~8 s at 15 fps = 120 frames; the sampler took few
        types = {a["type"] for a in report["alerts"]}
        assert "no_face_detected" in types
    finally:
        await client.close()
    assert await until(lambda: rtc_server.app[RTC].peer_count == 0)


async def test_vp8_only_offer_is_decoded_too(rtc_server: RunningServer) -> None:
    camera = SyntheticCamera(face_blank_scenes(), "face", fps=15)
    client = RtcTestClient(rtc_server.url, camera, codecs=["VP8"])
    try:
        answer = await client.connect()
        assert answer["codec"] == "VP8"
        result = (await client.wait_for("frame_analysis"))["result"]
        assert result["faces_count"] == 1
    finally:
        await client.close()


@pytest.mark.parametrize("settings_overrides", [{"rtc_metrics_interval_s": 0.3}])
async def test_live_metrics_are_pushed_without_asking(rtc_server: RunningServer) -> None:
    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face", fps=15))
    try:
        await client.connect()
        await client.wait_for("frame_analysis")
        mark = len(client.messages)
        await client.wait_for("live_metrics", start=mark, within=2)
        await client.wait_for("live_metrics", start=len(client.messages), within=2)
        pushed = client.of_type("live_metrics")
        assert all(m["session_id"] == client.session_id for m in pushed)
        assert pushed[-1]["rtc"]["channel"]["open"] is True
    finally:
        await client.close()


async def test_shutdown_releases_every_peer_and_task(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    running = await start_rtc_server(tmp_path, rekognition)
    before = _tasks()
    clients = [
        RtcTestClient(running.url, SyntheticCamera(face_blank_scenes(), "face", fps=15))
        for _ in range(2)
    ]
    try:
        for c in clients:
            await c.connect()
        for c in clients:
            await c.wait_for("frame_analysis")
        gateway = running.app[RTC]
        assert gateway.peer_count == 2
        await running.stop()
        for c in clients:  # sessions end at shutdown, and the pages are told
            ended = await c.wait_for("session_ended", within=5)
            assert ended["report"]["session_id"] == c.session_id
            assert ended["report"]["summary"]["end_reason"] == "server_shutdown"
        assert gateway.peer_count == 0
    finally:
        for c in clients:
            await c.close()
    assert await until(lambda: _tasks() <= before), (before, _tasks())


def _tasks() -> int:
    return len([t for t in asyncio.all_tasks() if not t.done()])


async def test_openapi_lists_the_offer_endpoint(rtc_server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{rtc_server.url}/api/openapi.json") as resp:
            doc = await resp.json()
    op = doc["paths"]["/api/rtc/offer"]["post"]
    assert {"400", "404", "409", "429", "503"} <= set(op["responses"])
