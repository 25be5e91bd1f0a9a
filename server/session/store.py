"""SQLite store (WAL) for sessions, per-frame summaries, alert episodes and reports.

Writes go through one bounded queue to one writer thread that commits each batch as it
comes, so the event loop never waits on the disk and a crash loses at most the batch in
flight (well under a second). A batch that fails is retried with backoff, then counted as
lost; `flush()` raises for lost writes and never waits forever; `health()` says whether
writes are failing. Reads use short-lived connections in worker threads; WAL lets them
run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from server.session.migrations import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")


_STOP = object()


class StoreError(Exception):
    """A write the caller depends on was lost, a read failed, or the store did not answer
    in time."""


class StoreTimeout(StoreError):
    """The store did not answer within its flush timeout."""


@dataclass(frozen=True)
class _Write:
    seq: int
    session_id: str
    sql: str
    params: Sequence[Any]


@dataclass(frozen=True)
class _Flush:
    future: asyncio.Future[None]
    session_id: str | None
    since: int


@dataclass(frozen=True)
class FrameSpan:
    """Earliest and latest usable frame time of a session, and its frame row count."""

    t_min: float | None
    t_max: float | None
    rows: int


#: Receives (exception, ids of the sessions whose writes were lost, statements lost).
WriteErrorHook = Callable[[BaseException, set[str], int], None]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def loads_object(text: Any) -> dict[str, Any] | None:
    """A stored JSON object, or None when missing or damaged."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _loads_list(text: Any) -> list[Any]:
    try:
        value = json.loads(text) if text else []
    except (TypeError, ValueError):
        return []
    return value if isinstance(value, list) else []


