"""Two nodes of a cluster (SPEC "More than one machine") as real processes on loopback,
sharing a private PostgreSQL (one test also a SQLite file) and a private redis-server:
sessions are seen, watched (the brief's events and the console's watch_all /
watch_session), fed, ended and reported from either node whichever node runs them; a
node killed with SIGKILL has its sessions marked interrupted by the other, everything
they stored kept; Redis restarted mid-session: events flow between the nodes again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster_kit import OPERATOR, Cluster, Node, eventually
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import face_data_url
from tests.services import (  # noqa: F401 (fixtures)
    RedisServer,
    postgres_cluster,
    postgres_url,
    redis_server,
)
from tests.test_socketio import Client

pytestmark = pytest.mark.slow
LEASE_S = 2.0


@pytest.fixture
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Where both nodes keep their data: a database of the private PostgreSQL cluster, or
    (parametrized "sqlite") one SQLite file, which nodes on one machine may share."""
    if getattr(request, "param", "postgresql") == "sqlite":
        return {"DATABASE_PATH": str(tmp_path / "shared.sqlite3")}
    return {"DATABASE_URL": request.getfixturevalue("postgres_url")}


@pytest.fixture
async def cluster(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,  # noqa: F811
    rekognition: FakeRekognition,
    store_env: dict[str, str],
) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, http, redis_server, rekognition, store_env,
                env={"API_TOKEN": OPERATOR, "NODE_LEASE_S": str(LEASE_S)})
    try:
        yield c
    finally:
        await c.stop()
        print(c.logs())  # pytest shows it when the test failed


async def watcher(url: str, token: str | None = OPERATOR) -> Client:
    client = Client()
    await client.sio.connect(url, transports=["websocket"], auth={"token": token})
    return client


async def frame(c: Cluster, url: str, sid: str, token: str | None = OPERATOR) -> tuple[int, Any]:
    return await c.call("POST", f"{url}/api/sessions/{sid}/frame", token,
                        {"frame": face_data_url()})


def alert_types(events: list[dict[str, Any]]) -> set[str]:
    return {a["type"] for e in events for a in e["alerts"] if a["status"] == "onset"}


