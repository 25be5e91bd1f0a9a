"""Re-scoring (SPEC "Evidence, review and re-scoring"): a session's alert history recomputed
from its stored per-frame facts with other thresholds or rules switched off, returned
beside the original, which stays as it was; with the session's own rules the replay gives
back exactly its alerts (per-frame pacing here; capture-time pacing over WebRTC in
test_evidence.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from server.analysis import facts
from server.analysis.observation import (
    Box,
    Checks,
    Face,
    Gaze,
    Label,
    Observation,
    Pose,
    Quality,
    TextLine,
)
from server.analysis.scoring import FrameMetrics
from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import face_data_url
from tests.test_evidence import same_alerts

OPERATOR = "rescore-operator-token"
CALM = {"CALM": 90.0, "HAPPY": 10.0}
BORED = {"SAD": 90.0, "CALM": 10.0}

#: (frames, scene): every rule fires and ends at least once; yaw 30.04 is over the 30°
#: threshold although frame summaries round it to 30.0 (facts keep full precision).
SCRIPT: list[tuple[int, dict[str, Any]]] = [
    (2, {"faces": [fake_face(emotions=CALM)]}),
    (6, {"faces": [fake_face(yaw=30.04, emotions=CALM)]}),
    (1, {"faces": [fake_face(emotions=CALM)]}),
    (
        1,
        {
            "faces": [fake_face(emotions=CALM)],
            "labels": [fake_label("Mobile Phone", 93.0, 1)],
            "text": ["def solve(items): return sorted(items)"],
        },
    ),
    (1, {"faces": [fake_face(emotions=CALM)]}),
    (3, {"faces": []}),
    (1, {"faces": [fake_face(emotions=CALM), fake_face(box=(0.7, 0.2, 0.2, 0.3))]}),
    (1, {"faces": [fake_face(emotions=CALM)]}),
    (10, {"faces": [fake_face(yaw=28, emotions=BORED)]}),
]
ALL_RULES = {
    "looking_away",
    "suspicious_object",
    "text_detected",
    "no_face_detected",
    "multiple_faces_detected",
    "low_engagement",
}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_token": OPERATOR, "evidence": "none"}


def op() -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATOR}"}


async def play(http: aiohttp.ClientSession, server: RunningServer, fake: FakeRekognition) -> str:
    async with http.post(f"{server.url}/api/sessions/start", json={}, headers=op()) as r:
        sid = str((await r.json())["session_id"])
    t0 = time.time() - 100
    i = 0
    for frames, scene in SCRIPT:
        fake.set_scene(**{"labels": [], "text": [], **scene})
        for _ in range(frames):
            body = {"frame": face_data_url(), "timestamp": t0 + i}
            async with http.post(
                f"{server.url}/api/sessions/{sid}/frame", json=body, headers=op()
            ) as r:
                assert r.status == 200, await r.text()
            i += 1
    return sid


async def rescore(
    http: aiohttp.ClientSession, server: RunningServer, sid: str, body: Any
) -> tuple[int, Any]:
    async with http.post(
        f"{server.url}/api/sessions/{sid}/rescore",
        data=body if isinstance(body, str | bytes) else json.dumps(body),
        headers={**op(), "Content-Type": "application/json"},
    ) as r:
        return r.status, await r.json()


async def alerts(http: aiohttp.ClientSession, server: RunningServer, sid: str) -> Any:
    async with http.get(f"{server.url}/api/sessions/{sid}/alerts", headers=op()) as r:
        assert r.status == 200
        return await r.json()


def types(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["type"] for a in alerts]


async def test_own_rules_reproduce_the_alerts_live_and_ended(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    sid = await play(http, server, rekognition)
    status, live = await rescore(http, server, sid, {})
    assert status == 200, live
    assert set(types(live["original"])) == ALL_RULES
    assert live["status"] == "live" and live["frames"] == {"replayed": 26, "without_facts": 0}
    assert same_alerts(live["alerts"], live["original"])
    # The edge case: 30.04° is over 30° although the stored pose says 30.0.
    [away] = [a for a in live["original"] if a["type"] == "looking_away"]
    assert away["details"]["yaw"] == 30.0 and away["details"]["yaw_threshold_deg"] == 30.0
    open_before = [a for a in live["original"] if a["status"] == "active"]
    assert types(open_before) == ["low_engagement"]

    async with http.post(f"{server.url}/api/sessions/{sid}/end", headers=op()) as r:
        assert r.status == 200
    status, ended = await rescore(http, server, sid, {"rules": {}})
    assert status == 200 and ended["status"] == "ended"
    assert all(a["status"] == "ended" for a in ended["original"])
    assert same_alerts(ended["alerts"], ended["original"])
    assert [a["original_id"] for a in ended["alerts"]] == [a["id"] for a in ended["original"]]
    assert ended["rules"]["timing"] == "frames" and ended["rules"]["disabled"] == []


async def test_looser_thresholds_remove_alerts_and_stricter_add_them(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    sid = await play(http, server, rekognition)
    status, looser = await rescore(http, server, sid, {"rules": {"looking_away": {"yaw_deg": 40}}})
    assert status == 200, looser
    assert "looking_away" not in types(looser["alerts"])
    kept = [a for a in looser["original"] if a["type"] != "looking_away"]
    assert same_alerts(looser["alerts"], kept)
    assert looser["rules"]["rules"]["looking_away"]["yaw_deg"] == 40.0
    assert looser["overrides"] == {"looking_away": {"yaw_deg": 40.0}}

    # Stricter: the bored stretch at yaw 28 now looks away too (5 frames in a row).
    status, stricter = await rescore(
        http, server, sid, {"rules": {"looking_away": {"yaw_deg": 20}}}
    )
    assert status == 200
    away = [a for a in stricter["alerts"] if a["type"] == "looking_away"]
    assert len(away) == 2 and away[1]["onset_frame"] == 16 + 4
    assert away[1]["original_id"] is None and away[1]["details"]["yaw_threshold_deg"] == 20.0

    status, fewer = await rescore(
        http,
        server,
        sid,
        {
            "rules": {
                "no_face_detected": {"onset_frames": 4},
                "suspicious_object": {"min_confidence": 95},
            }
        },
    )
    assert status == 200
    assert set(types(fewer["alerts"])) == ALL_RULES - {"no_face_detected", "suspicious_object"}
    assert fewer["counts"]["original"]["no_face_detected"] == 1


async def test_a_rule_switched_off_removes_only_its_alerts(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    sid = await play(http, server, rekognition)
    status, body = await rescore(
        http, server, sid, {"rules": {"text_detected": {"enabled": False}}}
    )
    assert status == 200, body
    assert "text_detected" not in types(body["alerts"])
    assert "text_detected" not in body["rules"]["rules"]
    assert body["rules"]["disabled"] == ["text_detected"]
    kept = [a for a in body["original"] if a["type"] != "text_detected"]
    assert same_alerts(body["alerts"], kept)


async def test_rescoring_leaves_the_original_alone(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    sid = await play(http, server, rekognition)
    async with http.post(f"{server.url}/api/sessions/{sid}/end", headers=op()) as r:
        report = await r.json()
    before = await alerts(http, server, sid)
    stored = await server.manager.store.alert_rows(sid)
    for body in (
        {"rules": {"looking_away": {"yaw_deg": 5, "onset_frames": 1}}},
        {"rules": {name: {"enabled": False} for name in ALL_RULES}},
    ):
        status, answer = await rescore(http, server, sid, body)
        assert status == 200 and answer["original"] == before["alerts"]
    assert await alerts(http, server, sid) == before
    assert await server.manager.store.alert_rows(sid) == stored
    async with http.get(f"{server.url}/api/sessions/{sid}/report", headers=op()) as r:
        assert (await r.json())["alerts"] == report["alerts"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"rules": {"looking_sideways": {"yaw_deg": 40}}}, "unknown_rule"),
        ({"rules": {"looking_away": {"yaw": 40}}}, "unknown_rule_field"),
        ({"rules": {"looking_away": {"dwell_s": 4}}}, "unknown_rule_field"),
        ({"rules": {"multiple_faces_detected": {"min_faces": 3}}}, "unknown_rule_field"),
        ({"rules": {"looking_away": {"yaw_deg": 400}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": {"yaw_deg": -1}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": {"yaw_deg": "40"}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": {"yaw_deg": True}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": {"onset_frames": 2.5}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": {"onset_frames": 0}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": {"enabled": "no"}}}, "invalid_rule_value"),
        ({"rules": {"looking_away": 40}}, "invalid_rule_value"),
        ({"rules": {"suspicious_object": {"labels": "Phone"}}}, "invalid_rule_value"),
        ({"rules": {"suspicious_object": {"labels": [""]}}}, "invalid_rule_value"),
        ({"rules": {"video_unusable": {"reasons": ["too_sleepy"]}}}, "invalid_rule_value"),
        ({"rules": ["looking_away"]}, "invalid_field"),
        ({"rulez": {}}, "invalid_field"),
        ([], "invalid_json"),
        ("{not json", "invalid_json"),
        ('{"rules": {"looking_away": {"yaw_deg": NaN}}}', "invalid_json"),
    ],
)
async def test_bad_bodies_get_a_specific_400(
    server: RunningServer,
    rekognition: FakeRekognition,
    http: aiohttp.ClientSession,
    body: Any,
    code: str,
) -> None:
    async with http.post(f"{server.url}/api/sessions/start", json={}, headers=op()) as r:
        sid = (await r.json())["session_id"]
    status, answer = await rescore(http, server, sid, body)
    assert (status, answer["error"]["code"]) == (400, code), answer


async def test_unknown_session_and_oversized_body(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    status, answer = await rescore(http, server, "nope", {})
    assert (status, answer["error"]["code"]) == (404, "session_not_found")
    async with http.post(f"{server.url}/api/sessions/start", json={}, headers=op()) as r:
        sid = (await r.json())["session_id"]
    huge = {"rules": {"suspicious_object": {"labels": ["x" * 90] * 200}}}
    status, answer = await rescore(http, server, sid, huge)
    assert (status, answer["error"]["code"]) == (413, "request_too_large")
    status, answer = await rescore(http, server, sid, {})
    assert status == 200 and answer["alerts"] == [] and answer["frames"]["replayed"] == 0


def test_facts_round_trip_keeps_what_the_rules_read() -> None:
    obs = Observation(
        "local",
        Checks(True, True, True),
        faces=(
            Face(Box(0.0, 0.0, 0.1, 0.1), 91.5),
            Face(
                Box(0.2, 0.2, 0.4, 0.5),
                99.123456789,
                Pose(30.0400001, -25.5, 3.0),
                gaze=Gaze(4.0, -2.0, 77.7),
            ),
        ),
        labels=(Label("Cell Phone", 70.00001, 2, (Box(0, 0, 1, 1),)),),
        text=(TextLine("  abc  ", 80.0),),
        quality=Quality(brightness=12.5, sharpness=3.25, insufficient=True, reason="too_dark"),
    )
    stored = json.loads(json.dumps(facts.encode(obs, FrameMetrics(engagement=39.99999))))
    back, metrics = facts.decode(stored)
    assert metrics.engagement == 39.99999
    assert back.faces is not None and len(back.faces) == 2
    primary = back.primary_face
    assert primary is not None and primary.pose == Pose(30.0400001, -25.5, 3.0)
    assert primary.gaze == Gaze(4.0, -2.0, 77.7) and primary.confidence == 99.123456789
    assert back.labels == (Label("Cell Phone", 70.00001, 2),)
    assert back.text == (TextLine("  abc  ", 80.0),)
    assert back.quality == obs.quality and back.insufficient
    empty, _ = facts.decode(facts.encode(Observation("x", Checks()), FrameMetrics()))
    assert empty.faces is None and empty.labels is None and empty.text is None
    for damaged in (
        None,
        {},
        {"v": 99},
        {"v": 1, "faces": 2},
        {"v": 1, "faces": "2"},
        {"v": 1, "labels": [["x", "high", 0]]},
        {"v": 1, "text": "abc"},
    ):
        with pytest.raises(facts.BadFacts):
            facts.decode(damaged)
