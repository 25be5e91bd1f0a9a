"""Every alert rule driven end to end: scripted Rekognition answers → real boto3 → server →
Socket.IO `alerts` events, with the contract's default thresholds pinned exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import socketio

from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import face_data_url

CALM = {"CALM": 90.0, "HAPPY": 10.0}
BORED = {"SAD": 90.0, "CALM": 10.0}

# (rule, scene that triggers it, frames that must NOT raise it, severity)
SCENARIOS: list[tuple[str, dict[str, Any], int, str]] = [
    ("no_face_detected", {"faces": []}, 2, "warning"),
    ("multiple_faces_detected", {"faces": [fake_face(), fake_face()]}, 0, "critical"),
    ("looking_away", {"faces": [fake_face(yaw=40, emotions=CALM)]}, 4, "warning"),
    ("looking_away", {"faces": [fake_face(pitch=-30, emotions=CALM)]}, 4, "warning"),
    ("low_engagement", {"faces": [fake_face(yaw=28, emotions=BORED)]}, 9, "info"),
    ("suspicious_object", {"labels": [fake_label("Mobile Phone", 93.0)]}, 0, "warning"),
    ("suspicious_object", {"labels": [fake_label("Person", 99.0, instances=2)]}, 0, "warning"),
    ("text_detected", {"text": ["def solve(items): return sorted(items)"]}, 0, "info"),
]


async def run_scenario(
    url: str, fake: FakeRekognition, scene: dict[str, Any], frames: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Send `frames` frames under `scene`, then one under a clean scene; return the alert
    events seen during the scene and after it."""
    sio = socketio.AsyncClient(reconnection=False)
    events: list[dict[str, Any]] = []
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    sio.on("alerts", lambda data: events.extend(data["alerts"]))
    sio.on("session_started", lambda data: started.set_result(data["session_id"]))
    await sio.connect(url, transports=["websocket"])
    try:
        await sio.emit("start_session", {"job_data": {}})
        sid = await asyncio.wait_for(started, 5)
        fake.set_scene(faces=[fake_face(emotions=CALM)], labels=[], text=[])
        fake.set_scene(**scene)
        for _ in range(frames):
            ack = await sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
            assert ack["status"] == "analysed"
        during = list(events)
        fake.set_scene(faces=[fake_face(emotions=CALM)], labels=[], text=[])
        await sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
        await asyncio.sleep(0.05)
        return during, events[len(during) :]
    finally:
        await sio.disconnect()


@pytest.mark.parametrize(("rule", "scene", "quiet", "severity"), SCENARIOS)
async def test_rule_fires_exactly_at_its_threshold_and_closes(
    server: RunningServer,
    rekognition: FakeRekognition,
    rule: str,
    scene: dict[str, Any],
    quiet: int,
    severity: str,
) -> None:
    if quiet:
        before, _ = await run_scenario(server.url, rekognition, scene, quiet)
        assert [e for e in before if e["type"] == rule] == [], f"{rule} raised before its threshold"
    during, after = await run_scenario(server.url, rekognition, scene, quiet + 1)
    onsets = [e for e in during if e["type"] == rule]
    assert [(e["status"], e["severity"]) for e in onsets] == [("onset", severity)]
    assert onsets[0]["frame_index"] == quiet
    assert [e["type"] for e in after if e["status"] == "ended"].count(rule) == 1


async def test_an_episode_is_raised_once_while_it_lasts(
    server: RunningServer, rekognition: FakeRekognition
) -> None:
    during, after = await run_scenario(
        server.url, rekognition, {"labels": [fake_label("Cell Phone", 95.0)]}, 30
    )
    assert [(e["type"], e["status"]) for e in during] == [("suspicious_object", "onset")]
    [ended] = after
    assert ended["status"] == "ended" and ended["duration_s"] > 0
