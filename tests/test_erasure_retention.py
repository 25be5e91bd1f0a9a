"""Erasure and retention, end to end: DELETE /api/sessions/{id} on ended, live and
video sessions (every row gone, the bytes too, committed before the answer, audited
without personal data), the evidence table when a database has it, and the retention
sweep (periodic, in bounded batches, never a live session)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import Settings
from server.session.store import Store
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url
from tests.test_video_api import TERMINAL, post_upload, video_settings, wait_state
from tests.video_media import make_video

ALICE = "alice-token-0123456789"
#: In the job data: no trace of it may survive an erasure, in any table or in the file.
MARKER = "Zebra-Quartermaster-7731"
SESSION_TABLES = ("frames", "alerts", "alert_reviews", "reports", "sessions")


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_tokens": f"alice:{ALICE}"}


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    token: str | None = ALICE,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def run_session(
    server: RunningServer,
    http: aiohttp.ClientSession,
    rekognition: FakeRekognition,
    *,
    end: bool = True,
    token: str | None = ALICE,
) -> str:
    """A session with two frames, one raising an alert that is then reviewed."""
    status, started = await call(
        http,
        "POST",
        f"{server.url}/api/sessions/start",
        {"job_data": {"jobTitle": MARKER}},
        token,
    )
    assert status == 200, started
    sid = started["session_id"]
    rekognition.set_scene(faces=[fake_face(), fake_face(box=(0.05, 0.1, 0.2, 0.3))])
    status, frame = await call(
        http, "POST", f"{server.url}/api/sessions/{sid}/frame", {"frame": face_data_url()}, token
    )
    assert status == 200, frame
    rekognition.set_scene(faces=[fake_face()])
    await call(
        http, "POST", f"{server.url}/api/sessions/{sid}/frame", {"frame": face_data_url()}, token
    )
    alert_id = frame["result"]["alerts"][0]["episode_id"]
    status, _ = await call(
        http,
        "POST",
        f"{server.url}/api/sessions/{sid}/alerts/{alert_id}/review",
        {"verdict": "confirmed", "note": "two people"},
        token,
    )
    assert status == 200
    if end:
        status, _ = await call(http, "POST", f"{server.url}/api/sessions/{sid}/end", None, token)
        assert status == 200
    return sid


def rows(db: Path, session_id: str) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {
            table: conn.execute(
                f"SELECT COUNT(*) FROM {table} WHERE "
                f"{'id' if table == 'sessions' else 'session_id'}=?",
                (session_id,),
            ).fetchone()[0]
            for table in SESSION_TABLES
        }


def checkpointed_bytes(db: Path) -> bytes:
    """The database file once the WAL is folded into it and emptied."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return db.read_bytes() + (
        db.with_name(db.name + "-wal").read_bytes()
        if db.with_name(db.name + "-wal").exists()
        else b""
    )


