"""Ephemeral TURN credentials: pages never see a static secret, and Debian's coturn (with
`use-auth-secret`) accepts what the server hands out — until it expires."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioice.stun import TransactionFailed
from aioice.turn import create_turn_endpoint

from server.config import Settings
from server.signaling.turn import client_ice_servers, turn_credentials
from tests.conftest import RunningServer

SECRET = "turn-shared-secret"


def test_credentials_follow_the_turn_rest_api() -> None:
    username, password = turn_credentials(SECRET, "sess1", ttl_s=600, now=1_000_000)
    assert username == "1000600:sess1"
    expected = base64.b64encode(
        hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()
    assert password == expected


def test_pages_never_get_the_servers_own_credentials() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        rtc_ice_servers=[
            {"urls": ["stun:stun.example.org:3478", "turn:turn.example.org"],
             "username": "static", "credential": "static-password"},
        ],
        turn_urls=["turn:turn.example.org:3478?transport=udp"],
        turn_secret=SECRET,
        turn_ttl_s=120,
    )
    servers = client_ice_servers(settings, "abc", now=2_000_000)
    assert servers[0] == {"urls": ["stun:stun.example.org:3478"]}
    assert servers[1]["username"] == "2000120:abc"
    assert "static-password" not in repr(servers) and SECRET not in repr(servers)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"turn_urls": ["turn:127.0.0.1:3478"], "turn_secret": SECRET}


async def test_the_endpoint_and_the_answer_hand_out_fresh_credentials(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.url}/api/rtc/ice-servers") as resp:
        assert resp.status == 200
        body = await resp.json()
    (turn,) = body["ice_servers"]
    expiry, _name = turn["username"].split(":", 1)
    assert abs(int(expiry) - (time.time() + 3600)) < 60 and body["ttl_s"] == 3600
    assert SECRET not in repr(body)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[int]:
    import os

    binary = shutil.which("turnserver")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("coturn's turnserver is missing (apt-get install coturn)")
        pytest.skip("coturn not installed")
    port = _free_udp_port()
    proc = subprocess.Popen(
        [binary, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
         f"--listening-port={port}", "--use-auth-secret", f"--static-auth-secret={SECRET}",
         "--realm=proctor.test", "--no-tls", "--no-dtls", "--no-cli", "--allow-loopback-peers",
         "--min-port=49152", "--max-port=49300", f"--pidfile={tmp_path / 'turn.pid'}",
         "--log-file=stdout", "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _allocate(port: int, username: str, password: str) -> tuple[str, int]:
    transport, _ = await asyncio.wait_for(
        create_turn_endpoint(asyncio.DatagramProtocol, ("127.0.0.1", port), username, password),
        10,
    )
    try:
        relayed: tuple[str, int] = transport.get_extra_info("sockname")
        return relayed
    finally:
        transport.close()


async def test_coturn_accepts_the_credentials_until_they_expire(coturn: int) -> None:
    username, password = turn_credentials(SECRET, "session", ttl_s=600)
    relayed = await _allocate(coturn, username, password)
    assert relayed[0] == "127.0.0.1" and relayed[1] >= 49152
    wrong = turn_credentials("not-the-secret", "session", ttl_s=600)
    with pytest.raises(TransactionFailed) as refused:  # 401 Unauthorized from coturn
        await _allocate(coturn, *wrong)
    assert refused.value.response.attributes["ERROR-CODE"][0] == 401
    expired = turn_credentials(SECRET, "session", ttl_s=1, now=time.time() - 3600)
    with pytest.raises(TransactionFailed):
        await _allocate(coturn, *expired)
