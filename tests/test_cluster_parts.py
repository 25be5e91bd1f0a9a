"""The cluster's parts on their own: signed forwarding (a forged or stale claim refused, a
signed one believed), node identity and tagged session ids, the lease reaper's SQL on a
real store shared by two nodes, a node that finds itself reaped after its lease lapsed."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from server.app import create_app
from server.cluster.forwarding import H_CLIENT, SignatureError, sign_headers, verify
from server.cluster.leases import LeaseKeeper
from server.cluster.node import ClusterConfigError, NodeIdentity, new_session_id, session_tag
from server.session.store import Store
from tests.conftest import make_settings, start_server
from tests.fakes.rekognition import FakeRekognition
from tests.services import RedisServer, redis_server  # noqa: F401 (fixture)

SECRET = b"s3cret"


def signed(**overrides: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        "client": "10.1.2.3", "host": "proctor.example", "scheme": "https", "via": "rest",
        "hop": 1,
    }
    args.update(overrides)
    return sign_headers(SECRET, "node-a", "POST", "/api/sessions/x/frame", **args)


def test_a_signed_forwarding_is_verified_and_anything_else_refused() -> None:
    claims = verify(SECRET, signed(), "POST", "/api/sessions/x/frame")
    assert (claims.client, claims.host, claims.scheme) == ("10.1.2.3", "proctor.example", "https")
    assert (claims.forwarded.node_id, claims.forwarded.via, claims.forwarded.hop) == (
        "node-a", "rest", 1
    )
    refused = [
        ({}, "POST", "/api/sessions/x/frame", SECRET),  # no signature at all
        (signed(), "POST", "/api/sessions/y/frame", SECRET),  # another path
        (signed(), "GET", "/api/sessions/x/frame", SECRET),  # another method
        (signed(), "POST", "/api/sessions/x/frame", b"other"),  # another cluster's secret
        ({**signed(), H_CLIENT: "6.6.6.6"}, "POST", "/api/sessions/x/frame", SECRET),  # altered
        (signed(now=time.time() - 120), "POST", "/api/sessions/x/frame", SECRET),  # stale
        (signed(via="carrier-pigeon"), "POST", "/api/sessions/x/frame", SECRET),
    ]
    for headers, method, path, secret in refused:
        with pytest.raises(SignatureError):
            verify(secret, headers, method, path)


def test_session_ids_carry_the_owner_tag() -> None:
    ident = NodeIdentity.from_settings(make_settings(Path("/tmp"), node_id="node-a"))
    sid = new_session_id(ident.tag)
    assert session_tag(sid) == ident.tag and len(ident.tag) == 8
    assert len(sid.split(".")[0]) >= 22  # still 128 random bits
    assert session_tag(new_session_id()) is None
    assert session_tag("abc.NOTHEX12") is None and session_tag(None) is None


def test_node_identity_defaults_and_refusals() -> None:
    ident = NodeIdentity.from_settings(make_settings(Path("/tmp"), port=5005))
    assert ident.node_id == f"{socket.gethostname()}:5005"
    assert ident.address == "http://127.0.0.1:5005"
    wide = NodeIdentity.from_settings(make_settings(Path("/tmp"), host="0.0.0.0", port=5001))
    assert wide.address == f"http://{socket.gethostname()}:5001"
    assert NodeIdentity.from_settings(
        make_settings(Path("/tmp"), node_address="https://10.0.0.5:5001/")
    ).address == "https://10.0.0.5:5001"
    for bad in ({"node_address": "10.0.0.5:5001"}, {"node_address": "http://h:1/api"},
                {"node_id": "two words"}, {"node_id": "x" * 200}):
        with pytest.raises(ClusterConfigError):
            NodeIdentity.from_settings(make_settings(Path("/tmp"), **bad))


def test_a_cluster_needs_its_secret(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="CLUSTER_SECRET"):
        create_app(make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0"))


async def _session(store: Store, sid: str, node: str) -> None:
    await store.create_session(sid, "rest", "local", {}, time.time(), node_id=node)


async def test_reaping_touches_only_live_sessions_of_nodes_without_a_lease(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shared.sqlite3"
    x, y = Store(path), Store(path)
    await x.open("node-x")
    await y.open("node-y")
    try:
        now = time.time()
        await x.renew_node("node-x", "http://x", "i1", now - 100, now - 10, now - 5)  # lapsed
        await y.renew_node("node-y", "http://y", "i2", now - 100, now, now + 60)
        await _session(x, "x-live", "node-x")
        await _session(x, "x-done", "node-x")
        await x.end_session("x-done", now, "client", {})
        await _session(y, "y-live", "node-y")
        await _session(y, "ghost-live", "node-z")  # its node never held a lease here
        await x.flush()
        await y.flush()

        orphans = await y.orphaned_sessions(time.time(), "node-y")
        assert sorted(orphans) == [("ghost-live", "node-z"), ("x-live", "node-x")]
        # Another node reaping the same orphans at the same time agrees.
        ids = [sid for sid, _ in orphans]
        await asyncio.gather(y.interrupt_sessions(ids, "node_lost"),
                             x.interrupt_sessions(ids, "node_lost"))
        for sid, status, reason in (
            ("x-live", "interrupted", "node_lost"),
            ("ghost-live", "interrupted", "node_lost"),
            ("x-done", "ended", "client"),
            ("y-live", "live", None),
        ):
            record = await y.get_session(sid)
            assert record is not None and (record["status"], record["end_reason"]) == (
                status, reason), sid
        assert await y.orphaned_sessions(time.time(), "node-y") == []
    finally:
        await x.close()
        await y.close()

    # A restart interrupts the node's own sessions, not a peer's.
    again = Store(path)
    try:
        assert await again.open("node-y") == ["y-live"]
    finally:
        await again.close()


async def test_a_fresh_node_waits_a_lease_before_reaping(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    await store.open("node-b")
    dropped: list[list[str]] = []

    async def abandon(ids: list[str]) -> None:
        dropped.append(ids)

    ident = NodeIdentity("node-b", "http://b", "00000000", "inc", time.time())
    keeper = LeaseKeeper(ident, store, 0.5, CollectorRegistry(), live_ids=lambda: ["mine"],
                         abandon=abandon)
    try:
        await _session(store, "dead", "node-a")  # node-a never held a lease
        await _session(store, "mine", "node-b")
        await store.flush()
        await keeper.start()
        assert await keeper.reap() == []  # not until our own renewals held a whole lease
        await asyncio.sleep(0.55)
        await keeper.tick()
        record = await store.get_session("dead")
        assert record is not None and record["status"] == "interrupted"
        assert dropped == []

        # Our lease lapsed (renewals failing) and a peer reaped our session meanwhile:
        # the next renewal that succeeds drops it here.
        keeper.renewed_at = time.time() - 5
        await store.interrupt_sessions(["mine"], "node_lost")
        await keeper.tick()
        assert dropped == [["mine"]]
        assert keeper.to_json()["state"] == "held"
    finally:
        await keeper.stop()
        await store.close()


async def test_only_a_signed_peer_may_name_the_client(
    tmp_path: Path, rekognition: FakeRekognition, redis_server: RedisServer,  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    """The per-address start limit counts the forwarded client only on a valid signature;
    the same headers from anyone else are refused."""
    srv = await start_server(make_settings(
        tmp_path, redis_url=redis_server.url, cluster_secret="s3cret", node_id="node-a",
        session_starts_per_minute=1,
    ))
    path = "/api/sessions/start"

    def as_peer(client: str, secret: bytes = SECRET) -> dict[str, str]:
        return sign_headers(secret, "node-b", "POST", path, client=client,
                            host="127.0.0.1", scheme="http", via="rest", hop=1)

    async def start(headers: dict[str, str]) -> tuple[int, Any]:
        async with http.post(srv.url + path, json={"job_data": {}}, headers=headers) as r:
            return r.status, await r.json()

    try:
        assert (await start(as_peer("10.0.0.1")))[0] == 200
        status, body = await start(as_peer("10.0.0.1"))
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert (await start(as_peer("10.0.0.2")))[0] == 200
        for forged in (
            {H_CLIENT: "10.0.0.3"},  # no signature
            as_peer("10.0.0.3", secret=b"guessed"),
            {**as_peer("10.0.0.2"), H_CLIENT: "10.0.0.3"},  # a peer's, altered
        ):
            status, body = await start(forged)
            assert status == 403 and body["error"]["code"] == "forwarding_refused"
        assert (await start({}))[0] == 200  # the test's own address: its first start
    finally:
        await srv.stop()
