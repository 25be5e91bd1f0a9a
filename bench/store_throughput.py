"""Frames written per second through the product's `Store`, on SQLite and on PostgreSQL
in the same run: `add_frame` for every frame, then `flush()`, the writer batching what is
queued (up to 500 statements a transaction) exactly as it does in the server.

    .venv/bin/python bench/store_throughput.py [--frames 20000]

Two write patterns: frames alone (a recorded video's backlog, or a bench), and frames as
a live session writes them, each followed by its session's counters update. PostgreSQL is
a private cluster this script starts (fsync on, like a real server) on loopback, on a free
port, in a temporary directory (tests/services.py's PostgresServer); SQLite is a file in
WAL mode in another temporary directory.
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


async def frames_per_second(db: Database, frames: int, counters: bool) -> float:
    store = Store(db, queue_size=100_000)
    await store.open()
    try:
        await store.create_session("s", "rest", "local", {}, 1000.0)
        await store.flush()
        t0 = time.perf_counter()
        for i in range(frames):
            await store.add_frame("s", i, 1000.0 + i * 0.5, SUMMARY)
            if counters:
                await store.update_counters("s", {"frames_analysed": i + 1}, 1000.0 + i * 0.5)
        await store.flush()
        elapsed = time.perf_counter() - t0
        assert store.health()["failed_writes"] == 0
        return frames / elapsed
    finally:
        await store.close()


async def main(frames: int) -> None:
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
            print(f"{'engine':<26} {'frames only':>14} {'frame + counters':>18}")
            for label, make in engines.items():
                alone = await frames_per_second(make("alone"), frames, counters=False)
                mixed = await frames_per_second(make("mixed"), frames, counters=True)
                print(f"{label:<26} {alone:>10,.0f} f/s {mixed:>14,.0f} f/s")
    finally:
        pg.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().frames))
