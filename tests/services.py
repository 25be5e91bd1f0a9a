"""Real services for tests, private to one test run: started on loopback on free ports
in a temporary directory, stopped by PID (never the system's own instances).

Every fixture here skips when the service's binary is missing, except under `CI=true`,
where `.ci/run` installs them and a missing one is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port


def need_binary(name: str, *candidates: str) -> str:
    """The path of a service binary, or skip (fail under CI=true) when it is missing."""
    for c in (*candidates, shutil.which(name)):
        if c and Path(c).is_file():
            return c
    message = f"{name} is not installed (apt-get install the package .ci/run names)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """A private redis-server without persistence; `restart()` keeps its port."""

    binary: str
    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        need_binary("redis-server", "/usr/bin/redis-server"), tmp_path_factory.mktemp("redis")
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
