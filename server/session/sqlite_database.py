"""The embedded default database: one SQLite file in WAL mode.

Writes run on one writer thread with one connection (SQLite has one writer anyway);
reads open short-lived connections in worker threads, which WAL lets run beside the
writer. The event loop never touches the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from server.session.database import Row, Statement, StoreError
from server.session.migrations import migrate

T = TypeVar("T")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    # Switching a new file to WAL answers "locked" at once, without the busy timeout,
    # while another process opens it at the same moment: try again for a while.
    for attempt in range(100):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                conn.close()
                raise
            time.sleep(0.05)
    conn.execute("PRAGMA synchronous=NORMAL")
    # Erased sessions (DELETE /api/sessions/{id}, retention) are overwritten with zeros,
    # not left readable in free pages of the file.
    conn.execute("PRAGMA secure_delete=ON")
    conn.row_factory = sqlite3.Row
    return conn


class SQLiteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._conn: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    async def open(self) -> list[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._writer_thread, _connect, self.path)
        return await loop.run_in_executor(self._writer_thread, migrate, self._conn)

    async def close(self, wait: bool = True) -> None:
        if wait and self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._writer_thread, conn.close)
        # A writer thread stuck in SQLite must not block the event loop on its way out.
        self._writer_thread.shutdown(wait=wait)

    async def execute_batch(self, statements: Sequence[Statement]) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._writer_thread, self._commit, list(statements)
        )

    def _commit(self, batch: list[Statement]) -> None:
        """On the writer thread: one transaction. Tests override it to fake a bad disk."""
        assert self._conn is not None, "database not open"
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

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._read(lambda conn: conn.execute(sql, params).fetchall())

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self._read(lambda conn: conn.execute(sql, params).fetchone())
        return row

    async def scan(
        self,
        sql: str,
        params: Sequence[Any],
        consume: Callable[[Iterator[tuple[Any, ...]]], T],
    ) -> T:
        def q(conn: sqlite3.Connection) -> T:
            cursor = conn.execute(sql, params)

            def stream() -> Iterator[tuple[Any, ...]]:
                try:
                    for r in cursor:
                        yield tuple(r)
                except sqlite3.Error as exc:  # tells the consumer's bugs from the store's
                    raise StoreError(f"store read failed: {exc}") from exc

            return consume(stream())

        return await self._read(q)

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)  # busy, locked, I/O, disk full

    def is_read_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)