async def test_a_session_of_one_node_is_listed_watched_fed_and_reported_on_the_other(
    cluster: Cluster, rekognition: FakeRekognition
) -> None:
    a, b = await cluster.start_all("node-a", "node-b")
    # The proctor's console on B watches everything, before the session exists.
    console = await watcher(b.url)
    assert (await console.sio.call("watch_all", {}, timeout=10))["status"] == "ok"
    started = await cluster.start_session(a, jobTitle="SRE")
    sid, candidate = started["session_id"], started["candidate_token"]
    [announced] = await console.wait("session_started", timeout=10)
    assert announced["session_id"] == sid
    ack = await console.sio.call("watch_session", {"session_id": sid}, timeout=10)
    assert ack == {"status": "ok", "session_id": sid}
    assert sid.endswith("." + a.tag)  # the owner's tag: the proxy's shortcut
    health = await cluster.health(a)
    assert health["cluster"]["node"]["tag"] == a.tag and health["cluster"]["redis"] == "ok"

    # Listed on B, from the shared store, with its owner; its report not before its end.
    status, listing = await cluster.call("GET", f"{b.url}/api/sessions")
    assert status == 200
    [row] = [s for s in listing["sessions"] if s["session_id"] == sid]
    assert row["status"] == "live" and row["node_id"] == "node-a"
    for node in (a, b):
        status, body = await cluster.call("GET", f"{node.url}/api/sessions/{sid}/report")
        assert status == 409 and body["error"]["code"] == "session_live", node.name
    status, body = await cluster.call("GET", f"{b.url}/api/sessions/nope.{a.tag}/metrics")
    assert status == 404 and body["error"]["code"] == "session_not_found"

    # Watched on B: naming the session joins its room there; live metrics come from A.
    watch = await watcher(b.url)
    try:
        ack = await watch.sio.call("get_live_metrics", {"session_id": sid}, timeout=10)
        assert ack == {"status": "ok"}
        [metrics] = await watch.wait("live_metrics")
        assert metrics["session_id"] == sid and metrics["frames_received"] == 0

        # A frame analysed on A raises an alert; B's watcher receives both events.
        rekognition.set_scene(faces=[fake_face(), fake_face()])
        status, answer = await frame(cluster, a.url, sid, candidate)
        assert status == 200 and answer == {"session_id": sid, "status": "analysed"}
        [analysis] = await watch.wait("frame_analysis", timeout=10)
        assert analysis["session_id"] == sid and analysis["result"]["faces_count"] == 2
        alerts = await watch.wait("alerts", timeout=10)
        assert "multiple_faces_detected" in alert_types(alerts)
        # The console too: the alert once (watch_all and watch_session), the analysis.
        assert "multiple_faces_detected" in alert_types(await console.wait("alerts", timeout=10))
        [seen] = await console.wait("frame_analysis", timeout=10)
        assert seen["result"]["frame_index"] == 0
        # A's pushes of the session's live metrics reach B's watch_session room.
        [pushed] = await console.wait("live_metrics", timeout=10)
        assert pushed["session_id"] == sid and "health" in pushed

        # The candidate token A issued works on B; B forwards to A.
        rekognition.set_scene(faces=[fake_face()])
        status, answer = await frame(cluster, b.url, sid, candidate)
        assert status == 200 and answer == {"session_id": sid, "status": "analysed"}
        status, metrics = await cluster.call("GET", f"{b.url}/api/sessions/{sid}/metrics")
        assert status == 200 and metrics["frames_received"] == 2 and metrics["metrics"]
        status, seen = await cluster.call(
            "GET", f"{b.url}/api/sessions/{sid}/metrics", candidate
        )
        assert status == 200 and set(seen) == {
            "session_id", "status", "started_at", "duration_s", "frames_received"
        }
        # Another session's candidate is refused on B before anything is forwarded.
        other = await cluster.start_session(b)
        status, body = await frame(cluster, b.url, sid, other["candidate_token"])
        assert status == 403 and body["error"]["code"] == "forbidden"

        # A push client on B sends the frame over Socket.IO: acknowledged as on A.
        ack = await watch.sio.call(
            "analyze_frame", {"session_id": sid, "frame": face_data_url()}, timeout=10
        )
        assert ack == {"status": "analysed", "frame_index": 2}
        await watch.wait("frame_analysis", count=3, timeout=10)
        bad = await watch.sio.call("analyze_frame", {"session_id": sid, "frame": "xx"},
                                   timeout=10)
        assert bad["status"] == "error" and bad["error"]["status"] == 400

        # Ended from B by its candidate; the report reaches B's watcher and is read on B.
        status, answer = await cluster.call("POST", f"{b.url}/api/sessions/{sid}/end",
                                            candidate)
        assert (status, answer) == (200, {"status": "ended"})
        [ended] = await watch.wait("session_ended", timeout=10)
        assert ended["session_id"] == sid and ended["report"]["summary"]["frames_analysed"] == 3
        [ended] = await console.wait("session_ended", timeout=10)
        assert ended["session_id"] == sid
        onsets = [a for e in console.received["alerts"] for a in e["alerts"]
                  if a["status"] == "onset"]
        assert len(onsets) == 1  # one delivery, though the console is in two of its rooms
    finally:
        await watch.sio.disconnect()
        await console.sio.disconnect()
    status, report = await cluster.call("GET", f"{b.url}/api/sessions/{sid}/report")
    assert status == 200 and report["summary"]["frames_analysed"] == 3
    assert "multiple_faces_detected" in {x["type"] for x in report["alerts"]}
    status, body = await frame(cluster, b.url, sid, candidate)
    assert status == 409 and body["error"]["code"] == "session_ended"
    # B forwarded (frame, metrics ×2, Socket.IO frames, end); A forwarded nothing.
    assert await cluster.metric(b, "proctor_cluster_forwarded_total", kind="frame",
                                outcome="2xx") == 2
    assert await cluster.metric(b, "proctor_cluster_forwarded_total", kind="end",
                                outcome="2xx") == 1
    assert await cluster.metric(a, "proctor_cluster_forwarded_total", kind="frame",
                                outcome="2xx") == 0


