"""Unexpected errors in the worker, a listener, the store and the report builder are
logged, counted in /metrics, announced as `error` events and survived; repeated ones end
the session with its report; damaged stored data makes a partial report, never a 500;
shutdown is bounded whatever hangs. Faults are injected with small test-side subclasses
and wrappers around the real parts."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from server.analysis.analyser import Analyser
from server.analysis.backends import make_analyser
from server.analysis.budget import CallBudget
from server.analysis.cadence import Checks
from server.app import make_store
from server.media.frames import Frame
from server.observability import Instruments
from server.session.database import Statement
from server.session.live_session import LiveSession
from server.session.report import ReportBuilder
from server.session.sqlite_database import SQLiteDatabase
from server.session.store import Store, StoreError, StoreTimeout
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import face_data_url

# --- faults -------------------------------------------------------------------------


class FaultyAnalyser:
    """The real analyser, except that chosen calls return garbage instead of an
    Observation: the worker then fails outside the analyser's own error handling."""

    def __init__(self, inner: Analyser) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.fail_calls: set[int] = set()
        self.fail_all = False

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def analyse(self, frame: Frame, checks: Checks) -> Any:
        self.calls += 1
        if self.fail_all or self.calls in self.fail_calls:
            return None
        return await self.inner.analyse(frame, checks)


class FlakyDatabase(SQLiteDatabase):
    """Commits fail with `disk I/O error` while `fail_next` > 0."""

    fail_next = 0

    def _commit(self, batch: list[Statement]) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise sqlite3.OperationalError("disk I/O error")
        super()._commit(batch)


class StuckDatabase(SQLiteDatabase):
    """Commits block until released (a hung disk)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _commit(self, batch: list[Statement]) -> None:
        self.entered.set()
        self.release.wait(30)
        super()._commit(batch)


class HangingEndStore(Store):
    """Storing the end of the chosen sessions never finishes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hang_on: set[str] = set()

    async def end_session(
        self, session_id: str, ended_at: float, reason: str, counters: dict[str, Any]
    ) -> None:
        if session_id in self.hang_on:
            await asyncio.Event().wait()
        await super().end_session(session_id, ended_at, reason, counters)


class UnreadableFramesStore(Store):
    """Reading a session's frames fails (the database file went away under us)."""

    async def scan_frames(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("store read failed: disk I/O error")


class FailingReportBuilder(ReportBuilder):
    def finish(self, alert_rows: Any) -> dict[str, Any]:
        raise RuntimeError("report builder exploded")


class CountingReportBuilder(ReportBuilder):
    built = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).built += 1
        super().__init__(*args, **kwargs)


class Recorder:
    """A session listener keeping every event; `raise_on` events raise after recording."""

    def __init__(self, raise_on: tuple[str, ...] = ()) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.raise_on = raise_on

    async def __call__(self, event: str, payload: dict[str, Any]) -> None:
        self.events.append((event, payload))
        if event in self.raise_on:
            raise RuntimeError(f"listener broke on {event}")

    def named(self, event: str) -> list[dict[str, Any]]:
        return [p for e, p in self.events if e == event]


# --- helpers ------------------------------------------------------------------------


