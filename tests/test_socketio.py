"""The legacy Socket.IO contract with a real python-socketio client."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import socketio

from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import face_data_url

EVENTS = ("session_started", "frame_analysis", "alerts", "live_metrics", "session_ended", "error")


class Client:
    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: dict[str, list[Any]] = defaultdict(list)
        self._waiters: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        for name in EVENTS:
            self.sio.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Any:
        async def record(data: Any) -> None:
            self.received[name].append(data)
            self._waiters[name].set()

        return record

    async def wait(self, name: str, count: int = 1, timeout: float = 5.0) -> list[Any]:
        async def until() -> None:
            while len(self.received[name]) < count:
                self._waiters[name].clear()
                await self._waiters[name].wait()

        await asyncio.wait_for(until(), timeout)
        return self.received[name]


@pytest.fixture
async def clients(server: RunningServer) -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    for _ in range(2):
        c = Client()
        await c.sio.connect(server.url, transports=["websocket"])
        made.append(c)
    yield made
    for c in made:
        await c.sio.disconnect()


async def test_full_flow(clients: list[Client], rekognition: FakeRekognition) -> None:
    c, _ = clients
    await c.sio.emit("start_session", {"job_data": {"jobTitle": "Software Engineer"}})
    started = (await c.wait("session_started"))[0]
    sid = started["session_id"]
    assert started["backend"] == "rekognition"

    ack = await c.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    assert ack == {"status": "analysed", "frame_index": 0}
    analysis = (await c.wait("frame_analysis"))[0]
    assert analysis["session_id"] == sid
    metrics = analysis["result"]["metrics"]
    assert metrics["eye_contact"] == 100.0 and metrics["engagement"] is not None
    assert analysis["result"]["dominant_emotion"] == "CALM"

    await c.sio.emit("get_live_metrics", {"session_id": sid})
    live = (await c.wait("live_metrics"))[0]
    assert live["frames_analysed"] == 1 and live["metrics"]["eye_contact"]["average"] == 100.0

    await c.sio.emit("end_session", {"session_id": sid})
    ended = (await c.wait("session_ended"))[0]
    assert ended["session_id"] == sid
    assert ended["report"]["summary"]["frames_analysed"] == 1
    assert c.received["error"] == []


async def test_alert_events_carry_onset_and_end(
    clients: list[Client], rekognition: FakeRekognition
) -> None:
    c, _ = clients
    await c.sio.emit("start_session", {"job_data": {}})
    sid = (await c.wait("session_started"))[0]["session_id"]
    rekognition.set_scene(faces=[fake_face(), fake_face()], labels=[fake_label("Mobile Phone", 91)])
    await c.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    onset = (await c.wait("alerts"))[0]["alerts"]
    assert sorted((a["type"], a["severity"], a["status"]) for a in onset) == [
        ("multiple_faces_detected", "critical", "onset"),
        ("suspicious_object", "warning", "onset"),
    ]
    rekognition.set_scene(faces=[fake_face()], labels=[])
    await c.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    closed = (await c.wait("alerts", 2))[1]["alerts"]
    assert {a["status"] for a in closed} == {"ended"}
    assert all(a["duration_s"] is not None for a in closed)


@pytest.mark.parametrize(
    ("event", "payload", "code"),
    [
        ("analyze_frame", {"session_id": "nope", "frame": "x"}, "session_not_found"),
        ("analyze_frame", {"frame": "x"}, "missing_session_id"),
        ("analyze_frame", "not json", "invalid_json"),
        ("get_live_metrics", {"session_id": "nope"}, "session_not_found"),
        ("end_session", {"session_id": "nope"}, "session_not_found"),
        ("start_session", {"job_data": "a string"}, "invalid_field"),
    ],
)
async def test_bad_input_gets_an_error_event_to_that_client_only(
    clients: list[Client], event: str, payload: Any, code: str
) -> None:
    bad, other = clients
    await bad.sio.emit(event, payload)
    err = (await bad.wait("error"))[0]
    assert err["code"] == code and err["event"] == event and err["message"]
    await asyncio.sleep(0.05)
    assert other.received["error"] == []
    assert bad.sio.connected  # the connection survives


async def test_bad_frames_do_not_end_the_session_or_connection(clients: list[Client]) -> None:
    c, _ = clients
    await c.sio.emit("start_session", {"job_data": {}})
    sid = (await c.wait("session_started"))[0]["session_id"]
    for frame, code in [
        ("data:image/jpeg;base64,@@@", "malformed_frame"),
        ("R0lGODlhAQABAAAAACw=", "unsupported_image"),
        (None, "malformed_frame"),
    ]:
        ack = await c.sio.call("analyze_frame", {"session_id": sid, "frame": frame})
        assert ack["status"] == "error" and ack["error"]["code"] == code
    ack = await c.sio.call("analyze_frame", {"session_id": sid})
    assert ack["error"]["code"] == "missing_field"
    ok = await c.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    assert ok["status"] == "analysed"
    assert c.sio.connected


async def test_oversized_frame_is_refused_and_the_connection_survives(
    clients: list[Client],
) -> None:
    c, _ = clients
    await c.sio.emit("start_session", {"job_data": {}})
    sid = (await c.wait("session_started"))[0]["session_id"]
    huge = "data:image/jpeg;base64," + "A" * (7 * 1024 * 1024)  # 5.25 MB decoded
    ack = await c.sio.call("analyze_frame", {"session_id": sid, "frame": huge}, timeout=10)
    assert ack["error"]["code"] == "frame_too_large" and ack["error"]["status"] == 413
    assert c.sio.connected
    ok = await c.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    assert ok["status"] == "analysed"


async def test_a_client_only_receives_its_own_sessions_events(clients: list[Client]) -> None:
    a, b = clients
    await a.sio.emit("start_session", {"job_data": {}})
    sid_a = (await a.wait("session_started"))[0]["session_id"]
    await b.sio.emit("start_session", {"job_data": {}})
    sid_b = (await b.wait("session_started"))[0]["session_id"]
    await a.sio.call("analyze_frame", {"session_id": sid_a, "frame": face_data_url()})
    await b.sio.call("analyze_frame", {"session_id": sid_b, "frame": face_data_url()})
    await a.wait("frame_analysis")
    await b.wait("frame_analysis")
    await asyncio.sleep(0.05)
    assert {e["session_id"] for e in a.received["frame_analysis"]} == {sid_a}
    assert {e["session_id"] for e in b.received["frame_analysis"]} == {sid_b}
    assert len(a.received["session_started"]) == 1 and len(b.received["session_started"]) == 1


async def test_naming_a_session_subscribes_to_it(
    clients: list[Client], server: RunningServer
) -> None:
    """A viewer (or a REST-started session) joins the room by naming the session id."""
    pusher, viewer = clients
    await pusher.sio.emit("start_session", {"job_data": {}})
    sid = (await pusher.wait("session_started"))[0]["session_id"]
    await viewer.sio.emit("get_live_metrics", {"session_id": sid})
    await viewer.wait("live_metrics")
    await pusher.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    assert (await viewer.wait("frame_analysis"))[0]["session_id"] == sid


async def test_analysing_a_frame_of_an_ended_session(clients: list[Client]) -> None:
    c, _ = clients
    await c.sio.emit("start_session", {"job_data": {}})
    sid = (await c.wait("session_started"))[0]["session_id"]
    await c.sio.emit("end_session", {"session_id": sid})
    await c.wait("session_ended")
    ack = await c.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
    assert ack["error"]["code"] == "session_ended" and ack["error"]["status"] == 409


async def test_a_polling_packet_arriving_in_pieces_is_read_whole(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    """Through a proxy or a slow network a long-polling POST arrives in pieces;
    engine.io's single read of it got only the first ones (refused as bad JSON)."""
    base = f"{server.url}/socket.io/?EIO=4&transport=polling"
    async with http.get(base) as r:
        sid = json.loads((await r.text())[1:])["sid"]
    url = f"{base}&sid={sid}"
    async with http.post(url, data="40") as r:
        assert r.status == 200
    async with http.get(url) as r:
        assert (await r.text()).startswith("40")
    packet = ("42" + json.dumps(["analyze_frame", {"session_id": "nope", "frame": face_data_url()}])
              ).encode()

    async def pieces() -> AsyncIterator[bytes]:
        half = len(packet) // 2
        yield packet[:half]
        await asyncio.sleep(0.2)  # the server has started reading by now
        yield packet[half:]

    async with http.post(url, data=pieces(),
                         headers={"Content-Length": str(len(packet))}) as r:
        assert r.status == 200
    async with http.get(url) as r:
        text = await r.text()
    assert '"error"' in text and "session_not_found" in text, text[:300]
