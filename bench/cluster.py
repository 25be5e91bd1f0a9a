"""Two nodes of a cluster on this machine (README "Running a cluster").

A private redis-server, the store (a private PostgreSQL by default, or one SQLite file
with --sqlite), two `proctor serve` nodes (real boto3 to a zero-latency fake Rekognition
in its own process, analyser budget off) and, measured:

1. fan-out: --sessions sessions, half started on each node, each fed one 640×480 JPEG a
   second over REST by its owner; each watched over Socket.IO (websocket) from the OTHER
   node and, as the baseline in the same run, from its owner. Latency = the watcher's
   arrival time − the owner's `analysis_ended_at` (same machine, same clock), p50 / p95.
   Also each node's CPU (from /proc) while it runs its share: CPU per session.
2. forwarding: one session, frames sent one at a time alternately to its owner and to the
   other node (which forwards them): round trip p50 / p95 each, and the difference.
3. store writes: bench/store_throughput.py (frames/s through the Store, PostgreSQL vs
   SQLite, same run).
4. death: the node owning half the sessions is killed with SIGKILL; time until the other
   node lists all of them `interrupted` (NODE_LEASE_S = --lease, the default 15 s).

    .venv/bin/python bench/cluster.py [--sessions 20] [--seconds 30] [--lease 15] [--sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.cluster.devcluster import NodeProcess, Postgres, Redis, free_port
from tests.media import face_data_url

FAKE_SERVER = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from tests.fakes.rekognition import FakeRekognition, fake_face
async def main():
    fake = FakeRekognition()
    fake.set_scene(faces=[fake_face()])
    await fake.start()
    for k, v in fake.env().items():
        print(f"{k}={v}", flush=True)
    print("", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watcher:
    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.latencies: list[float] = []
        self.sio.on("frame_analysis", self._arrived)

    async def _arrived(self, data: dict[str, Any]) -> None:
        ended = data["result"]["timings"]["analysis_ended_at"]
        self.latencies.append(time.time() - ended)


async def start_session(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/api/sessions/start", json={"job_data": {}}) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["session_id"])


async def post_frame(http: aiohttp.ClientSession, url: str, sid: str) -> float:
    t0 = time.perf_counter()
    async with http.post(f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}) as r:
        body = await r.json()
        assert r.status == 200 and body["status"] in ("analysed", "dropped"), body
    return time.perf_counter() - t0


async def fanout(http: aiohttp.ClientSession, nodes: list[NodeProcess], sessions: int,
                 seconds: float) -> dict[str, Any]:
    owners = [nodes[i % 2] for i in range(sessions)]
    sids = [await start_session(http, n.url) for n in owners]
    remote: list[Watcher] = []
    local: list[Watcher] = []
    for sid, owner in zip(sids, owners, strict=True):
        other = nodes[1] if owner is nodes[0] else nodes[0]
        for node, group in ((other, remote), (owner, local)):
            w = Watcher()
            await w.sio.connect(node.url, transports=["websocket"])
            await w.sio.call("get_live_metrics", {"session_id": sid}, timeout=10)
            group.append(w)
    cpu0 = {n.node_id: cpu_seconds(n.proc.pid) for n in nodes if n.proc}
    t0 = time.monotonic()
    sent = 0

    async def feed(sid: str, owner: NodeProcess, offset: float) -> None:
        nonlocal sent
        await asyncio.sleep(offset)
        nxt = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await post_frame(http, owner.url, sid)
            sent += 1
            nxt += 1.0
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    await asyncio.gather(*(feed(s, o, i / sessions) for i, (s, o) in
                           enumerate(zip(sids, owners, strict=True))))
    elapsed = time.monotonic() - t0
    cpu = {n.node_id: (cpu_seconds(n.proc.pid) - cpu0[n.node_id]) / elapsed
           for n in nodes if n.proc}
    await asyncio.sleep(0.5)
    for w in remote + local:
        await w.sio.disconnect()
    r = [x for w in remote for x in w.latencies]
    loc = [x for w in local for x in w.latencies]
    return {
        "sids": sids, "owners": owners, "frames": sent, "fps": sent / elapsed,
        "remote": r, "local": loc, "cpu": cpu, "per_node": sessions / len(nodes),
    }


async def forwarding(http: aiohttp.ClientSession, nodes: list[NodeProcess],
                     rounds: int) -> tuple[list[float], list[float]]:
    a, b = nodes
    sid = await start_session(http, a.url)
    for _ in range(10):  # warm both paths (connections, caches)
        await post_frame(http, a.url, sid)
        await post_frame(http, b.url, sid)
    direct: list[float] = []
    forwarded: list[float] = []
    for _ in range(rounds):
        direct.append(await post_frame(http, a.url, sid))
        forwarded.append(await post_frame(http, b.url, sid))
    async with http.post(f"{a.url}/api/sessions/{sid}/end"):
        pass
    return direct, forwarded


async def death(http: aiohttp.ClientSession, victim: NodeProcess, survivor: NodeProcess,
                sids: list[str]) -> float:
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t0 = time.monotonic()
    pending = set(sids)
    while pending:
        async with http.get(f"{survivor.url}/api/sessions?status=interrupted&limit=1000") as r:
            listed = {s["session_id"] for s in (await r.json())["sessions"]}
        pending -= listed
        if time.monotonic() - t0 > 300:
            raise RuntimeError(f"{len(pending)} sessions still live after 300 s")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def wait_ready(node: NodeProcess, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not node.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node.node_id} did not start; see {node.log}")
        time.sleep(0.2)


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    assert fake.stdout is not None
    fake_env: dict[str, str] = {}
    for line in iter(fake.stdout.readline, ""):
        if not line.strip():
            break
        key, _, value = line.strip().partition("=")
        fake_env[key] = value
    redis = Redis(tmp / "redis")
    postgres = None if args.sqlite else Postgres(tmp / "postgres")
    nodes: list[NodeProcess] = []
    try:
        redis.start()
        if postgres is not None:
            postgres.start()
            store = {"DATABASE_URL": postgres.url}
        else:
            store = {"DATABASE_PATH": str(tmp / "shared.sqlite3")}
        for name in ("node-a", "node-b"):
            port = free_port()
            env = {
                **fake_env, **store,
                "REDIS_URL": redis.url, "NODE_ID": name, "CLUSTER_SECRET": "bench",
                "NODE_ADDRESS": f"http://127.0.0.1:{port}", "NODE_LEASE_S": str(args.lease),
                "ANALYSER_BACKEND": "rekognition", "ANALYSER_CALLS_PER_S": "0",
                "SESSION_STARTS_PER_MINUTE": "0", "LOG_LEVEL": "WARNING",
                "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "API_TOKEN": "",
                "VIDEO_WORK_DIR": str(tmp / "videos"),
            }
            node = NodeProcess(name, port, env, tmp / f"{name}.log")
            node.start(tmp)
            nodes.append(node)
        async with aiohttp.ClientSession() as http:
            for node in nodes:  # loading the server takes seconds
                await asyncio.to_thread(wait_ready, node)
            await asyncio.sleep(args.lease / 3 + 0.5)  # both have seen each other's lease
            print(f"store: {'SQLite file' if args.sqlite else 'PostgreSQL 15'}, "
                  f"Redis 7, NODE_LEASE_S={args.lease:g}, 2 nodes on {os.cpu_count()} cores")

            fan = await fanout(http, nodes, args.sessions, args.seconds)
            r, loc = fan["remote"], fan["local"]
            print(f"\n1. fan-out: {args.sessions} sessions ({fan['per_node']:.0f} per node), "
                  f"{fan['frames']} frames in {args.seconds:g} s ({fan['fps']:.1f}/s)")
            print(f"   owner's analysis → watcher on the other node: p50 {ms(pct(r, .5))} ms, "
                  f"p95 {ms(pct(r, .95))} ms ({len(r)} events)")
            print(f"   owner's analysis → watcher on the owner (baseline): p50 "
                  f"{ms(pct(loc, .5))} ms, p95 {ms(pct(loc, .95))} ms ({len(loc)} events)")
            for node_id, share in fan["cpu"].items():
                print(f"   {node_id} CPU {share * 100:.1f} % of a core "
                      f"({share * 100 / fan['per_node']:.2f} % per session at 1 frame/s, "
                      f"plus its watchers)")

            direct, fwd = await forwarding(http, nodes, args.rounds)
            added = statistics.median(fwd) - statistics.median(direct)
            print(f"\n2. forwarding a frame to its owner ({args.rounds} each, one at a time):")
            print(f"   to the owner: p50 {ms(pct(direct, .5))} ms, p95 {ms(pct(direct, .95))} ms")
            print(f"   via the other node: p50 {ms(pct(fwd, .5))} ms, p95 {ms(pct(fwd, .95))} ms"
                  f" → added p50 {ms(added)} ms")

            if not args.sqlite and not args.skip_store:
                print("\n3. store writes (bench/store_throughput.py):", flush=True)
                await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, str(ROOT / "bench" / "store_throughput.py"), "--frames",
                     str(args.store_frames)],
                    check=False,
                )

            victim = fan["owners"][0]
            survivor = nodes[1] if victim is nodes[0] else nodes[0]
            theirs = [s for s, o in zip(fan["sids"], fan["owners"], strict=True) if o is victim]
            took = await death(http, victim, survivor, theirs)
            print(f"\n4. {victim.node_id} killed (SIGKILL) with {len(theirs)} live sessions: all "
                  f"interrupted on {survivor.node_id} after {took:.2f} s "
                  f"(NODE_LEASE_S={args.lease:g}; expected ≤ lease + lease/3)")
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            node.wait()
        redis.stop()
        if postgres is not None:
            postgres.stop()
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--store-frames", type=int, default=20_000)
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--sqlite", action="store_true",
                        help="one SQLite file instead of PostgreSQL (before DATABASE_URL)")
    asyncio.run(main(parser.parse_args()))
