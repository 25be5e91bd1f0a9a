"""Shared fixtures: a real server on a free loopback port, backed by the fake Rekognition
(reached through real boto3) unless a test asks otherwise."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.app import MANAGER, create_app
from server.config import Settings
from server.session.manager import SessionManager
from tests.fakes.rekognition import FakeRekognition

# Private PostgreSQL and Redis instances (started only by the tests that ask for them).
pytest_plugins = ["tests.services"]


@dataclass
class RunningServer:
    url: str
    app: web.Application
    runner: web.AppRunner
    settings: Settings

    @property
    def manager(self) -> SessionManager:
        return self.app[MANAGER]

    async def stop(self) -> None:
        await self.runner.cleanup()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_path": tmp_path / "proctor.sqlite3",
        "analyser_backend": "rekognition",
        # Every frame asks every question unless a test is about cadence.
        "labels_interval_s": 0.0,
        "text_interval_s": 0.0,
        "rekognition_max_attempts": 1,
        "openai_api_key": "",
        "anthropic_api_key": "",
        # Test clients all start from 127.0.0.1: the per-address start limit is tested in
        # test_spend_caps.py, off elsewhere.
        "session_starts_per_minute": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def start_server(settings: Settings, **app_kwargs: Any) -> RunningServer:
    app = create_app(settings, **app_kwargs)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningServer(f"http://127.0.0.1:{port}", app, runner, settings)


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_subprocess(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    env: dict[str, str],
    *,
    log: Path | None = None,
    port: int | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """`proctor serve` as its own process (a test can SIGKILL it) on a free loopback
    port (or `port`), with `env` over the environment; returns once /health answers.
    `log`: a file for its stderr (for a failing test to show), else discarded."""
    port = port or free_port()
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port",
             str(port)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            async with http.get(f"{url}/health") as r:
                if r.status == 200:
                    break
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    return proc, url


@pytest.fixture
async def rekognition(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeRekognition]:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fake = FakeRekognition()
    await fake.start()
    for key, value in fake.env().items():
        monkeypatch.setenv(key, value)
    yield fake
    await fake.stop()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change the server's settings."""
    return {}


@pytest.fixture
async def server(
    tmp_path: Path, rekognition: FakeRekognition, settings_overrides: dict[str, Any]
) -> AsyncIterator[RunningServer]:
    running = await start_server(make_settings(tmp_path, **settings_overrides))
    yield running
    await running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def rtc_server(
    tmp_path: Path, rekognition: FakeRekognition, settings_overrides: dict[str, Any]
) -> AsyncIterator[RunningServer]:
    """The real server with WebRTC pinned to loopback (see tests/rtc_client.py)."""
    from tests.rtc_client import start_rtc_server

    running = await start_rtc_server(tmp_path, rekognition, **settings_overrides)
    yield running
    await running.stop()