async def start(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(
        f"{url}/api/sessions/start", json={"job_data": {"jobTitle": "Analyst"}}
    ) as r:
        assert r.status == 200
        return str((await r.json())["session_id"])


async def post_frame(
    http: aiohttp.ClientSession, url: str, sid: str, **extra: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{url}/api/sessions/{sid}/frame", json={"frame": face_data_url(), **extra}
    ) as r:
        return r.status, await r.json()


async def end(http: aiohttp.ClientSession, url: str, sid: str) -> dict[str, Any]:
    async with http.post(f"{url}/api/sessions/{sid}/end") as r:
        assert r.status == 200
        return strict_json(await r.text())


def strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON answer")

    return json.loads(text, parse_constant=refuse)


async def internal_errors(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    pattern = r'proctor_internal_errors_total\{where="(\w+)"\} ([0-9.]+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


async def eventually(check: Any, tries: int = 200) -> None:
    """Polls until `check()` is truthy (bounded: fails rather than hangs)."""
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never became true")


async def faulty_server(tmp_path: Path, **overrides: Any) -> tuple[RunningServer, FaultyAnalyser]:
    settings = make_settings(tmp_path, **overrides)
    analyser = FaultyAnalyser(make_analyser(settings, Instruments()))
    return await start_server(settings, analyser=analyser), analyser


# --- worker ---------------------------------------------------------------------------


async def test_worker_error_is_counted_announced_and_the_session_goes_on(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv, analyser = await faulty_server(tmp_path)
    sio = socketio.AsyncClient(reconnection=False)
    errors: list[dict[str, Any]] = []
    sio.on("error", lambda data: errors.append(data))
    try:
        await sio.connect(srv.url, transports=["websocket"])
        started = await sio.call("start_session", {"job_data": {}})
        sid = started["session_id"]
        analyser.fail_calls = {2}
        ok = await sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
        assert ok["status"] == "analysed"
        failed = await sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
        assert failed["status"] == "error" and failed["error"]["code"] == "internal_error"
        again = await sio.call("analyze_frame", {"session_id": sid, "frame": face_data_url()})
        assert again["status"] == "analysed" and again["frame_index"] == 1

        async def announced() -> bool:
            return any(e.get("where") == "worker" for e in errors)

        await eventually(announced)
        [room_error] = [e for e in errors if e.get("where") == "worker"]
        assert room_error["session_id"] == sid and room_error["code"] == "internal_error"
        assert (await internal_errors(http, srv.url)).get("worker") == 1.0
        report = await end(http, srv.url, sid)
        assert report["summary"]["frames_analysed"] == 2
        assert report["summary"]["end_reason"] == "client"
    finally:
        await sio.disconnect()
        await srv.stop()


async def test_repeated_internal_errors_end_the_session_with_its_report(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv, analyser = await faulty_server(tmp_path, internal_errors_max=3)
    try:
        sid = await start(http, srv.url)
        assert (await post_frame(http, srv.url, sid))[0] == 200
        analyser.fail_all = True
        for _ in range(3):
            status, body = await post_frame(http, srv.url, sid)
            if status == 409:  # already ending
                break
            assert status == 500 and body["error"]["code"] == "internal_error"

        async def reported() -> bool:
            async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
                return r.status == 200

        await eventually(reported)
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            report = strict_json(await r.text())
        assert report["summary"]["end_reason"] == "internal_error"
        assert report["summary"]["frames_analysed"] == 1
        assert (await internal_errors(http, srv.url))["worker"] == 3.0
        status, body = await post_frame(http, srv.url, sid)
        assert status == 409 and body["error"]["code"] == "session_ended"
    finally:
        await srv.stop()


class BrokenBudget(CallBudget):
    async def acquire(self, calls: int = 1, priority: Any = "live") -> None:
        raise RuntimeError("budget exploded")


async def test_a_dead_worker_ends_its_session_with_a_report(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path))
    try:
        sid = await start(http, srv.url)
        assert (await post_frame(http, srv.url, sid))[0] == 200
        # A failure outside the worker's per-frame guard kills the worker itself.
        srv.manager.pipeline.budget = BrokenBudget(25.0)  # the worker's budget
        status, body = await post_frame(http, srv.url, sid)
        # The waiting frame is answered, not left hanging.
        assert status == 200 and body["status"] == "dropped"

        async def reported() -> bool:
            async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
                return r.status == 200

        await eventually(reported)
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            report = strict_json(await r.text())
        assert report["summary"]["end_reason"] == "internal_error"
        assert report["summary"]["frames_analysed"] == 1
        assert (await internal_errors(http, srv.url))["worker"] == 1.0
    finally:
        await srv.stop()


# --- listeners ------------------------------------------------------------------------


async def test_failing_listener_is_counted_and_others_still_receive(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path))
    try:
        sid = await start(http, srv.url)
        session: LiveSession = await srv.manager.get_live(sid)
        # Raises on every event, its own `error` announcements included: counted, but not
        # announced again (that would loop).
        broken = Recorder(raise_on=("frame_analysis", "error"))
        healthy = Recorder()
        session.subscribe(broken)
        session.subscribe(healthy)
        assert (await post_frame(http, srv.url, sid))[0] == 200

        async def announced() -> bool:
            return bool(healthy.named("error"))

        await eventually(announced)
        await asyncio.sleep(0.2)  # room for a (wrong) second announcement
        assert len(healthy.named("frame_analysis")) == 1
        [error] = healthy.named("error")
        assert error == {
            "session_id": sid,
            "code": "internal_error",
            "message": error["message"],
            "where": "listener",
        }
        assert (await internal_errors(http, srv.url))["listener"] == 2.0
        async with http.get(f"{srv.url}/api/sessions/{sid}/metrics") as r:
            assert r.status == 200 and (await r.json())["status"] == "live"
        assert (await post_frame(http, srv.url, sid))[0] == 200
        report = await end(http, srv.url, sid)
        assert report["summary"]["frames_analysed"] == 2
    finally:
        await srv.stop()


# --- store ----------------------------------------------------------------------------


async def store_server(
    tmp_path: Path,
    cls: type[Store] = Store,
    database_cls: type[SQLiteDatabase] = SQLiteDatabase,
    **overrides: Any,
) -> tuple[RunningServer, Any]:
    """A server on a store of class `cls` over a database of class `database_cls`;
    returns the server and the database (or the store, when `cls` is not `Store`)."""
    overrides.setdefault("store_retry_window_s", 0.0)  # lose after the attempts, no window
    settings = make_settings(tmp_path, store_retry_backoff_s=0.01, **overrides)
    db = database_cls(settings.database_path)
    store = make_store(settings, cls, database=db)
    return await start_server(settings, store=store), (db if cls is Store else store)


async def health(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/health") as r:
        assert r.status == 200  # degraded is still 200: the server serves
        return dict(await r.json())


async def test_a_failed_write_is_retried_and_nothing_is_lost(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv, db = await store_server(tmp_path, Store, FlakyDatabase, store_write_attempts=3)
    store = srv.manager.store
    try:
        sid = await start(http, srv.url)
        db.fail_next = 2  # the third attempt succeeds
        assert (await post_frame(http, srv.url, sid))[0] == 200
        await store.flush()  # success: nothing was lost
        h = await health(http, srv.url)
        assert h["status"] == "ok"
        assert h["store"]["retried_batches"] == 2 and h["store"]["failed_writes"] == 0
        report = await end(http, srv.url, sid)
        assert report["partial"] is False and report["summary"]["frames_analysed"] == 1
        assert "store" not in await internal_errors(http, srv.url)
    finally:
        await srv.stop()


async def test_a_lost_write_degrades_health_fails_flush_and_marks_the_report(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv, db = await store_server(tmp_path, Store, FlakyDatabase, store_write_attempts=2)
    store = srv.manager.store
    try:
        sid = await start(http, srv.url)
        recorder = Recorder()
        (await srv.manager.get_live(sid)).subscribe(recorder)
        assert (await post_frame(http, srv.url, sid))[0] == 200
        await store.flush()
        assert (await health(http, srv.url))["status"] == "ok"

        db.fail_next = 2  # both attempts of the next batch fail: it is lost
        mark = store.mark()
        assert (await post_frame(http, srv.url, sid))[0] == 200
        with pytest.raises(StoreError):
            await store.flush()
        with pytest.raises(StoreError):
            await store.flush(sid)
        h = await health(http, srv.url)
        assert h["status"] == "degraded" and h["store"]["reasons"] == ["writes_failing"]
        assert h["store"]["failed_writes"] >= 1 and "disk I/O error" in h["store"]["last_error"]
        assert (await internal_errors(http, srv.url))["store"] >= 1.0
        assert any(e["where"] == "store" for e in recorder.named("error"))

        # The disk recovers: the next write succeeds and health is ok again; flushes
        # that ask only about later writes succeed, earlier ones keep failing.
        assert (await post_frame(http, srv.url, sid))[0] == 200
        after = store.mark()
        await store.flush(since=after)
        assert (await health(http, srv.url))["status"] == "ok"
        with pytest.raises(StoreError):
            await store.flush(since=mark)

        report = await end(http, srv.url, sid)
        assert report["partial"] is True and "store_write_failed" in report["partial_reasons"]
        assert report["summary"]["end_reason"] == "client"
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            assert r.status == 200 and (await r.json())["partial"] is True
    finally:
        await srv.stop()


async def test_flush_never_waits_forever_and_a_full_queue_is_degraded(tmp_path: Path) -> None:
    db = StuckDatabase(tmp_path / "s.sqlite3")
    store = Store(db, queue_size=2, flush_timeout_s=0.3)
    await store.open()
    try:
        await store.create_session("s1", "rest", "local", {}, 1.0)
        assert await asyncio.to_thread(db.entered.wait, 10)  # the writer is stuck on it
        await store.create_session("s2", "rest", "local", {}, 1.0)
        await store.create_session("s3", "rest", "local", {}, 1.0)
        h = store.health()
        assert h["status"] == "degraded" and h["reasons"] == ["queue_full"]
        assert h["queue_depth"] == h["queue_capacity"] == 2
        with pytest.raises(StoreTimeout):  # waiting for room in the queue is bounded too
            await store.flush()
        # Closing is bounded too (it gives up on the queued writes), however long the
        # disk hangs: wait_for only turns a hang into a failure.
        await asyncio.wait_for(store.close(timeout_s=0.3), 20)
    finally:
        db.release.set()


async def test_one_refused_statement_does_not_lose_its_batch(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    await store.open()
    try:
        for i in range(3):
            await store.create_session(f"s{i}", "rest", "local", {}, 1.0)
        # NaN binds as NULL: the NOT NULL column refuses it (an IntegrityError).
        await store.add_frame("s1", 0, float("nan"), {})
        await store.add_frame("s2", 0, 2.0, {})
        with pytest.raises(StoreError):
            await store.flush("s1")
        await store.flush("s2")  # the others of its batch were kept
        assert store.health()["failed_writes"] == 1
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone() == (3,)
    assert conn.execute("SELECT session_id FROM frames").fetchall() == [("s2",)]
    conn.close()


# --- reports --------------------------------------------------------------------------


async def test_report_builder_failure_still_ends_the_session_with_a_report(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv = await start_server(make_settings(tmp_path))
    try:
        srv.manager.report_builder = FailingReportBuilder
        sid = await start(http, srv.url)
        assert (await post_frame(http, srv.url, sid))[0] == 200
        report = await end(http, srv.url, sid)
        assert report["session_id"] == sid
        assert report["partial"] is True and "report_failed" in report["partial_reasons"]
        assert report["summary"]["end_reason"] == "client"
        assert (await internal_errors(http, srv.url))["report"] == 1.0
        async with http.get(f"{srv.url}/api/sessions?status=ended") as r:
            assert [s["session_id"] for s in (await r.json())["sessions"]] == [sid]
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            assert r.status == 200 and (await r.json())["partial_reasons"] == ["report_failed"]
        assert srv.manager.live_count == 0
    finally:
        await srv.stop()


async def test_unreadable_frames_give_a_report_from_memory(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv, _store = await store_server(tmp_path, UnreadableFramesStore)
    try:
        sid = await start(http, srv.url)
        for _ in range(2):
            assert (await post_frame(http, srv.url, sid))[0] == 200
        report = await end(http, srv.url, sid)
        assert report["partial"] is True
        assert {"store_unreadable", "frames_from_memory"} <= set(report["partial_reasons"])
        assert report["summary"]["frames_analysed"] == 2
        assert report["behavioural_scores"]["eye_contact"]["samples"] == 2
        assert (await internal_errors(http, srv.url))["store"] == 1.0
    finally:
        await srv.stop()


def reopen_as_interrupted(db: Path, sid: str) -> None:
    """What a crash leaves behind: the session still `live` in the store, no report."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE sessions SET status='live', ended_at=NULL, end_reason=NULL WHERE id=?",
            (sid,),
        )
        conn.execute("DELETE FROM reports WHERE session_id=?", (sid,))
    conn.close()


async def test_damaged_rows_make_a_partial_report_not_a_500(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path)
    srv = await start_server(settings)
    sid = await start(http, srv.url)
    rekognition.set_scene(faces=[fake_face()], labels=[fake_label("Book", 90)])
    for _ in range(4):
        assert (await post_frame(http, srv.url, sid))[0] == 200
    # A client timestamp far past year 9999 is refused at the door (within a day of the
    # server's clock); the row is damaged directly in the database below instead.
    assert (await post_frame(http, srv.url, sid, timestamp=1e300))[0] == 400
    assert (await post_frame(http, srv.url, sid))[0] == 200
    for bad in ("NaN", "Infinity"):  # refused as input, never stored
        async with http.post(
            f"{srv.url}/api/sessions/{sid}/frame",
            data=f'{{"frame": "{face_data_url()}", "timestamp": {bad}}}',
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 400  # invalid_field, or invalid_json with a strict parser
    empty = await start(http, srv.url)
    empty_report = await end(http, srv.url, empty)
    assert empty_report["partial"] is False and empty_report["summary"]["frames_analysed"] == 0
    await srv.stop()

    db = settings.database_path
    reopen_as_interrupted(db, sid)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE frames SET t='NaN' WHERE session_id=? AND idx=0", (sid,))
        conn.execute("UPDATE frames SET t=1e300 WHERE session_id=? AND idx=4", (sid,))
        conn.execute("UPDATE frames SET summary='{oops' WHERE session_id=? AND idx=1", (sid,))
        conn.execute(
            "UPDATE frames SET summary=? WHERE session_id=? AND idx=2",
            ('{"metrics": {"engagement": NaN, "eye_contact": "high"}, "calls": {"x": "y"}}', sid),
        )
        conn.execute(
            "INSERT INTO alerts (id, session_id, started_at, episode) VALUES ('bad', ?, 1, '[1]')",
            (sid,),
        )
    conn.close()

    srv = await start_server(settings)
    try:
        assert srv.manager.interrupted_at_start == [sid]
        async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
            assert r.status == 200
            report = strict_json(await r.text())
        assert report["partial"] is True
        assert {"bad_frame_timestamp", "corrupt_frame_row", "corrupt_alert_row"} <= set(
            report["partial_reasons"]
        )
        assert report["summary"]["frames_analysed"] == 4  # all but the unreadable row
        assert report["summary"]["frames_unreadable"] == 1
        assert report["summary"]["interrupted"] is True
        assert [a["type"] for a in report["alerts"]] == ["suspicious_object"]
        assert report["behavioural_scores"]["engagement"]["average"] is not None
        assert all(p["time"] for p in report["emotion_timeline"])
    finally:
        await srv.stop()


async def test_concurrent_requests_for_an_interrupted_report_build_it_once(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path)
    srv = await start_server(settings)
    sid = await start(http, srv.url)
    for _ in range(3):
        assert (await post_frame(http, srv.url, sid))[0] == 200
    await srv.stop()
    reopen_as_interrupted(settings.database_path, sid)

    srv = await start_server(settings)
    try:
        CountingReportBuilder.built = 0
        srv.manager.report_builder = CountingReportBuilder

        async def fetch() -> dict[str, Any]:
            async with http.get(f"{srv.url}/api/sessions/{sid}/report") as r:
                assert r.status == 200
                return dict(await r.json())

        reports = await asyncio.gather(*(fetch() for _ in range(6)))
        assert CountingReportBuilder.built == 1
        assert len({r["generated_at"] for r in reports}) == 1
        assert reports[0]["summary"]["frames_analysed"] == 3
        assert (await fetch())["generated_at"] == reports[0]["generated_at"]  # stored
        assert CountingReportBuilder.built == 1
    finally:
        await srv.stop()


# --- shutdown -------------------------------------------------------------------------


async def test_shutdown_with_a_hanging_end_is_bounded(
    tmp_path: Path, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    srv, store = await store_server(tmp_path, HangingEndStore, shutdown_timeout_s=2.0)
    assert isinstance(store, HangingEndStore)
    stuck = await start(http, srv.url)
    fine = await start(http, srv.url)
    for sid in (stuck, fine):
        assert (await post_frame(http, srv.url, sid))[0] == 200
    store.hang_on = {stuck}
    # Far above the shutdown timeout: this only turns a hang into a failure.
    await asyncio.wait_for(srv.stop(), 60)
    conn = sqlite3.connect(srv.settings.database_path)
    rows = dict(
        (
            (sid, (status, reason))
            for sid, status, reason in conn.execute("SELECT id, status, end_reason FROM sessions")
        )
    )
    reported = {r[0] for r in conn.execute("SELECT session_id FROM reports")}
    conn.close()
    assert rows[stuck] == ("interrupted", "shutdown_timeout")
    assert rows[fine] == ("ended", "server_shutdown") and reported == {fine}
