"""EMOTION_ANALYSIS=off end to end: Rekognition is never asked for emotions (the fake
records the request), the offline backend never runs its expression model, REST,
Socket.IO and WebRTC results carry no emotion or expression, the store keeps none,
low_engagement still fires from eye contact alone, and the report (rule-based parts and
the LLM's prompt) says what was not computed and nothing about emotions."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.session.narrative import SYSTEM_PROMPT, SYSTEM_PROMPT_NO_EMOTION
from server.session.report import EMOTION_PARTS
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.llm import FakeOpenAI
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url

EMOTION_WORDS = re.compile(r"emotion|expression|happy|calm|smil|mood|feel", re.IGNORECASE)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"emotion_analysis": False}


@pytest.fixture
async def fake_openai(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    yield fake
    await fake.stop()


def assert_no_emotion(result: dict[str, Any]) -> None:
    assert result["dominant_emotion"] is None and result["emotions"] is None
    metrics = result["metrics"]
    assert metrics["facial_expression"] is None
    assert metrics["eye_contact"] is not None
    assert metrics["engagement"] == metrics["eye_contact"]  # eye contact alone


async def test_rest_session_without_emotion_analysis(
    tmp_path: Path,
    rekognition: FakeRekognition,
    fake_openai: FakeOpenAI,
    http: aiohttp.ClientSession,
) -> None:
    srv = await start_server(
        make_settings(
            tmp_path,
            emotion_analysis=False,
            low_engagement_frames=3,
            openai_api_key="sk-test-openai",
        )
    )
    try:
        # Looking well away with a beaming face: engagement would be lifted by the
        # expression if it were measured; eye contact alone is low.
        rekognition.set_scene(faces=[fake_face(yaw=50, emotions={"HAPPY": 97.0}, smile=True)])
        async with http.post(
            f"{srv.url}/api/sessions/start", json={"job_data": {"jobTitle": "Teacher"}}
        ) as r:
            sid = (await r.json())["session_id"]
        raised: list[str] = []
        for _ in range(3):
            async with http.post(
                f"{srv.url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
            ) as r:
                assert r.status == 200
                result = (await r.json())["result"]
            assert_no_emotion(result)
            assert result["metrics"]["engagement"] < 40
            raised += [a["type"] for a in result["alerts"] if a["status"] == "onset"]
        assert "low_engagement" in raised  # from eye contact alone

        # Rekognition was never asked for emotions or smiles.
        faces_calls = [c for c in rekognition.calls if c.operation == "DetectFaces"]
        assert len(faces_calls) == 3
        for call in faces_calls:
            asked = call.params["Attributes"]
            assert not {"ALL", "EMOTIONS", "SMILE"} & set(asked), asked
            assert {"EYE_DIRECTION", "EYES_OPEN", "MOUTH_OPEN"} <= set(asked)

        async with http.get(f"{srv.url}/api/sessions/{sid}/metrics") as r:
            live = await r.json()
        assert live["emotion_distribution"] is None
        async with http.post(f"{srv.url}/api/sessions/{sid}/end") as r:
            report = await r.json()

        # Nothing about emotions was stored.
        with sqlite3.connect(srv.settings.database_path) as conn:
            summaries = [json.loads(s) for (s,) in conn.execute("SELECT summary FROM frames")]
        assert len(summaries) == 3
        for summary in summaries:
            assert summary["emotions"] is None and summary["dominant_emotion"] is None
            assert summary["metrics"]["facial_expression"] is None
        assert "HAPPY" not in json.dumps(summaries)

        # The report says what was not computed, and its narrative says nothing of it.
        assert report["not_computed"] == list(EMOTION_PARTS)
        assert report["emotion_distribution"] is None
        assert report["dominant_emotion_counts"] is None
        assert report["emotion_timeline"] == []
        assert report["behavioural_scores"]["facial_expression"] is None
        assert report["behavioural_scores"]["engagement"]["average"] < 40
        assert report["body_language"]["expression"] == "not computed"
        assert "EMOTION_ANALYSIS=off" in report["emotion_note"]
        for text in (report["narrative"]["summary"], report["body_language"]["assessment"]):
            assert not EMOTION_WORDS.search(text), text
        # The LLM was told the subject is off limits, and was given no emotion data.
        request = fake_openai.last
        system, user = (m["content"] for m in request.body["messages"])
        assert system == SYSTEM_PROMPT_NO_EMOTION != SYSTEM_PROMPT
        assert not EMOTION_WORDS.search(user), user
        assert report["ai_summary"] is not None  # and it did write the narrative
    finally:
        await srv.stop()


async def test_socketio_results_carry_no_emotion(
    server: RunningServer, rekognition: FakeRekognition
) -> None:
    from tests.test_socketio import Client

    c = Client()
    await c.sio.connect(server.url, transports=["websocket"])
    try:
        await c.sio.emit("start_session", {"job_data": {}})
        sid = (await c.wait("session_started"))[0]["session_id"]
        await c.sio.emit("analyze_frame", {"session_id": sid, "frame": face_data_url()})
        result = (await c.wait("frame_analysis"))[0]["result"]
        assert_no_emotion(result)
        await c.sio.emit("end_session", {"session_id": sid})
        report = (await c.wait("session_ended", timeout=30))[0]["report"]
        assert report["not_computed"] == list(EMOTION_PARTS)
    finally:
        await c.sio.disconnect()


@pytest.mark.netns
async def test_webrtc_results_carry_no_emotion(
    rtc_server: RunningServer, rekognition: FakeRekognition
) -> None:
    from tests.rtc_client import RtcTestClient, SyntheticCamera, face_blank_scenes

    client = RtcTestClient(rtc_server.url, SyntheticCamera(face_blank_scenes(), "face", fps=15))
    try:
        await client.connect(job_data={})
        message = await client.wait_for("frame_analysis", lambda m: m["result"]["faces_count"])
        assert_no_emotion(message["result"])
        assert rekognition.calls and all(
            "ALL" not in c.params["Attributes"]
            for c in rekognition.calls
            if c.operation == "DetectFaces"
        )
    finally:
        await client.close()


async def test_the_offline_backend_never_runs_its_expression_model() -> None:
    pytest.importorskip("skimage")
    from server.analysis.local_backend import LocalAnalyser
    from server.analysis.observation import Checks
    from tests.test_local_backend import astronaut, jpeg_frame

    settings = make_settings(Path("/nonexistent"), analyser_backend="local")
    for emotions in (True, False):
        analyser = LocalAnalyser(
            settings.model_copy(update={"emotion_analysis": emotions}), workers=1
        )
        await analyser.start()
        try:
            obs = await analyser.analyse(jpeg_frame(astronaut()), Checks())
            assert obs.faces is not None and len(obs.faces) == 1
            face = obs.faces[0]
            assert face.pose is not None and face.eyes_open is True  # the rest still works
            ran = "expression" in analyser.timings()
            if emotions:  # the control: the same frame, with the model, has expressions
                assert face.dominant_emotion == "HAPPY" and face.smile is True and ran
            else:
                assert face.emotions == {} and face.smile is None and not ran
                assert "expression" not in analyser.missing  # off, not broken
                assert "expression:unavailable" not in obs.degraded
        finally:
            await analyser.close()
