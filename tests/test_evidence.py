"""Alert evidence (SPEC "Evidence, review and re-scoring"): one snapshot per alert onset,
served to the operator only; decoded here and its boxes checked, pixel by pixel, against
what the fake Rekognition answered; bounded in size; absent with EVIDENCE=none; erased
with its session; and made off the live path (a full writer queue drops, never waits)."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from server.analysis.observation import Box, Checks, Face, Observation
from server.config import Settings
from server.media.frames import Frame
from server.observability import Instruments
from server.session.evidence import (
    EVIDENCE_NICE,
    FACE_COLOUR,
    OBJECT_COLOUR,
    TEXT_COLOUR,
    EvidenceJob,
    EvidenceWriter,
    render,
)
from server.session.store import Store
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import astronaut_bgr, blank_bgr, data_url, jpeg_bytes

OPERATOR = "evidence-operator-token"
W, H = 640, 480
FACES = [(0.1, 0.3, 0.25, 0.35), (0.6, 0.25, 0.2, 0.3)]
PHONE = (0.4, 0.7, 0.15, 0.2)
TEXT_BOX = (0.1, 0.1, 0.3, 0.05)  # where the fake's DetectText puts every line
CODE = "def solve(items): return sorted(items)"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_token": OPERATOR}


def op(token: str | None = OPERATOR) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def busy_scene(fake: FakeRekognition) -> None:
    """Two faces, a phone and a line of code: three alerts on one frame."""
    fake.set_scene(
        faces=[fake_face(box=FACES[0], yaw=3.0), fake_face(box=FACES[1])],
        labels=[fake_label("Mobile Phone", 93.0, boxes=[PHONE])],
        text=[(CODE, 97.0)],
    )


async def start(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(f"{url}/api/sessions/start", json={"job_data": {}}, headers=op()) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def push(http: aiohttp.ClientSession, url: str, sid: str, frame: str) -> dict[str, Any]:
    async with http.post(
        f"{url}/api/sessions/{sid}/frame", json={"frame": frame}, headers=op()
    ) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def alerts_of(
    http: aiohttp.ClientSession, url: str, sid: str, token: str | None = OPERATOR
) -> tuple[int, Any]:
    async with http.get(f"{url}/api/sessions/{sid}/alerts", headers=op(token)) as r:
        return r.status, await r.json()


async def with_evidence(
    http: aiohttp.ClientSession, url: str, sid: str, count: int
) -> list[dict[str, Any]]:
    """The session's alerts once `count` of them have their snapshot (rendered off the
    live path, so a moment after the onset)."""
    deadline = time.monotonic() + 10
    while True:
        status, body = await alerts_of(http, url, sid)
        assert status == 200, body
        alerts: list[dict[str, Any]] = body["alerts"]
        if sum(a["evidence_url"] is not None for a in alerts) >= count:
            return alerts
        assert time.monotonic() < deadline, alerts
        await asyncio.sleep(0.05)


async def fetch_image(
    http: aiohttp.ClientSession, url: str, token: str | None = OPERATOR
) -> tuple[int, dict[str, str], bytes]:
    async with http.get(url, headers=op(token)) as r:
        return r.status, dict(r.headers), await r.read()


# --- pixels ------------------------------------------------------------------------------


def corners(box: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    left, top, bw, bh = box
    return round(left * w), round(top * h), round((left + bw) * w), round((top + bh) * h)


def is_colour(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> bool:
    """Near `colour` after JPEG (each channel within 70: a saturated stroke stays clear of
    grey and of the other two box colours)."""
    return all(abs(int(p) - c) <= 70 for p, c in zip(pixel[:3], colour, strict=True))


def is_grey(pixel: tuple[int, ...]) -> bool:
    return max(pixel[:3]) - min(pixel[:3]) <= 25


def assert_boxed(
    image: Image.Image,
    box: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    picture_h: int,
    grey_around: bool,
) -> None:
    """The box's four sides are drawn in `colour` where the fake's BoundingBox says,
    scaled to the snapshot; just outside and well inside it the frame shows through."""
    x0, y0, x1, y1 = corners(box, image.width, picture_h)
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    for x, y in ((x0 + 1, ym), (x1 - 1, ym), (xm, y1 - 1), (xm, y0 + 1)):
        assert is_colour(image.getpixel((x, y)), colour), (box, (x, y), image.getpixel((x, y)))
    if grey_around:
        for x, y in ((x0 - 6, ym), (x1 + 6, ym), (xm, y1 + 6), (xm, ym)):
            assert is_grey(image.getpixel((x, y))), (box, (x, y), image.getpixel((x, y)))


# --- end to end over REST ---------------------------------------------------------------


async def test_each_onset_has_a_snapshot_with_the_fakes_boxes(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    busy_scene(rekognition)
    sid = (await start(http, server.url))["session_id"]
    result = await push(http, server.url, sid, data_url(blank_bgr(W, H, 128)))
    onsets = {a["type"] for a in result["result"]["alerts"]}
    assert onsets == {"multiple_faces_detected", "suspicious_object", "text_detected"}
    alerts = await with_evidence(http, server.url, sid, 3)
    by_type = {a["type"]: a for a in alerts}
    # The numbers that made each rule fire, beside its thresholds.
    assert by_type["multiple_faces_detected"]["details"]["faces"] == 2
    assert by_type["multiple_faces_detected"]["details"]["min_faces"] == 2
    phone = by_type["suspicious_object"]["details"]
    assert (phone["object"], phone["confidence"], phone["min_confidence"]) == (
        "Mobile Phone",
        93.0,
        70.0,
    )
    text = by_type["text_detected"]["details"]
    assert text["lines"] == [CODE] and text["chars"] == len(CODE) and text["min_chars"] == 8
    for alert in alerts:
        assert set(alert) >= {
            "id",
            "type",
            "severity",
            "category",
            "started_at",
            "ended_at",
            "duration_s",
            "message",
            "details",
            "evidence_url",
            "review",
        }
        assert alert["review"] is None and alert["status"] == "active"
        assert alert["evidence_url"] == f"/api/sessions/{sid}/alerts/{alert['id']}/evidence"
        status, headers, body = await fetch_image(http, server.url + alert["evidence_url"])
        assert status == 200
        assert headers["Content-Type"] == "image/jpeg"
        assert headers["Cache-Control"] == "private, no-store"
        assert len(body) <= server.settings.evidence_max_bytes
        image = Image.open(io.BytesIO(body))
        assert image.format == "JPEG" and image.width == W  # a 640-wide frame, unscaled
        assert image.height > H  # the caption band is below the picture
        image = image.convert("RGB")
        for box in FACES:
            assert_boxed(image, box, FACE_COLOUR, H, grey_around=True)
        assert_boxed(image, PHONE, OBJECT_COLOUR, H, grey_around=True)
        assert_boxed(image, TEXT_BOX, TEXT_COLOUR, H, grey_around=False)
        band = np.asarray(image)[H + 2 :]
        assert band.max() > 200  # caption text, light on the dark band
    assert server.manager.evidence.outcomes == {"stored": 3}


async def test_a_wide_frame_is_scaled_to_640_and_boxes_follow(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    rekognition.set_scene(faces=[fake_face(box=FACES[0]), fake_face(box=FACES[1])])
    sid = (await start(http, server.url))["session_id"]
    await push(http, server.url, sid, data_url(blank_bgr(1600, 900, 128)))
    [alert] = await with_evidence(http, server.url, sid, 1)
    _status, _headers, body = await fetch_image(http, server.url + alert["evidence_url"])
    image = Image.open(io.BytesIO(body)).convert("RGB")
    assert image.width == 640
    for box in FACES:
        assert_boxed(image, box, FACE_COLOUR, 360, grey_around=True)


async def test_the_size_bound_is_kept(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    """Camera noise compresses badly: quality and then size shrink to fit the bound."""
    srv = await start_server(make_settings(tmp_path, api_token=OPERATOR, evidence_max_bytes=8000))
    try:
        rekognition.set_scene(faces=[fake_face(box=FACES[0]), fake_face(box=FACES[1])])
        noise = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
        assert len(jpeg_bytes(noise, 95)) > 100_000
        sid = (await start(http, srv.url))["session_id"]
        await push(http, srv.url, sid, data_url(noise, 95))
        [alert] = await with_evidence(http, srv.url, sid, 1)
        _status, _headers, body = await fetch_image(http, srv.url + alert["evidence_url"])
        assert len(body) <= 8000
        image = Image.open(io.BytesIO(body))
        assert image.width <= 640
        image.load()  # a whole, decodable JPEG
    finally:
        await srv.stop()


def test_render_keeps_within_the_bound_or_gives_up() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    obs = Observation("test", Checks(), faces=(Face(Box(0.1, 0.1, 0.3, 0.4), 99.0),))
    alert = {
        "episode_id": "a1",
        "type": "no_face_detected",
        "severity": "warning",
        "message": "m",
        "details": {},
        "frame_index": 0,
    }
    job = EvidenceJob("s", alert, Frame.from_bgr(noise, captured_at=time.time()), obs)
    for bound in (8_000, 30_000, 200_000):
        evidence = render(job, 640, bound)
        assert evidence is not None and len(evidence.jpeg) <= bound
        assert evidence.width <= 640
        assert Image.open(io.BytesIO(evidence.jpeg)).size == (evidence.width, evidence.height)
    assert render(job, 640, 200) is None  # cannot fit: nothing, rather than too much


async def test_evidence_none_renders_and_stores_nothing(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path, api_token=OPERATOR, evidence="none"))
    try:
        busy_scene(rekognition)
        sid = (await start(http, srv.url))["session_id"]
        await push(http, srv.url, sid, data_url(blank_bgr(W, H, 128)))
        await asyncio.sleep(0.3)  # time a snapshot would have had
        status, body = await alerts_of(http, srv.url, sid)
        assert status == 200 and len(body["alerts"]) == 3
        assert all(a["evidence_url"] is None for a in body["alerts"])
        alert_id = body["alerts"][0]["id"]
        url = f"{srv.url}/api/sessions/{sid}/alerts/{alert_id}/evidence"
        async with http.get(url, headers=op()) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "no_evidence"
        assert srv.manager.evidence.outcomes == {}
    finally:
        await srv.stop()
    with sqlite3.connect(tmp_path / "proctor.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM evidence").fetchone() == (0,)


async def test_evidence_is_erased_with_its_session(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    busy_scene(rekognition)
    sid = (await start(http, server.url))["session_id"]
    await push(http, server.url, sid, data_url(blank_bgr(W, H, 128)))
    alerts = await with_evidence(http, server.url, sid, 3)
    store = server.manager.store
    async with http.post(f"{server.url}/api/sessions/{sid}/end", headers=op()) as r:
        assert r.status == 200
    assert len(await store.evidence_ids(sid)) == 3  # ending keeps it; erasing does not
    await store.erase_session(sid)
    await store.flush()
    assert await store.evidence_ids(sid) == set()
    assert await store.get_evidence(sid, alerts[0]["id"]) is None
    # A snapshot rendered after its session was erased leaves nothing behind.
    await store.save_evidence(sid, "late", time.time(), b"\xff\xd8jpeg", 1, 1, {})
    await store.flush()
    assert await store.evidence_ids(sid) == set()
    status, body = await alerts_of(http, server.url, sid)
    assert status == 404 and body["error"]["code"] == "session_not_found"


async def test_evidence_is_for_the_operator_only(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    busy_scene(rekognition)
    mine, theirs = await start(http, server.url), await start(http, server.url)
    sid = mine["session_id"]
    await push(http, server.url, sid, data_url(blank_bgr(W, H, 128)))
    [alert, *_] = await with_evidence(http, server.url, sid, 3)
    evidence = server.url + alert["evidence_url"]
    for token, status in (
        (None, 401),
        ("not-a-token", 401),
        (mine["candidate_token"], 403),
        (theirs["candidate_token"], 403),
    ):
        got, _headers, body = await fetch_image(http, evidence, token)
        assert got == status, (token, body)
        code, _ = await alerts_of(http, server.url, sid, token)
        assert code == status
    # Unknown session, unknown alert: 404 with their own codes.
    async with http.get(
        f"{server.url}/api/sessions/nope/alerts/{alert['id']}/evidence", headers=op()
    ) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "session_not_found"
    async with http.get(f"{server.url}/api/sessions/{sid}/alerts/nope/evidence", headers=op()) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "alert_not_found"
    # Another session's alert is not found under this one.
    async with http.get(
        f"{server.url}/api/sessions/{theirs['session_id']}/alerts/{alert['id']}/evidence",
        headers=op(),
    ) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "alert_not_found"


# --- the writer: bounded, never waits ----------------------------------------------------


async def test_a_full_queue_drops_and_counts_and_the_session_limit_holds(
    tmp_path: Path,
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, evidence_queue_size=1, evidence_max_per_session=2
    )
    store = Store(tmp_path / "s.sqlite3")
    await store.open()
    await store.create_session("s1", "rest", "test", {}, time.time())
    writer = EvidenceWriter(settings, store, Instruments())
    writer.start()
    frame = Frame.from_bgr(astronaut_bgr(), captured_at=time.time())
    obs = Observation("test", Checks(), faces=())

    def job(n: int) -> EvidenceJob:
        alert = {
            "episode_id": f"a{n}",
            "type": "no_face_detected",
            "severity": "warning",
            "message": "m",
            "details": {},
            "frame_index": n,
        }
        return EvidenceJob("s1", alert, frame, obs)

    try:
        # Offered back to back from the loop: the first waits in the one-place queue, the
        # second finds it full and is dropped at once (offer never awaits).
        assert writer.offer(job(1)) is True
        assert writer.offer(job(2)) is False
        assert writer.outcomes == {"dropped": 1}
        await writer.settle("s1")
        assert writer.offer(job(3)) is True
        await writer.settle("s1")
        assert writer.offer(job(4)) is False  # two per session
        assert writer.outcomes == {"dropped": 1, "stored": 2, "session_limit": 1}
        await store.flush()
        assert await store.evidence_ids("s1") == {"a1", "a3"}
        value = writer.instruments.registry.get_sample_value(
            "proctor_evidence_total", {"outcome": "dropped"}
        )
        assert value == 1.0
        # Rendering yields the CPU to the live path: its thread runs at a higher nice.
        [thread] = [t for t in threading.enumerate() if t.name.startswith("evidence")]
        assert thread.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(
            19, os.getpriority(os.PRIO_PROCESS, 0) + EVIDENCE_NICE
        )
    finally:
        await writer.stop()
        await store.close()


# --- WebRTC end to end -------------------------------------------------------------------


async def test_webrtc_onset_snapshot_boxes_and_rescore(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    """Over a real aiortc peer: a second face raises multiple_faces_detected; its
    snapshot is the frame that confirmed it, both faces boxed where the fake said; and
    re-scoring the capture-timed session with its own rules gives back its alerts."""
    from tests.rtc_client import RtcTestClient, SyntheticCamera, alert_events, start_rtc_server

    srv = await start_rtc_server(tmp_path, rekognition)
    scenes = {"face": astronaut_bgr(W, H), "blank": blank_bgr(W, H)}
    client = RtcTestClient(srv.url, SyntheticCamera(scenes, "face"))
    try:
        rekognition.set_scene(faces=[fake_face(box=FACES[0])], labels=[], text=[])
        await client.connect(job_data={"jobTitle": "evidence"})
        await client.wait_for("frame_analysis", within=20)
        mark = len(client.messages)
        rekognition.set_scene(faces=[fake_face(box=FACES[0]), fake_face(box=FACES[1])])
        msg = await client.wait_for(
            "alerts",
            lambda m: bool(alert_events(m, "multiple_faces_detected", "onset")),
            within=15,
            start=mark,
        )
        [onset] = alert_events(msg, "multiple_faces_detected", "onset")
        assert onset["details"]["faces"] == 2
        rekognition.set_scene(faces=[fake_face(box=FACES[0])])
        await client.wait_for(
            "alerts",
            lambda m: bool(alert_events(m, "multiple_faces_detected", "ended")),
            within=15,
            start=mark,
        )
        sid = client.session_id
        alerts = await with_evidence(http, srv.url, sid, 1)
        [alert] = [a for a in alerts if a["id"] == onset["episode_id"]]
        assert alert["status"] == "ended" and alert["evidence_url"] is not None
        _s, headers, body = await fetch_image(http, srv.url + alert["evidence_url"])
        assert headers["Content-Type"] == "image/jpeg" and len(body) <= 80_000
        image = Image.open(io.BytesIO(body)).convert("RGB")
        assert image.width == W
        for box in FACES:  # on the photo: the strokes, not the surroundings, are checked
            assert_boxed(image, box, FACE_COLOUR, H, grey_around=False)
        async with http.post(f"{srv.url}/api/sessions/{sid}/rescore", json={}) as r:
            assert r.status == 200, await r.text()
            rescored = await r.json()
        assert rescored["rules"]["timing"] == "capture"
        assert same_alerts(rescored["alerts"], rescored["original"])
        assert [a["original_id"] for a in rescored["alerts"]] == [
            a["id"] for a in rescored["original"]
        ]
    finally:
        await client.close()
        await srv.stop()


def same_alerts(replayed: list[dict[str, Any]], original: list[dict[str, Any]]) -> bool:
    """Equal but for what only the original has (its id, snapshot and review)."""
    ignore = {"id", "original_id", "evidence_url", "review"}

    def strip(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in a.items() if k not in ignore} for a in alerts]

    return strip(replayed) == strip(original)
