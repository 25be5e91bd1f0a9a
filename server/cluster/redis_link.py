"""One node's link to Redis (REDIS_URL): the client every cluster module uses, whether
Redis answers now, and what runs each time it comes back.

Redis is a helper, never a single point of failure: a command that fails marks the link
down (logged once per outage, counted), each user falls back to what it can do alone
(a local share of the budget, store-based spend caps, jobs kept `queued` in the store),
and a monitor task pings every REDIS_PING_INTERVAL_S. When a ping succeeds again the
link is up and the callbacks registered with `on_up` run (in that task, one after the
other): seeding counters from the store, re-enqueueing the jobs the store says are
queued. They run at the first successful ping after start too, and when Redis is found
to have lost its data (a restart between two pings, without persistence) although no
command failed.

The monitor also keeps this node in a small registry (a sorted set of node ids scored by
their last ping), so a node knows how many peers were alive when Redis went away: its
fallback budget divides by that many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.config import Settings
from server.observability import Instruments

log = logging.getLogger(__name__)

#: Everything a Redis command can raise when Redis is unreachable or misbehaving.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
#: Of those, the ones that mean "Redis is not reachable now" (the link goes down).
LINK_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)
#: Key prefix of everything this server keeps in Redis.
PREFIX = "proctor:"
NODES_KEY = PREFIX + "nodes"
#: A value the first node writes; a different one later means Redis lost its data (a
#: restart without persistence, a flush) even if no command failed meanwhile.
EPOCH_KEY = PREFIX + "epoch"

UpCallback = Callable[[], Awaitable[None]]
Probe = Callable[[Redis], Awaitable[None]]


def redact(url: str) -> str:
    """The URL without its password (for logs and /health)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable REDIS_URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def make_node_id() -> str:
    """Unique per process: host, pid and a random tail (a restarted node is a new one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class RedisLink:
    def __init__(
        self, settings: Settings, instruments: Instruments, node_id: str | None = None
    ) -> None:
        self.settings = settings
        self.instruments = instruments
        self.node_id = node_id or make_node_id()
        self.display_url = redact(settings.redis_url)
        timeout = max(0.05, settings.redis_timeout_s)
        # One retry on a fresh connection: after a Redis restart every pooled connection
        # is stale, and the first command on each would fail otherwise.
        self.pool = ConnectionPool.from_url(
            settings.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            max_connections=64,
        )
        self.client: Redis = Redis(connection_pool=self.pool)
        self.up = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.down_since: float | None = time.time()
        self.outages = 0
        #: Nodes seen alive in the registry at the last successful ping (this one too).
        self.nodes_seen = 1
        self._on_up: list[UpCallback] = []
        self._probes: list[Probe] = []
        self._monitor: asyncio.Task[None] | None = None
        self._became_up = asyncio.Event()
        self._checked_once = False
        self._epoch: bytes | None = None
        self.data_losses = 0
        instruments.redis_up.set(0)

    # --- registration ----------------------------------------------------------------

    def on_up(self, callback: UpCallback) -> None:
        """Run `callback` each time Redis becomes reachable (at start too)."""
        self._on_up.append(callback)

    def add_probe(self, probe: Probe) -> None:
        """Run `probe(client)` at each ping while up (e.g. to cache a queue depth)."""
        self._probes.append(probe)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """One check now (so the app starts knowing where it stands), then the monitor.
        An unreachable Redis does not stop the start: the node runs on its fallbacks."""
        await self._check()
        if not self.up:
            log.warning(
                "Redis at %s is not reachable (%s): running on local fallbacks until it is",
                self.display_url,
                self.last_error,
            )
        self._monitor = asyncio.create_task(self._watch(), name="redis-link")

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.wait({self._monitor}, timeout=2.0)
            self._monitor = None
        with contextlib.suppress(*REDIS_ERRORS):
            async with asyncio.timeout(1.0):
                await self.client.zrem(NODES_KEY, self.node_id)
        with contextlib.suppress(Exception):
            await self.client.aclose()
            await self.pool.disconnect()
        self.instruments.redis_up.set(0)

    @property
    def checked(self) -> bool:
        """Has the link been tried at least once (before that, `up` means nothing)?"""
        return self._checked_once

    async def wait_up(self) -> None:
        while not self.up:
            self._became_up.clear()
            await self._became_up.wait()

    # --- state -------------------------------------------------------------------------

    def failed(self, where: str, exc: BaseException) -> None:
        """A Redis command of `where` failed: counted; the link goes down when the error
        says Redis is unreachable (logged once per outage)."""
        self.instruments.redis_errors.labels(where=where).inc()
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self.last_error_at = time.time()
        if not isinstance(exc, LINK_ERRORS):
            log.error("Redis command of %s failed: %s", where, self.last_error)
            return
        if self.up:
            self.up = False
            self.down_since = time.time()
            self.outages += 1
            self.instruments.redis_up.set(0)
            log.warning(
                "Redis at %s unreachable (%s, from %s): local fallbacks until it is back",
                self.display_url,
                self.last_error,
                where,
            )

    async def _check(self) -> None:
        now = time.time()
        stale = now - max(3 * self.settings.redis_ping_interval_s, 5.0)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.zadd(NODES_KEY, {self.node_id: now})
                pipe.zremrangebyscore(NODES_KEY, "-inf", stale)
                pipe.zcard(NODES_KEY)
                pipe.expire(NODES_KEY, 3600)
                pipe.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
                pipe.get(EPOCH_KEY)
                replies = await pipe.execute()
            self.nodes_seen = max(1, int(replies[3]))
            epoch, self._epoch = self._epoch, replies[6]
            lost = epoch is not None and epoch != self._epoch
            for probe in self._probes:
                await probe(self.client)
        except REDIS_ERRORS as exc:
            self.failed("link", exc)
            if not self._checked_once:
                self._checked_once = True
                self.up = False
                self.instruments.redis_up.set(0)
            return
        first = not self._checked_once
        self._checked_once = True
        if not self.up:
            self.up = True
            self.down_since = None
            self.instruments.redis_up.set(1)
            self._became_up.set()
            if not first:
                log.info("Redis at %s is reachable again", self.display_url)
            await self._run_on_up()
        elif lost:
            self.data_losses += 1
            log.warning(
                "Redis at %s lost its data (restarted?): counters and queue rebuilt from the store",
                self.display_url,
            )
            await self._run_on_up()

    async def _run_on_up(self) -> None:
        for callback in self._on_up:
            try:
                await callback()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failing callback must not stop the others
                if isinstance(exc, REDIS_ERRORS):
                    self.failed("link", exc)
                else:
                    log.exception("a Redis reconnect task failed")
                    self.instruments.internal_errors.labels(where="redis_link").inc()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.redis_ping_interval_s)
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must keep monitoring
                log.exception("Redis link monitor error")
                self.instruments.internal_errors.labels(where="redis_link").inc()

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.display_url,
            "status": "ok" if self.up else "down",
            "node": self.node_id,
            "nodes_seen": self.nodes_seen,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "down_since": self.down_since,
            "outages": self.outages,
            "data_losses": self.data_losses,
        }
