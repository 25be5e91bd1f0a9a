"""The store behaves the same on both engines: every test here runs on SQLite (a file) and
on PostgreSQL (a fresh database in a private cluster started by the tests), through the
same `Store` the server uses."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.session.database import Database
from server.session.migrations import LATEST, MIGRATIONS, SchemaTooNew
from server.session.postgres_database import PostgresDatabase
from server.session.sqlite_database import SQLiteDatabase
from server.session.store import FrameSpan, Store, StoreError

Opener = Callable[[], Database]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Makes a driver for this test's database (the same data each time it is called)."""
    if request.param == "sqlite":
        return lambda: SQLiteDatabase(tmp_path / "store.sqlite3")
    url = request.getfixturevalue("postgres_url")
    return lambda: PostgresDatabase(url, max_size=3)


@pytest.fixture
async def store(new_database: Opener) -> AsyncIterator[Store]:
    s = Store(new_database())
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reopen(store: Store, new_database: Opener) -> tuple[Store, list[str]]:
    """The store closed and opened again (a restart); and the sessions it interrupted."""
    await store.close()
    again = Store(new_database())
    return again, await again.open()


async def _versions(db: Database) -> list[int]:
    rows = await db.fetch_all("SELECT version FROM schema_migrations ORDER BY version")
    return [int(r["version"]) for r in rows]


# --- sessions ---------------------------------------------------------------------------


async def test_sessions_are_written_listed_and_interrupted_at_the_next_start(
    store: Store, new_database: Opener
) -> None:
    await store.create_session(
        "a", "rest", "local", {"jobTitle": "SRE"}, 1000.0, rules={"no_face_frames": 3}
    )
    await store.create_session(
        "b", "webrtc", "rekognition", {}, 1001.5, backend_switches=[{"to": "local", "at": 1002}]
    )
    await store.create_session("c", "socketio", "local", {}, 1002)  # an int time binds too
    await store.update_counters("a", {"frames_analysed": 4}, 1010.25)
    await store.set_backend("a", "local", [{"to": "local", "at": 1005.0}])
    await store.end_session("a", 1020.0, "client", {"frames_analysed": 5})
    await store.mark_interrupted("b", "shutdown_timeout")
    await store.mark_interrupted("a", "not live: ignored")
    await store.flush()

    a = await store.get_session("a")
    assert a is not None
    assert a["status"] == "ended" and a["end_reason"] == "client" and a["ended_at"] == 1020.0
    assert a["job_data"] == {"jobTitle": "SRE"} and a["rules"] == {"no_face_frames": 3}
    assert a["counters"] == {"frames_analysed": 5} and a["last_activity"] == 1010.25
    assert a["backend"] == "local" and a["backend_switches"] == [{"to": "local", "at": 1005.0}]
    b = await store.get_session("b")
    assert b is not None and b["status"] == "interrupted"
    assert b["end_reason"] == "shutdown_timeout"
    assert b["backend_switches"] == [{"to": "local", "at": 1002}]
    assert await store.get_session("nope") is None

    newest_first = [r["session_id"] for r in await store.list_sessions()]
    assert newest_first == ["c", "b", "a"]
    assert [r["session_id"] for r in await store.list_sessions(limit=1, offset=1)] == ["b"]
    assert [r["session_id"] for r in await store.list_sessions(status="live")] == ["c"]

    await store.set_session_status("b", "live", None)
    await store.flush()
    store, interrupted = await reopen(store, new_database)
    try:
        assert sorted(interrupted) == ["b", "c"]  # live at the "restart"
        rows = {r["session_id"]: r for r in await store.list_sessions()}
        assert rows["b"]["status"] == rows["c"]["status"] == "interrupted"
        assert rows["c"]["end_reason"] == "server_restart" and rows["a"]["status"] == "ended"
        await store.erase_session("c")
        await store.flush()
        assert await store.get_session("c") is None
    finally:
        await store.close()