@pytest.mark.parametrize("store_env", ["postgresql", "sqlite"], indirect=True)
async def test_a_killed_node_has_its_sessions_interrupted_by_the_other(
    cluster: Cluster, rekognition: FakeRekognition
) -> None:
    a, b = await cluster.start_all("node-a", "node-b")
    sid = (await cluster.start_session(a, jobTitle="Data Analyst"))["session_id"]
    kept = (await cluster.start_session(b))["session_id"]
    rekognition.set_scene(faces=[fake_face()], labels=[fake_label("Book", 88)])
    for _ in range(3):
        status, _ = await frame(cluster, a.url, sid)
        assert status == 200
    await asyncio.sleep(0.3)  # the store commits as it goes

    a.kill()
    killed = time.monotonic()
    # Until its lease lapses and B marks it, B answers for the dead owner: never a hang.
    status, body = await frame(cluster, b.url, sid)
    assert status == 503 and body["error"]["code"] == "owner_unavailable", body

    async def interrupted() -> bool:
        _, listing = await cluster.call("GET", f"{b.url}/api/sessions?status=interrupted")
        return any(s["session_id"] == sid for s in listing["sessions"])

    assert await eventually(interrupted, within=3 * LEASE_S), cluster.logs()
    waited = time.monotonic() - killed
    status, record = await cluster.call("GET", f"{b.url}/api/sessions")
    by_id = {s["session_id"]: s for s in record["sessions"]}
    assert by_id[sid]["status"] == "interrupted" and by_id[sid]["end_reason"] == "node_lost"
    assert by_id[kept]["status"] == "live"  # B's own session is untouched
    status, body = await frame(cluster, b.url, sid)
    assert status == 409 and body["error"]["code"] == "session_ended"
    # Everything A stored is there: B builds the report.
    status, report = await cluster.call("GET", f"{b.url}/api/sessions/{sid}/report")
    assert status == 200, report
    assert report["summary"]["interrupted"] is True
    assert report["summary"]["frames_analysed"] == 3
    assert report["job_data"] == {"jobTitle": "Data Analyst"}
    [book] = report["alerts"]
    assert book["type"] == "suspicious_object" and book["end_reason"] == "interrupted"
    health = await cluster.health(b)
    assert [(p["node_id"], p["alive"]) for p in health["cluster"]["lease"]["peers"]] == [
        ("node-a", False)
    ]
    assert await cluster.metric(b, "proctor_cluster_sessions_reaped_total") == 1
    print(f"interrupted {waited:.2f} s after SIGKILL (lease {LEASE_S} s)")


async def test_a_restarted_node_interrupts_only_its_own_sessions(cluster: Cluster) -> None:
    # A lease far longer than the test: no reaper acts, only the restart itself.
    cluster.env["NODE_LEASE_S"] = "60"
    a, b = await cluster.start_all("node-a", "node-b")
    mine = (await cluster.start_session(a))["session_id"]
    theirs = (await cluster.start_session(b))["session_id"]
    a.kill()
    a = await cluster.start("node-a")
    status, listing = await cluster.call("GET", f"{a.url}/api/sessions")
    by_id = {s["session_id"]: s for s in listing["sessions"]}
    assert (by_id[mine]["status"], by_id[mine]["end_reason"]) == ("interrupted", "server_restart")
    assert by_id[theirs]["status"] == "live"
    status, _ = await frame(cluster, a.url, theirs)  # forwarded to B, still running it
    assert status == 200


