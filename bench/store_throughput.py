"""Frames written per second through the product's `Store`, on SQLite and on PostgreSQL
in the same run: `add_frame` for every frame, then `flush()`, the writer batching what is
queued (up to 500 statements a transaction) exactly as it does in the server.

    .venv/bin/python bench/store_throughput.py [--frames 20000] [--sessions 20]

Two write patterns: frames alone (a recorded video's backlog, or a bench), and frames as
live sessions write them, each followed by its session's counters update: all of one
session (the same row updated again and again), and interleaved over --sessions.
PostgreSQL is a private cluster this script starts (fsync on, like a real server) on
loopback, on a free port, in a temporary directory (tests/services.py's PostgresServer);
SQLite is a file in WAL mode in another temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_build import SUMMARY  # the same stored frame summary as the report bench

from server.session.database import Database
from server.session.postgres_database import PostgresDatabase
from server.session.sqlite_database import SQLiteDatabase
from server.session.store import Store
from tests.services import PG_BIN, PostgresServer


async def frames_per_second(db: Database, frames: int, counters: bool, sessions: int) -> float:
    # A generous flush bound: a large --frames backlog, written at once, can take longer
    # than the server's 10 s.
    store = Store(db, queue_size=100_000, flush_timeout_s=600.0)
    await store.open()
    try:
        ids = [f"s{n}" for n in range(sessions)]
        for sid in ids:
            await store.create_session(sid, "rest", "local", {}, 1000.0)
        await store.flush()
        t0 = time.perf_counter()
        for i in range(frames):
            # Frames interleaved over the sessions, as that many live sessions write them.
            sid, index = ids[i % sessions], i // sessions
            await store.add_frame(sid, index, 1000.0 + index * 0.5, SUMMARY)
            if counters:
                values = {"frames_analysed": index + 1}
                await store.update_counters(sid, values, 1000.0 + index * 0.5)
        await store.flush()
        elapsed = time.perf_counter() - t0
        assert store.health()["failed_writes"] == 0
        return frames / elapsed
    finally:
        await store.close()


async def main(frames: int, sessions: int) -> None:
    if not (PG_BIN / "initdb").is_file():
        sys.exit(f"PostgreSQL is not installed ({PG_BIN}): apt-get install postgresql")
    pg = PostgresServer()  # fsync on
    pg.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engines: dict[str, Callable[[str], Database]] = {
                "SQLite (WAL file)": lambda name: SQLiteDatabase(Path(tmp) / f"{name}.sqlite3"),
                "PostgreSQL 15 (loopback)": lambda name: PostgresDatabase(pg.create_database(name)),
            }
            print(f"{frames} frames, {len(str(SUMMARY))}-character summaries")
            head = f"frame + counters, 1 / {sessions} sessions"
            print(f"{'engine':<26} {'frames only':>14} {head:>34}")
            for label, make in engines.items():
                alone = await frames_per_second(make("alone"), frames, False, sessions)
                one = await frames_per_second(make("one"), frames, True, 1)
                many = await frames_per_second(make("many"), frames, True, sessions)
                print(f"{label:<26} {alone:>10,.0f} f/s {one:>14,.0f} / {many:>7,.0f} f/s")
    finally:
        pg.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=20, help="sessions the frames go to")
    args = parser.parse_args()
    asyncio.run(main(args.frames, args.sessions))
