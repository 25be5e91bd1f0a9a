"""Benchmark of the Rekognition call budget shared by two nodes through Redis.

Two real servers (in this process, each with its own app, store connection and Redis
link; one SQLite file, one private redis-server started here) reach one fake Rekognition
through real boto3. --sessions REST sessions, spread over the two nodes, each push frames
back to back (every frame asks faces, labels and text: three calls). Measured: the
combined calls/s at the fake (the mean over the run's whole seconds), against the budget; the most calls granted in
any one second, both nodes together (recorded where the grant is made: by the local
budgets, on this process' clock; by the Redis script, on Redis' clock: what the budget
bounds), and the most that arrived at the fake in any one second (a grant's calls leave
a moment later: the session's task must be scheduled, boto3 runs them in threads, so
arrivals jitter by tens of milliseconds on a busy machine); from each frame's answer the
time it waited for the budget (`timings.budget_wait_ms`), p50 / p95.

Baseline in the same run: the same two nodes without Redis, each with a local budget of
half (the static split a cluster would need without a shared budget). Both scenarios run
saturated (sessions push as fast as answered) and at half load (each session paces its
frames, staggered, so the demand is about half the budget), so the wait the shared
bucket adds shows beside the queueing both have.

    .venv/bin/python bench/shared_budget.py [--rate 24] [--sessions 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.analysis.budget import CallBudget
from server.app import create_app
from server.cluster.shared_budget import SharedBudget
from server.config import Settings
from tests.fakes.rekognition import FakeRekognition
from tests.media import face_data_url

CALLS_PER_FRAME = 3
#: Monotonic time of every call granted, by any budget in this process.
GRANTS: list[float] = []


def record_grants() -> None:
    """Note each grant where the budgets make it (this benchmark's instrument only)."""
    local_grant = CallBudget._grant
    shared_granted = SharedBudget._granted

    def grant(self: CallBudget, now: float, calls: int, asked_at: float) -> None:
        GRANTS.extend([now] * calls)
        local_grant(self, now, calls, asked_at)

    def granted(self: SharedBudget, waiter: Any) -> None:
        # The time Redis granted it (its clock: the same for both nodes); a grant from
        # the local share (Redis down) would be on this process' clock: not here.
        GRANTS.extend([self.last_grant_at] * waiter.calls)
        shared_granted(self, waiter)

    CallBudget._grant = grant  # type: ignore[method-assign]
    SharedBudget._granted = granted  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def start_node(settings: Settings) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def most_in_a_second(times: list[float]) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


async def scenario(
    name: str,
    fake: FakeRekognition,
    root: Path,
    *,
    rate: float,
    redis_url: str,
    per_node_rate: float,
    sessions: int,
    seconds: float,
    pace_s: float,
) -> dict[str, Any]:
    db = root / f"{name}.sqlite3"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_path=db,
        analyser_backend="rekognition",
        labels_interval_s=0.0,
        text_interval_s=0.0,
        rekognition_max_attempts=1,
        openai_api_key="",
        anthropic_api_key="",
        session_starts_per_minute=0,
        analyser_calls_per_s=per_node_rate,
        redis_url=redis_url,
        redis_ping_interval_s=0.5,
        log_level="WARNING",
    )
    nodes = [await start_node(settings), await start_node(settings)]
    waits: list[float] = []
    frame = face_data_url()
    stop_at = 0.0
    async with aiohttp.ClientSession() as http:
        sids = []
        for i in range(sessions):
            url = nodes[i % 2][1]
            async with http.post(f"{url}/api/sessions/start", json={"job_data": {}}) as r:
                sids.append((url, (await r.json())["session_id"]))

        async def push(i: int, url: str, sid: str) -> None:
            await asyncio.sleep(pace_s * i / sessions)  # staggered when paced
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                async with http.post(f"{url}/api/sessions/{sid}/frame", json={"frame": frame}) as r:
                    body = await r.json()
                waits.append(float(body["result"]["timings"]["budget_wait_ms"]))
                if pace_s:
                    await asyncio.sleep(max(0.0, pace_s - (time.monotonic() - t0)))

        fake.reset()
        GRANTS.clear()
        start = time.monotonic()
        stop_at = start + seconds
        await asyncio.gather(*(push(i, url, sid) for i, (url, sid) in enumerate(sids)))
    for runner, _url in nodes:
        await runner.cleanup()
    arrivals = sorted(c.at for c in fake.calls)
    # Calls per second: the mean over the run's whole seconds (from its first call).
    seconds_run = max(1, int(arrivals[-1] - arrivals[0]))
    in_whole = sum(1 for t in arrivals if t < arrivals[0] + seconds_run)
    return {
        "name": name,
        "budget": rate,
        "calls_per_s": in_whole / seconds_run,
        "max_granted_1s": most_in_a_second(sorted(GRANTS)),
        "max_in_1s": most_in_a_second(arrivals),
        "frames": len(waits),
        "wait_p50": pct(waits, 0.5),
        "wait_p95": pct(waits, 0.95),
        "wait_mean": statistics.fmean(waits) if waits else float("nan"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=24.0, help="the cluster's calls/s")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    record_grants()
    fake = FakeRekognition()
    await fake.start()
    os.environ.update(fake.env())
    # Unsaturated: the sessions together ask about half the budget.
    frames_per_s = args.rate / CALLS_PER_FRAME
    pace = args.sessions / (frames_per_s * 0.5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = Redis(root)
        try:
            for load, pace_s in (("saturated", 0.0), ("half load", pace)):
                rows.append(
                    await scenario(
                        f"shared-{load}",
                        fake,
                        root,
                        rate=args.rate,
                        redis_url=redis.url,
                        per_node_rate=args.rate,
                        sessions=args.sessions,
                        seconds=args.seconds,
                        pace_s=pace_s,
                    )
                    | {"load": load, "budget_kind": "shared in Redis"}
                )
                rows.append(
                    await scenario(
                        f"local-{load}",
                        fake,
                        root,
                        rate=args.rate,
                        redis_url="",
                        per_node_rate=args.rate / 2,
                        sessions=args.sessions,
                        seconds=args.seconds,
                        pace_s=pace_s,
                    )
                    | {"load": load, "budget_kind": "local, half each"}
                )
        finally:
            redis.stop()
            await fake.stop()
    print(
        f"budget {args.rate:g} calls/s for the cluster, 2 nodes, {args.sessions} sessions, "
        f"{args.seconds:g} s per scenario, {CALLS_PER_FRAME} calls per frame"
    )
    print(
        "| Load | Budget | combined calls/s | most granted in any 1 s | most arrived in any "
        "1 s | frames | budget wait p50 / p95 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['load']} | {r['budget_kind']} | {r['calls_per_s']:.1f} | "
            f"{r['max_granted_1s']} | {r['max_in_1s']} | {r['frames']} | "
            f"{r['wait_p50']:.1f} / {r['wait_p95']:.1f} ms |"
        )
    for load in ("saturated", "half load"):
        shared = next(
            r for r in rows if r["load"] == load and r["budget_kind"].startswith("shared")
        )
        local = next(r for r in rows if r["load"] == load and r["budget_kind"].startswith("local"))
        print(
            f"{load}: p95 wait added by the shared bucket: "
            f"{shared['wait_p95'] - local['wait_p95']:+.1f} ms "
            f"(p50 {shared['wait_p50'] - local['wait_p50']:+.1f} ms)"
        )


if __name__ == "__main__":
    asyncio.run(main())