async def test_events_flow_again_after_redis_restarts(
    cluster: Cluster, redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = await cluster.start_all("node-a", "node-b")
    sid = (await cluster.start_session(a))["session_id"]
    local, remote = await watcher(a.url), await watcher(b.url)
    try:
        for w in (local, remote):
            await w.sio.call("get_live_metrics", {"session_id": sid}, timeout=10)
        assert (await frame(cluster, a.url, sid))[0] == 200
        await remote.wait("frame_analysis", timeout=10)

        redis_server.stop()
        assert (await frame(cluster, a.url, sid))[0] == 200
        await local.wait("frame_analysis", count=2, timeout=10)  # this node's: no Redis

        async def degraded() -> bool:
            health = await cluster.health(b)
            return health["status"] == "degraded" and health["cluster"]["redis"] == "down"

        assert await eventually(degraded, within=5)

        redis_server.start()
        seen = len(remote.received["frame_analysis"])

        async def flowing() -> bool:
            assert (await frame(cluster, a.url, sid))[0] == 200
            await asyncio.sleep(0.2)
            return len(remote.received["frame_analysis"]) > seen

        assert await eventually(flowing, within=20, step=0.5), cluster.logs()
        for node in (a, b):

            async def ok(node: Node = node) -> bool:
                health = await cluster.health(node)
                return health["cluster"]["redis"] == "ok" and health["status"] == "ok"

            assert await eventually(ok, within=5)
    finally:
        for w in (local, remote):
            await w.sio.disconnect()


async def test_an_offer_for_another_node_s_session_reaches_its_owner(
    cluster: Cluster, rekognition: FakeRekognition
) -> None:
    """The page reconnects through the other node: the offer is forwarded, the owner
    answers with its own ICE candidates, so the media goes to the owner."""
    from tests.netns import require_netns
    from tests.rtc_client import RtcTestClient, SyntheticCamera, face_blank_scenes

    require_netns()
    rekognition.faces_from_image = True
    cluster.env.update({
        "API_TOKEN": "",  # the test client posts offers without a token
        "RTC_HOST_ADDRESSES": '["127.0.0.1"]',
        "RTC_REMOTE_CANDIDATE_ADDRESSES": '["127.0.0.1"]',
        "RTC_RECONNECT_GRACE_S": "30",
    })
    a, b = await cluster.start_all("node-a", "node-b")
    first = RtcTestClient(a.url, SyntheticCamera(face_blank_scenes(), "face"))
    try:
        answer = await first.connect(job_data={"jobTitle": "SRE"})
        sid = answer["session_id"]
        assert sid.endswith("." + a.tag)
        await first.opened()
        await first.wait_for("frame_analysis", within=15)
    finally:
        await first.close()

    again = RtcTestClient(b.url, SyntheticCamera(face_blank_scenes(), "face"))
    try:
        answer = await again.connect(session_id=sid)
        assert answer["session_id"] == sid
        await again.opened()
        m = await again.wait_for("frame_analysis", within=15)
        assert m["session_id"] == sid
    finally:
        await again.close()
    assert await cluster.metric(b, "proctor_cluster_forwarded_total", kind="offer",
                                outcome="2xx") == 1
    assert await cluster.metric(b, "proctor_sessions_started_total", transport="webrtc") == 0
    # A junk offer naming the session gets the owner's own refusal through B.
    status, body = await cluster.call("POST", f"{b.url}/api/rtc/offer", None,
                                      {"sdp": "v=0 junk", "type": "offer", "session_id": sid})
    assert status == 400 and body["error"]["code"] == "malformed_sdp"
    assert await cluster.metric(b, "proctor_cluster_forwarded_total", kind="offer",
                                outcome="4xx") == 1
