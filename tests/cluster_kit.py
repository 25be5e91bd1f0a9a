"""Nodes of a cluster as real `proctor serve` processes on loopback: one shared store,
one private redis-server, the fake Rekognition, each node its own NODE_ID and log file
(shown when a test fails). Nodes can be killed with SIGKILL and started again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from server.app import create_app
from server.cluster.node import node_tag
from server.config import Settings
from tests.conftest import RunningServer, free_port, serve_subprocess
from tests.fakes.rekognition import FakeRekognition
from tests.services import RedisServer

SECRET = "test-cluster-secret-do-not-use"
OPERATOR = "operator-s3cret-token"


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class Node:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def tag(self) -> str:
        return node_tag(self.name)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, its lease is left to lapse."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # aiohttp's graceful stop
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    tmp_path: Path
    http: aiohttp.ClientSession
    redis: RedisServer
    rekognition: FakeRekognition
    store_env: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)

    def node_env(self, name: str) -> dict[str, str]:
        return {
            **self.rekognition.env(),
            **self.store_env,
            "REDIS_URL": self.redis.url,
            "NODE_ID": name,
            "CLUSTER_SECRET": SECRET,
            "NODE_LEASE_S": "2",
            "ANALYSER_BACKEND": "rekognition",
            "LABELS_INTERVAL_S": "0",
            "TEXT_INTERVAL_S": "0",
            "REKOGNITION_MAX_ATTEMPTS": "1",
            "OPENAI_API_KEY": "",
            "ANTHROPIC_API_KEY": "",
            "SESSION_STARTS_PER_MINUTE": "0",
            # One directory for all: an upload is read by whichever node runs its job.
            "VIDEO_WORK_DIR": str(self.tmp_path / "videos"),
            "LOG_LEVEL": "INFO",
            **self.env,
        }

    async def start(self, name: str, **env: str) -> Node:
        log = self.tmp_path / f"{name}.log"
        proc, url = await serve_subprocess(
            self.tmp_path, self.http, {**self.node_env(name), **env}, log=log
        )
        node = Node(name, url, proc, log)
        self.nodes[name] = node

        async def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"node {name} exited:\n{node.tail()}")
            async with self.http.get(f"{url}/health") as r:
                return r.status == 200

        # Importing the server takes seconds, more when nodes start side by side.
        if not await eventually(up, within=60):
            raise RuntimeError(f"node {name} did not start:\n{node.tail()}")
        return node

    async def start_all(self, *names: str) -> list[Node]:
        """Start nodes side by side (each takes seconds to import the server)."""
        return list(await asyncio.gather(*(self.start(n) for n in names)))

    async def stop(self) -> None:
        running = [n for n in self.nodes.values() if n.proc.poll() is None]
        for node in running:
            node.proc.send_signal(signal.SIGINT)  # aiohttp's graceful stop
        for node in running:
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.tail()}" for n in self.nodes.values())

    # --- REST helpers ---------------------------------------------------------------------

    async def call(
        self, method: str, url: str, token: str | None = OPERATOR, body: Any = None
    ) -> tuple[int, Any]:
        async with self.http.request(method, url, json=body, headers=bearer(token)) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    async def start_session(self, node: Node, token: str | None = OPERATOR,
                            **job: Any) -> dict[str, Any]:
        status, body = await self.call("POST", f"{node.url}/api/sessions/start", token,
                                       {"job_data": job})
        assert status == 200, body
        return dict(body)

    async def health(self, node: Node) -> dict[str, Any]:
        status, body = await self.call("GET", f"{node.url}/health", None)
        assert status == 200, body
        return dict(body)

    async def metric(self, node: Node, name: str, **labels: str) -> float:
        """A sample of the node's /metrics (0 when absent)."""
        status, text = await self.call("GET", f"{node.url}/metrics")
        assert status == 200, text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in str(text).splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
            if metric == name and got == want:
                return float(value)
        return 0.0


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, step: float = 0.1
) -> bool:
    """Poll an async condition (state across processes has no event to wait on)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            if await check():
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)


async def start_node(settings: Settings, name: str, **app_kwargs: Any) -> RunningServer:
    """A cluster node in this process: its own NODE_ID, port and address, the shared
    CLUSTER_SECRET; `settings` carry the rest (REDIS_URL, the store)."""
    port = free_port()
    own = settings.model_copy(
        update={
            "node_id": name,
            "port": port,
            "node_address": f"http://127.0.0.1:{port}",
            "cluster_secret": SECRET,
        }
    )
    app = create_app(own, **app_kwargs)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return RunningServer(f"http://127.0.0.1:{port}", app, runner, own)
