"""The store: sessions, per-frame summaries, alert episodes and their evidence, reports,
jobs and usage.

Writes go through one bounded queue to one writer task that commits each batch as it
comes, so the event loop never waits on the database and a crash loses at most the batch
in flight (well under a second). A batch that fails is retried with backoff, then counted
as lost; `flush()` raises for lost writes and never waits forever; `health()` says whether
writes are failing. The SQL here is portable; a driver (`database.py`) runs it on SQLite
(the embedded default) or PostgreSQL. PostgreSQL checks parameter types strictly: values
bound to INTEGER columns are ints (`int(...)`), to REAL columns ints or floats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from server.session.database import Database, Row, StoreError
from server.session.sqlite_database import SQLiteDatabase

__all__ = ["FrameSpan", "Store", "StoreError", "StoreTimeout", "loads_object", "open_store"]

log = logging.getLogger(__name__)
T = TypeVar("T")


_STOP = object()


class StoreTimeout(StoreError):
    """The store did not answer within its flush timeout."""


@dataclass(frozen=True)
class _Write:
    seq: int
    session_id: str
    sql: str
    params: Sequence[Any]
    #: Writes with the same key only assign absolute values that no other statement
    #: reads: in one batch, the last of them is all that needs to run.
    latest_wins: str | None = None


def _statements(batch: Sequence[_Write]) -> list[tuple[str, Sequence[Any]]]:
    """The batch's statements, in order, without the `latest_wins` writes that a later one
    of the same key replaces: a backlog of a session's frames and counters updates becomes
    its frames (consecutive, so one round trip on PostgreSQL) and one counters update."""
    last = {w.latest_wins: i for i, w in enumerate(batch) if w.latest_wins is not None}
    return [
        (w.sql, w.params)
        for i, w in enumerate(batch)
        if w.latest_wins is None or last[w.latest_wins] == i
    ]


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


#: Every table holding a session's data, with the column naming the session: erasure
#: (DELETE /api/sessions/{id}, the retention sweep) deletes from each, the session row
#: last. A table the database does not have (its migration is on another branch, or a
#: newer one) is skipped: `open()` finds out which exist. A new per-session table is
#: added here, in one place.
SESSION_TABLES: tuple[tuple[str, str], ...] = (
    ("frames", "session_id"),
    ("alerts", "session_id"),
    ("evidence", "session_id"),
    ("alert_reviews", "session_id"),
    ("reports", "session_id"),
    ("video_jobs", "session_id"),
    ("candidate_tokens", "session_id"),
    ("sessions", "id"),
)

#: Receives (exception, ids of the sessions whose writes were lost, statements lost).
WriteErrorHook = Callable[[BaseException, set[str], int], None]


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
        database: Database | Path,
        queue_size: int = 10_000,
        *,
        write_attempts: int = 3,
        retry_backoff_s: float = 0.1,
        retry_window_s: float = 0.0,
        retry_max_backoff_s: float = 2.0,
        flush_timeout_s: float = 10.0,
    ) -> None:
        self.db: Database = (
            database if not isinstance(database, str | Path) else SQLiteDatabase(Path(database))
        )
        self.write_attempts = max(1, write_attempts)
        self.retry_backoff_s = retry_backoff_s
        # A transient failure is retried for at least `write_attempts` attempts and at
        # least `retry_window_s` (a database restart or failover takes seconds).
        self.retry_window_s = max(0.0, retry_window_s)
        self.retry_max_backoff_s = retry_max_backoff_s
        self.flush_timeout_s = flush_timeout_s
        self.on_write_error: WriteErrorHook | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
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
        #: SESSION_TABLES this database has (known once opened).
        self.session_tables: tuple[tuple[str, str], ...] = SESSION_TABLES

    # --- lifecycle --------------------------------------------------------------------

    async def open(self, node_id: str | None = None) -> list[str]:
        """Bring the schema to the newest version (an existing database migrates in
        place); sessions left live by a previous process become `interrupted`. Returns
        their ids. A database migrated by a newer server is refused (`SchemaTooNew`).

        `node_id`: this node in a cluster, whose store other live nodes share: only its own
        sessions (its previous incarnation's) and those of no node (written before
        clusters) are interrupted here; a dead peer's are the lease reaper's
        (server/cluster/leases.py). None: a single server, every live session was ours."""
        applied = await self.db.open()  # versioned (server/session/migrations.py)
        if applied:
            log.info("store %s: applied schema migration(s) %s", self.db.describe(), applied)
        if node_id is None:
            rows = await self.db.fetch_all("SELECT id FROM sessions WHERE status='live'")
        else:
            rows = await self.db.fetch_all(
                "SELECT id FROM sessions WHERE status='live' AND (node_id=? OR node_id IS NULL)",
                (node_id,),
            )
        interrupted = [str(r["id"]) for r in rows]
        if interrupted:
            await self.db.execute_batch(
                [
                    (
                        "UPDATE sessions SET status='interrupted', end_reason='server_restart' "
                        "WHERE id=? AND status='live'",
                        (sid,),
                    )
                    for sid in interrupted
                ]
            )
        have = await self._tables()
        self.session_tables = tuple((t, c) for t, c in SESSION_TABLES if t in have)
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        if interrupted:
            log.warning(
                "%d session(s) were live at the last stop: now interrupted", len(interrupted)
            )
        return interrupted

    async def _tables(self) -> set[str]:
        """The tables of this database (each engine has its own catalogue)."""
        if self.db.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type='table'"
        else:  # the SQL standard's catalogue
            sql = (
                "SELECT table_name AS name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        return {str(r["name"]) for r in await self.db.fetch_all(sql)}

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
        await self.db.close(wait=clean)

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
            "engine": self.db.dialect,  # public: never the host, user or file path
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

    async def _put(
        self, session_id: str, sql: str, params: Sequence[Any], latest_wins: str | None = None
    ) -> None:
        # Bounded: if the disk cannot keep up, producers wait here instead of growing memory.
        self._seq += 1
        await self._queue.put(_Write(self._seq, session_id, sql, params, latest_wins))

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
        statements = _statements(batch)
        first_failure: float | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.db.execute_batch(statements)
            except Exception as exc:
                if not self.db.is_transient(exc):
                    # A statement the database refuses: retrying cannot help.
                    self._note_error(exc)
                    if len(batch) == 1:
                        self._lose(batch, exc)
                        return
                    # Keep the batch's other statements: one bad row loses only itself.
                    for w in batch:
                        await self._write([w])
                    return
                self._note_error(exc)  # busy, locked, I/O, connection lost: may pass
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if (
                    attempt < self.write_attempts
                    or now - first_failure < self.retry_window_s
                ):
                    self.retried_batches += 1
                    log.warning(
                        "store write failed (%s); attempt %d (at least %d, for at least "
                        "%.0f s)",
                        exc,
                        attempt,
                        self.write_attempts,
                        self.retry_window_s,
                    )
                    await asyncio.sleep(
                        min(self.retry_max_backoff_s, self.retry_backoff_s * 2 ** (attempt - 1))
                    )
                    continue
                self._lose(batch, exc)
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

    async def _fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return await self.db.fetch_all(sql, params)
        except Exception as exc:
            if self.db.is_read_error(exc):
                raise StoreError(f"store read failed: {type(exc).__name__}: {exc}") from exc
            raise

    async def _fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        try:
            return await self.db.fetch_one(sql, params)
        except Exception as exc:
            if self.db.is_read_error(exc):
                raise StoreError(f"store read failed: {type(exc).__name__}: {exc}") from exc
            raise

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
        node_id: str | None = None,
    ) -> None:
        """`node_id`: the node that runs the session (cluster ownership)."""
        await self._put(
            session_id,
            "INSERT INTO sessions (id, status, transport, backend, job_data, started_at, "
            "last_activity, rules, backend_switches, node_id) "
            "VALUES (?, 'live', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                transport,
                backend,
                _dumps(job_data),
                started_at,
                started_at,
                None if rules is None else _dumps(rules),
                _dumps(backend_switches) if backend_switches else None,
                node_id,
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

    async def set_transport(
        self, session_id: str, transport: str, rules: dict[str, Any]
    ) -> None:
        """A session whose candidate joined over another transport before its first frame
        (its alert rules count time as that transport's do)."""
        await self._put(
            session_id,
            "UPDATE sessions SET transport=?, rules=? WHERE id=?",
            (transport, _dumps(rules), session_id),
        )

    async def update_counters(
        self, session_id: str, counters: dict[str, Any], last_activity: float
    ) -> None:
        await self._put(
            session_id,
            "UPDATE sessions SET counters=?, last_activity=? WHERE id=?",
            (_dumps(counters), last_activity, session_id),
            latest_wins="counters:" + session_id,
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
            "INSERT INTO frames (session_id, idx, t, summary) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id, idx) DO UPDATE SET t=excluded.t, summary=excluded.summary",
            (session_id, int(index), t, _dumps(summary)),
        )

    async def save_alert(self, session_id: str, episode: dict[str, Any]) -> None:
        """Insert at onset, replace at closure (same episode id)."""
        await self._put(
            session_id,
            "INSERT INTO alerts (id, session_id, started_at, episode) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET session_id=excluded.session_id, "
            "started_at=excluded.started_at, episode=excluded.episode",
            (episode["episode_id"], session_id, episode["started_at"], _dumps(episode)),
        )

    async def save_report(self, session_id: str, report: dict[str, Any]) -> None:
        await self._put(
            session_id,
            "INSERT INTO reports (session_id, created_at, report) VALUES (?, ?, ?) "
            "ON CONFLICT (session_id) DO UPDATE SET created_at=excluded.created_at, "
            "report=excluded.report",
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

    async def save_evidence(
        self,
        session_id: str,
        alert_id: str,
        created_at: float,
        jpeg: bytes,
        width: int,
        height: int,
        details: dict[str, Any],
    ) -> None:
        """An alert's snapshot, kept once (the first wins). Inserted only while its
        session exists, so a snapshot rendered after the session was erased leaves
        nothing behind."""
        await self._put(
            session_id,
            "INSERT INTO evidence (alert_id, session_id, created_at, jpeg, width, height, "
            "details) SELECT ?, ?, ?, ?, ?, ?, ? WHERE EXISTS "
            "(SELECT 1 FROM sessions WHERE id=?) ON CONFLICT (alert_id) DO NOTHING",
            (
                alert_id,
                session_id,
                created_at,
                bytes(jpeg),
                width,
                height,
                _dumps(details),
                session_id,
            ),
        )

    async def erase_session(self, session_id: str) -> None:
        """Delete everything stored about the session (SESSION_TABLES), in one batch when
        the writer takes them together. The audit log keeps its entries."""
        for table, column in self.session_tables:
            await self._put(session_id, f"DELETE FROM {table} WHERE {column}=?", (session_id,))

    async def sessions_ended_before(self, cutoff: float, limit: int) -> list[str]:
        """Ids of ended or interrupted sessions whose end (or, never ended, last activity)
        is before `cutoff`, at most `limit`: the retention sweep's next batch."""
        rows = await self._fetch_all(
            "SELECT id FROM sessions WHERE status IN ('ended', 'interrupted') AND "
            "((ended_at IS NOT NULL AND ended_at < ?) OR "
            "(ended_at IS NULL AND last_activity < ?)) ORDER BY id LIMIT ?",
            (cutoff, cutoff, limit),
        )
        return [str(r["id"]) for r in rows]

    # --- reviews and the audit log --------------------------------------------------------

    async def get_alert(self, session_id: str, alert_id: str) -> dict[str, Any] | None:
        """One alert episode of the session as stored (None: unknown or damaged)."""
        row = await self._fetch_one(
            "SELECT episode FROM alerts WHERE session_id=? AND id=?", (session_id, alert_id)
        )
        return None if row is None else loads_object(row["episode"])

    async def save_review(
        self,
        session_id: str,
        alert_id: str,
        verdict: str,
        note: str | None,
        actor: str,
        at: float,
    ) -> None:
        """One review per alert: a later one replaces it (the audit log keeps both)."""
        await self._put(
            session_id,
            "INSERT INTO alert_reviews (session_id, alert_id, verdict, note, actor, at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, alert_id) DO UPDATE SET "
            "verdict=excluded.verdict, note=excluded.note, actor=excluded.actor, at=excluded.at",
            (session_id, alert_id, verdict, note, actor, at),
        )

    async def reviews(self, session_id: str) -> dict[str, dict[str, Any]]:
        """alert id → {verdict, note, at, by} for the session's reviewed alerts."""
        rows = await self._fetch_all(
            "SELECT alert_id, verdict, note, actor, at FROM alert_reviews WHERE session_id=?",
            (session_id,),
        )
        return {
            str(r["alert_id"]): {
                "verdict": r["verdict"],
                "note": r["note"],
                "at": r["at"],
                "by": r["actor"],
            }
            for r in rows
        }

    async def review_counts(self, session_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """session id → {alerts, confirmed, dismissed} for these sessions."""
        out: dict[str, dict[str, int]] = {
            sid: {"alerts": 0, "confirmed": 0, "dismissed": 0} for sid in session_ids
        }
        if not session_ids:
            return out
        marks = ",".join("?" * len(session_ids))
        for r in await self._fetch_all(
            f"SELECT session_id, COUNT(*) AS n FROM alerts WHERE session_id IN ({marks}) "
            "GROUP BY session_id",
            list(session_ids),
        ):
            out[str(r["session_id"])]["alerts"] = int(r["n"])
        for r in await self._fetch_all(
            "SELECT session_id, verdict, COUNT(*) AS n FROM alert_reviews "
            f"WHERE session_id IN ({marks}) GROUP BY session_id, verdict",
            list(session_ids),
        ):
            if r["verdict"] in ("confirmed", "dismissed"):
                out[str(r["session_id"])][str(r["verdict"])] = int(r["n"])
        return out

    async def add_audit_entry(self, entry: dict[str, Any]) -> None:
        await self._put(
            entry.get("session_id") or "",
            "INSERT INTO audit_log (id, at, actor, action, session_id, details) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                entry["id"],
                entry["at"],
                entry["actor"],
                entry["action"],
                entry.get("session_id"),
                _dumps(entry.get("details") or {}),
            ),
        )

    async def set_audit_details(
        self, entry_id: str, session_id: str, details: dict[str, Any]
    ) -> None:
        """Rewrite an entry's details (an erasure removes the notes of its reviews)."""
        await self._put(
            session_id, "UPDATE audit_log SET details=? WHERE id=?", (_dumps(details), entry_id)
        )

    async def audit_entries(
        self, session_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Newest first."""
        sql = "SELECT id, at, actor, action, session_id, details FROM audit_log"
        params: list[Any] = []
        if session_id is not None:
            sql += " WHERE session_id=?"
            params.append(session_id)
        sql += " ORDER BY at DESC, id DESC LIMIT ? OFFSET ?"
        params += [limit, offset]
        return [
            {
                "id": r["id"],
                "at": r["at"],
                "actor": r["actor"],
                "action": r["action"],
                "session_id": r["session_id"],
                "details": loads_object(r["details"]) or {},
            }
            for r in await self._fetch_all(sql, params)
        ]

    # --- cluster: owners, leases, candidate tokens ----------------------------------------

    async def _write_now(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """One transaction outside the write queue, for leases: a renewal stuck behind
        thousands of queued frame writes would let the lease lapse while the node is
        alive. Raises StoreError when the database refuses or fails."""
        try:
            await self.db.execute_batch(statements)
        except Exception as exc:
            if self.db.is_read_error(exc) or self.db.is_transient(exc):
                raise StoreError(f"store write failed: {type(exc).__name__}: {exc}") from exc
            raise

    async def renew_node(
        self, node_id: str, address: str, incarnation: str, started_at: float, now: float,
        lease_until: float,
    ) -> None:
        """Register this node or renew its lease (at once, not through the queue)."""
        await self._write_now(
            [
                (
                    "INSERT INTO nodes (node_id, address, incarnation, started_at, renewed_at, "
                    "lease_until) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                    "address=excluded.address, incarnation=excluded.incarnation, "
                    "started_at=excluded.started_at, renewed_at=excluded.renewed_at, "
                    "lease_until=excluded.lease_until",
                    (node_id, address, incarnation, started_at, now, lease_until),
                )
            ]
        )

    async def remove_node(self, node_id: str, incarnation: str) -> None:
        """A node leaving gracefully (its sessions have ended)."""
        await self._write_now(
            [("DELETE FROM nodes WHERE node_id=? AND incarnation=?", (node_id, incarnation))]
        )

    async def prune_nodes(self, before: float) -> None:
        """Forget nodes whose lease lapsed before `before` and who own no live session."""
        await self._write_now(
            [
                (
                    "DELETE FROM nodes WHERE lease_until < ? AND NOT EXISTS (SELECT 1 FROM "
                    "sessions s WHERE s.node_id = nodes.node_id AND s.status='live')",
                    (before,),
                )
            ]
        )

    async def nodes(self) -> list[dict[str, Any]]:
        rows = await self._fetch_all(
            "SELECT node_id, address, incarnation, started_at, renewed_at, lease_until "
            "FROM nodes ORDER BY node_id"
        )
        return [dict(r) for r in rows]

    async def orphaned_sessions(self, now: float, node_id: str) -> list[tuple[str, str]]:
        """(session id, owner) of live sessions whose owner holds no lease at `now` (dead,
        or gone without ending them), other than `node_id`'s own."""
        rows = await self._fetch_all(
            "SELECT s.id AS id, s.node_id AS node_id FROM sessions s WHERE s.status='live' "
            "AND s.node_id IS NOT NULL AND s.node_id <> ? AND NOT EXISTS (SELECT 1 FROM "
            "nodes n WHERE n.node_id = s.node_id AND n.lease_until >= ?)",
            (node_id, now),
        )
        return [(str(r["id"]), str(r["node_id"])) for r in rows]

    async def interrupt_sessions(self, session_ids: Sequence[str], reason: str) -> None:
        """Mark live sessions interrupted, now (idempotent: only rows still live change,
        so several nodes reaping the same dead node agree). Frames, alerts and reports are
        untouched."""
        if session_ids:
            await self._write_now(
                [
                    (
                        "UPDATE sessions SET status='interrupted', end_reason=? "
                        "WHERE id=? AND status='live'",
                        (reason, sid),
                    )
                    for sid in session_ids
                ]
            )

    async def session_owner(self, session_id: str) -> tuple[str | None, str] | None:
        """(owner node id, status) of a session, or None when there is no such session."""
        row = await self._fetch_one(
            "SELECT node_id, status FROM sessions WHERE id=?", (session_id,)
        )
        if row is None:
            return None
        return (None if row["node_id"] is None else str(row["node_id"])), str(row["status"])

    async def node_session_statuses(self, node_id: str, ids: Sequence[str]) -> dict[str, str]:
        """Status of each of these sessions of `node_id` (a node checking whether peers
        reaped its sessions while its own lease had lapsed)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = await self._fetch_all(
            f"SELECT id, status FROM sessions WHERE node_id=? AND id IN ({marks})",
            (node_id, *ids),
        )
        return {str(r["id"]): str(r["status"]) for r in rows}

    async def save_candidate_token(self, digest: str, session_id: str) -> None:
        await self._put(
            session_id,
            "INSERT INTO candidate_tokens (digest, session_id, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (digest) DO UPDATE SET session_id=excluded.session_id",
            (digest, session_id, time.time()),
        )

    async def candidate_token_session(self, digest: str) -> str | None:
        row = await self._fetch_one(
            "SELECT session_id FROM candidate_tokens WHERE digest=?", (digest,)
        )
        return None if row is None else str(row["session_id"])

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
            "ON CONFLICT (day, kind) DO UPDATE SET amount = usage.amount + excluded.amount",
            (day, kind, int(amount)),
        )

    async def usage_on(self, day: str) -> dict[str, int]:
        rows = await self._fetch_all("SELECT kind, amount FROM usage WHERE day=?", (day,))
        return {str(r["kind"]): int(r["amount"]) for r in rows}

    async def starts_since(self, since: float) -> list[tuple[str, float]]:
        """(address, time) of the session starts recorded since `since`, oldest first."""

        rows = await self._fetch_all(
            "SELECT address, at FROM session_starts WHERE at >= ? ORDER BY at", (since,)
        )
        return [(str(r["address"]), float(r["at"])) for r in rows]

    # --- recorded-video jobs ------------------------------------------------------------

    async def save_video_job(self, job: dict[str, Any]) -> None:
        await self._put(
            job.get("session_id") or "",
            "INSERT INTO video_jobs (id, created_at, state, session_id, job) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "created_at=excluded.created_at, state=excluded.state, "
            "session_id=excluded.session_id, job=excluded.job",
            (job["id"], job["created_at"], job["state"], job.get("session_id"), _dumps(job)),
        )

    async def save_owned_video_job(self, job: dict[str, Any], owner: str) -> None:
        """A running job's progress, written only while `owner` still holds it (a node
        that lost its lease, or whose job was taken over, writes nothing)."""
        await self._put(
            job.get("session_id") or "",
            "UPDATE video_jobs SET state=?, session_id=?, job=? WHERE id=? AND owner=?",
            (job["state"], job.get("session_id"), _dumps(job), job["id"], owner),
        )

    # Coordination between nodes: run at once (not through the write queue), each one
    # conditional UPDATE, then read back to learn whether it was this one that applied.

    async def _execute_now(self, sql: str, params: Sequence[Any]) -> None:
        try:
            await self.db.execute_batch([(sql, params)])
        except Exception as exc:
            if self.db.is_read_error(exc) or self.db.is_transient(exc):
                raise StoreError(f"store write failed: {type(exc).__name__}: {exc}") from exc
            raise

    async def claim_video_job(self, job: dict[str, Any], owner: str, lease_until: float) -> bool:
        """Take a `queued` job for `owner` (its record now says it runs); False when
        another node took it first, or it is no longer queued."""
        text = _dumps(job)
        await self._execute_now(
            "UPDATE video_jobs SET state=?, job=?, owner=?, lease_until=?, cancel_requested=0 "
            "WHERE id=? AND state='queued'",
            (job["state"], text, owner, lease_until, job["id"]),
        )
        row = await self._fetch_one("SELECT owner FROM video_jobs WHERE id=?", (job["id"],))
        return row is not None and row["owner"] == owner

    async def renew_video_lease(
        self, job_id: str, owner: str, lease_until: float
    ) -> tuple[bool, bool]:
        """(still held by `owner`, cancel requested) after extending the lease."""
        await self._execute_now(
            "UPDATE video_jobs SET lease_until=? WHERE id=? AND owner=?",
            (lease_until, job_id, owner),
        )
        row = await self._fetch_one(
            "SELECT owner, cancel_requested FROM video_jobs WHERE id=?", (job_id,)
        )
        if row is None or row["owner"] != owner:
            return False, False
        return True, bool(row["cancel_requested"])

    async def request_video_cancel(self, job_id: str) -> None:
        await self._execute_now("UPDATE video_jobs SET cancel_requested=1 WHERE id=?", (job_id,))

    async def replace_video_job(
        self, job: dict[str, Any], expect_state: str, expect_owner: str | None = None
    ) -> bool:
        """Compare and set: write `job` (and release the job: no owner, no lease) only
        if it is still in `expect_state` (and held by `expect_owner`, when given). True
        when this write is the one that applied."""
        text = _dumps(job)
        sql = (
            "UPDATE video_jobs SET state=?, session_id=?, job=?, owner=NULL, lease_until=NULL, "
            "cancel_requested=0 WHERE id=? AND state=?"
        )
        params: list[Any] = [job["state"], job.get("session_id"), text, job["id"], expect_state]
        if expect_owner is not None:
            sql += " AND owner=?"
            params.append(expect_owner)
        await self._execute_now(sql, params)
        row = await self._fetch_one("SELECT job FROM video_jobs WHERE id=?", (job["id"],))
        return row is not None and row["job"] == text

    async def lapsed_video_jobs(self, now: float) -> list[tuple[dict[str, Any], str | None]]:
        """Running jobs whose owner has not renewed its lease by `now` (or never had one:
        left by a single node), with their owner."""
        rows = await self._fetch_all(
            "SELECT job, owner FROM video_jobs WHERE state IN ('downloading', 'analysing') "
            "AND (lease_until IS NULL OR lease_until < ?)",
            (now,),
        )
        return [(job, r["owner"]) for r in rows if (job := loads_object(r["job"])) is not None]

    async def count_video_jobs(self, states: Sequence[str]) -> int:
        row = await self._fetch_one(
            f"SELECT COUNT(*) AS n FROM video_jobs WHERE state IN ({','.join('?' * len(states))})",
            list(states),
        )
        return 0 if row is None else int(row["n"])

    async def delete_video_job(self, job_id: str) -> None:
        await self._put("", "DELETE FROM video_jobs WHERE id=?", (job_id,))

    async def get_video_job(self, job_id: str) -> dict[str, Any] | None:
        row = await self._fetch_one("SELECT job FROM video_jobs WHERE id=?", (job_id,))
        return None if row is None else loads_object(row["job"])

    async def list_video_jobs(
        self, limit: int = 100, offset: int = 0, states: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        sql = "SELECT job FROM video_jobs"
        params: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params += list(states)
        # `id` breaks ties: pages must not overlap on an engine that orders ties freely.
        sql += " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        params += [int(limit), int(offset)]
        rows = await self._fetch_all(sql, params)
        return [job for r in rows if (job := loads_object(r["job"])) is not None]

    # --- reading ----------------------------------------------------------------------

    @staticmethod
    def _session_row(row: Row) -> dict[str, Any]:
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
            "node_id": row["node_id"],
        }
        corrupt = [
            name for name, v in (("job_data", job_data), ("counters", counters)) if v is None
        ]
        if corrupt:  # readable anyway: a damaged field must not hide the session
            record["corrupt_fields"] = corrupt
        return record

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        row = await self._fetch_one("SELECT * FROM sessions WHERE id=?", (session_id,))
        return None if row is None else self._session_row(row)

    async def list_sessions(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM sessions"
        params: list[Any] = []
        if status:
            sql += " WHERE status=?"
            params.append(status)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ? OFFSET ?"
        params += [int(limit), int(offset)]
        return [self._session_row(r) for r in await self._fetch_all(sql, params)]

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

        # SQLite keeps whatever type a damaged row was given; other engines enforce REAL.
        numeric = "typeof(t) IN ('integer', 'real') AND " if self.db.dialect == "sqlite" else ""
        span = await self._fetch_one(
            "SELECT MIN(t) AS t_min, MAX(t) AS t_max, COUNT(*) AS n FROM frames "
            f"WHERE session_id=? AND {numeric}t BETWEEN ? AND ?",
            (session_id, *t_range),
        )
        assert span is not None  # an aggregate always answers one row
        frame_span = FrameSpan(span["t_min"], span["t_max"], int(span["n"]))
        try:
            return await self.db.scan(
                "SELECT idx, t, summary FROM frames WHERE session_id=? ORDER BY idx",
                (session_id,),
                lambda rows: consume(frame_span, rows),
            )
        except StoreError:
            raise
        except Exception as exc:
            if self.db.is_read_error(exc):
                raise StoreError(f"store read failed: {type(exc).__name__}: {exc}") from exc
            raise

    async def alert_rows(self, session_id: str) -> list[Any]:
        """The session's alert episodes as stored (JSON text, possibly damaged)."""

        rows = await self._fetch_all(
            "SELECT episode FROM alerts WHERE session_id=? ORDER BY started_at", (session_id,)
        )
        return [r["episode"] for r in rows]

    async def evidence_ids(self, session_id: str) -> set[str]:
        """Ids of the session's alerts that have an evidence snapshot."""
        rows = await self._fetch_all(
            "SELECT alert_id FROM evidence WHERE session_id=?", (session_id,)
        )
        return {str(r["alert_id"]) for r in rows}

    async def get_evidence(self, session_id: str, alert_id: str) -> dict[str, Any] | None:
        """An alert's snapshot: `jpeg` (bytes), `width`, `height`, `details`, `created_at`."""
        row = await self._fetch_one(
            "SELECT jpeg, width, height, details, created_at FROM evidence "
            "WHERE alert_id=? AND session_id=?",
            (alert_id, session_id),
        )
        if row is None:
            return None
        return {
            "jpeg": bytes(row["jpeg"]),
            "width": row["width"],
            "height": row["height"],
            "details": loads_object(row["details"]),
            "created_at": row["created_at"],
        }

    async def get_report(self, session_id: str) -> dict[str, Any] | None:
        row = await self._fetch_one("SELECT report FROM reports WHERE session_id=?", (session_id,))
        if row is None:
            return None
        report = loads_object(row["report"])
        if report is None:  # damaged: the caller builds it again
            log.error("stored report of %s is unreadable", session_id)
        return report


@contextlib.asynccontextmanager
async def open_store(path: Path) -> Any:
    store = Store(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
