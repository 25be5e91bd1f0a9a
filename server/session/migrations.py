"""Versioned schema migrations for the store, applied in order at start.

Each migration has a version, a name and its SQL; `schema_migrations` records the ones a
database has (with when). `migrate()` applies the missing ones in order, each in its own
transaction (SQLite's and PostgreSQL's DDL are transactional), so a failure leaves the
database at the last complete version. A database newer than this code is refused rather
than guessed at.

One definition serves both engines: migrations are written in SQLite's plain types
(TEXT, REAL, INTEGER, BLOB) and `for_dialect()` translates them for PostgreSQL
(`migrate_postgres()`), where an advisory lock lets only one node at a time migrate.

SQLite files written before this runner existed have no `schema_migrations`: their
schema was created with `CREATE TABLE IF NOT EXISTS` plus column additions, so each
migration carries a check that says whether a legacy file already has what it adds;
those are recorded as applied ("adopted") and the rest run. Existing files migrate in
place. (PostgreSQL came after the runner: nothing to adopt there.)
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.session.database import rewrite_code

if TYPE_CHECKING:
    import asyncpg


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer version of the server."""


def _table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)
    ).fetchone()
    return row is not None


def _column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    #: For files from before the runner: does this database already have it? (None:
    #: added after the runner existed, so a legacy file never has it.)
    present: Callable[[sqlite3.Connection], bool] | None = None


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions, frames, alert episodes, reports",
        (
            """CREATE TABLE sessions (
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
            )""",
            """CREATE TABLE frames (
                session_id TEXT NOT NULL,
                idx INTEGER NOT NULL,
                t REAL NOT NULL,
                summary TEXT NOT NULL,
                PRIMARY KEY (session_id, idx)
            )""",
            """CREATE TABLE alerts (
                id TEXT PRIMARY KEY,
                session_id TEXT NOT NULL,
                started_at REAL NOT NULL,
                episode TEXT NOT NULL
            )""",
            "CREATE INDEX alerts_by_session ON alerts (session_id, started_at)",
            """CREATE TABLE reports (
                session_id TEXT PRIMARY KEY,
                created_at REAL NOT NULL,
                report TEXT NOT NULL
            )""",
        ),
        lambda conn: _table(conn, "sessions"),
    ),
    Migration(
        2,
        "sessions.rules: the alert settings a session is judged with",
        ("ALTER TABLE sessions ADD COLUMN rules TEXT",),
        lambda conn: _column(conn, "sessions", "rules"),
    ),
    Migration(
        3,
        "recorded-video jobs",
        (
            """CREATE TABLE video_jobs (
                id TEXT PRIMARY KEY,
                created_at REAL NOT NULL,
                state TEXT NOT NULL,   -- queued | downloading | analysing | done | failed | ...
                session_id TEXT,
                job TEXT NOT NULL      -- the job's JSON record (server/video/jobs.py)
            )""",
            "CREATE INDEX video_jobs_by_time ON video_jobs (created_at)",
        ),
        lambda conn: _table(conn, "video_jobs"),
    ),
    Migration(
        4,
        "spend caps: backend switches, session starts per address, daily usage",
        (
            # JSON list: moves to the offline backend (spend cap)
            "ALTER TABLE sessions ADD COLUMN backend_switches TEXT",
            "CREATE TABLE session_starts (address TEXT NOT NULL, at REAL NOT NULL)",
            "CREATE INDEX session_starts_by_time ON session_starts (at)",
            """CREATE TABLE usage (
                day TEXT NOT NULL,     -- YYYY-MM-DD, UTC
                kind TEXT NOT NULL,    -- rekognition_calls | llm_tokens
                amount INTEGER NOT NULL,
                PRIMARY KEY (day, kind)
            )""",
        ),
        lambda conn: _column(conn, "sessions", "backend_switches") and _table(conn, "usage"),
    ),
    Migration(
        5,
        "alert evidence: one snapshot per alert onset",
        (
            """CREATE TABLE evidence (
                alert_id TEXT PRIMARY KEY,
                session_id TEXT NOT NULL,
                created_at REAL NOT NULL,
                jpeg BLOB NOT NULL,
                width INTEGER,
                height INTEGER,
                details TEXT           -- JSON: what is boxed where, the numbers shown
            )""",
            "CREATE INDEX evidence_by_session ON evidence (session_id)",
        ),
    ),
    Migration(
        6,
        "alert reviews, the audit log, session indexes for the retention sweep",
        (
            """CREATE TABLE alert_reviews (
                session_id TEXT NOT NULL,
                alert_id TEXT NOT NULL,    -- the alert episode's id
                verdict TEXT NOT NULL,     -- confirmed | dismissed
                note TEXT,
                actor TEXT NOT NULL,       -- the operator token's name
                at REAL NOT NULL,
                PRIMARY KEY (session_id, alert_id)
            )""",
            """CREATE TABLE audit_log (
                id TEXT PRIMARY KEY,       -- a random uuid (portable: no autoincrement)
                at REAL NOT NULL,
                actor TEXT NOT NULL,       -- an operator token's name, or "system"
                action TEXT NOT NULL,      -- review | rescore | erase | retention_sweep
                session_id TEXT,
                details TEXT NOT NULL      -- JSON object, never the session's job data
            )""",
            "CREATE INDEX audit_log_by_time ON audit_log (at)",
            "CREATE INDEX audit_log_by_session ON audit_log (session_id, at)",
            "CREATE INDEX sessions_by_end ON sessions (ended_at)",
            "CREATE INDEX sessions_by_activity ON sessions (last_activity)",
        ),
    ),
    Migration(
        7,
        "video jobs across nodes: who runs a job, until when, a cancel asked from elsewhere",
        (
            "ALTER TABLE video_jobs ADD COLUMN owner TEXT",  # node id + run token, while it runs
            "ALTER TABLE video_jobs ADD COLUMN lease_until REAL",  # owner renews it (NODE_LEASE_S)
            "ALTER TABLE video_jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
        ),
        None,
    ),
    Migration(
        8,
        "cluster: session owners, node leases, candidate tokens shared by every node",
        (
            # The node that runs the session (its media, frames and worker).
            "ALTER TABLE sessions ADD COLUMN node_id TEXT",
            "CREATE INDEX sessions_by_status_node ON sessions (status, node_id)",
            # One lease per node, renewed every NODE_LEASE_S / 3: a session is alive as
            # long as its node's lease is (sessions never move between live nodes).
            """CREATE TABLE nodes (
                node_id TEXT PRIMARY KEY,
                address TEXT NOT NULL,     -- NODE_ADDRESS: where peers forward to
                incarnation TEXT NOT NULL, -- random per process start
                started_at REAL NOT NULL,
                renewed_at REAL NOT NULL,
                lease_until REAL NOT NULL
            )""",
            """CREATE TABLE candidate_tokens (
                digest TEXT PRIMARY KEY,   -- SHA-256 of the token, hex; never the token
                session_id TEXT NOT NULL,
                created_at REAL NOT NULL
            )""",
            "CREATE INDEX candidate_tokens_by_session ON candidate_tokens (session_id)",
        ),
    ),
    Migration(
        9,
        "no index on sessions.last_activity: every analysed frame updates it",
        (
            # An indexed column changed by each counters update makes every one of them
            # rewrite the index (PostgreSQL: no HOT update). Its one reader, the retention
            # sweep, scans the sessions table, one row per session, a few times a day.
            "DROP INDEX sessions_by_activity",
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

# --- one definition, two dialects -----------------------------------------------------------

#: SQLite's plain types and forms → PostgreSQL's. INTEGER is 64-bit in SQLite; a lone
#: `INTEGER PRIMARY KEY` is SQLite's rowid, numbered when not given: an identity column.
_POSTGRES_TYPES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.I), replacement)
    for pattern, replacement in (
        (
            r"\bINTEGER\s+PRIMARY\s+KEY(?:\s+AUTOINCREMENT)?\b",
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        ),
        (r"\bINTEGER\b", "BIGINT"),
        (r"\bREAL\b", "DOUBLE PRECISION"),
        (r"\bBLOB\b", "BYTEA"),
        # Table options only SQLite has.
        (r"\)\s*(?:WITHOUT\s+ROWID|STRICT)(?:\s*,\s*(?:WITHOUT\s+ROWID|STRICT))*\s*$", ")"),
    )
)


