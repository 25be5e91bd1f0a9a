"""Debian's nginx, with the configuration the project ships (deploy/nginx.conf.template),
in front of two nodes that trust it (TRUSTED_PROXIES): the brief's REST client and
Socket.IO clients (long-polling and websocket) work through it whichever node they land
on; a path naming a session reaches its owner directly; a dead owner's sessions are
answered by the other node, never with a proxy error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import socketio
from yarl import URL

from server.cluster.forwarding import NODE_COOKIE
from server.cluster.nginx import Nginx, Upstream
from tests.cluster_kit import Cluster, Node
from tests.conftest import free_port
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url
from tests.services import (  # noqa: F401 (fixtures)
    RedisServer,
    need_binary,
    postgres_cluster,
    postgres_url,
    redis_server,
)
from tests.test_socketio import EVENTS, Client

pytestmark = pytest.mark.slow


@pytest.fixture
async def proxied(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,  # noqa: F811
    rekognition: FakeRekognition,
    postgres_url: str,  # noqa: F811
) -> AsyncIterator[tuple[Cluster, Nginx]]:
    binary = need_binary("nginx", "/usr/sbin/nginx")
    cluster = Cluster(tmp_path, http, redis_server, rekognition,
                      {"DATABASE_URL": postgres_url},
                      env={"TRUSTED_PROXIES": '["127.0.0.1"]'})
    nginx: Nginx | None = None
    try:
        a, b = await cluster.start_all("node-a", "node-b")
        nginx = Nginx(tmp_path / "nginx", [Upstream(n.name, n.url) for n in (a, b)],
                      free_port(), binary)
        nginx.start()
        yield cluster, nginx
    finally:
        if nginx is not None:
            print(nginx.errors())
            nginx.stop()
        await cluster.stop()
        print(cluster.logs())


def jar_client(base: str, node: Node | None) -> tuple[Client, aiohttp.ClientSession]:
    """A Socket.IO client whose HTTP session keeps cookies (as a browser does), already
    holding the node cookie of `node` when given."""
    jar = aiohttp.CookieJar(unsafe=True)  # the proxy is at an IP address
    if node is not None:
        jar.update_cookies({NODE_COOKIE: node.tag}, URL(base))
    session = aiohttp.ClientSession(cookie_jar=jar)
    client = Client()
    client.sio = socketio.AsyncClient(reconnection=False, http_session=session)
    for name in EVENTS:
        client.sio.on(name, client._recorder(name))
    return client, session


async def close(client: Client, session: aiohttp.ClientSession) -> None:
    """python-engineio's client waits for its pending long-poll GET to come back (up to
    the ping interval, 25 s) before a disconnect returns: send the close and go."""
    if client.sio.connected:
        await client.sio.eio.disconnect(abort=True)
    await session.close()


async def socketio_flow(client: Client, rekognition: FakeRekognition) -> str:
    """The brief's Socket.IO flow; returns the session id."""
    await client.sio.emit("start_session", {"job_data": {"jobTitle": "SRE"}})
    [started] = await client.wait("session_started", timeout=10)
    sid = str(started["session_id"])
    rekognition.set_scene(faces=[fake_face()])
    ack = await client.sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()},
                                timeout=10)
    assert ack == {"status": "analysed", "frame_index": 0}, ack
    [analysis] = await client.wait("frame_analysis", timeout=10)
    assert analysis["result"]["metrics"]["eye_contact"] is not None
    await client.sio.emit("get_live_metrics", {"session_id": sid})
    [metrics] = await client.wait("live_metrics", timeout=10)
    assert metrics["frames_analysed"] == 1
    await client.sio.emit("end_session", {"session_id": sid})
    [ended] = await client.wait("session_ended", timeout=10)
    assert ended["report"]["summary"]["frames_analysed"] == 1
    return sid


async def test_the_brief_clients_work_through_nginx_on_either_node(
    proxied: tuple[Cluster, Nginx], rekognition: FakeRekognition
) -> None:
    cluster, nginx = proxied
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    base = nginx.url

    # REST, as the brief's integration does it (development mode: no token).
    owners: dict[str, str] = {}
    for _ in range(8):
        status, started = await cluster.call("POST", f"{base}/api/sessions/start", None,
                                             {"job_data": {"jobTitle": "SRE"}})
        assert status == 200, started
        sid = started["session_id"]
        owners[sid] = sid.rsplit(".", 1)[1]
        assert started["join_url"].startswith(base)  # the host the client used
        if set(owners.values()) == {a.tag, b.tag}:
            break
    assert set(owners.values()) == {a.tag, b.tag}  # new sessions land on both nodes
    rekognition.set_scene(faces=[fake_face()])
    for sid in owners:
        status, answer = await cluster.call("POST", f"{base}/api/sessions/{sid}/frame", None,
                                            {"frame": face_data_url()})
        assert status == 200 and answer["status"] == "analysed", answer
        status, metrics = await cluster.call("GET", f"{base}/api/sessions/{sid}/metrics", None)
        assert status == 200 and metrics["frames_analysed"] == 1
        status, report = await cluster.call("POST", f"{base}/api/sessions/{sid}/end", None)
        assert status == 200 and report["summary"]["frames_analysed"] == 1
        status, again = await cluster.call("GET", f"{base}/api/sessions/{sid}/report", None)
        assert status == 200 and again["session_id"] == sid
    # The session id routed each request straight to its owner: nothing was forwarded.
    for node in (a, b):
        for kind in ("frame", "metrics", "end"):
            assert await cluster.metric(node, "proctor_cluster_forwarded_total", kind=kind,
                                        outcome="2xx") == 0, (node.name, kind)

    # Socket.IO long-polling held on each node by its cookie, then websocket.
    for node in (a, b):
        client, session = jar_client(base, node)
        try:
            await client.sio.connect(base, transports=["polling"])
            sid = await socketio_flow(client, rekognition)
            assert sid.endswith("." + node.tag), node.name
        finally:
            await close(client, session)
    # No cookie yet: the handshake's node sets it, polling stays there and upgrades.
    client, session = jar_client(base, None)
    try:
        await client.sio.connect(base)  # polling, then the websocket upgrade
        sid = await socketio_flow(client, rekognition)
        cookies = {c.key: c.value for c in session.cookie_jar}
        assert sid.endswith("." + cookies[NODE_COOKIE])
        assert client.sio.transport() == "websocket"
    finally:
        await close(client, session)

    # A websocket client on one node watches a session the other node runs.
    status, started = await cluster.call("POST", f"{a.url}/api/sessions/start", None, {})
    remote_sid = started["session_id"]
    client, session = jar_client(base, b)
    try:
        await client.sio.connect(base, transports=["websocket"])
        await client.sio.call("get_live_metrics", {"session_id": remote_sid}, timeout=10)
        status, _ = await cluster.call("POST", f"{base}/api/sessions/{remote_sid}/frame", None,
                                       {"frame": face_data_url()})
        assert status == 200
        [seen] = await client.wait("frame_analysis", timeout=10)
        assert seen["session_id"] == remote_sid
    finally:
        await close(client, session)

    # The owner dies: nginx passes its sessions to the other node, which answers for it.
    a.kill()
    status, body = await cluster.call("POST", f"{base}/api/sessions/{remote_sid}/frame", None,
                                      {"frame": face_data_url()})
    assert (status, body["error"]["code"]) in ((503, "owner_unavailable"),
                                               (409, "session_ended")), body
