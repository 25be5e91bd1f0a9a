"""A session the operator starts (REST, or the console) for a candidate who joins from the
join link's WebRTC page becomes a WebRTC session when its media arrives first: its rules
count capture time and its reconnect grace is WebRTC's, as if the page had started it. A
session that already had frames pushed stays what it was."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.fakes.rekognition import FakeRekognition
from tests.media import face_data_url
from tests.rtc_client import RtcTestClient, SyntheticCamera, face_blank_scenes, start_rtc_server

pytestmark = [pytest.mark.netns]


async def test_the_candidate_joining_over_webrtc_makes_it_a_webrtc_session(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    server = await start_rtc_server(tmp_path, rekognition)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/api/sessions/start", json={"job_data": {}}) as r:
                joined = (await r.json())["session_id"]
            async with http.post(f"{server.url}/api/sessions/start", json={"job_data": {}}) as r:
                pushed = (await r.json())["session_id"]
            async with http.post(
                f"{server.url}/api/sessions/{pushed}/frame", json={"frame": face_data_url()}
            ) as r:
                assert r.status == 200
            reports = {}
            for sid in (joined, pushed):
                peer = RtcTestClient(server.url, SyntheticCamera(face_blank_scenes(), "face"))
                try:
                    await peer.connect(session_id=sid)
                    await peer.wait_for("frame_analysis", within=20)
                    live = next(s for s in server.manager.live_sessions() if s.id == sid)
                    assert live.transport == ("webrtc" if sid == joined else "rest")
                    assert live.clock == ("capture" if sid == joined else "arrival")
                    async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
                        reports[sid] = await r.json()
                finally:
                    await peer.close()
            async with http.get(f"{server.url}/api/sessions") as r:
                listed = {s["session_id"]: s["transport"] for s in (await r.json())["sessions"]}
    finally:
        await server.stop()
    assert reports[joined]["summary"]["transport"] == "webrtc"
    assert reports[joined]["rules"]["timing"] == "capture"
    assert listed[joined] == "webrtc"
    # Frames had been pushed: the rules it was judged with so far stay.
    assert reports[pushed]["summary"]["transport"] == "rest"
    assert reports[pushed]["rules"]["timing"] == "frames"
    assert listed[pushed] == "rest"