def for_dialect(statement: str, dialect: str) -> str:
    """A migration statement (SQLite types) as `dialect` needs it; literals, quoted names
    and comments are left as they are."""
    if dialect == "sqlite":
        return statement
    if dialect != "postgresql":
        raise ValueError(f"no migrations for dialect {dialect!r}")

    def translate(code: str) -> str:
        for pattern, replacement in _POSTGRES_TYPES:
            code = pattern.sub(replacement, code)
        return code

    return rewrite_code(statement, translate)


def _too_new(have: set[int], migrations: Sequence[Migration]) -> SchemaTooNew | None:
    known = {m.version for m in migrations}
    if not have - known:
        return None
    return SchemaTooNew(
        f"the database has schema version {max(have)}, newer than this server's "
        f"{max(known)}: run a newer server (or another database)"
    )


def applied_versions(conn: sqlite3.Connection) -> list[int]:
    if not _table(conn, "schema_migrations"):
        return []
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """Bring the database to the newest version; returns the versions applied now (not
    the adopted ones). Raises SchemaTooNew for a database newer than `migrations`."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL, "
        "adopted INTEGER NOT NULL DEFAULT 0)"
    )
    conn.commit()
    have = set(applied_versions(conn))
    if (too_new := _too_new(have, migrations)) is not None:
        raise too_new
    legacy = not have and _table(conn, "sessions")
    applied: list[int] = []
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in have:
            continue
        try:
            # The write lock first, then a second look: another process opening the
            # same file at the same moment may have applied it meanwhile.
            conn.execute("BEGIN IMMEDIATE")
            if m.version in applied_versions(conn):
                conn.rollback()
                continue
            adopted = legacy and m.present is not None and m.present(conn)
            if not adopted:
                for statement in m.statements:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at, adopted) "
                "VALUES (?, ?, ?, ?)",
                (m.version, m.name, time.time(), int(adopted)),
            )
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        if not adopted:
            applied.append(m.version)
    return applied


# --- PostgreSQL ---------------------------------------------------------------------------

#: pg_advisory_xact_lock key: one node at a time migrates a database ("proctor" in ASCII).
MIGRATION_LOCK = 0x70726F63746F72

_PG_SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL, "
    "adopted BIGINT NOT NULL DEFAULT 0)"
)


async def postgres_versions(conn: asyncpg.Connection) -> list[int]:
    """The versions a PostgreSQL database has ([] before its first migration)."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return []
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [int(r["version"]) for r in rows]


async def migrate_postgres(
    conn: asyncpg.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """`migrate()` for PostgreSQL, on one connection. Each migration runs in its own
    transaction holding an advisory lock, and looks again at what is applied once it has
    the lock: nodes starting at the same moment wait for each other, and each version is
    applied once (by whichever got there first). Returns the versions applied by this
    call."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_PG_SCHEMA_MIGRATIONS)
    for m in sorted(migrations, key=lambda m: m.version):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            have = set(await postgres_versions(conn))
            if (too_new := _too_new(have, migrations)) is not None:
                raise too_new
            if m.version in have:
                continue
            for statement in m.statements:
                await conn.execute(for_dialect(statement, "postgresql"))
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at, adopted) "
                "VALUES ($1, $2, $3, 0)",
                m.version,
                m.name,
                time.time(),
            )
        applied.append(m.version)
    return applied
