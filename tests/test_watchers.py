"""The console's Socket.IO events (`watch_session`, `watch_all`, `unwatch_*`) with real
python-socketio clients against the real server: who may watch, what each watcher
receives from sessions of every transport, and that a watcher which stops reading can
neither hold memory nor slow analysis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from server.app import SOCKETIO
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url
from tests.test_socketio import Client

OPERATOR = "watch-operator-token"
Connect = Callable[[str | None], Awaitable[Client]]


def bearer(token: str | None = OPERATOR) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_token": OPERATOR, "watch_metrics_interval_s": 0.2}


@pytest.fixture
async def connect(server: RunningServer) -> AsyncIterator[Connect]:
    made: list[Client] = []

    async def make(token: str | None) -> Client:
        c = Client()
        await c.sio.connect(
            server.url, transports=["websocket"], auth={"token": token} if token else None
        )
        made.append(c)
        return c

    yield make
    for c in made:
        await c.sio.disconnect()


async def rest_start(http: aiohttp.ClientSession, url: str, **job: Any) -> dict[str, Any]:
    async with http.post(
        f"{url}/api/sessions/start", json={"job_data": job}, headers=bearer()
    ) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def rest_frame(http: aiohttp.ClientSession, url: str, sid: str) -> dict[str, Any]:
    async with http.post(
        f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}, headers=bearer()
    ) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def rest_end(http: aiohttp.ClientSession, url: str, sid: str) -> dict[str, Any]:
    async with http.post(f"{url}/api/sessions/{sid}/end", headers=bearer()) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def until_true(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def for_session(received: list[Any], sid: str) -> list[Any]:
    return [m for m in received if m.get("session_id") == sid]


# --- who may watch ---------------------------------------------------------------------------


async def test_only_the_operator_may_watch(
    server: RunningServer, http: aiohttp.ClientSession, connect: Connect
) -> None:
    started = await rest_start(http, server.url, jobTitle="Analyst")
    sid, candidate = started["session_id"], started["candidate_token"]
    for token, code in (
        (None, "unauthorized"),
        (candidate, "forbidden"),
        ("wrong", "unauthorized"),
    ):
        c = await connect(token)
        for event, payload in (("watch_all", {}), ("watch_session", {"session_id": sid})):
            ack = await c.sio.call(event, payload, timeout=5)
            assert ack["status"] == "error" and ack["error"]["code"] == code, (token, event, ack)
        errors = await c.wait("error", 2)
        assert [e["code"] for e in errors] == [code, code]
        assert [e["event"] for e in errors] == ["watch_all", "watch_session"]
        # Refused watchers are in no room: a frame and an alert reach none of them.
    rekognition_free_frame = await rest_frame(http, server.url, sid)
    assert rekognition_free_frame["status"] == "analysed"
    op = await connect(OPERATOR)
    assert await op.sio.call("watch_all", {}, timeout=5) == {"status": "ok"}
    ack = await op.sio.call("watch_session", {"session_id": sid}, timeout=5)
    assert ack == {"status": "ok", "session_id": sid}
    # A token in the payload works too (old clients), like every other event.
    old = await connect(None)
    ack = await old.sio.call("watch_all", {"token": OPERATOR}, timeout=5)
    assert ack == {"status": "ok"}


async def test_watching_what_cannot_be_watched_is_a_clear_error(
    server: RunningServer, http: aiohttp.ClientSession, connect: Connect
) -> None:
    op = await connect(OPERATOR)
    cases: list[tuple[Any, str]] = [
        ({"session_id": "no-such-session"}, "session_not_found"),
        ({}, "missing_session_id"),
        ({"session_id": 42}, "missing_session_id"),
        ({"session_id": "x" * 500}, "session_not_found"),
        ("not json", "invalid_json"),
        ([1, 2], "invalid_json"),
    ]
    ended = await rest_start(http, server.url)
    await rest_end(http, server.url, ended["session_id"])
    cases.append(({"session_id": ended["session_id"]}, "session_ended"))
    for payload, code in cases:
        ack = await op.sio.call("watch_session", payload, timeout=5)
        assert ack["status"] == "error" and ack["error"]["code"] == code, (payload, ack)
        assert len(json.dumps(ack)) < 1000  # no echo of a long id
    ack = await op.sio.call("unwatch_session", {}, timeout=5)
    assert ack["error"]["code"] == "missing_session_id"
    # The connection survived every refusal.
    assert await op.sio.call("watch_all", {}, timeout=5) == {"status": "ok"}


# --- what watchers receive -------------------------------------------------------------------


async def test_watch_all_and_watch_session_receive_their_events(
    server: RunningServer,
    http: aiohttp.ClientSession,
    connect: Connect,
    rekognition: FakeRekognition,
) -> None:
    everything = await connect(OPERATOR)
    assert (await everything.sio.call("watch_all", {}, timeout=5))["status"] == "ok"
    one = await connect(OPERATOR)

    watched = await rest_start(http, server.url, jobTitle="Watched", candidateName="Ada")
    other = await rest_start(http, server.url, jobTitle="Other")
    wid, oid = watched["session_id"], other["session_id"]
    await everything.wait("session_started", 2)
    started = {m["session_id"]: m for m in everything.received["session_started"]}
    assert started[wid]["job_data"] == {"jobTitle": "Watched", "candidateName": "Ada"}
    assert started[wid]["transport"] == "rest" and started[wid]["status"] == "live"
    assert "candidate_token" not in started[wid]  # the candidate's capability stays put

    ack = await one.sio.call("watch_session", {"session_id": wid}, timeout=5)
    assert ack["status"] == "ok"
    first = (await one.wait("live_metrics"))[0]  # the state at once
    assert first["session_id"] == wid and first["health"]["status"] in ("ok", "warning")

    rekognition.set_scene(faces=[fake_face(), fake_face()])  # multiple_faces_detected
    for sid in (wid, oid):
        await rest_frame(http, server.url, sid)
    await one.wait("alerts")
    await everything.wait("alerts", 2)
    await one.wait("frame_analysis")
    await one.wait("live_metrics", 3)  # pushed every WATCH_METRICS_INTERVAL_S (0.2 s)

    # watch_all: every session's alerts; no frames, no metrics.
    assert {m["session_id"] for m in everything.received["alerts"]} == {wid, oid}
    assert everything.received["frame_analysis"] == []
    assert everything.received["live_metrics"] == []
    # watch_session: that session's frames, alerts and metrics only; no other session's.
    assert {m["session_id"] for m in one.received["frame_analysis"]} == {wid}
    assert {m["session_id"] for m in one.received["alerts"]} == {wid}
    assert {m["session_id"] for m in one.received["live_metrics"]} == {wid}
    assert one.received["session_started"] == []
    [alerts] = one.received["alerts"]
    assert alerts["alerts"][0]["type"] == "multiple_faces_detected"
    pushed = one.received["live_metrics"][-1]
    assert pushed["frames_analysed"] == 1 and pushed["active_alerts"]
    assert set(pushed["health"]) == {"status", "reasons"}

    await rest_end(http, server.url, wid)
    ended = (await one.wait("session_ended"))[0]
    assert ended["session_id"] == wid and ended["report"]["summary"]["frames_analysed"] == 1
    await until_true(lambda: len(for_session(everything.received["session_ended"], wid)) == 1)
    assert for_session(everything.received["session_ended"], wid)[0]["report"]["summary"]
    assert everything.received["error"] == [] and one.received["error"] == []


async def test_a_socket_in_several_rooms_gets_each_event_once(
    server: RunningServer,
    http: aiohttp.ClientSession,
    connect: Connect,
    rekognition: FakeRekognition,
) -> None:
    """A console watches everything and the session it shows; the brief's operator client
    taking part in the session watches it too: each gets each alert once."""
    started = await rest_start(http, server.url)
    sid = started["session_id"]
    console = await connect(OPERATOR)
    await console.sio.call("watch_all", {}, timeout=5)
    await console.sio.call("watch_session", {"session_id": sid}, timeout=5)
    await console.sio.call("get_live_metrics", {"session_id": sid}, timeout=5)  # takes part
    rekognition.set_scene(faces=[fake_face(), fake_face()])
    await rest_frame(http, server.url, sid)
    await console.wait("alerts")
    await console.wait("frame_analysis")
    await rest_end(http, server.url, sid)
    await console.wait("session_ended")
    await asyncio.sleep(0.3)  # a duplicate would have arrived by now
    # The onset, and its closure when the session ended: each once.
    seen = [(a["episode_id"], a["status"]) for m in console.received["alerts"] for a in m["alerts"]]
    assert len(seen) == 2 and len(set(seen)) == 2 and {st for _e, st in seen} == {"onset", "ended"}
    assert len(console.received["frame_analysis"]) == 1
    assert len(console.received["session_ended"]) == 1


async def test_unwatch_stops_the_events(
    server: RunningServer,
    http: aiohttp.ClientSession,
    connect: Connect,
    rekognition: FakeRekognition,
) -> None:
    started = await rest_start(http, server.url)
    sid = started["session_id"]
    c = await connect(OPERATOR)
    await c.sio.call("watch_all", {}, timeout=5)
    await c.sio.call("watch_session", {"session_id": sid}, timeout=5)
    rekognition.set_scene(faces=[fake_face(), fake_face()])
    await rest_frame(http, server.url, sid)
    await c.wait("alerts")
    assert await c.sio.call("unwatch_session", {"session_id": sid}, timeout=5) == {
        "status": "ok",
        "session_id": sid,
    }
    assert await c.sio.call("unwatch_all", {}, timeout=5) == {"status": "ok"}
    metrics_before = len(c.received["live_metrics"])
    rekognition.set_scene(faces=[])  # ends the episode: an `alerts` closure
    await rest_frame(http, server.url, sid)
    second = await rest_start(http, server.url)
    await rest_end(http, server.url, sid)
    await asyncio.sleep(0.5)  # two metric pushes, the closure, a start and an end later
    assert len(c.received["alerts"]) == 1
    assert len(c.received["frame_analysis"]) == 1
    assert len(c.received["live_metrics"]) == metrics_before
    assert c.received["session_ended"] == []
    assert all(m["session_id"] != second["session_id"] for m in c.received["session_started"])


async def test_every_transport_reaches_the_watchers(
    server: RunningServer,
    http: aiohttp.ClientSession,
    connect: Connect,
    rekognition: FakeRekognition,
    tmp_path: Path,
) -> None:
    """REST, Socket.IO and recorded video here; WebRTC in the netns test below."""
    from tests.test_video_api import post_upload, wait_state
    from tests.video_media import make_video

    console = await connect(OPERATOR)
    await console.sio.call("watch_all", {}, timeout=5)
    rekognition.set_scene(faces=[fake_face(), fake_face()])  # an alert on every frame

    rest = await rest_start(http, server.url)
    await rest_frame(http, server.url, rest["session_id"])
    await rest_end(http, server.url, rest["session_id"])

    pusher = await connect(OPERATOR)
    ack = await pusher.sio.call("start_session", {"job_data": {"jobTitle": "SIO"}}, timeout=5)
    sio_id = ack["session_id"]
    ack = await pusher.sio.call(
        "analyze_frame", {"session_id": sio_id, "frame": face_data_url()}, timeout=10
    )
    assert ack["status"] == "analysed"
    await pusher.sio.call("end_session", {"session_id": sio_id}, timeout=30)

    video = make_video(tmp_path / "clip.webm", [(2, "face")], codec="vp8")
    async with aiohttp.ClientSession(headers=bearer()) as op_http:
        status, job = await post_upload(op_http, server.url, video.read_bytes(), interval="1")
        assert status == 202, job
        done = await wait_state(op_http, server.url, job["id"], {"done", "failed"})
    assert done["state"] == "done", done
    video_id = done["session_id"]

    expected = {rest["session_id"]: "rest", sio_id: "socketio", video_id: "video"}
    await until_true(
        lambda: set(expected) <= {m["session_id"] for m in console.received["session_ended"]}
    )
    transports = {m["session_id"]: m["transport"] for m in console.received["session_started"]}
    assert {sid: transports.get(sid) for sid in expected} == expected
    alerted = {m["session_id"] for m in console.received["alerts"]}
    assert set(expected) <= alerted


@pytest.mark.netns
async def test_webrtc_sessions_reach_the_watchers(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    from tests.rtc_client import RtcTestClient, SyntheticCamera, face_blank_scenes, start_rtc_server

    server = await start_rtc_server(tmp_path, rekognition, watch_metrics_interval_s=0.2)
    cam = SyntheticCamera(face_blank_scenes(), first="face")
    peer = RtcTestClient(server.url, cam)
    console = Client()
    try:
        await console.sio.connect(server.url, transports=["websocket"])  # development mode
        await console.sio.call("watch_all", {}, timeout=5)
        await peer.connect(job_data={"jobTitle": "WebRTC"})
        sid = peer.session_id
        await console.sio.call("watch_session", {"session_id": sid}, timeout=5)
        await console.wait("session_started")
        assert console.received["session_started"][0]["transport"] == "webrtc"
        await peer.wait_for("frame_analysis", within=20)
        cam.show("blank")  # nobody in front of the camera: no_face_detected after 2 s
        alert = await peer.wait_for(
            "alerts", lambda m: any(a["status"] == "onset" for a in m["alerts"]), within=20
        )
        await console.wait("alerts")
        [first] = console.received["alerts"][:1]
        assert first["alerts"][0]["episode_id"] == alert["alerts"][0]["episode_id"]
        await console.wait("frame_analysis")
        pushed = await console.wait("live_metrics", 2)
        assert pushed[-1]["rtc"]["connection_state"] == "connected"
        assert pushed[-1]["health"]["status"] in ("ok", "warning")
        peer.send({"type": "end_session"})
        await console.wait("session_ended", timeout=20)
    finally:
        await console.sio.disconnect()
        await peer.close()
        await server.stop()


# --- a watcher that stops reading ---------------------------------------------------------


class StalledPollingWatcher:
    """A Socket.IO client on the polling transport that joins `watch_session` and then
    never polls again: everything sent to it waits in its engine.io queue on the server."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.base = f"{url}/socket.io/?EIO=4&transport=polling"
        self.http = http
        self.sid = ""

    async def _get(self) -> str:
        async with self.http.get(f"{self.base}&sid={self.sid}") as r:
            return await r.text()

    async def _post(self, packet: str) -> None:
        async with self.http.post(f"{self.base}&sid={self.sid}", data=packet) as r:
            assert r.status == 200, await r.text()

    async def join(self, session_id: str) -> None:
        async with self.http.get(self.base) as r:
            opened = await r.text()
        self.sid = json.loads(opened[1:])["sid"]
        await self._post("40" + json.dumps({"token": OPERATOR}))
        assert (await self._get()).startswith("40")
        await self._post("42" + json.dumps(["watch_session", {"session_id": session_id}]))
        await asyncio.sleep(0.1)
        assert "live_metrics" in await self._get()  # joined: its first metrics arrived