class Store:
    def __init__(
        self,
        path: Path,
        queue_size: int = 10_000,
        *,
        write_attempts: int = 3,
        retry_backoff_s: float = 0.1,
        flush_timeout_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.write_attempts = max(1, write_attempts)
        self.retry_backoff_s = retry_backoff_s
        self.flush_timeout_s = flush_timeout_s
        self.on_write_error: WriteErrorHook | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._conn: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._seq = 0  # writes queued so far; each write's number
        # Health and lost-write bookkeeping (written by the writer task only).
        self._failing = False  # the latest write attempt failed
        self._last_lost_seq = 0
        self._lost_by_session: dict[str, int] = {}  # session id → its latest lost write
        self.failed_writes = 0  # statements lost after every attempt
        self.failed_batches = 0
        self.retried_batches = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Bring the schema to the newest version (an existing file migrates in place);
        sessions left live by a previous process become `interrupted`. Returns their ids.
        A database migrated by a newer server is refused (`SchemaTooNew`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._writer_thread, _connect, self.path)

        def init(conn: sqlite3.Connection) -> list[str]:
            applied = migrate(conn)  # versioned (server/session/migrations.py)
            if applied:
                log.info("store %s: applied schema migration(s) %s", self.path, applied)
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

    async def close(self, timeout_s: float | None = None) -> None:
        """Commit what is queued and close; gives up after `timeout_s` (default: the flush
        timeout) so a hung disk cannot hold the process."""
        timeout_s = self.flush_timeout_s if timeout_s is None else timeout_s
        clean = True
        try:
            async with asyncio.timeout(timeout_s):
                if self._writer is not None:
                    await self._queue.put(_STOP)
                    await self._writer
                if self._conn is not None:
                    conn, self._conn = self._conn, None
                    await asyncio.get_running_loop().run_in_executor(
                        self._writer_thread, conn.close
                    )
        except TimeoutError:
            clean = False
            log.error(
                "store did not close within %.1f s; %d write(s) still queued are lost",
                timeout_s,
                self._queue.qsize(),
            )
            if self._writer is not None:
                self._writer.cancel()
        self._writer = None
        # A writer thread stuck in SQLite must not block the event loop on its way out.
        self._writer_thread.shutdown(wait=clean)

    # --- health -----------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def health(self) -> dict[str, Any]:
        """`degraded` while writes fail (until one succeeds again) or while the queue is
        full (producers are waiting)."""
        reasons = []
        if self._failing:
            reasons.append("writes_failing")
        if self._queue.maxsize and self._queue.qsize() >= self._queue.maxsize:
            reasons.append("queue_full")
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "failed_writes": self.failed_writes,
            "failed_batches": self.failed_batches,
            "retried_batches": self.retried_batches,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "queue_depth": self._queue.qsize(),
            "queue_capacity": self._queue.maxsize,
        }

    # --- writing ----------------------------------------------------------------------

    async def _put(self, session_id: str, sql: str, params: Sequence[Any]) -> None:
        # Bounded: if the disk cannot keep up, producers wait here instead of growing memory.
        self._seq += 1
        await self._queue.put(_Write(self._seq, session_id, sql, params))

    def mark(self) -> int:
        """The number of the latest write queued: `flush(since=mark)` asks only about the
        writes queued after this call."""
        return self._seq

    async def flush(self, session_id: str | None = None, *, since: int = 0) -> None:
        """Wait until every write queued so far is committed or lost. Raises StoreError if
        a write queued after `since` (of `session_id`, when given) was lost, or if that
        takes longer than the flush timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.flush_timeout_s):
                await self._queue.put(_Flush(fut, session_id, since))
                await fut
        except TimeoutError:
            fut.cancel()
            raise StoreTimeout(
                f"the store did not commit within {self.flush_timeout_s} s "
                f"({self._queue.qsize()} write(s) queued)"
            ) from None

    async def _write_loop(self) -> None:
        while True:
            item = await self._queue.get()
            batch: list[_Write] = []
            flush: _Flush | None = None
            stop = False
            # A batch ends at a flush, so the flush is answered right after exactly the
            # writes queued before it.
            while True:
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, _Flush):
                    flush = item
                    break
                batch.append(item)
                if len(batch) >= 500 or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                try:
                    await self._write(batch)
                except Exception as exc:  # the writer must outlive any bug of its own
                    log.exception("store writer error")
                    self._lose(batch, exc)
            if flush is not None:
                self._answer(flush)
            if stop:
                return

    async def _write(self, batch: list[_Write]) -> None:
        loop = asyncio.get_running_loop()
        statements = [(w.sql, w.params) for w in batch]
        for attempt in range(1, self.write_attempts + 1):
            try:
                await loop.run_in_executor(self._writer_thread, self._commit, statements)
            except sqlite3.OperationalError as exc:  # busy, locked, I/O, full: may pass
                self._note_error(exc)
                if attempt < self.write_attempts:
                    self.retried_batches += 1
                    log.warning(
                        "store write failed (%s); attempt %d of %d",
                        exc,
                        attempt,
                        self.write_attempts,
                    )
                    await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
                    continue
                self._lose(batch, exc)
                return
            except Exception as exc:  # a statement the database refuses: retrying cannot help
                self._note_error(exc)
                if len(batch) == 1:
                    self._lose(batch, exc)
                    return
                # Keep the batch's other statements: one bad row loses only itself.
                for w in batch:
                    await self._write([w])
                return
            else:
                self._failing = False
                return

    def _note_error(self, exc: BaseException) -> None:
        self._failing = True
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.last_error_at = time.time()

    def _lose(self, batch: list[_Write], exc: BaseException) -> None:
        self.failed_writes += len(batch)
        self.failed_batches += 1
        sessions = set()
        for w in batch:
            self._last_lost_seq = max(self._last_lost_seq, w.seq)
            self._lost_by_session[w.session_id] = max(
                self._lost_by_session.get(w.session_id, 0), w.seq
            )
            sessions.add(w.session_id)
        log.error(
            "store write failed (%s: %s); %d statement(s) lost",
            type(exc).__name__,
            exc,
            len(batch),
            exc_info=exc if self.on_write_error is None else None,  # else the hook logs it
        )
        if self.on_write_error is not None:
            try:
                self.on_write_error(exc, sessions, len(batch))
            except Exception:
                log.exception("store write-error hook failed")

    def _answer(self, flush: _Flush) -> None:
        if flush.future.done():  # the caller gave up waiting
            return
        lost = (
            self._last_lost_seq
            if flush.session_id is None
            else self._lost_by_session.get(flush.session_id, 0)
        )
        if lost > flush.since:
            flush.future.set_exception(
                StoreError(
                    "a write queued before this flush was lost"
                    + (f" (session {flush.session_id})" if flush.session_id else "")
                    + f": {self.last_error}"
                )
            )
        else:
            flush.future.set_result(None)

    def _commit(self, batch: list[tuple[str, Sequence[Any]]]) -> None:
        assert self._conn is not None
        with self._conn:
            for sql, params in batch:
                self._conn.execute(sql, params)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                conn = _connect(self.path)
                try:
                    return fn(conn)
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed: {type(exc).__name__}: {exc}") from exc

        return await asyncio.to_thread(run)

    # --- sessions ---------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str,
        transport: str,
        backend: str,
        job_data: dict[str, Any],
        started_at: float,
        rules: dict[str, Any] | None = None,
        backend_switches: list[dict[str, Any]] | None = None,
    ) -> None:
        await self._put(
            session_id,
            "INSERT INTO sessions (id, status, transport, backend, job_data, started_at, "
            "last_activity, rules, backend_switches) VALUES (?, 'live', ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                transport,
                backend,
                _dumps(job_data),
                started_at,
                started_at,
                None if rules is None else _dumps(rules),
                _dumps(backend_switches) if backend_switches else None,
            ),
        )

    async def set_backend(
        self, session_id: str, backend: str, switches: list[dict[str, Any]]
    ) -> None:
        """A live session moved to another backend (a spend cap was reached)."""
        await self._put(
            session_id,
            "UPDATE sessions SET backend=?, backend_switches=? WHERE id=?",
            (backend, _dumps(switches), session_id),
        )

    async def update_counters(
        self, session_id: str, counters: dict[str, Any], last_activity: float
    ) -> None:
        await self._put(
            session_id,
            "UPDATE sessions SET counters=?, last_activity=? WHERE id=?",
            (_dumps(counters), last_activity, session_id),
        )

    async def end_session(
        self, session_id: str, ended_at: float, reason: str, counters: dict[str, Any]
    ) -> None:
        await self._put(
            session_id,
            "UPDATE sessions SET status='ended', ended_at=?, end_reason=?, counters=? WHERE id=?",
            (ended_at, reason, _dumps(counters), session_id),
        )

    async def add_frame(
        self, session_id: str, index: int, t: float, summary: dict[str, Any]
    ) -> None:
        await self._put(
            session_id,
            "INSERT OR REPLACE INTO frames (session_id, idx, t, summary) VALUES (?, ?, ?, ?)",
            (session_id, index, t, _dumps(summary)),
        )

    async def save_alert(self, session_id: str, episode: dict[str, Any]) -> None:
        """Insert at onset, replace at closure (same episode id)."""
        await self._put(
            session_id,
            "INSERT OR REPLACE INTO alerts (id, session_id, started_at, episode) "
            "VALUES (?, ?, ?, ?)",
            (episode["episode_id"], session_id, episode["started_at"], _dumps(episode)),
        )

    async def save_report(self, session_id: str, report: dict[str, Any]) -> None:
        await self._put(
            session_id,
            "INSERT OR REPLACE INTO reports (session_id, created_at, report) VALUES (?, ?, ?)",
            (session_id, time.time(), _dumps(report)),
        )

    async def mark_interrupted(self, session_id: str, reason: str) -> None:
        """A live session this process gave up on (it keeps whatever was stored)."""
        await self._put(
            session_id,
            "UPDATE sessions SET status='interrupted', end_reason=? WHERE id=? AND status='live'",
            (reason, session_id),
        )

    async def set_session_status(
        self, session_id: str, status: str, end_reason: str | None
    ) -> None:
        """Mark a session `interrupted` (a recorded video stopped by a shutdown) or back
        to `live` (the same video resumed)."""
        await self._put(
            session_id,
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
            await self._put(session_id, f"DELETE FROM {table} WHERE {column}=?", (session_id,))

    # --- spend caps -------------------------------------------------------------------

    async def record_start(self, address: str, at: float) -> None:
        await self._put("", "INSERT INTO session_starts (address, at) VALUES (?, ?)",
                        (address, at))

    async def prune_starts(self, before: float) -> None:
        await self._put("", "DELETE FROM session_starts WHERE at < ?", (before,))

    async def add_usage(self, day: str, kind: str, amount: int) -> None:
        await self._put(
            "",
            "INSERT INTO usage (day, kind, amount) VALUES (?, ?, ?) "
            "ON CONFLICT (day, kind) DO UPDATE SET amount = amount + excluded.amount",
            (day, kind, amount),
        )

    async def usage_on(self, day: str) -> dict[str, int]:
        def q(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT kind, amount FROM usage WHERE day=?", (day,))
            return {r[0]: int(r[1]) for r in rows}

        return await self._read(q)

    async def starts_since(self, since: float) -> list[tuple[str, float]]:
        """(address, time) of the session starts recorded since `since`, oldest first."""

        def q(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            rows = conn.execute(
                "SELECT address, at FROM session_starts WHERE at >= ? ORDER BY at", (since,)
            )
            return [(str(r[0]), float(r[1])) for r in rows]

        return await self._read(q)

    # --- recorded-video jobs ------------------------------------------------------------

    async def save_video_job(self, job: dict[str, Any]) -> None:
        await self._put(
            job.get("session_id") or "",
            "INSERT OR REPLACE INTO video_jobs (id, created_at, state, session_id, job) "
            "VALUES (?, ?, ?, ?, ?)",
            (job["id"], job["created_at"], job["state"], job.get("session_id"), _dumps(job)),
        )

    async def delete_video_job(self, job_id: str) -> None:
        await self._put("", "DELETE FROM video_jobs WHERE id=?", (job_id,))

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
        job_data = loads_object(row["job_data"])
        counters = loads_object(row["counters"] or "{}")
        record = {
            "session_id": row["id"],
            "status": row["status"],
            "transport": row["transport"],
            "backend": row["backend"],
            "job_data": job_data or {},
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "end_reason": row["end_reason"],
            "last_activity": row["last_activity"],
            "counters": counters or {},
            "rules": loads_object(row["rules"]),
            "backend_switches": _loads_list(row["backend_switches"]),
        }
        corrupt = [
            name for name, v in (("job_data", job_data), ("counters", counters)) if v is None
        ]
        if corrupt:  # readable anyway: a damaged field must not hide the session
            record["corrupt_fields"] = corrupt
        return record

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

    async def scan_frames(
        self,
        session_id: str,
        consume: Callable[[FrameSpan, Iterator[tuple[Any, Any, Any]]], T],
        t_range: tuple[float, float],
    ) -> T:
        """Runs `consume(span, rows)` in a reader thread, streaming the session's frame
        rows `(idx, t, summary JSON)` in index order from the cursor, so a long session is
        never held in memory. `span` covers the rows whose `t` is a number in `t_range`;
        rows are raw (possibly damaged): parsing them is the consumer's job."""

        def q(conn: sqlite3.Connection) -> T:
            t_min, t_max, rows = conn.execute(
                "SELECT MIN(t), MAX(t), COUNT(*) FROM frames WHERE session_id=? "
                "AND typeof(t) IN ('integer', 'real') AND t BETWEEN ? AND ?",
                (session_id, *t_range),
            ).fetchone()
            cursor = conn.execute(
                "SELECT idx, t, summary FROM frames WHERE session_id=? ORDER BY idx",
                (session_id,),
            )

            def stream() -> Iterator[tuple[Any, Any, Any]]:
                try:
                    for r in cursor:
                        yield r[0], r[1], r[2]
                except sqlite3.Error as exc:  # tells the consumer's bugs from the store's
                    raise StoreError(f"store read failed: {exc}") from exc

            return consume(FrameSpan(t_min, t_max, rows), stream())

        return await self._read(q)

    async def alert_rows(self, session_id: str) -> list[Any]:
        """The session's alert episodes as stored (JSON text, possibly damaged)."""

        def q(conn: sqlite3.Connection) -> list[Any]:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT episode FROM alerts WHERE session_id=? ORDER BY started_at",
                    (session_id,),
                )
            ]

        return await self._read(q)

    async def get_report(self, session_id: str) -> dict[str, Any] | None:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT report FROM reports WHERE session_id=?", (session_id,)
            ).fetchone()
            if row is None:
                return None
            report = loads_object(row["report"])
            if report is None:  # damaged: the caller builds it again
                log.error("stored report of %s is unreadable", session_id)
            return report

        return await self._read(q)


@contextlib.asynccontextmanager
async def open_store(path: Path) -> Any:
    store = Store(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
