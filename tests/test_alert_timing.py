"""Alert timing end to end: capture-time dwell on WebRTC, the per-frame meaning on push
transports, `video_unusable` on a dark camera, and the report's record of the rules."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import socketio

from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import astronaut_bgr, blank_bgr, data_url
from tests.rtc_client import RtcTestClient, SyntheticCamera, alert_events, face_blank_scenes


@pytest.mark.netns
async def test_webrtc_no_face_waits_two_seconds_of_capture_time(
    rtc_server: RunningServer, rekognition: FakeRekognition
) -> None:
    camera = SyntheticCamera(face_blank_scenes(), "face", fps=15)
    client = RtcTestClient(rtc_server.url, camera)
    try:
        await client.connect()
        await client.wait_for("frame_analysis")
        mark = len(client.messages)
        camera.show("blank")
        message = await client.wait_for(
            "alerts", lambda m: bool(alert_events(m, "no_face_detected", "onset")),
            within=15, start=mark,
        )
        [onset] = alert_events(message, "no_face_detected", "onset")
        results = {m["result"]["frame_index"]: m["result"]
                   for m in client.of_type("frame_analysis")}
        onset_at = results[onset["frame_index"]]["timestamp"]
        last_face_at = max(
            r["timestamp"] for i, r in results.items()
            if i < onset["frame_index"] and r["faces_count"]
        )
        blank_before = [r for i, r in results.items()
                        if r["timestamp"] > last_face_at and i < onset["frame_index"]]
        # Capture times, not arrival: the faces had been gone for 2 s of video.
        assert onset_at - last_face_at >= 2.0
        assert onset_at - onset["started_at"] >= 2.0 > last_face_at - onset["started_at"]
        assert onset["details"]["required_dwell_s"] == 2.0
        assert onset["details"]["dwell_s"] >= 2.0 and onset["category"] == "behaviour"
        # Sampled faster while pending (that is what makes the onset timely), and still
        # no onset before the dwell was over.
        assert len(blank_before) >= 2 and all(r["faces_count"] == 0 for r in blank_before)
        earlier = [a for m in client.of_type("alerts") for a in m["alerts"]
                   if a["type"] == "no_face_detected" and a is not onset]
        assert earlier == []

        client.send({"type": "end_session"})
        report = (await client.wait_for("session_ended", within=15))["report"]
        assert report["rules"]["timing"] == "capture"
        assert report["rules"]["rule_frame_interval_s"] == 1.0
        assert report["rules"]["rules"]["no_face_detected"]["dwell_s"] == 2.0
    finally:
        await client.close()


class SioSession:
    def __init__(self, url: str) -> None:
        self.url = url
        self.sio = socketio.AsyncClient(reconnection=False)
        self.alerts: list[dict[str, Any]] = []
        self.results: dict[int, dict[str, Any]] = {}
        self._new_result = asyncio.Event()
        self.sid = ""

    def _on_result(self, data: dict[str, Any]) -> None:
        self.results[data["result"]["frame_index"]] = data["result"]
        self._new_result.set()

    async def __aenter__(self) -> SioSession:
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.sio.on("alerts", lambda data: self.alerts.extend(data["alerts"]))
        self.sio.on("frame_analysis", self._on_result)
        self.sio.on("session_started", lambda data: started.set_result(data["session_id"]))
        await self.sio.connect(self.url, transports=["websocket"])
        await self.sio.emit("start_session", {"job_data": {}})
        self.sid = await asyncio.wait_for(started, 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sio.disconnect()

    async def frame(self, url: str, timestamp: float) -> dict[str, Any]:
        ack = await self.sio.call(
            "analyze_frame", {"session_id": self.sid, "frame": url, "timestamp": timestamp}
        )
        assert ack["status"] == "analysed", ack
        async with asyncio.timeout(5):  # the event is emitted before the ack; be lenient
            while ack["frame_index"] not in self.results:
                self._new_result.clear()
                await self._new_result.wait()
        return self.results[ack["frame_index"]]

    async def end(self) -> dict[str, Any]:
        ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.sio.on("session_ended", lambda data: ended.set_result(data["report"]))
        await self.sio.emit("end_session", {"session_id": self.sid})
        return await asyncio.wait_for(ended, 15)


async def test_a_dark_camera_raises_video_unusable_not_a_behaviour_flag(
    server: RunningServer, rekognition: FakeRekognition
) -> None:
    dark = data_url((astronaut_bgr() * 0.2).astype(np.uint8))  # mean luma ≈ 18, textured
    rekognition.set_scene(faces=[], labels=[], text=[])  # the service sees no face in it
    async with SioSession(server.url) as s:
        t0 = time.time()  # within a day of the server clock, as pushed timestamps must be
        for i in range(10):  # 0 … 9 s of client capture time, one frame a second
            result = await s.frame(dark, t0 + i)
            assert result["insufficient"] and result["quality"]["reason"] == "too_dark"
        await asyncio.sleep(0.05)
        assert s.alerts == []  # no no_face_detected: darkness is not absence
        result = await s.frame(dark, t0 + 10)  # 10 s: UNUSABLE_VIDEO_S
        [onset] = result["alerts"]
        assert (onset["type"], onset["status"], onset["category"]) == (
            "video_unusable", "onset", "technical"
        )
        assert onset["started_at"] == t0 and onset["details"]["reason"] == "too_dark"
        rekognition.set_scene(faces=[fake_face()])
        result = await s.frame(data_url(astronaut_bgr()), t0 + 11)  # the light is back
        assert [(a["type"], a["status"]) for a in result["alerts"]] == [
            ("video_unusable", "ended")
        ]
        report = await s.end()
    [episode] = [a for a in report["alerts"] if a["type"] == "video_unusable"]
    assert episode["category"] == "technical" and episode["duration_s"] == 11.0
    assert report["alert_summary"]["video_unusable"]["category"] == "technical"
    assert report["rules"]["timing"] == "frames"
    assert report["rules"]["rule_frame_interval_s"] is None
    assert report["rules"]["rules"]["video_unusable"]["dwell_s"] == 10.0
    assert report["rules"]["rules"]["no_face_detected"]["onset_frames"] == 3
    assert "Laptop" in report["rules"]["rules"]["suspicious_object"]["second_device_labels"]


async def test_a_covered_lens_is_no_face_detected_after_three_frames(
    server: RunningServer, rekognition: FakeRekognition
) -> None:
    covered = data_url(blank_bgr(value=2))  # flat black: judgeable, however dark
    rekognition.set_scene(faces=[], labels=[], text=[])
    async with SioSession(server.url) as s:
        t0 = time.time()  # within a day of the server clock, as pushed timestamps must be
        # A push client's pace: three frames 0.1 s apart are three frames.
        results = [await s.frame(covered, t0 + i / 10) for i in range(3)]
        assert not any(r["insufficient"] for r in results)
        assert [a["type"] for a in results[2]["alerts"]] == ["no_face_detected"]
        assert results[2]["alerts"][0]["category"] == "behaviour"
        for i in range(3, 15):
            await s.frame(covered, t0 + i)
        await asyncio.sleep(0.05)
        assert {a["type"] for a in s.alerts} == {"no_face_detected"}


async def test_eye_direction_lowers_eye_contact_with_the_head_frontal(
    server: RunningServer, rekognition: FakeRekognition
) -> None:
    async with SioSession(server.url) as s:
        rekognition.set_scene(faces=[fake_face(gaze=(0.0, 0.0, 99.0))])
        frontal = await s.frame(data_url(astronaut_bgr()), time.time())
        rekognition.set_scene(faces=[fake_face(gaze=(45.0, 0.0, 99.0))])  # a second screen
        aside = await s.frame(data_url(astronaut_bgr()), time.time() + 1)
    assert frontal["metrics"]["eye_contact"] == 100.0
    assert aside["metrics"]["eye_contact"] == 25.0  # 1.5 × the 30° threshold
    assert aside["pose"][0] == 0.0  # the head itself stayed frontal


async def test_sessions_table_gains_the_rules_column_on_an_old_file(tmp_path: Path) -> None:
    from server.session.store import Store

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, status TEXT NOT NULL, transport TEXT "
            "NOT NULL, backend TEXT NOT NULL, job_data TEXT NOT NULL, started_at REAL NOT NULL,"
            " ended_at REAL, end_reason TEXT, last_activity REAL NOT NULL, counters TEXT NOT "
            "NULL DEFAULT '{}')"
        )
        conn.execute(
            "INSERT INTO sessions VALUES ('old', 'ended', 'rest', 'local', '{}', 1.0, 2.0, "
            "'client', 2.0, '{}')"
        )
    store = Store(path)
    await store.open()
    try:
        old = await store.get_session("old")
        assert old is not None and old["rules"] is None
        await store.create_session("new", "webrtc", "local", {}, 3.0, rules={"timing": "capture"})
        await store.flush()
        new = await store.get_session("new")
        assert new is not None and new["rules"] == {"timing": "capture"}
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(sessions)")]
    assert columns.count("rules") == 1
