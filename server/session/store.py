"""SQLite store (WAL) for sessions, per-frame summaries, alert episodes and reports.

Writes go through one bounded queue to one writer thread that commits each batch as it
comes, so the event loop never waits on the disk and a crash loses at most the batch in
flight (well under a second). Reads use short-lived connections in worker threads; WAL
lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,              -- live | ended | interrupted
    transport TEXT NOT NULL,
    backend TEXT NOT NULL,
    job_data TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    end_reason TEXT,
    last_activity REAL NOT NULL,
    counters TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS frames (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    t REAL NOT NULL,
    summary TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    episode TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_session ON alerts (session_id, started_at);
CREATE TABLE IF NOT EXISTS reports (
    session_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS video_jobs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,               -- queued | downloading | analysing | done | failed | ...
    session_id TEXT,
    job TEXT NOT NULL                  -- the job's JSON record (server/video/jobs.py)
);
CREATE INDEX IF NOT EXISTS video_jobs_by_time ON video_jobs (created_at);
"""

_STOP = object()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class Store:
    def __init__(self, path: Path, queue_size: int = 10_000) -> None:
        self.path = Path(path)
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._conn: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._flushed: list[asyncio.Future[None]] = []

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Create the schema; sessions left live by a previous process become
        `interrupted`. Returns their ids."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._writer_thread, _connect, self.path)

        def init(conn: sqlite3.Connection) -> list[str]:
            conn.executescript(SCHEMA)
            ids = [r[0] for r in conn.execute("SELECT id FROM sessions WHERE status='live'")]
            conn.execute(
                "UPDATE sessions SET status='interrupted', end_reason='server_restart' "
                "WHERE status='live'"
            )
            conn.commit()
            return ids

        interrupted = await loop.run_in_executor(self._writer_thread, init, self._conn)
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        if interrupted:
            log.warning(
                "%d session(s) were live at the last stop: now interrupted", len(interrupted)
            )
        return interrupted

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.put(_STOP)
            await self._writer
            self._writer = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._writer_thread, conn.close)
        self._writer_thread.shutdown(wait=True)

    # --- writing ----------------------------------------------------------------------

    async def _put(self, sql: str, params: Sequence[Any]) -> None:
        # Bounded: if the disk cannot keep up, producers wait here instead of growing memory.
        await self._queue.put((sql, params))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(fut)
        await fut

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            item = await self._queue.get()
            batch: list[tuple[str, Sequence[Any]]] = []
            waiters: list[asyncio.Future[None]] = []
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, asyncio.Future):
                    waiters.append(item)
                else:
                    batch.append(item)
                if stop or self._queue.empty() or len(batch) >= 500:
                    break
                item = self._queue.get_nowait()
            if batch:
                try:
                    await loop.run_in_executor(self._writer_thread, self._commit, batch)
                except sqlite3.Error:
                    log.exception("store write failed; %d statement(s) lost", len(batch))
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _commit(self, batch: list[tuple[str, Sequence[Any]]]) -> None:
        assert self._conn is not None
        with self._conn:
            for sql, params in batch:
                self._conn.execute(sql, params)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = _connect(self.path)
            try:
                return fn(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    # --- sessions ---------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str,
        transport: str,
        backend: str,
        job_data: dict[str, Any],
        started_at: float,
    ) -> None:
        await self._put(
            "INSERT INTO sessions (id, status, transport, backend, job_data, started_at, "
            "last_activity) VALUES (?, 'live', ?, ?, ?, ?, ?)",
            (session_id, transport, backend, _dumps(job_data), started_at, started_at),
        )

    async def update_counters(
        self, session_id: str, counters: dict[str, Any], last_activity: float
    ) -> None:
        await self._put(
            "UPDATE sessions SET counters=?, last_activity=? WHERE id=?",
            (_dumps(counters), last_activity, session_id),
        )

    async def end_session(
        self, session_id: str, ended_at: float, reason: str, counters: dict[str, Any]
    ) -> None:
        await self._put(
            "UPDATE sessions SET status='ended', ended_at=?, end_reason=?, counters=? WHERE id=?",
            (ended_at, reason, _dumps(counters), session_id),
        )

    async def add_frame(
        self, session_id: str, index: int, t: float, summary: dict[str, Any]
    ) -> None:
        await self._put(
            "INSERT OR REPLACE INTO frames (session_id, idx, t, summary) VALUES (?, ?, ?, ?)",
            (session_id, index, t, _dumps(summary)),
        )

    async def save_alert(self, session_id: str, episode: dict[str, Any]) -> None:
        """Insert at onset, replace at closure (same episode id)."""
        await self._put(
            "INSERT OR REPLACE INTO alerts (id, session_id, started_at, episode) "
            "VALUES (?, ?, ?, ?)",
            (episode["episode_id"], session_id, episode["started_at"], _dumps(episode)),
        )

    async def save_report(self, session_id: str, report: dict[str, Any]) -> None:
        await self._put(
            "INSERT OR REPLACE INTO reports (session_id, created_at, report) VALUES (?, ?, ?)",
            (session_id, time.time(), _dumps(report)),
        )

    async def set_session_status(
        self, session_id: str, status: str, end_reason: str | None
    ) -> None:
        """Mark a session `interrupted` (a recorded video stopped by a shutdown) or back
        to `live` (the same video resumed)."""
        await self._put(
            "UPDATE sessions SET status=?, end_reason=?, ended_at=NULL WHERE id=?",
            (status, end_reason, session_id),
        )

    async def erase_session(self, session_id: str) -> None:
        for table, column in (
            ("frames", "session_id"),
            ("alerts", "session_id"),
            ("reports", "session_id"),
            ("sessions", "id"),
        ):
            await self._put(f"DELETE FROM {table} WHERE {column}=?", (session_id,))

    # --- recorded-video jobs ------------------------------------------------------------

    async def save_video_job(self, job: dict[str, Any]) -> None:
        await self._put(
            "INSERT OR REPLACE INTO video_jobs (id, created_at, state, session_id, job) "
            "VALUES (?, ?, ?, ?, ?)",
            (job["id"], job["created_at"], job["state"], job.get("session_id"), _dumps(job)),
        )

    async def delete_video_job(self, job_id: str) -> None:
        await self._put("DELETE FROM video_jobs WHERE id=?", (job_id,))

    async def get_video_job(self, job_id: str) -> dict[str, Any] | None:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT job FROM video_jobs WHERE id=?", (job_id,)).fetchone()
            return None if row is None else json.loads(row["job"])

        return await self._read(q)

    async def list_video_jobs(
        self, limit: int = 100, offset: int = 0, states: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT job FROM video_jobs"
            params: list[Any] = []
            if states:
                sql += f" WHERE state IN ({','.join('?' * len(states))})"
                params += list(states)
            sql += " ORDER BY created_at DESC LIMIT ? OFFSET ?"
            params += [limit, offset]
            return [json.loads(r["job"]) for r in conn.execute(sql, params)]

        return await self._read(q)

    # --- reading ----------------------------------------------------------------------

    @staticmethod
    def _session_row(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "session_id": row["id"],
            "status": row["status"],
            "transport": row["transport"],
            "backend": row["backend"],
            "job_data": json.loads(row["job_data"]),
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "end_reason": row["end_reason"],
            "last_activity": row["last_activity"],
            "counters": json.loads(row["counters"] or "{}"),
        }

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
            return None if row is None else self._session_row(row)

        return await self._read(q)

    async def list_sessions(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT * FROM sessions"
            params: list[Any] = []
            if status:
                sql += " WHERE status=?"
                params.append(status)
            sql += " ORDER BY started_at DESC LIMIT ? OFFSET ?"
            params += [limit, offset]
            return [self._session_row(r) for r in conn.execute(sql, params)]

        return await self._read(q)

    async def session_data(
        self, session_id: str
    ) -> tuple[list[tuple[int, float, dict[str, Any]]], list[dict[str, Any]]]:
        """Every frame summary (index, time, summary) and alert episode of a session."""

        def q(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[int, float, dict[str, Any]]], list[dict[str, Any]]]:
            frames = [
                (r["idx"], r["t"], json.loads(r["summary"]))
                for r in conn.execute(
                    "SELECT idx, t, summary FROM frames WHERE session_id=? ORDER BY idx",
                    (session_id,),
                )
            ]
            alerts = [
                json.loads(r["episode"])
                for r in conn.execute(
                    "SELECT episode FROM alerts WHERE session_id=? ORDER BY started_at",
                    (session_id,),
                )
            ]
            return frames, alerts

        return await self._read(q)

    async def get_report(self, session_id: str) -> dict[str, Any] | None:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT report FROM reports WHERE session_id=?", (session_id,)
            ).fetchone()
            return None if row is None else json.loads(row["report"])

        return await self._read(q)


@contextlib.asynccontextmanager
async def open_store(path: Path) -> Any:
    store = Store(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
