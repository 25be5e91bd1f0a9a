"""Webhooks against a real aiohttp receiver on loopback: signed deliveries (checked here
with our own HMAC, not the server's helper), retries of 5xx / 429 / timeouts with the same
delivery id, 4xx and redirects final, a dead receiver given up on, a full queue dropping
and counting, and analysis never waiting for a receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.app import WEBHOOKS, create_app
from server.config import ConfigError, Settings
from server.observability import Instruments
from server.session.webhooks import WebhookSender, sign, verify
from tests.conftest import RunningServer, free_port, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url

SECRET = "webhook-secret-0123456789abcdef"
MARKER = "Okapi-Registrar-5521"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def signed(self) -> bool:
        """Checked the way a receiver's own code would, independently of ours."""
        ts = self.headers["X-Proctor-Timestamp"]
        mac = hmac.new(SECRET.encode(), ts.encode() + b"." + self.body, hashlib.sha256)
        fresh = abs(time.time() - int(ts)) < 300
        return fresh and hmac.compare_digest(
            "sha256=" + mac.hexdigest(), self.headers["X-Proctor-Signature"]
        )


@dataclass
class Receiver:
    """Answers each request with the next scripted (status, headers, delay) or 200."""

    script: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: requests wait for it
    pending: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        app.router.add_post("/elsewhere", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self.url

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read()))
        status, headers, delay = self.script.pop(0) if self.script else (200, {}, 0.0)
        self.pending += 1
        try:
            if self.hold is not None:
                await self.hold.wait()
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.pending -= 1
        return web.Response(status=status, headers=headers)

    def deliveries(self, event: str) -> list[Received]:
        return [r for r in self.received if r.headers["X-Proctor-Event"] == event]

    async def wait(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"{len(self.received)} of {n} requests"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def hook_settings(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_url": url,
        "webhook_secret": SECRET,
        "webhook_retry_backoff_s": 0.01,
        "webhook_retry_max_backoff_s": 0.05,
        "webhook_max_attempts": 4,
        "webhook_timeout_s": 5.0,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


def outcome(instruments: Instruments, name: str, **labels: str) -> float:
    return instruments.registry.get_sample_value(name, labels) or 0.0


async def two_faces_then_end(
    srv: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> str:
    async with http.post(
        f"{srv.url}/api/sessions/start", json={"job_data": {"jobTitle": MARKER}}
    ) as r:
        sid = str((await r.json())["session_id"])
    rekognition.set_scene(faces=[fake_face(), fake_face(box=(0.05, 0.1, 0.2, 0.3))])
    async with http.post(
        f"{srv.url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
    ) as r:
        alerts = (await r.json())["result"]["alerts"]
    assert [a["type"] for a in alerts] == ["multiple_faces_detected"]
    async with http.post(f"{srv.url}/api/sessions/{sid}/end") as r:
        assert r.status == 200
    return sid


async def test_critical_alerts_and_ends_are_signed_and_retried(
    tmp_path: Path,
    rekognition: FakeRekognition,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    receiver.script = [(503, {}, 0.0), (502, {}, 0.0)]  # the first two attempts fail
    srv = await start_server(hook_settings(tmp_path, receiver.url))
    try:
        sid = await two_faces_then_end(srv, http, rekognition)
        await receiver.wait(4)  # alert ×3 (two failures), then session_ended
        alert_attempts = receiver.deliveries("alert")
        assert [r.headers["X-Proctor-Attempt"] for r in alert_attempts] == ["1", "2", "3"]
        assert len({r.headers["X-Proctor-Delivery"] for r in alert_attempts}) == 1
        assert all(r.signed for r in receiver.received)
        alert = alert_attempts[-1].json
        assert alert["event"] == "alert" and alert["session_id"] == sid
        assert alert["delivery_id"] == alert_attempts[0].headers["X-Proctor-Delivery"]
        assert alert["data"]["type"] == "multiple_faces_detected"
        assert alert["data"]["severity"] == "critical" and alert["data"]["status"] == "onset"
        [ended] = receiver.deliveries("session_ended")
        body = ended.json
        assert body["session_id"] == sid and body["data"]["summary"]["frames_analysed"] == 1
        assert body["data"]["alert_summary"]["multiple_faces_detected"]["count"] == 1
        assert body["data"]["review_status"] == "not_reviewed"
        assert MARKER.encode() not in ended.body  # no job data leaves the server
        assert ended.headers["Content-Type"] == "application/json"
        await asyncio.wait_for(srv.app[WEBHOOKS].idle(), 10)  # outcomes counted
        instruments = srv.manager.instruments
        name = "proctor_webhook_deliveries_total"
        assert outcome(instruments, name, outcome="delivered") == 2
        attempts = "proctor_webhook_attempts_total"
        assert outcome(instruments, attempts, result="http_5xx") == 2
        assert outcome(instruments, attempts, result="ok") == 2
    finally:
        await srv.stop()


async def test_verify_refuses_tampering_and_replays() -> None:
    body = b'{"event":"alert"}'
    now = int(time.time())
    signature = sign(SECRET, str(now), body)
    assert verify(SECRET, str(now), body, signature)
    assert not verify(SECRET, str(now), body + b" ", signature)
    assert not verify("another-secret-0123456789", str(now), body, signature)
    old = str(now - 3600)
    assert not verify(SECRET, old, body, sign(SECRET, old, body))  # a replay, an hour late
    assert not verify(SECRET, "yesterday", body, signature)


async def start_sender(url: str, tmp_path: Path, **overrides: Any) -> WebhookSender:
    sender = WebhookSender(hook_settings(tmp_path, url, **overrides), Instruments())
    await sender.start()
    return sender


async def test_4xx_and_redirects_are_final_429_and_timeouts_are_retried(
    tmp_path: Path, receiver: Receiver
) -> None:
    sender = await start_sender(receiver.url, tmp_path, webhook_timeout_s=0.2)
    m = sender.instruments
    try:
        receiver.script = [(400, {}, 0.0)]
        sender.offer("alert", "s1", {"n": 1})
        receiver.script.append((302, {"Location": receiver.url.replace("hook", "elsewhere")}, 0))
        sender.offer("alert", "s2", {"n": 2})
        receiver.script += [(429, {"Retry-After": "0"}, 0.0), (200, {}, 0.0)]
        sender.offer("alert", "s3", {"n": 3})
        receiver.script += [(200, {}, 1.0)]  # slower than the per-attempt timeout
        sender.offer("alert", "s4", {"n": 4})
        await receiver.wait(6)
        await asyncio.wait_for(sender.idle(), 10)
        ids = [r.json["session_id"] for r in receiver.received]
        # One attempt each for the 400 and the 302 (whose Location was not followed).
        assert ids == ["s1", "s2", "s3", "s3", "s4", "s4"]
        name = "proctor_webhook_deliveries_total"
        assert outcome(m, name, outcome="rejected") == 2
        assert outcome(m, name, outcome="delivered") == 2
        assert outcome(m, "proctor_webhook_attempts_total", result="http_429") == 1
        assert outcome(m, "proctor_webhook_attempts_total", result="timeout") == 1
    finally:
        await sender.stop()


async def test_a_dead_receiver_is_given_up_on_after_the_attempts(tmp_path: Path) -> None:
    sender = await start_sender(f"http://127.0.0.1:{free_port()}/hook", tmp_path)
    try:
        sender.offer("session_ended", "s1", {})
        await asyncio.wait_for(sender.idle(), 10)
        m = sender.instruments
        assert outcome(m, "proctor_webhook_deliveries_total", outcome="failed") == 1
        assert outcome(m, "proctor_webhook_attempts_total", result="connection_error") == 4
    finally:
        await sender.stop()


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    sender = WebhookSender(
        hook_settings(tmp_path, "http://127.0.0.1:9/hook", webhook_queue_size=2), Instruments()
    )  # not started: nothing leaves the queue
    assert sender.offer("alert", "a", {}) and sender.offer("alert", "b", {})
    assert not sender.offer("alert", "c", {})
    m = sender.instruments
    assert outcome(m, "proctor_webhook_deliveries_total", outcome="dropped") == 1
    assert outcome(m, "proctor_webhook_queue_depth") == 2
    await sender.stop()
    assert outcome(m, "proctor_webhook_deliveries_total", outcome="abandoned") == 2


async def test_a_hung_receiver_never_holds_analysis_or_the_end(
    tmp_path: Path,
    rekognition: FakeRekognition,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    receiver.hold = asyncio.Event()  # every request hangs until the test lets go
    srv = await start_server(
        hook_settings(tmp_path, receiver.url, webhook_timeout_s=600, webhook_shutdown_drain_s=0)
    )
    try:
        sid = await two_faces_then_end(srv, http, rekognition)  # answered meanwhile
        await receiver.wait(1)
        assert receiver.pending == 1 and receiver.deliveries("alert")
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            assert r.status == 200
    finally:
        await srv.stop()  # abandons what is still queued instead of waiting for it
    m = srv.manager.instruments
    assert outcome(m, "proctor_webhook_deliveries_total", outcome="abandoned") == 2


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"webhook_secret": ""}, "WEBHOOK_SECRET is not"),
        ({"webhook_secret": "short"}, "shorter than 16"),
        ({"webhook_url": "ftp://127.0.0.1/hook"}, "http:// or https://"),
        ({"webhook_events": ["alert", "frame"]}, "WEBHOOK_EVENTS"),
        ({"webhook_alert_severities": ["urgent"]}, "WEBHOOK_ALERT_SEVERITIES"),
    ],
)
def test_bad_webhook_settings_refuse_the_start(
    tmp_path: Path, overrides: dict[str, Any], complaint: str
) -> None:
    settings = hook_settings(tmp_path, "https://hooks.example.com/p", **overrides)
    with pytest.raises(ConfigError) as refused:
        create_app(settings)
    assert complaint in str(refused.value)
    assert "short" not in str(refused.value).replace("shorter", "")
