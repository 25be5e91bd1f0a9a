"""Socket.IO frame push benchmark.

N python-socketio clients push 640×480 JPEG data URLs (`analyze_frame`, paced at --fps,
one frame outstanding each) to the real server, whose Rekognition backend talks through
real boto3 to a zero-latency fake. Beside it, a bare python-socketio echo server (same
aiohttp mode, same payload) is measured in the same run.

Printed per client count: frames/s, client round trip p50/p95, and the time our server
adds beyond the analyser call (round trip − the server's own analyser_ms), with the echo
server's round trip as the baseline and the ratio between them.

    .venv/bin/python bench/socketio_frames.py --clients 1 10 50 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.media import face_data_url

ECHO_SERVER = r"""
import sys, socketio
from aiohttp import web
sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=20_000_000)
app = web.Application(client_max_size=20_000_000)
sio.attach(app)

@sio.on("analyze_frame")
async def analyze_frame(sid, data):
    await sio.emit("frame_analysis", {"session_id": data.get("session_id"), "result": {}}, to=sid)
    return {"status": "analysed"}

web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

FAKE_SERVER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from tests.fakes.rekognition import FakeRekognition
async def main():
    fake = FakeRekognition()
    from aiohttp import web
    url = await fake.start()
    print(url, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_up(url: str, timeout: float = 30.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client_loop(
    url: str,
    frame: str,
    fps: float,
    seconds: float,
    real: bool,
    rtts: list[float],
    added: list[float],
    errors: list[str],
) -> int:
    sio = socketio.AsyncClient(reconnection=False)
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    analyser_ms: dict[int, float] = {}

    @sio.on("session_started")
    async def on_started(data: dict[str, Any]) -> None:
        if not started.done():
            started.set_result(data["session_id"])

    @sio.on("frame_analysis")
    async def on_analysis(data: dict[str, Any]) -> None:
        result = data.get("result") or {}
        if "frame_index" in result:
            analyser_ms[result["frame_index"]] = result["timings"]["analyser_ms"]

    await sio.connect(url, transports=["websocket"])
    if real:
        await sio.emit("start_session", {"job_data": {"jobTitle": "bench"}})
        sid = await asyncio.wait_for(started, 10)
    else:
        sid = "echo"
    sent = 0
    interval = 1.0 / fps
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        t0 = time.perf_counter()
        ack = await sio.call("analyze_frame", {"session_id": sid, "frame": frame}, timeout=30)
        rtt = (time.perf_counter() - t0) * 1000
        sent += 1
        if ack.get("status") != "analysed":
            errors.append(str(ack))
        else:
            rtts.append(rtt)
            if real:
                # frame_analysis is emitted before the ack, so its timing has arrived.
                added.append(rtt - analyser_ms.pop(ack["frame_index"], 0.0))
            else:
                added.append(rtt)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if real:
        await sio.emit("end_session", {"session_id": sid})
        await asyncio.sleep(0.2)
    await sio.disconnect()
    return sent


async def run_load(
    url: str, clients: int, fps: float, seconds: float, real: bool
) -> dict[str, float]:
    frame = face_data_url()
    rtts: list[float] = []
    added: list[float] = []
    errors: list[str] = []
    t0 = time.monotonic()

    # Stagger starts so clients do not all send in the same millisecond forever.
    async def staggered(i: int) -> int:
        await asyncio.sleep(i / clients / fps)
        return await client_loop(url, frame, fps, seconds, real, rtts, added, errors)

    sent = await asyncio.gather(*(staggered(i) for i in range(clients)))
    elapsed = time.monotonic() - t0
    return {
        "frames": float(sum(sent)),
        "fps": len(rtts) / elapsed,
        "rtt_p50": pct(rtts, 0.5),
        "rtt_p95": pct(rtts, 0.95),
        "added_p50": pct(added, 0.5),
        "added_p95": pct(added, 0.95),
        "errors": float(len(errors)),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=2.0, help="frames per second per client")
    args = ap.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    try:
        fake = subprocess.Popen(
            [sys.executable, "-c", FAKE_SERVER, "x", str(ROOT)], stdout=subprocess.PIPE
        )
        procs.append(fake)
        assert fake.stdout is not None
        fake_url = fake.stdout.readline().decode().strip()

        port = free_port()
        db = Path(tempfile.mkdtemp()) / "bench.sqlite3"
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL_REKOGNITION": fake_url,
            "AWS_ACCESS_KEY_ID": "AKIAFAKE",
            "AWS_SECRET_ACCESS_KEY": "fake",
            "AWS_EC2_METADATA_DISABLED": "true",
            "ANALYSER_BACKEND": "rekognition",
            "DATABASE_PATH": str(db),
            "LOG_LEVEL": "WARNING",
            "OPENAI_API_KEY": "",
            "ANTHROPIC_API_KEY": "",
            "MAX_LIVE_SESSIONS": "1000",
            "SESSION_STARTS_PER_MINUTE": "0",  # every bench client starts from 127.0.0.1
            # The server-wide budget would cap throughput at the Rekognition quota; this
            # measures what the server itself costs.
            "ANALYSER_CALLS_PER_S": "0",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
                cwd=ROOT,
                env=env,
            )
        )
        echo_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)]))
        ours = f"http://127.0.0.1:{port}"
        echo = f"http://127.0.0.1:{echo_port}"
        await wait_up(ours + "/health")
        await wait_up(echo + "/socket.io/?EIO=4&transport=polling")

        print(
            f"640x480 JPEG ({len(face_data_url()) // 1024} KiB as data URL), {args.fps:g} fps per client, "
            f"{args.seconds:g} s per run, {os.cpu_count()} cores"
        )
        print(
            f"{'clients':>7} | {'ours fps':>8} {'rtt p50':>8} {'rtt p95':>8} {'added p50':>9} {'added p95':>9} "
            f"| {'echo rtt p50':>12} {'p95':>6} | {'ratio p50':>9} | errors"
        )
        for n in args.clients:
            echo_res = await run_load(echo, n, args.fps, args.seconds, real=False)
            ours_res = await run_load(ours, n, args.fps, args.seconds, real=True)
            ratio = (
                ours_res["added_p50"] / echo_res["rtt_p50"] if echo_res["rtt_p50"] else float("nan")
            )
            print(
                f"{n:>7} | {ours_res['fps']:>8.1f} {ours_res['rtt_p50']:>7.2f}ms {ours_res['rtt_p95']:>7.2f}ms "
                f"{ours_res['added_p50']:>7.2f}ms {ours_res['added_p95']:>7.2f}ms | "
                f"{echo_res['rtt_p50']:>10.2f}ms {echo_res['rtt_p95']:>5.1f}ms | {ratio:>8.2f}x | "
                f"{int(ours_res['errors'] + echo_res['errors'])}"
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
