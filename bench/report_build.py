"""Time and peak memory of building one long session's report from the store, the path
`GET /api/sessions/{id}/report` takes for an interrupted session: frame rows streamed from
the database cursor through the report builder in the reader thread.

    .venv/bin/python bench/report_build.py [--frames 100000] [--postgres]

`--postgres`: on a private PostgreSQL cluster this script starts (tests/services.py's
PostgresServer) instead of a SQLite file.

Peak memory is measured with tracemalloc (every thread), which slows the build: the time
is measured on a separate run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.session.database import Database
from server.session.postgres_database import PostgresDatabase
from server.session.report import TIMESTAMP_RANGE, ReportBuilder
from server.session.sqlite_database import SQLiteDatabase
from server.session.store import Store
from tests.services import PostgresServer

SUMMARY = {
    "metrics": {
        "eye_contact": 90.1,
        "engagement": 70.2,
        "facial_expression": 60.0,
        "posture": 88.0,
        "confidence": 99.0,
    },
    "faces": 1,
    "dominant_emotion": "CALM",
    "emotions": {"CALM": 80.0, "HAPPY": 15.0, "SAD": 5.0},
    "pose": [1.0, 2.0, 0.5],
    "labels": [],
    "text_lines": 0,
    "insufficient": False,
    "quality_reason": None,
    "degraded": [],
    "calls": {"DetectFaces": 1},
    "latency_ms": 12.3,
}


async def build(store: Store) -> dict[str, object]:
    record = await store.get_session("s")
    assert record is not None
    builder = ReportBuilder(record)
    await store.scan_frames("s", builder.feed, TIMESTAMP_RANGE)
    return builder.finish(await store.alert_rows("s"))


async def main(frames: int, postgres: bool) -> None:
    pg = PostgresServer(fsync=False) if postgres else None
    try:
        if pg is not None:
            pg.start()
            await run(PostgresDatabase(pg.create_database("bench")), frames)
        else:
            await run(SQLiteDatabase(Path(tempfile.mkdtemp()) / "bench.sqlite3"), frames)
    finally:
        if pg is not None:
            pg.destroy()


async def run(db: Database, frames: int) -> None:
    store = Store(db, queue_size=100_000)
    await store.open()
    try:
        await store.create_session("s", "rest", "local", {}, 1000.0)
        for i in range(frames):  # one frame every 0.5 s
            await store.add_frame("s", i, 1000.0 + i * 0.5, SUMMARY)
        await store.flush()
        t0 = time.perf_counter()
        report = await build(store)
        elapsed = time.perf_counter() - t0
        tracemalloc.start()
        await build(store)
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        summary = report["summary"]
        assert isinstance(summary, dict) and summary["frames_analysed"] == frames
        print(f"{db.dialect}, {frames} frames: report built in {elapsed:.2f} s, "
              f"peak memory {peak / 1e6:.1f} MB")
    finally:
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--postgres", action="store_true", help="on PostgreSQL, not SQLite")
    args = parser.parse_args()
    asyncio.run(main(args.frames, args.postgres))
