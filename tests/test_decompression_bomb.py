"""A decompression bomb — a small PNG declaring 20000×20000 pixels, sixteen at once over
REST and Socket.IO — is refused from its header (413 `frame_too_large`) and never decoded:
the server's peak resident memory (its kernel high-water mark, VmHWM, plus our own
sampling) stays within 200 MB of its baseline. The server runs as its own process so
that the measurement is of it alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.fakes.rekognition import FakeRekognition
from tests.hostile_inputs import b64url, png
from tests.media import face_data_url
from tests.test_socketio import Client

ROOT = Path(__file__).resolve().parent.parent
BUDGET_BYTES = 200 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def test_a_decompression_bomb_is_refused_without_decoding(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    bomb = png(20000, 20000, bit_depth=1, rows=True)
    assert len(bomb) < 400 * 1024  # small on the wire; 1.2 GB as decoded BGR pixels
    bomb_url = b64url(bomb, "image/png")

    port = free_port()
    env: dict[str, Any] = {
        **os.environ,
        **rekognition.env(),
        "PYTHONPATH": str(ROOT),
        "DATABASE_PATH": str(tmp_path / "proctor.sqlite3"),
        "API_TOKEN": "",
        "LOG_LEVEL": "WARNING",
        "REKOGNITION_MAX_ATTEMPTS": "1",
        "MAX_FRAME_PIXELS": "40000000",  # the default; with 10**12 this test fails (3.2 GB peak)
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--backend", "rekognition"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("server did not start")
            async with http.post(url + "/api/sessions/start", json={}) as r:
                sid = (await r.json())["session_id"]
            for _ in range(3):  # warm up: imports, decoders, the first analyses
                async with http.post(
                    f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
                ) as r:
                    assert r.status == 200
            baseline = status_kib(proc.pid, "VmRSS") * 1024
            sampled = [baseline]

            async def sample() -> None:
                while True:
                    sampled.append(status_kib(proc.pid, "VmRSS") * 1024)
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())

            async def rest_bomb() -> tuple[int, str]:
                async with http.post(
                    f"{url}/api/sessions/{sid}/frame", json={"frame": bomb_url}
                ) as r:
                    return r.status, (await r.json()).get("error", {}).get("code")

            client = Client()
            await client.sio.connect(url, transports=["websocket"])

            async def socketio_bomb() -> tuple[int, str]:
                ack = await client.sio.call(
                    "analyze_frame", {"session_id": sid, "frame": bomb_url}, timeout=30
                )
                error = ack.get("error") or {}
                return error.get("status", 200), error.get("code")

            answers = await asyncio.gather(
                *(rest_bomb() for _ in range(16)), *(socketio_bomb() for _ in range(16))
            )
            await client.sio.disconnect()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            peak = max(max(sampled), status_kib(proc.pid, "VmHWM") * 1024)
            assert peak - baseline < BUDGET_BYTES, (
                f"peak {peak / 2**20:.0f} MiB vs baseline {baseline / 2**20:.0f} MiB"
            )
            assert answers == [(413, "frame_too_large")] * 32
            # The session was never hurt.
            async with http.post(
                f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
            ) as r:
                assert r.status == 200 and (await r.json())["status"] == "analysed"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
