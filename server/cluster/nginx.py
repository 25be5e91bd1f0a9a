"""The nginx configuration in front of a cluster (deploy/nginx.conf.template), rendered
for a list of nodes, and a runner for Debian's nginx as a private process (tests,
`make cluster`).

Routing, in the template's words: Socket.IO sticks to one node per connection (the
`proctor_node` cookie a node sets on its handshake answer, else the client address,
`ip_hash`), as long-polling needs; a path naming a session goes to the node whose tag
ends the session id; everything else to the least busy node. Whatever reaches the
wrong node is forwarded by the node itself, so the proxy's routing is only a shortcut.

    python -m server.cluster.nginx --listen 8080 \\
        --node node-a=http://10.0.0.5:5001 --node node-b=http://10.0.0.6:5001 > nginx.conf
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from server.cluster.forwarding import CLUSTER_HEADERS
from server.cluster.node import node_tag

TEMPLATE = Path(__file__).resolve().parent.parent.parent / "deploy" / "nginx.conf.template"
NGINX = "/usr/sbin/nginx"


@dataclass(frozen=True)
class Upstream:
    node_id: str
    address: str  # NODE_ADDRESS: http://host:port

    @property
    def tag(self) -> str:
        return node_tag(self.node_id)

    @property
    def server(self) -> str:
        parts = urlsplit(self.address)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"{self.address!r}: the template proxies to http://host:port")
        return parts.netloc


def _headers() -> str:
    lines = [
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Host $http_host;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "# Between nodes only (a node refuses them from anyone else anyway).",
        *(f'proxy_set_header {h} "";' for h in CLUSTER_HEADERS),
    ]
    return "\n".join(" " * 12 + line for line in lines)


def render(
    nodes: list[Upstream], listen: str, prefix: Path, *, run_as_root: bool = False,
    template: Path = TEMPLATE,
) -> str:
    """The configuration for `nodes`, listening on `listen` (a port or address:port),
    keeping its pid, logs and temporary files under `prefix`."""
    if not nodes:
        raise ValueError("at least one node")
    servers = "\n".join(f"        server {n.server} max_fails=1 fail_timeout=5s;  # {n.node_id}"
                        for n in nodes)
    per_node = []
    for n in nodes:
        lines = [f"    upstream proctor_node_{n.tag} {{  # {n.node_id}",
                 f"        server {n.server} max_fails=1 fail_timeout=5s;"]
        lines += [f"        server {o.server} backup;" for o in nodes if o is not n]
        lines += ["        keepalive 8;", "    }"]
        per_node.append("\n".join(lines))
    tags = "\n".join(f'        "{n.tag}" proctor_node_{n.tag};' for n in nodes)
    text = template.read_text()
    for marker, value in (
        ("@@USER@@", "user root;" if run_as_root else ""),
        ("@@PREFIX@@", str(prefix)),
        ("@@LISTEN@@", listen),
        ("@@SERVERS@@", servers),
        ("@@NODE_UPSTREAMS@@", "\n\n".join(per_node)),
        ("@@TAG_MAP@@", tags),
        ("@@HEADERS@@", _headers()),
    ):
        text = text.replace(marker, value)
    return text


class Nginx:
    """Debian's nginx as a private foreground process under `prefix` (never the system's
    own instance), stopped by its PID."""

    def __init__(self, prefix: Path, nodes: list[Upstream], port: int,
                 binary: str = NGINX) -> None:
        self.prefix = prefix
        self.port = port
        self.binary = binary
        self.conf = prefix / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            render(nodes, f"127.0.0.1:{port}", prefix, run_as_root=os.geteuid() == 0)
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-e",
                str(self.prefix / "error.log")]

    def check(self) -> None:
        """`nginx -t`: raises with nginx's own message when the configuration is wrong."""
        done = subprocess.run([*self._args(), "-t"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nginx -t refused {self.conf}:\n{done.stderr}")

    def start(self, timeout_s: float = 10.0) -> None:
        self.check()
        self.proc = subprocess.Popen([*self._args(), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start:\n{self.errors()}") from None
                time.sleep(0.05)

    def errors(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.cluster.nginx",
        description="Print the nginx configuration for a proctoring cluster.",
    )
    parser.add_argument("--listen", default="8080", help="port or address:port (8080)")
    parser.add_argument("--prefix", default="/var/lib/proctor-nginx",
                        help="directory for nginx's pid, logs and temporary files")
    parser.add_argument("--node", action="append", required=True, metavar="NODE_ID=URL",
                        help="a node: its NODE_ID and NODE_ADDRESS (repeat per node)")
    args = parser.parse_args(argv)
    nodes = []
    for entry in args.node:
        node_id, sep, url = entry.partition("=")
        if not sep:
            parser.error(f"--node {entry!r}: expected NODE_ID=http://host:port")
        nodes.append(Upstream(node_id.strip(), url.strip().rstrip("/")))
    sys.stdout.write(render(nodes, args.listen, Path(args.prefix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