async def test_frames_alerts_and_reports_are_upserts(store: Store) -> None:
    await store.create_session("s", "rest", "local", {}, 1000.0)
    await store.add_frame("s", 0, 1000.5, {"faces": 0})
    await store.add_frame("s", 1, 1001.0, {"faces": 1})
    await store.add_frame("s", 0, 1000.25, {"faces": 2})  # the same frame again
    episode = {"episode_id": "s-1", "type": "no_face", "started_at": 1000.5, "ended_at": None}
    await store.save_alert("s", episode)
    await store.save_alert("s", {**episode, "ended_at": 1003.0})
    await store.save_alert("s", {"episode_id": "s-0", "type": "x", "started_at": 1000})
    await store.save_report("s", {"version": 1, "n": 1})
    await store.save_report("s", {"version": 1, "n": 2})
    await store.flush()

    def rows(span: FrameSpan, it: Iterator[tuple[Any, Any, Any]]) -> tuple[FrameSpan, list[Any]]:
        return span, list(it)

    span, frames = await store.scan_frames("s", rows, (0.0, 1e12))
    assert span == FrameSpan(1000.25, 1001.0, 2)
    assert [(i, t) for i, t, _ in frames] == [(0, 1000.25), (1, 1001.0)]
    assert frames[0][2] == '{"faces":2}'
    alerts = await store.alert_rows("s")
    assert len(alerts) == 2 and '"ended_at":1003.0' in alerts[1]  # by start time
    assert await store.get_report("s") == {"version": 1, "n": 2}
    assert await store.get_report("other") is None


async def test_a_backlog_writes_each_session_counters_once_and_the_latest(
    store: Store,
) -> None:
    """Counters updates are latest-wins: in one batch only the last per session runs, so
    a backlog's frames go together; the stored result is the same as running them all."""
    for sid in ("a", "b"):
        await store.create_session(sid, "rest", "local", {}, 1000.0)
    await store.flush()
    executed: list[list[str]] = []
    real = store.db.execute_batch

    async def counting(statements: Any) -> None:
        executed.append([sql for sql, _ in statements])
        await real(statements)

    store.db.execute_batch = counting  # type: ignore[method-assign]
    for i in range(50):
        for sid in ("a", "b"):
            await store.add_frame(sid, i, 1000.0 + i, {"faces": 1})
            await store.update_counters(sid, {"frames_analysed": i + 1}, 1000.0 + i)
    await store.end_session("b", 1100.0, "ended", {"frames_analysed": 99})
    await store.update_counters("b", {"frames_analysed": 50}, 1050.0)  # after the end
    await store.flush()
    statements = [sql for batch in executed for sql in batch]
    updates = [sql for sql in statements if sql.startswith("UPDATE sessions SET counters")]
    assert len(executed) == 1 and len(updates) == 2  # one batch: one per session
    assert sum(sql.startswith("INSERT INTO frames") for sql in statements) == 100
    a, b = await store.get_session("a"), await store.get_session("b")
    assert a is not None and a["counters"] == {"frames_analysed": 50}
    assert a["last_activity"] == 1049.0
    # Written in order around the end: the end's counters, then the later update.
    assert b is not None and b["status"] == "ended" and b["counters"] == {"frames_analysed": 50}
    span, frames = await store.scan_frames("b", lambda sp, it: (sp, list(it)), (0.0, 1e12))
    assert span.rows == 50 and [i for i, _t, _s in frames] == list(range(50))


async def test_video_jobs_are_listed_by_state_newest_first(store: Store) -> None:
    for i, state in enumerate(["queued", "done", "failed", "queued"]):
        await store.save_video_job(
            {
                "id": f"j{i}",
                "created_at": 100.0 + i,
                "state": state,
                "session_id": None if state == "queued" else f"s{i}",
            }
        )
    await store.save_video_job(
        {"id": "j1", "created_at": 101.0, "state": "analysing", "session_id": "s1"}
    )  # the same job, later
    await store.flush()
    assert [j["id"] for j in await store.list_video_jobs()] == ["j3", "j2", "j1", "j0"]
    assert [j["id"] for j in await store.list_video_jobs(states=["queued"])] == ["j3", "j0"]
    assert [
        j["id"]
        for j in await store.list_video_jobs(states=["queued", "analysing"], limit=2, offset=1)
    ] == ["j1", "j0"]
    assert (await store.get_video_job("j1") or {})["state"] == "analysing"
    await store.delete_video_job("j1")
    await store.flush()
    assert await store.get_video_job("j1") is None
    assert await store.list_video_jobs(states=["analysing"]) == []