async def test_a_stalled_watcher_cannot_hold_memory_or_slow_analysis(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    limit = 8
    server = await start_server(
        make_settings(
            tmp_path,
            api_token=OPERATOR,
            socketio_send_queue_max=limit,
            watch_metrics_interval_s=0.05,
        )
    )
    try:
        sio = server.app[SOCKETIO]
        started = await rest_start(http, server.url)
        sid = started["session_id"]
        stalled = StalledPollingWatcher(server.url, http)
        await stalled.join(sid)
        [eio_sid] = [k for k, s in sio.eio.sockets.items() if not s.closed]
        queue = sio.eio.sockets[eio_sid].queue
        # Frames only (no alert changes): the queue stops growing at the limit; analysis
        # goes on, every frame answered.
        depths = []
        for _ in range(3 * limit):
            assert (await rest_frame(http, server.url, sid))["status"] == "analysed"
            depths.append(queue.qsize())
        assert max(depths) <= limit + 1  # + the engine.io ping that may be queued
        dropped = _counter(server, "dropped")
        assert dropped >= 2 * limit
        # Alerts are never dropped: past twice the limit the watcher is disconnected.
        for i in range(3 * limit):
            faces = [fake_face(), fake_face()] if i % 2 == 0 else [fake_face()]
            rekognition.set_scene(faces=faces)  # an onset, then its closure, each frame
            assert (await rest_frame(http, server.url, sid))["status"] == "analysed"
            if eio_sid not in sio.eio.sockets or sio.eio.sockets[eio_sid].closed:
                break
        await until_true(lambda: _counter(server, "disconnected") == 1, within=5)
        assert queue.qsize() <= 1  # freed (only the writer's wake-up is left)
        await until_true(lambda: not any(sio.rooms(s) for s in _namespace_sids(sio)), 5)
        # The session and a healthy watcher carry on.
        console = Client()
        await console.sio.connect(server.url, transports=["websocket"], auth={"token": OPERATOR})
        try:
            await console.sio.call("watch_session", {"session_id": sid}, timeout=5)
            await rest_frame(http, server.url, sid)
            await console.wait("frame_analysis")
        finally:
            await console.sio.disconnect()
    finally:
        await server.stop()


def _counter(server: RunningServer, action: str) -> float:
    from server.app import INSTRUMENTS

    metric = server.app[INSTRUMENTS].socketio_backpressure.labels(action=action)
    return float(metric._value.get())


def _namespace_sids(sio: socketio.AsyncServer) -> list[str]:
    return [sid for sid, _eio in sio.manager.get_participants("/", None)]


# --- the sessions list the console starts from -------------------------------------------------


async def test_session_list_has_alert_counts_and_live_health(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    live = await rest_start(http, server.url, candidateName="Grace")
    ended = await rest_start(http, server.url)
    rekognition.set_scene(faces=[fake_face(), fake_face()])
    await rest_frame(http, server.url, live["session_id"])
    await rest_frame(http, server.url, ended["session_id"])
    await rest_end(http, server.url, ended["session_id"])
    async with http.get(f"{server.url}/api/sessions", headers=bearer()) as r:
        assert r.status == 200
        rows = {s["session_id"]: s for s in (await r.json())["sessions"]}
    row = rows[live["session_id"]]
    assert row["alert_count"] == 1 and row["job_data"] == {"candidateName": "Grace"}
    assert row["live"]["alerts_active"] == 1 and row["live"]["frames_analysed"] == 1
    assert row["live"]["health"] == {"status": "ok", "reasons": []}
    assert row["live"]["backend"] == "rekognition"
    done = rows[ended["session_id"]]
    assert done["alert_count"] == 1 and "live" not in done
