"""`make cluster`: a whole cluster on this machine, from Debian's packages — a private
PostgreSQL, a private redis-server, N nodes (`proctor serve`, 2 by default) and nginx in
front with the shipped configuration — in a temporary directory, all on loopback. It
prints the URL to open; Ctrl-C stops everything (by PID, never the system's services)
and removes the directory (unless --dir names one to keep).

    python -m server.cluster.devcluster [--nodes 2] [--port 8080] [--dir DIR] [--sqlite]

Needs `apt-get install postgresql redis-server nginx`. The nodes get this process's
environment (API_TOKEN, AWS credentials, ...) plus what makes them a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from server.cluster.nginx import NGINX, Nginx, Upstream

ROOT = Path(__file__).resolve().parent.parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(path: Path | str, package: str) -> str:
    found = str(path) if Path(path).is_file() else shutil.which(Path(path).name)
    if not found:
        raise SystemExit(f"{Path(path).name} is missing: apt-get install {package}")
    return found


def _wait(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s")
        time.sleep(0.1)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Postgres:
    """A private PostgreSQL cluster (initdb + pg_ctl; as the `postgres` user when root,
    since both refuse to run as root)."""

    dir: Path
    port: int = field(default_factory=free_port)
    started: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/proctor"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # Own sessions (as every child here): a Ctrl-C reaches only this script, which
        # stops them in order — the nodes still need the database while they stop.
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       start_new_session=True)

    def start(self) -> None:
        initdb = need(PG_BIN / "initdb", "postgresql")
        pg_ctl = need(PG_BIN / "pg_ctl", "postgresql")
        createdb = need(PG_BIN / "createdb", "postgresql")
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "data"
        if os.geteuid() == 0:
            os.chmod(self.dir.parent, 0o711)
            os.chmod(self.dir, 0o711)
            shutil.chown(self.dir, "postgres", "postgres")
        if not data.exists():
            self._run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        self._run(pg_ctl, "-D", str(data), "-l", str(self.dir / "postgres.log"), "-w", "-t", "30",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        self.started = True
        with contextlib.suppress(subprocess.CalledProcessError):  # exists on a kept --dir
            self._run(createdb, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                      "proctor")

    def stop(self) -> None:
        pid_file = self.dir / "data" / "postmaster.pid"
        if not self.started or not pid_file.exists():
            return
        pid = int(pid_file.read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # fast shutdown
        deadline = time.monotonic() + 20
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.started = False


@dataclass
class Redis:
    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = need("/usr/bin/redis-server", "redis-server")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        _wait(lambda: _port_open(self.port), "redis-server", 10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class NodeProcess:
    node_id: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, cwd: Path) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
            )

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"node {self.node_id} exited; see {self.log}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class DevCluster:
    dir: Path
    nodes: int = 2
    port: int = 8080
    sqlite: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    postgres: Postgres | None = None
    redis: Redis | None = None
    node_processes: list[NodeProcess] = field(default_factory=list)
    nginx: Nginx | None = None

    @property
    def database_env(self) -> dict[str, str]:
        if self.sqlite:  # one WAL file shared by the processes of this machine
            return {"DATABASE_PATH": str(self.dir / "proctor.sqlite3")}
        assert self.postgres is not None
        return {"DATABASE_URL": self.postgres.url}

    def start(self) -> None:
        need(NGINX, "nginx")
        if not self.sqlite:
            self.postgres = Postgres(self.dir / "postgres")
            self.postgres.start()
        self.redis = Redis(self.dir / "redis")
        self.redis.start()
        secret = secrets.token_urlsafe(24)
        for i in range(1, self.nodes + 1):
            port = free_port()
            node_id = f"node-{i}"
            env = {
                **self.database_env,
                "REDIS_URL": self.redis.url,
                "NODE_ID": node_id,
                "NODE_ADDRESS": f"http://127.0.0.1:{port}",
                "CLUSTER_SECRET": secret,
                "TRUSTED_PROXIES": '["127.0.0.1"]',
                # One directory for all: an upload is read by whichever node runs its job.
                "VIDEO_WORK_DIR": str(self.dir / "videos"),
                **self.extra_env,
            }
            node = NodeProcess(node_id, port, env, self.dir / f"{node_id}.log")
            node.start(self.dir)
            self.node_processes.append(node)
        for node in self.node_processes:  # loading the models takes a while
            _wait(node.ready, f"node {node.node_id}", 180)
        self.nginx = Nginx(self.dir / "nginx",
                           [Upstream(n.node_id, n.url) for n in self.node_processes], self.port)
        self.nginx.start()

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for node in self.node_processes:
            node.stop()
        for node in self.node_processes:
            node.wait()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


@contextlib.contextmanager
def running(cluster: DevCluster) -> Iterator[DevCluster]:
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cluster.devcluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (8080)")
    parser.add_argument("--dir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--sqlite", action="store_true",
                        help="share one SQLite file instead of starting PostgreSQL")
    args = parser.parse_args(argv)
    temp = args.dir is None
    base = Path(tempfile.mkdtemp(prefix="proctor-cluster-")) if temp else args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    cluster = DevCluster(base, args.nodes, args.port, args.sqlite)
    stop = False

    def interrupted(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, interrupted)
    try:
        with running(cluster):
            assert cluster.redis is not None
            nodes = ", ".join(f"{n.node_id} {n.url}" for n in cluster.node_processes)
            store = "SQLite" if cluster.postgres is None else f"PostgreSQL {cluster.postgres.url}"
            print(f"cluster ready: open http://localhost:{args.port}/ "
                  f"({nodes}; {store}; Redis {cluster.redis.url}; "
                  f"logs in {base}). Ctrl-C stops it.", flush=True)
            while not stop:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if temp:
            shutil.rmtree(base, ignore_errors=True)
    print("cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
