"""What the store needs of a database: one interface, a driver per engine.

The store (`store.py`) owns the write queue, batching, retries and health; a driver owns
connections and turns the store's portable SQL into its engine's. The SQL is written once
with `?` placeholders and standard forms both engines accept (`INSERT ... ON CONFLICT
(...) DO UPDATE`, no `INSERT OR REPLACE`); a driver rewrites placeholders if its engine
needs another style. `sqlite_database.py` is the embedded default, `postgres_database.py`
the one several nodes share; `make_database` picks one from the settings (`DATABASE_URL`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from server.config import Settings

T = TypeVar("T")

#: One statement of a batch: portable SQL with `?` placeholders, and its parameters.
Statement = tuple[str, Sequence[Any]]
Row = Mapping[str, Any]


class StoreError(Exception):
    """A write the caller depends on was lost, a read failed, or the store did not answer
    in time."""


class Database(Protocol):
    #: "sqlite" or "postgresql": the few queries that differ look at it.
    dialect: str

    def describe(self) -> str:
        """Where the data lives, for logs and /health (never a password)."""
        ...

    async def open(self) -> list[int]:
        """Connect and bring the schema to the newest version; returns the migrations
        applied now. Raises `SchemaTooNew` for a database newer than this code."""
        ...

    async def close(self, wait: bool = True) -> None:
        """Release connections. `wait=False`: do not wait for a hung statement."""
        ...

    async def execute_batch(self, statements: Sequence[Statement]) -> None:
        """Run the statements in one transaction: all committed, or none."""
        ...

    async def fetch_all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        ...

    async def fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        ...

    async def scan(
        self,
        sql: str,
        params: Sequence[Any],
        consume: Callable[[Iterator[tuple[Any, ...]]], T],
    ) -> T:
        """Run `consume(rows)` in a worker thread over the query's rows, streamed from the
        cursor (never all in memory). A database error mid-stream surfaces from the
        iterator as `StoreError`."""
        ...

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed write may pass when retried (busy, locked, I/O, connection
        lost) rather than being refused by the database (a constraint, bad SQL)."""
        ...

    def is_read_error(self, exc: BaseException) -> bool:
        """Whether an exception raised by a read came from the database (it becomes a
        `StoreError`) rather than from our own code."""
        ...


# --- SQL text ---------------------------------------------------------------------------

#: String literals, quoted identifiers and comments: the parts of a statement a rewrite
#: (placeholders, type names) must leave alone.
_OPAQUE = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/""", re.S)


def rewrite_code(sql: str, rewrite: Callable[[str], str]) -> str:
    """`sql` with `rewrite` applied to each stretch of code outside literals, quoted
    identifiers and comments (which are kept as they are)."""
    out: list[str] = []
    pos = 0
    for m in _OPAQUE.finditer(sql):
        out.append(rewrite(sql[pos : m.start()]))
        out.append(m.group())
        pos = m.end()
    out.append(rewrite(sql[pos:]))
    return "".join(out)


# --- choosing the engine ------------------------------------------------------------------


def database_kind(url: str) -> tuple[str, str]:
    """("sqlite", path) or ("postgresql", url) for a `DATABASE_URL`; "" is ("sqlite", "")
    (the file `DATABASE_PATH` names). Raises ValueError for anything else."""
    url = url.strip()
    if not url:
        return "sqlite", ""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        if not url[len(scheme) :].startswith("://"):
            raise ValueError("a PostgreSQL DATABASE_URL looks like postgresql://user@host/db")
        return "postgresql", url
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ValueError(
                "a SQLite DATABASE_URL is sqlite:///relative/path or sqlite:////absolute/path"
            )
        return "sqlite", url[len("sqlite:///") :]
    raise ValueError(
        f"DATABASE_URL must be empty (SQLite at DATABASE_PATH), sqlite:///path or "
        f"postgresql://user:password@host:port/database, not a {scheme!r} URL"
    )


def make_database(settings: Settings) -> Database:
    """The database `DATABASE_URL` names (SQLite at `DATABASE_PATH` when it is empty)."""
    kind, where = database_kind(settings.database_url)
    if kind == "postgresql":
        from server.session.postgres_database import PostgresDatabase

        return PostgresDatabase(
            where,
            min_size=settings.database_pool_min_size,
            max_size=settings.database_pool_max_size,
            timeout_s=settings.database_timeout_s,
        )
    from server.session.sqlite_database import SQLiteDatabase

    return SQLiteDatabase(Path(where) if where else settings.database_path)