async def test_usage_adds_up_and_session_starts_are_pruned(store: Store) -> None:
    await store.add_usage("2030-01-01", "llm_tokens", 120)
    await store.add_usage("2030-01-01", "llm_tokens", 30)
    await store.add_usage("2030-01-01", "rekognition_calls", 2)
    await store.add_usage("2030-01-02", "llm_tokens", 7)
    for at, address in ((50.0, "10.0.0.2"), (10.0, "10.0.0.1"), (30.5, "10.0.0.1")):
        await store.record_start(address, at)
    await store.flush()
    assert await store.usage_on("2030-01-01") == {"llm_tokens": 150, "rekognition_calls": 2}
    assert await store.usage_on("2030-01-02") == {"llm_tokens": 7}
    assert await store.usage_on("2030-01-03") == {}
    assert await store.starts_since(20) == [("10.0.0.1", 30.5), ("10.0.0.2", 50.0)]
    await store.prune_starts(40.0)
    await store.flush()
    assert await store.starts_since(0) == [("10.0.0.2", 50.0)]


async def test_one_refused_statement_loses_only_itself(store: Store) -> None:
    await store.create_session("s1", "rest", "local", {}, 1.0)
    await store.flush()
    mark = store.mark()
    await store.create_session("s1", "rest", "local", {}, 2.0)  # the same id: refused
    await store.create_session("s2", "rest", "local", {}, 3.0)
    with pytest.raises(StoreError):
        await store.flush("s1", since=mark)
    await store.flush("s2", since=mark)  # the rest of its batch was kept
    assert (await store.get_session("s1") or {})["started_at"] == 1.0
    assert await store.get_session("s2") is not None
    health = store.health()
    assert health["failed_writes"] == 1 and health["retried_batches"] == 0  # not retried
    assert health["engine"] == store.db.dialect


async def test_reviews_audit_retention_and_erasure(store: Store) -> None:
    for sid, ended in (("old", 100.0), ("new", 900.0)):
        await store.create_session(sid, "rest", "local", {}, 50.0)
        await store.add_frame(sid, 0, 60.0, {})
        await store.save_alert(sid, {"episode_id": f"{sid}-a", "started_at": 60.0})
        await store.save_alert(sid, {"episode_id": f"{sid}-b", "started_at": 61.0})
        await store.save_report(sid, {"n": 1})
        await store.end_session(sid, ended, "client", {})
    await store.create_session("live", "rest", "local", {}, 50.0)  # never swept
    await store.save_review("old", "old-a", "confirmed", "seen twice", "alice", 200.0)
    await store.save_review("old", "old-a", "dismissed", None, "bob", 201.5)  # replaces it
    await store.save_review("old", "old-b", "confirmed", None, "bob", 202)
    for i, sid in enumerate(("old", "new", "old")):
        await store.add_audit_entry(
            {
                "id": f"e{i}",
                "at": 300.0 + i,
                "actor": "alice",
                "action": "review",
                "session_id": sid,
                "details": {"note": i},
            }
        )
    await store.set_audit_details("e0", "old", {"note": None})
    await store.flush()

    assert await store.get_alert("old", "old-a") == {"episode_id": "old-a", "started_at": 60.0}
    assert await store.get_alert("new", "old-a") is None
    assert await store.reviews("old") == {
        "old-a": {"verdict": "dismissed", "note": None, "at": 201.5, "by": "bob"},
        "old-b": {"verdict": "confirmed", "note": None, "at": 202.0, "by": "bob"},
    }
    assert await store.review_counts(["old", "new", "none"]) == {
        "old": {"alerts": 2, "confirmed": 1, "dismissed": 1},
        "new": {"alerts": 2, "confirmed": 0, "dismissed": 0},
        "none": {"alerts": 0, "confirmed": 0, "dismissed": 0},
    }
    entries = await store.audit_entries()
    assert [e["id"] for e in entries] == ["e2", "e1", "e0"]
    assert entries[2]["details"] == {"note": None}
    assert [e["id"] for e in await store.audit_entries("old", limit=1, offset=1)] == ["e0"]
    assert await store.sessions_ended_before(500.0, 10) == ["old"]
    assert await store.sessions_ended_before(1000.0, 1) == ["new"]  # by id, limited

    await store.erase_session("old")
    await store.flush()
    assert await store.get_session("old") is None and await store.alert_rows("old") == []
    assert await store.reviews("old") == {} and await store.get_report("old") is None
    assert await store.get_session("new") is not None  # only that one
    assert len(await store.audit_entries("old")) == 2  # the audit log keeps its entries