async def test_erasing_an_ended_session_leaves_only_its_audit_entry(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    db = server.settings.database_path
    sid = await run_session(server, http, rekognition)
    kept = await run_session(server, http, rekognition)  # another session: untouched
    status, report = await call(http, "GET", f"{server.url}/api/sessions/{sid}/report")
    assert status == 200 and report["job_data"] == {"jobTitle": MARKER}
    assert all(n > 0 for n in rows(db, sid).values()), rows(db, sid)

    status, erased = await call(http, "DELETE", f"{server.url}/api/sessions/{sid}")
    assert status == 200, erased
    assert erased["session_id"] == sid and erased["status"] == "erased"
    # Committed before the answer: a reader of the file right now finds nothing.
    assert rows(db, sid) == dict.fromkeys(SESSION_TABLES, 0)
    assert all(n > 0 for n in rows(db, kept).values())
    for path in (f"/api/sessions/{sid}", f"/api/sessions/{sid}/report"):
        status, data = await call(http, "GET", server.url + path)
        assert (status, data["error"]["code"]) == (404, "session_not_found"), path
    status, again = await call(http, "DELETE", f"{server.url}/api/sessions/{sid}")
    assert (status, again["error"]["code"]) == (404, "session_not_found")
    status, listed = await call(http, "GET", f"{server.url}/api/sessions")
    assert [s["session_id"] for s in listed["sessions"]] == [kept]

    # The audit log keeps who erased what (and the reviews before), nothing personal.
    status, audit = await call(http, "GET", f"{server.url}/api/audit?session_id={sid}")
    actions = [(e["action"], e["actor"]) for e in audit["entries"]]
    assert actions == [("erase", "alice"), ("review", "alice")]
    erase = audit["entries"][0]
    assert erase["id"] == erased["audit_id"]
    assert erase["details"]["was_live"] is False and erase["details"]["status"] == "ended"
    assert erase["details"]["frames_analysed"] == 2
    review = audit["entries"][1]
    assert review["details"]["verdict"] == "confirmed"  # who decided what stays ...
    assert review["details"]["note"] is None and review["details"]["note_erased"] is True
    assert "two people" not in json.dumps(audit)  # ... the note about the candidate goes
    assert MARKER not in json.dumps(audit)

    # Not just unreachable: the erased session's bytes are gone from the file (the other
    # session, with the same job data, still holds the marker there).
    await call(http, "DELETE", f"{server.url}/api/sessions/{kept}")
    assert MARKER.encode() not in checkpointed_bytes(db)


async def test_erasing_a_live_session_ends_it_first(
    server: RunningServer, http: aiohttp.ClientSession, rekognition: FakeRekognition
) -> None:
    sid = await run_session(server, http, rekognition, end=False)
    assert sid in [s.id for s in server.manager.live_sessions()]
    status, erased = await call(http, "DELETE", f"{server.url}/api/sessions/{sid}")
    assert status == 200 and erased["status"] == "erased"
    assert server.manager.live_count == 0
    assert rows(server.settings.database_path, sid) == dict.fromkeys(SESSION_TABLES, 0)
    status, data = await call(
        http, "POST", f"{server.url}/api/sessions/{sid}/frame", {"frame": face_data_url()}
    )
    assert (status, data["error"]["code"]) == (404, "session_not_found")
    status, audit = await call(http, "GET", f"{server.url}/api/audit?session_id={sid}")
    erase = audit["entries"][0]
    assert erase["action"] == "erase" and erase["details"]["was_live"] is True
    assert erase["details"]["status"] == "ended"  # it was ended, then erased


async def test_evidence_rows_are_erased_with_their_session(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path, api_tokens=f"alice:{ALICE}")
    srv = await start_server(settings)
    try:
        sid = await run_session(srv, http, rekognition)
        with sqlite3.connect(settings.database_path) as conn:
            for session, alert in ((sid, "a"), ("someone-else", "b")):
                conn.execute(
                    "INSERT INTO evidence (alert_id, session_id, created_at, jpeg) "
                    "VALUES (?, ?, 1.0, x'ffd8ffd9')",
                    (alert, session),
                )
        status, _ = await call(http, "DELETE", f"{srv.url}/api/sessions/{sid}")
        assert status == 200
        with sqlite3.connect(settings.database_path) as conn:
            left = conn.execute("SELECT session_id FROM evidence").fetchall()
        assert left == [("someone-else",)]
    finally:
        await srv.stop()


async def test_erasing_a_video_session_stops_and_forgets_its_job(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    rekognition.latency_s = 0.1
    running = await start_server(video_settings(tmp_path, video_jobs=1))
    try:
        path = make_video(tmp_path / "v.mp4", [(30, "face")], fps=5)
        status, job = await post_upload(http, running.url, path.read_bytes(), interval="0.5")
        assert status == 202
        analysing = await wait_state(http, running.url, job["id"], {"analysing"})
        sid = analysing["session_id"]
        async with http.delete(f"{running.url}/api/sessions/{sid}") as r:
            assert r.status == 200, await r.text()
        async with http.get(f"{running.url}/api/videos/{job['id']}") as r:
            assert r.status == 404  # the job went with its session
        assert list(running.settings.video_work_dir.iterdir()) == []
        with sqlite3.connect(running.settings.database_path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM video_jobs").fetchone()[0] == 0
        # The worker goes on with the next job; erasing a finished one's session works too.
        _s, second = await post_upload(http, running.url, path.read_bytes(), interval="10")
        done = await wait_state(http, running.url, second["id"], TERMINAL)
        assert done["state"] == "done"
        async with http.delete(f"{running.url}/api/sessions/{done['session_id']}") as r:
            assert r.status == 200
        async with http.get(f"{running.url}/api/videos/{second['id']}") as r:
            assert r.status == 404
        async with http.get(f"{running.url}/api/audit") as r:
            erasures = [e for e in (await r.json())["entries"] if e["action"] == "erase"]
        assert [e["actor"] for e in erasures] == ["anonymous", "anonymous"]  # development mode
    finally:
        await running.stop()


async def test_retention_sweep_runs_periodically_and_spares_live_sessions(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(
        make_settings(
            tmp_path,
            api_tokens=f"alice:{ALICE}",
            retention_days=2 / 86_400,  # two seconds
            retention_sweep_interval_s=0.2,
            retention_batch_sessions=2,
        )
    )
    try:
        live = await run_session(srv, http, rekognition, end=False)
        ended = [await run_session(srv, http, rekognition) for _ in range(3)]
        deadline = time.monotonic() + 60
        while True:
            status, listed = await call(http, "GET", f"{srv.url}/api/sessions")
            left = [s["session_id"] for s in listed["sessions"]]
            if left == [live]:
                break
            assert time.monotonic() < deadline, left
            await asyncio.sleep(0.2)
        status, metrics = await call(http, "GET", f"{srv.url}/api/sessions/{live}/metrics")
        assert status == 200 and metrics["status"] == "live"  # older than 2 s, still live
        for sid in ended:
            assert rows(srv.settings.database_path, sid) == dict.fromkeys(SESSION_TABLES, 0)
        status, audit = await call(http, "GET", f"{srv.url}/api/audit")
        swept = [e for e in audit["entries"] if e["action"] == "retention_sweep"]
        assert sorted(e["session_id"] for e in swept) == sorted(ended)
        assert {e["actor"] for e in swept} == {"system"}
        assert swept[0]["details"]["retention_days"] == pytest.approx(2 / 86_400)
        notes = [e["details"]["note"] for e in audit["entries"] if e["action"] == "review"]
        # The erased sessions' reviews lose their notes; the live session's (oldest) keeps it.
        assert notes == [None, None, None, "two people"]
        erased = 'proctor_sessions_erased_total{reason="retention"} 3.0'
        for _ in range(100):  # counted just after the batch's commit the listing saw
            async with http.get(
                f"{srv.url}/metrics", headers={"Authorization": f"Bearer {ALICE}"}
            ) as r:
                if erased in await r.text():
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no {erased} in /metrics")
    finally:
        await srv.stop()


async def test_a_backlog_is_swept_in_batches(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(
        make_settings(
            tmp_path,
            retention_days=30,
            retention_sweep_interval_s=86_400,
            retention_batch_sessions=2,
        )
    )
    try:
        ended = [await run_session(srv, http, rekognition, token=None) for _ in range(5)]
        live = await run_session(srv, http, rekognition, end=False, token=None)
        manager = srv.manager
        assert await manager.sweep_retention() == 0  # nothing 30 days old yet
        # Each batch is committed before the next is read: 2 + 2 + 1 sessions, 3 commits.
        commits: list[int] = []
        flush = manager.store.flush

        async def counted(session_id: str | None = None, *, since: int = 0) -> None:
            commits.append(manager.store.queue_depth)
            await flush(session_id, since=since)

        manager.store.flush = counted  # type: ignore[method-assign]
        assert await manager.sweep_retention(now=time.time() + 31 * 86_400) == 5
        manager.store.flush = flush  # type: ignore[method-assign]
        assert len(commits) == 3
        for sid in ended:
            assert rows(srv.settings.database_path, sid) == dict.fromkeys(SESSION_TABLES, 0)
        assert [s.id for s in manager.live_sessions()] == [live]
    finally:
        await srv.stop()


async def test_which_sessions_are_due(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    await store.open()
    try:
        now = time.time()
        old, recent = now - 10 * 86_400, now - 60
        for sid, start in (
            ("ended-old", old),
            ("ended-recent", old),
            ("interrupted-old", old),
            ("interrupted-active", old),
            ("live-old", old),
            ("new", recent),
        ):
            await store.create_session(sid, "rest", "local", {}, start)
        await store.end_session("ended-old", old + 10, "client", {})
        await store.end_session("ended-recent", recent, "client", {})
        await store.end_session("new", recent, "client", {})
        await store.mark_interrupted("interrupted-old", "server_restart")
        await store.mark_interrupted("interrupted-active", "server_restart")
        await store.update_counters("interrupted-active", {}, recent)  # active until lately
        await store.flush()
        due = await store.sessions_ended_before(now - 86_400, 100)
        assert sorted(due) == ["ended-old", "interrupted-old"]
        assert len(await store.sessions_ended_before(now - 86_400, 1)) == 1
    finally:
        await store.close()


def test_empty_retention_means_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETENTION_DAYS", "")
    assert Settings(_env_file=None).retention_days == 0  # type: ignore[call-arg]
    monkeypatch.setenv("RETENTION_DAYS", "30")
    assert Settings(_env_file=None).retention_days == 30  # type: ignore[call-arg]
