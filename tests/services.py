"""Real services for tests, private to one test run: started on loopback on free ports
in a temporary directory, stopped by PID (never the system's own instances).

Every fixture here skips when the service's binary is missing, except under `CI=true`,
where `.ci/run` installs them and a missing one is a failure.

`PostgresServer` is plain Python (no pytest) so the benchmarks start clusters with it too.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
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


# --- PostgreSQL ---------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15 (not on PATH)


def need_postgres() -> Path:
    """The PostgreSQL binaries' directory, or skip (fail under CI=true)."""
    initdb = need_binary("initdb", str(PG_BIN / "initdb"))
    return Path(initdb).parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie nobody reaps (the postmaster is not our child) has exited
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster on loopback, trust authentication, user `postgres`.

    As root, initdb and pg_ctl run as the `postgres` user (they refuse root): the
    temporary directory is made traversable (711) and the data directory theirs.
    `fsync=False` is for speed only; a test of crash safety keeps the default (on).
    `restart()` keeps the port and the data.
    """

    bin_dir: Path = PG_BIN
    fsync: bool = True
    port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="proctor-pg-")))
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The `postgres` database (every cluster has it)."""
        return self.url_for("postgres")

    def _run(self, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [*as_postgres, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self.dir.chmod(0o711)
        self.data.mkdir()
        (self.dir / "run").mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(self.dir / "run", "postgres", "postgres")
            (self.dir / "log").touch()
            shutil.chown(self.dir / "log", "postgres", "postgres")
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
        )

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.init()
        options = (
            f"-p {self.port} -k {self.dir / 'run'} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if self.fsync else 'off'}"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
            "-w", "-t", "30", "-o", options, "start",
        )

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT to the postmaster): sessions are cut, commits kept.
        `immediate` (SIGQUIT): as if it crashed, no checkpoint; the next start recovers
        from the write-ahead log."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGQUIT if immediate else signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)

    def restart(self, immediate: bool = False) -> None:
        self.stop(immediate)
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"db{next(self._names)}"
        self._run(
            str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", "postgres", name,
        )
        return self.url_for(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One cluster for the whole run (fsync off: nothing here tests crash safety); tests
    get a database of their own from `postgres_url`."""
    server = PostgresServer(need_postgres(), fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresServer) -> str:
    """A fresh, empty database in the shared cluster."""
    return postgres_cluster.create_database()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A cluster of this test's own (it may restart it), fsync on."""
    server = PostgresServer(need_postgres())
    try:
        server.start()
        yield server
    finally:
        server.destroy()
