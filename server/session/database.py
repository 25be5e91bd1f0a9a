"""What the store needs of a database: one interface, a driver per engine.

The store (`store.py`) owns the write queue, batching, retries and health; a driver owns
connections and turns the store's portable SQL into its engine's. The SQL is written once
with `?` placeholders and standard forms both engines accept (`INSERT ... ON CONFLICT
(...) DO UPDATE`, no `INSERT OR REPLACE`); a driver rewrites placeholders if its engine
needs another style. `sqlite_database.py` is the embedded default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

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
