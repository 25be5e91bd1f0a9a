"""The bad-input battery over REST and Socket.IO (the data channel and the offer have
their own): every case answers a 4xx or an error event, never a 5xx; afterwards the
server is healthy and the session it was aimed at still analyses frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer
from tests.hostile_inputs import FRAMES, HOSTILE_JSON, RAW_TIMESTAMPS, TIMESTAMPS, b64url, jpeg_sof
from tests.media import face_data_url
from tests.test_socketio import Client

OPERATOR = "battery-operator-token"
AUTH = {"Authorization": f"Bearer {OPERATOR}"}
COUNTED: dict[str, int] = {}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The battery is about input, not rate: the rate limit has its own test.
    return {"api_token": OPERATOR, "socketio_events_per_s": 10_000, "socketio_event_burst": 10_000}


async def start(http: aiohttp.ClientSession, server: RunningServer) -> str:
    async with http.post(f"{server.url}/api/sessions/start", json={}, headers=AUTH) as r:
        assert r.status == 200
        return str((await r.json())["session_id"])


async def still_analysing(http: aiohttp.ClientSession, server: RunningServer, sid: str) -> None:
    async with http.get(f"{server.url}/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(f"{server.url}/api/sessions/{sid}/metrics", headers=AUTH) as r:
        before = (await r.json())["frames_analysed"]
    async with http.post(
        f"{server.url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}, headers=AUTH
    ) as r:
        assert r.status == 200 and (await r.json())["status"] == "analysed"
    async with http.get(f"{server.url}/api/sessions/{sid}/metrics", headers=AUTH) as r:
        assert (await r.json())["frames_analysed"] == before + 1


def frame_body(frame: Any = None, timestamp: str | None = None, *, omit_frame: bool = False) -> bytes:
    parts = [] if omit_frame else [f'"frame": {json.dumps(frame)}']
    if timestamp is not None:
        parts.append(f'"timestamp": {timestamp}')
    return ("{" + ", ".join(parts) + "}").encode()


def rest_cases(sid: str) -> list[tuple[str, str, str, bytes | None, dict[str, str], set[int]]]:
    """(name, method, path, body, headers, acceptable statuses)."""
    frame_path = f"/api/sessions/{sid}/frame"
    cases: list[tuple[str, str, str, bytes | None, dict[str, str], set[int]]] = []
    for name, body in HOSTILE_JSON:
        expect = {400, 413}
        cases.append((f"start: {name}", "POST", "/api/sessions/start", body, AUTH, expect))
        cases.append((f"frame: {name}", "POST", frame_path, body, AUTH, expect))
    for name, value, status in FRAMES:
        cases.append((f"frame value: {name}", "POST", frame_path, frame_body(value), AUTH, {status}))
    cases.append(("frame missing", "POST", frame_path, frame_body(omit_frame=True), AUTH, {400}))
    good = face_data_url()
    for name, stamp in TIMESTAMPS:
        cases.append(
            (f"timestamp {name}", "POST", frame_path, frame_body(good, json.dumps(stamp)), AUTH, {400})
        )
    for name, raw in RAW_TIMESTAMPS:
        cases.append((f"timestamp raw {name}", "POST", frame_path, frame_body(good, raw), AUTH, {400}))
    big_start = b'{"job_data": {"d": "' + b"x" * 20_000 + b'"}}'
    cases.append(("start body over its limit", "POST", "/api/sessions/start", big_start, AUTH, {413}))
    over = "data:image/jpeg;base64," + "A" * (7 * 1024 * 1024 + 4)
    cases.append(("frame body over its limit", "POST", frame_path, frame_body(over), AUTH, {413}))
    just_over = b64url(jpeg_sof(64, 64) + b"\x00" * (5 * 1024 * 1024))
    cases.append(("frame decoded over MAX_FRAME_BYTES", "POST", frame_path, frame_body(just_over), AUTH, {413}))
    for label, bad_id in (
        ("unknown", "no-such-session"),
        ("long", "x" * 5000),
        ("encoded nul", "%00"),
        ("dot-dot", "..%2F.."),
        ("unicode", "%C3%BF%C3%BE"),
    ):
        cases.append((f"frame on {label} id", "POST", f"/api/sessions/{bad_id}/frame", frame_body(good), AUTH, {400, 404}))
        cases.append((f"metrics of {label} id", "GET", f"/api/sessions/{bad_id}/metrics", None, AUTH, {400, 404}))
        cases.append((f"end of {label} id", "POST", f"/api/sessions/{bad_id}/end", None, AUTH, {400, 404}))
        cases.append((f"report of {label} id", "GET", f"/api/sessions/{bad_id}/report", None, AUTH, {400, 404}))
    for query in (
        "status=bogus",
        "limit=0",
        "limit=-1",
        "limit=100000",
        "limit=abc",
        "limit=1e3",
        "offset=-5",
        "offset=" + "9" * 5000,
        "status=" + "x" * 5000,
    ):
        cases.append((f"list ?{query[:20]}", "GET", f"/api/sessions?{query}", None, AUTH, {400}))
    for label, headers in (
        ("no token", {}),
        ("wrong token", {"Authorization": "Bearer nope"}),
        ("long token", {"Authorization": "Bearer " + "t" * 6000}),
        ("basic auth", {"Authorization": "Basic dXNlcjpwYXNz"}),
        ("empty bearer", {"Authorization": "Bearer "}),
        ("foreign origin", {**AUTH, "Origin": "http://evil.example"}),
        ("foreign host", {**AUTH, "Host": "evil.example"}),
    ):
        cases.append((f"start with {label}", "POST", "/api/sessions/start", b"{}", headers, {401, 403}))
    for method, path in (
        ("PUT", "/api/sessions/start"),
        ("GET", "/api/sessions/start"),
        ("DELETE", "/health"),
        ("PATCH", frame_path),
        ("GET", "/api/no-such-route"),
    ):
        cases.append((f"{method} {path[:30]}", method, path, None, AUTH, {404, 405}))
    return cases


async def test_rest_battery(server: RunningServer, http: aiohttp.ClientSession) -> None:
    sid = await start(http, server)
    cases = rest_cases(sid)
    failures = []
    for i, (name, method, path, body, headers, expect) in enumerate(cases):
        async with http.request(
            method,
            server.url + path,
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as r:
            data = await r.json(content_type=None)
            ok = r.status in expect and isinstance(data.get("error", {}).get("code"), str)
            if not ok:
                failures.append((name, r.status, data))
        if i % 20 == 0:
            await still_analysing(http, server, sid)
    assert not failures, failures
    await still_analysing(http, server, sid)
    # The session's data survived it all: it ends with a report, readable afterwards.
    async with http.post(f"{server.url}/api/sessions/{sid}/end", headers=AUTH) as r:
        assert r.status == 200
        analysed = (await r.json())["summary"]["frames_analysed"]
    async with http.get(f"{server.url}/api/sessions/{sid}/report", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["summary"]["frames_analysed"] == analysed
    COUNTED["rest"] = len(cases)


@pytest.fixture
async def operator_client(server: RunningServer) -> AsyncIterator[Client]:
    c = Client()
    await c.sio.connect(server.url, transports=["websocket"], auth={"token": OPERATOR})
    yield c
    await c.sio.disconnect()


def socketio_cases(sid: str) -> list[tuple[str, str, Any, set[int]]]:
    """(name, event, payload, acceptable statuses) sent with a python-socketio client."""
    good = face_data_url()
    cases: list[tuple[str, str, Any, set[int]]] = []
    for event in ("analyze_frame", "get_live_metrics", "end_session"):
        for label, payload in (
            ("a number", 123),
            ("a list", [1, 2]),
            ("true", True),
            ("a non-JSON string", "not json"),
            ("a JSON-string array", "[1]"),
            ("a JSON string too deep", deep(40)),
            ("no session_id", {}),
            ("null session_id", {"session_id": None}),
            ("numeric session_id", {"session_id": 123}),
            ("list session_id", {"session_id": [sid]}),
            ("unknown session_id", {"session_id": "no-such-session"}),
            ("5000-char session_id", {"session_id": "s" * 5000}),
            ("bad token in payload", {"session_id": sid, "token": "nope"}),
        ):
            cases.append((f"{event} with {label}", event, payload, {400, 401, 404}))
    for label, value, status in FRAMES:
        cases.append((f"frame {label}", "analyze_frame", {"session_id": sid, "frame": value}, {status}))
    cases.append(("frame missing", "analyze_frame", {"session_id": sid}, {400}))
    for label, stamp in TIMESTAMPS:
        cases.append(
            (f"timestamp {label}", "analyze_frame", {"session_id": sid, "frame": good, "timestamp": stamp}, {400})
        )
    for label, payload in (
        ("job_data list", {"job_data": []}),
        ("job_data string", {"job_data": "x"}),
        ("job_data too large", {"job_data": {"d": "x" * 5000}}),
        ("job_data too deep", {"job_data": json.loads(deep(35))}),
        ("a number", 5),
        ("a non-JSON string", "{nope"),
    ):
        cases.append((f"start_session with {label}", "start_session", payload, {400, 413}))
    for event in ("no_such_event", "on_connect", "__init__", "x" * 500):
        cases.append((f"unknown event {event[:20]}", event, {}, {400}))
    return cases


def deep(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


async def test_socketio_battery(
    server: RunningServer, http: aiohttp.ClientSession, operator_client: Client
) -> None:
    sid = await start(http, server)
    c = operator_client
    cases = socketio_cases(sid)
    failures = []
    for i, (name, event, payload, expect) in enumerate(cases):
        before = len(c.received["error"])
        ack = await c.sio.call(event, payload, timeout=10)
        error = ack.get("error") if isinstance(ack, dict) else None
        if not (ack.get("status") == "error" and error and error["status"] in expect):
            failures.append((name, ack))
            continue
        await c.wait("error", before + 1)
        if i % 20 == 0:
            await still_analysing(http, server, sid)
    assert not failures, failures
    assert c.sio.connected
    await still_analysing(http, server, sid)
    COUNTED["socketio"] = len(cases)


class RawSocket:
    """A bare Engine.IO/Socket.IO v4 websocket client: sends any text as a packet."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[Any] = []
        self.acks: dict[int, Any] = {}
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, url: str, token: str) -> RawSocket:
        ws = await http.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket")
        first = await ws.receive_str()
        assert first.startswith("0{")
        await ws.send_str("40" + json.dumps({"token": token}))
        assert (await ws.receive_str()).startswith("40{")
        return cls(ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            text = msg.data
            if text == "2":
                await self.ws.send_str("3")
            elif text.startswith("42"):
                self.events.append(json.loads(text[2:]))
            elif text.startswith("43"):
                digits = len(text[2:]) - len(text[2:].lstrip("0123456789"))
                self.acks[int(text[2 : 2 + digits])] = json.loads(text[2 + digits :])
            self._arrived.set()

    async def wait_ack(self, ack_id: int, timeout: float = 10.0) -> Any:
        async def until() -> Any:
            while ack_id not in self.acks:
                self._arrived.clear()
                await self._arrived.wait()
            return self.acks[ack_id]

        return await asyncio.wait_for(until(), timeout)

    def errors(self) -> list[dict[str, Any]]:
        return [e[1] for e in self.events if e and e[0] == "error"]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


def raw_cases(sid: str) -> list[tuple[str, str]]:
    """(name, packet body after `42<id>`) that no JSON encoder would write."""
    good = json.dumps(face_data_url())
    cases = [
        ("deep array 100k", f'["analyze_frame",{"[" * 100_000}{"]" * 100_000}]'),
        ("deep object payload", f'["analyze_frame",{deep(50_000)}]'),
        ("5000-digit number", '["get_live_metrics",{"session_id":' + "9" * 5000 + "}]"),
        ("NaN payload", f'["analyze_frame",{{"session_id":"{sid}","frame":{good},"timestamp":NaN}}]'),
        ("Infinity payload", f'["analyze_frame",{{"session_id":"{sid}","frame":{good},"timestamp":Infinity}}]'),
        ("1e400 payload", f'["analyze_frame",{{"session_id":"{sid}","frame":{good},"timestamp":1e400}}]'),
        ("not JSON", "[nope"),
        ("object instead of array", '{"event":"analyze_frame"}'),
        ("empty array", "[]"),
        ("number event name", "[5,{}]"),
        ("client-sent connect", '["connect",{}]'),
        ("client-sent disconnect", '["disconnect","x"]'),
        ("string packet", '"analyze_frame"'),
        ("extra arguments", f'["get_live_metrics",{{"session_id":"{sid}"}},1,2,3]'),
    ]
    return cases


async def test_socketio_raw_packets_battery(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    sid = await start(http, server)
    raw = await RawSocket.open(http, server.url, OPERATOR)
    try:
        cases = raw_cases(sid)
        failures = []
        for ack_id, (name, body) in enumerate(cases, start=1):
            before = len(raw.errors())
            await raw.ws.send_str(f"42{ack_id}{body}")
            ack = (await raw.wait_ack(ack_id))[0]
            if name == "extra arguments":  # extra arguments are ignored, the event answers
                if ack != {"status": "ok"}:
                    failures.append((name, ack))
                continue
            if not (isinstance(ack, dict) and ack.get("status") == "error"):
                failures.append((name, ack))
                continue
            if not 400 <= ack["error"]["status"] < 500:
                failures.append((name, ack))
            if len(raw.errors()) <= before:  # the error event precedes its ack
                failures.append((name, "no error event"))
        assert not failures, failures
        assert not raw.ws.closed
        await still_analysing(http, server, sid)
        COUNTED["socketio_raw"] = len(cases)
    finally:
        await raw.close()


async def test_socketio_message_over_the_size_limit_closes_only_that_connection(
    server: RunningServer, http: aiohttp.ClientSession, operator_client: Client
) -> None:
    sid = await start(http, server)
    raw = await RawSocket.open(http, server.url, OPERATOR)
    limit = server.settings.max_frame_bytes * 4 // 3 * 2 + 128 * 1024
    try:
        await raw.ws.send_str('42["analyze_frame",{"frame":"' + "A" * limit + '"}]')
    except ConnectionError:
        pass  # the server may close before the message is all sent
    await asyncio.wait_for(raw._reader, 10)  # engine.io closes the connection …
    assert raw.ws.closed
    ack = await operator_client.sio.call(  # … and nothing else
        "analyze_frame", {"session_id": sid, "frame": face_data_url()}, timeout=10
    )
    assert ack["status"] == "analysed"
    await still_analysing(http, server, sid)


async def test_the_battery_is_large_enough() -> None:
    sid = "s"
    total = len(rest_cases(sid)) + len(socketio_cases(sid)) + len(raw_cases(sid))
    assert total >= 150, total


async def test_a_socketio_flood_gets_rate_limited_errors_and_others_are_served(
    tmp_path: Any, rekognition: Any, http: aiohttp.ClientSession
) -> None:
    from tests.conftest import make_settings, start_server

    srv = await start_server(
        make_settings(
            tmp_path,
            api_token=OPERATOR,
            socketio_events_per_s=20,
            socketio_event_burst=20,
            socketio_errors_per_s=5,
        )
    )
    try:
        sid = await start(http, srv)
        flood = await RawSocket.open(http, srv.url, OPERATOR)
        honest = Client()
        await honest.sio.connect(srv.url, transports=["websocket"], auth={"token": OPERATOR})
        n = 400
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for ack_id in range(1, n + 1):
            await flood.ws.send_str(f'42{ack_id}["get_live_metrics",{{"session_id":"{sid}"}}]')
        acks = [(await flood.wait_ack(i))[0] for i in range(1, n + 1)]
        elapsed = loop.time() - t0
        served = [a for a in acks if a.get("status") == "ok"]
        limited = [a for a in acks if a.get("error", {}).get("code") == "rate_limited"]
        assert len(served) + len(limited) == n
        assert len(served) <= 20 + 20 * elapsed + 1  # the burst, then the sustained rate
        assert len(limited) >= n - len(served) > 0
        # Error events are limited too: a flood cannot make the server flood back.
        errors = [e for e in flood.errors() if e["code"] == "rate_limited"]
        assert 0 < len(errors) <= 5 + 5 * elapsed + 1
        assert not flood.ws.closed
        # Another connection is not slowed into failure, and the session goes on.
        ack = await honest.sio.call(
            "analyze_frame", {"session_id": sid, "frame": face_data_url()}, timeout=10
        )
        assert ack["status"] == "analysed"
        await asyncio.sleep(0.3)  # the bucket refills: the flooder is served again
        await flood.ws.send_str(f'42{n + 1}["get_live_metrics",{{"session_id":"{sid}"}}]')
        assert (await flood.wait_ack(n + 1))[0] == {"status": "ok"}
        await honest.sio.disconnect()
        await flood.close()
    finally:
        await srv.stop()
