"""PostgreSQL, for several nodes sharing one store (`DATABASE_URL=postgresql://...`).

asyncpg with a connection pool; the store's portable SQL (`?` placeholders) is rewritten to
PostgreSQL's `$1, $2, ...` once per statement text. A batch is one transaction on one
connection, consecutive runs of the same statement sent together (`executemany`, one
round trip). `scan` streams a server-side cursor into the consumer's worker thread a chunk
at a time, so a long session's frames are never all in memory.

After a lost connection (PostgreSQL restarted, a failover, a network cut) every pooled
connection is expired: the store's retry of the failed batch, and everything after it,
gets a fresh connection instead of another dead one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import asyncpg
import asyncpg.exceptions as pg
from asyncpg.pool import PoolConnectionProxy

from server.session.database import Row, Statement, StoreError, rewrite_code
from server.session.migrations import migrate_postgres

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Frame rows per cursor fetch: the bridge to the consumer holds at most two such chunks.
SCAN_CHUNK = 500

#: Errors after which the same statement may pass on another try: the connection was lost
#: or refused (08, 57P01-3: shut down, starting up), the server lacked resources (53: too
#: many connections, disk full), a transaction lost a race (40: serialization failure,
#: deadlock), a lock or statement timed out (55P03, 57014), or a cached plan went stale
#: because another node changed the schema.
_TRANSIENT = (
    pg.PostgresConnectionError,
    pg.OperatorInterventionError,
    pg.InsufficientResourcesError,
    pg.TransactionRollbackError,
    pg.LockNotAvailableError,
    pg.InvalidCachedStatementError,
    pg.PostgresSystemError,  # 58: I/O error on the server
    OSError,  # refused, reset, unreachable; TimeoutError is one too
)

#: Errors that mean this connection (and, likely, its pool mates) is gone.
_CONNECTION_LOST = (
    pg.PostgresConnectionError,
    pg.AdminShutdownError,
    pg.CrashShutdownError,
    pg.CannotConnectNowError,
    OSError,
)


def _closed_under_us(exc: BaseException) -> bool:
    """asyncpg's InterfaceError for a connection that closed while in use (it has no
    class of its own)."""
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


@functools.lru_cache(maxsize=1024)
def to_postgres(sql: str) -> str:
    """`?` placeholders as `$1, $2, ...` (not inside literals, quoted names or comments)."""
    numbers = itertools.count(1)
    return rewrite_code(sql, lambda code: re.sub(r"\?", lambda _m: f"${next(numbers)}", code))


def _gone(conn: asyncpg.Connection | PoolConnectionProxy) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # a pool's proxy, terminated and so given back already
        return True


@contextlib.asynccontextmanager
async def _transaction(
    conn: asyncpg.Connection | PoolConnectionProxy, readonly: bool = False
) -> AsyncIterator[None]:
    """`conn.transaction()`, except that an error inside it is what the caller sees: on a
    connection that was lost (or cut on purpose) there is nothing to roll back, and
    asyncpg's own context manager would replace the error with "connection is closed"."""
    tx = conn.transaction(readonly=readonly)
    await tx.start()
    try:
        yield
    except BaseException:
        if not _gone(conn):
            try:
                await tx.rollback()
            except Exception:  # the first error is the one that matters
                conn.terminate()  # in no state to go back to the pool
        raise
    else:
        await tx.commit()