# --- streaming ----------------------------------------------------------------------------


async def test_scan_frames_streams_a_long_session(store: Store) -> None:
    """Every row, in order, without ever holding them all: the peak memory of a scan
    that reads 12 MB of summaries stays a fraction of it."""
    frames, pad = 15_000, "x" * 800
    await store.create_session("s", "rest", "local", {}, 0.0)
    for i in reversed(range(frames)):  # written backwards: the scan orders them
        await store.add_frame("s", i, 100.0 + i, {"i": i, "pad": pad})
    await store.add_frame("s", frames, float("inf"), {"i": frames, "pad": ""})  # not in span
    await store.flush()

    def count(span: FrameSpan, rows: Iterator[tuple[Any, Any, Any]]) -> tuple[FrameSpan, int]:
        n = 0
        for n, (idx, _t, summary) in enumerate(rows, 1):
            assert idx == n - 1 and f'"i":{idx},' in summary
        return span, n

    tracemalloc.start()
    try:
        span, n = await store.scan_frames("s", count, (0.0, 1e12))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert span == FrameSpan(100.0, 100.0 + frames - 1, frames) and n == frames + 1
    assert peak < frames * len(pad) / 4, f"peak {peak / 1e6:.1f} MB: rows were held"

    # A consumer that stops early, or fails, leaves the store as it was.
    first = await store.scan_frames("s", lambda _s, rows: next(rows)[0], (0.0, 1e12))
    assert first == 0

    def explode(_span: FrameSpan, rows: Iterator[Any]) -> None:
        next(rows)
        raise ZeroDivisionError("the consumer's own bug")

    with pytest.raises(ZeroDivisionError):  # not a StoreError: not the database's fault
        await store.scan_frames("s", explode, (0.0, 1e12))
    for _ in range(5):  # more scans than the pool has connections: none was kept
        assert (
            await store.scan_frames("s", lambda _s, rows: sum(1 for _ in rows), (0.0, 1e12))
            == frames + 1
        )


# --- migrations ---------------------------------------------------------------------------


async def test_a_fresh_database_gets_every_version(new_database: Opener) -> None:
    db = new_database()
    assert await db.open() == [m.version for m in MIGRATIONS]
    try:
        assert await _versions(db) == sorted(m.version for m in MIGRATIONS)
    finally:
        await db.close()
    again = new_database()
    assert await again.open() == []  # nothing left to apply
    await again.close()


async def test_a_database_newer_than_the_server_is_refused(new_database: Opener) -> None:
    db = new_database()
    await db.open()
    await db.execute_batch(
        [
            (
                "INSERT INTO schema_migrations (version, name, applied_at, adopted) "
                "VALUES (?, 'from the future', 0, 0)",
                (LATEST + 1,),
            )
        ]
    )
    await db.close()
    store = Store(new_database())
    with pytest.raises(SchemaTooNew):
        await store.open()
    await store.db.close()


async def test_concurrent_starts_migrate_once(new_database: Opener) -> None:
    """Two nodes starting at the same moment: each version is applied by one of them."""
    dbs = [new_database(), new_database()]
    try:
        applied = await asyncio.gather(*(db.open() for db in dbs))
        assert sorted(applied[0] + applied[1]) == [m.version for m in MIGRATIONS]
        assert await _versions(dbs[0]) == sorted(m.version for m in MIGRATIONS)
    finally:
        for db in dbs:
            await db.close()
