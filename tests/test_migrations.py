"""Versioned schema migrations: fresh files, files from before the runner (migrated in
place, data kept), databases newer than the server, and a migration that fails."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from server.session.migrations import (
    LATEST,
    MIGRATIONS,
    Migration,
    SchemaTooNew,
    applied_versions,
    migrate,
)
from server.session.store import Store

#: Every version this server knows (numbers are handed out per branch, so they may have
#: a gap until the branches are merged).
VERSIONS = sorted(m.version for m in MIGRATIONS)

#: The schema files had when this round began (created with IF NOT EXISTS, no versions).
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, transport TEXT NOT NULL, backend TEXT NOT NULL,
    job_data TEXT NOT NULL, started_at REAL NOT NULL, ended_at REAL, end_reason TEXT,
    last_activity REAL NOT NULL, counters TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS frames (
    session_id TEXT NOT NULL, idx INTEGER NOT NULL, t REAL NOT NULL, summary TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, started_at REAL NOT NULL,
    episode TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_session ON alerts (session_id, started_at);
CREATE TABLE IF NOT EXISTS reports (
    session_id TEXT PRIMARY KEY, created_at REAL NOT NULL, report TEXT NOT NULL
);
"""


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_fresh_database_gets_every_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "fresh.sqlite3")
    assert migrate(conn) == [m.version for m in MIGRATIONS]
    assert applied_versions(conn) == VERSIONS
    assert {"sessions", "frames", "alerts", "reports", "video_jobs", "usage"} <= _tables(conn)
    assert migrate(conn) == []  # idempotent: nothing left to apply


async def test_a_file_from_before_the_runner_migrates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "legacy.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SCHEMA)
    conn.execute(
        "INSERT INTO sessions (id, status, transport, backend, job_data, started_at, "
        "last_activity) VALUES ('old', 'live', 'rest', 'local', '{\"jobTitle\": \"SRE\"}', "
        "1700000000, 1700000000)"
    )
    conn.execute("INSERT INTO frames VALUES ('old', 0, 1700000001, ?)",
                 (json.dumps({"metrics": {"engagement": 70}, "faces": 1}),))
    conn.commit()
    conn.close()

    store = Store(path)
    interrupted = await store.open()  # the server's own start-up path
    try:
        assert interrupted == ["old"]
        record = await store.get_session("old")
        assert record is not None and record["job_data"] == {"jobTitle": "SRE"}
        assert record["rules"] is None  # the new column, empty for old sessions
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    rows = list(conn.execute("SELECT version, adopted FROM schema_migrations ORDER BY version"))
    # The legacy tables were adopted as version 1; the rest ran for real.
    assert rows == [(1, 1)] + [(v, 0) for v in VERSIONS[1:]]
    assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 1
    assert "backend_switches" in {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}


def test_a_database_newer_than_the_server_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "newer.sqlite3")
    migrate(conn)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0, 0)",
                 (LATEST + 1,))
    conn.commit()
    with pytest.raises(SchemaTooNew):
        migrate(conn)


def test_a_failing_migration_leaves_the_last_complete_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "broken.sqlite3")
    broken = Migration(
        LATEST + 1,
        "half a migration",
        ("CREATE TABLE half (x INTEGER)", "ALTER TABLE no_such_table ADD COLUMN y TEXT"),
        lambda c: False,
    )
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, (*MIGRATIONS, broken))
    assert applied_versions(conn) == VERSIONS
    assert "half" not in _tables(conn)  # rolled back with its version