def redact(url: str) -> str:
    """The URL without its password (in the netloc or as a `password=` parameter)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "postgresql://(unparsable URL)"
    user = unquote(parts.username) if parts.username else ""
    host = f"[{host}]" if ":" in host else host
    netloc = (f"{user}@" if user else "") + host + (f":{port}" if port else "")
    return f"postgresql://{netloc}{parts.path}"


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout_s: float = 10.0,
        scan_chunk: int = SCAN_CHUNK,
    ) -> None:
        self.url = url
        self.min_size = max(0, min_size)
        self.max_size = max(1, max_size, self.min_size)
        self.timeout_s = timeout_s
        self.scan_chunk = max(1, scan_chunk)
        self._pool: asyncpg.Pool | None = None

    def describe(self) -> str:
        return redact(self.url)

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> list[int]:
        # Migrations on a connection of their own, with no statement timeout: an index
        # on a large table may take longer than any ordinary statement should.
        conn = await self._connect_at_start()
        try:
            applied = await migrate_postgres(conn)
        finally:
            await conn.close(timeout=self.timeout_s)
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.timeout_s,  # connecting
            command_timeout=self.timeout_s,  # each statement
        )
        return applied

    async def _connect_at_start(self) -> asyncpg.Connection:
        """A first connection, waiting up to the timeout for a server that is starting
        too (refused, "the database system is starting up"); then a StoreError that says
        which database could not be reached."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                return await asyncpg.connect(self.url, timeout=self.timeout_s, command_timeout=None)
            except Exception as exc:
                if self.is_transient(exc) and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                raise StoreError(
                    f"cannot connect to {self.describe()}: {type(exc).__name__}: {exc}"
                ) from exc

    async def close(self, wait: bool = True) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if wait:
            try:
                await asyncio.wait_for(pool.close(), self.timeout_s)
                return
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("PostgreSQL pool did not close cleanly; terminating it")
        pool.terminate()  # a hung statement must not hold the process

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise asyncpg.InterfaceError("database not open")
        return self._pool

    async def _after_error(self, exc: BaseException) -> None:
        lost = isinstance(exc, _CONNECTION_LOST) or _closed_under_us(exc)
        if lost and self._pool is not None:
            # The server went away: its other connections are as dead as this one. Each
            # is closed when next acquired (or released) and a new one made in its place.
            await self._pool.expire_connections()

    # --- statements -------------------------------------------------------------------

    async def execute_batch(self, statements: Sequence[Statement]) -> None:
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self.timeout_s) as conn, _transaction(conn):
                for sql, group in itertools.groupby(statements, key=lambda s: s[0]):
                    params = [tuple(p) for _, p in group]
                    if len(params) == 1:
                        await conn.execute(to_postgres(sql), *params[0])
                    else:
                        await conn.executemany(to_postgres(sql), params)
        except BaseException as exc:
            await self._after_error(exc)
            raise

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self.timeout_s) as conn:
                # Records are read by column name like the mappings the store expects.
                return cast(list[Row], await conn.fetch(to_postgres(sql), *params))
        except BaseException as exc:
            await self._after_error(exc)
            raise

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self.timeout_s) as conn:
                return cast(Row | None, await conn.fetchrow(to_postgres(sql), *params))
        except BaseException as exc:
            await self._after_error(exc)
            raise

    async def scan(
        self,
        sql: str,
        params: Sequence[Any],
        consume: Callable[[Iterator[tuple[Any, ...]]], T],
    ) -> T:
        """The consumer pulls chunks from a server-side cursor: while it works through
        one chunk the next is being fetched (at most two in memory, however many rows)."""
        pool = self._require_pool()
        loop = asyncio.get_running_loop()
        chunk = self.scan_chunk
        # The fetch in flight, if any, as the consumer thread left it.
        pending: list[concurrent.futures.Future[list[asyncpg.Record]]] = []
        try:
            async with pool.acquire(timeout=self.timeout_s) as conn:
                async with _transaction(conn, readonly=True):
                    cursor = await conn.cursor(to_postgres(sql), *params)

                    def fetch() -> concurrent.futures.Future[list[asyncpg.Record]]:
                        future = asyncio.run_coroutine_threadsafe(
                            cursor.fetch(chunk, timeout=self.timeout_s), loop
                        )
                        pending[:] = [future]
                        return future

                    def rows() -> Iterator[tuple[Any, ...]]:
                        future = fetch()
                        while True:
                            try:
                                batch = future.result()
                            except Exception as exc:  # tells the consumer's bugs from ours
                                raise StoreError(
                                    f"store read failed: {type(exc).__name__}: {exc}"
                                ) from exc
                            pending.clear()
                            if len(batch) == chunk:  # maybe more: fetch while this is read
                                future = fetch()
                            for r in batch:
                                yield tuple(r)
                            if len(batch) < chunk:
                                return

                    try:
                        return await asyncio.to_thread(consume, rows())
                    except asyncio.CancelledError:
                        # The thread may still be reading: cut the connection under it
                        # (its next fetch fails) rather than hand it back mid-cursor.
                        conn.terminate()
                        raise
                    finally:
                        if pending:  # the consumer stopped early: let the last fetch end
                            with_pending = asyncio.wrap_future(pending[0])
                            await asyncio.gather(with_pending, return_exceptions=True)
        except BaseException as exc:
            await self._after_error(exc)
            raise

    # --- errors -----------------------------------------------------------------------

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, _TRANSIENT) or _closed_under_us(exc)

    def is_read_error(self, exc: BaseException) -> bool:
        return isinstance(
            exc,
            asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError | OSError,
        )
