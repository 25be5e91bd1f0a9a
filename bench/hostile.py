"""Honest WebRTC sessions beside hostile clients: does bad input slow anyone down?

One server (its own process) with a Rekognition fake answering after 50 ms. Ten honest
aiortc senders stream 640×480@15 fps H.264 and run glass-to-alert trials (a second person
steps in: `multiple_faces_detected`, an instant rule). Two phases of --seconds each, in the
same run:

1. baseline: the honest sessions alone;
2. hostile: a separate load-generator process also sends the bad-input battery
   (tests/hostile_inputs.py: hostile JSON, frames, timestamps; broken offers; bad
   Socket.IO events) at --rate requests/s in total, round-robin over the cases.

Printed per phase: glass-to-alert p50 / p95, analyses per honest session per second, the
server's CPU, and for the hostile phase the requests sent, their answers by status (a 5xx
is a failure) and the CPU the load generator itself took.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/hostile.py'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webrtc_kit import (
    Peer,
    ServerProcess,
    build_clips,
    fmt_s,
    new_fake,
    pct,
    require_netns,
)

ROOT = Path(__file__).resolve().parent.parent

# --- the load generator (runs in its own process) -------------------------------------------


def _cases(session_id: str) -> list[tuple[str, str, str | bytes]]:
    """(method, path, body) of the battery, as a hostile client sends them."""
    from tests.hostile_inputs import FRAMES, HOSTILE_JSON, RAW_TIMESTAMPS, TIMESTAMPS

    frame_path = f"/api/sessions/{session_id}/frame"
    out: list[tuple[str, str, str | bytes]] = []
    for _name, body in HOSTILE_JSON:
        out += [("POST", frame_path, body), ("POST", "/api/sessions/start", body),
                ("POST", "/api/rtc/offer", body)]
    for _name, value, _status in FRAMES:
        out.append(("POST", frame_path, json.dumps({"frame": value}, default=str)))
    for _name, value in TIMESTAMPS:
        out.append(("POST", frame_path, json.dumps({"frame": "AAAA", "timestamp": value},
                                                   default=str)))
    for _name, raw in RAW_TIMESTAMPS:
        out.append(("POST", frame_path, '{"frame": "AAAA", "timestamp": ' + raw + "}"))
    for sdp in ("", "v=0", "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "x" * 5000):
        out.append(("POST", "/api/rtc/offer", json.dumps({"sdp": sdp, "type": "offer"})))
    out += [("GET", f"/api/sessions/{'x' * 300}/metrics", b""),
            ("GET", "/api/sessions/../../etc/passwd/metrics", b""),
            ("POST", f"/api/sessions/{session_id}/end", b"[")]
    return out


async def generate(url: str, rate: float, seconds: float, session_id: str) -> None:
    import aiohttp
    import socketio

    cases = _cases(session_id)
    statuses: Counter[str] = Counter()
    sent = 0
    sio_bad = [("analyze_frame", {"session_id": session_id, "frame": "data:image/png;base64,@@"}),
               ("analyze_frame", "[" * 200), ("get_live_metrics", {"session_id": 12}),
               ("start_session", {"job_data": "x" * 100_000}), ("end_session", None)]
    period = 1.0 / rate
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        sio = socketio.AsyncClient(reconnection=False)
        try:
            await sio.connect(url, transports=["websocket"])
        except Exception as exc:  # the battery goes on over REST
            print(f"generator: socket.io connect failed: {exc}", file=sys.stderr)

        async def one(i: int) -> None:
            nonlocal sent
            if i % 10 == 9 and sio.connected:  # a tenth of the load over Socket.IO
                event, data = sio_bad[i % len(sio_bad)]
                await sio.emit(event, data)
                statuses["socketio"] += 1
                sent += 1
                return
            method, path, body = cases[i % len(cases)]
            try:
                async with http.request(method, url + path, data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    statuses[f"{r.status // 100}xx"] += 1
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] += 1
            sent += 1

        tasks: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        i = 0
        while time.monotonic() < deadline:
            next_at += period
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*tasks, return_exceptions=True)
        if sio.connected:
            await sio.disconnect()
    print(json.dumps({"sent": sent, "statuses": dict(statuses)}))


# --- the bench --------------------------------------------------------------------------------


async def phase(peers: list[Peer], seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    onsets: list[float] = []
    missed = 0
    before = [len(p.client.of_type("frame_analysis")) for p in peers]
    t0 = time.monotonic()

    async def trials(peer: Peer) -> None:
        nonlocal missed
        while time.monotonic() - t0 < seconds - 6:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            # The fake answers each image for the scene it shows.
            onset = await peer.switch_and_wait("two_faces", "multiple_faces_detected",
                                               "onset", 5)
            if onset is None:
                missed += 1
            else:
                onsets.append(onset)
            await peer.switch_and_wait("face", "multiple_faces_detected", "ended", 5)

    await asyncio.gather(*(trials(p) for p in peers))
    elapsed = time.monotonic() - t0
    analysed = [len(p.client.of_type("frame_analysis")) - b for p, b in zip(peers, before,
                                                                           strict=True)]
    return {"onsets": onsets, "missed": missed, "elapsed": elapsed,
            "rate": sum(analysed) / len(peers) / elapsed}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10, help="honest WebRTC senders")
    ap.add_argument("--rate", type=float, default=200.0, help="hostile requests per second")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    ap.add_argument("--generate", nargs=3, metavar=("URL", "SECONDS", "SESSION_ID"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        url, seconds, sid = args.generate
        await generate(url, args.rate, float(seconds), sid)
        return
    require_netns()
    print("encoding camera clips…", flush=True)
    clips = build_clips()
    fake = new_fake(0.05, per_image=True)
    await fake.start()
    server = ServerProcess(fake)
    await server.start()
    peers: list[Peer] = []
    try:
        peers = [await Peer.connect(server.url, clips) for _ in range(args.sessions)]
        import aiohttp

        async with aiohttp.ClientSession() as http:  # the session the battery aims at
            async with http.post(f"{server.url}/api/sessions/start", json={}) as r:
                target = (await r.json())["session_id"]
        print(f"baseline phase, {args.seconds:.0f} s…", flush=True)
        cpu0 = server.cpu_s()
        base = await phase(peers, args.seconds, 1)
        base["server_cpu"] = (server.cpu_s() - cpu0) / base["elapsed"]

        print(f"hostile phase, {args.seconds:.0f} s at {args.rate:g} requests/s…", flush=True)
        gen = subprocess.Popen(
            [sys.executable, __file__, "--rate", str(args.rate), "--generate", server.url,
             str(args.seconds), target],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        cpu0 = server.cpu_s()
        hostile = await phase(peers, args.seconds, 2)
        hostile["server_cpu"] = (server.cpu_s() - cpu0) / hostile["elapsed"]
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out, _ = await asyncio.to_thread(gen.communicate, timeout=args.seconds + 60)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Only the generator has exited (and been waited for) by now.
        gen_cpu = (children.ru_utime + children.ru_stime) - (
            children0.ru_utime + children0.ru_stime
        )
        report = json.loads(out.strip().splitlines()[-1])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/health") as r:
                health = await r.json()
    finally:
        for p in peers:
            await p.close()
        await server.stop()
        await fake.stop()

    print()
    print(f"{args.sessions} honest WebRTC sessions (640×480@15 fps H.264, fake Rekognition "
          f"at 50 ms), glass-to-alert for a second person stepping in")
    print(f"{'phase':<10} {'trials':>6} {'missed':>6} {'p50':>6} {'p95':>6} "
          f"{'analyses/s/session':>19} {'server CPU':>10}")
    for name, r in (("baseline", base), ("hostile", hostile)):
        print(f"{name:<10} {len(r['onsets']):>6} {r['missed']:>6} "
              f"{fmt_s(pct(r['onsets'], 0.5)):>6} {fmt_s(pct(r['onsets'], 0.95)):>6} "
              f"{r['rate']:>19.2f} {r['server_cpu'] * 100:>9.0f}%")
    p95b, p95h = pct(base["onsets"], 0.95), pct(hostile["onsets"], 0.95)
    print(f"p95 hostile / baseline: {p95h / p95b:.2f}; analysis rate hostile / baseline: "
          f"{hostile['rate'] / base['rate']:.2f} (target: within 20 %)")
    print(f"hostile requests sent: {report['sent']} ({report['sent'] / args.seconds:.0f}/s), "
          f"answers {report['statuses']}; server health after: {health['status']}")
    print(f"load generator CPU: {gen_cpu / args.seconds * 100:.0f} % of a core")


if __name__ == "__main__":
    asyncio.run(main())
