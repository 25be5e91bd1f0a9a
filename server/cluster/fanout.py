"""Socket.IO events between nodes: python-socketio's Redis manager, owned by the app.

Every node emits its sessions' events to their rooms as before; the manager delivers
them to this node's members of the room at once and publishes them on a Redis channel,
where every other node's listener delivers them to its own members. So a watcher on any
node receives every session's events, whichever node runs the session.

What this subclass changes:
- publishing never makes a session wait: `_publish` puts the message on a bounded queue
  that one task (ours, cancelled at close) sends to Redis in order. While Redis is down
  messages are dropped and counted (`proctor_cluster_fanout_dropped_total`) instead of
  piling up; local members got theirs already.
- the listener (python-socketio's `_redis_listen_with_retries`: on any error it
  reconnects and subscribes again after 1 s, doubling to at most 60 s while Redis stays
  down) is started with the app and cancelled at close, instead of at the first
  Socket.IO connection and never;
- connections time out (`socket_connect_timeout`) and keep TCP keepalive on; the
  listener's connection has no read timeout (a pub/sub read waits for the next message).

Redis pub/sub keeps nothing: events published while a node's listener is reconnecting
never reach that node's watchers. What they show is in the store (metrics, alerts,
reports are read on demand from any node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import socketio
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import asyncio as aioredis

log = logging.getLogger(__name__)

CHANNEL = "proctor-socketio"
CONNECT_TIMEOUT_S = 2.0
#: While Redis is down, one publish attempt per this many seconds; the rest are dropped.
RETRY_INTERVAL_S = 0.5
PING_CACHE_S = 1.0


class ClusterRedisManager(socketio.AsyncRedisManager):
    def __init__(self, url: str, queue_size: int, registry: CollectorRegistry) -> None:
        super().__init__(
            url,
            channel=CHANNEL,
            logger=log,
            redis_options={"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_keepalive": True},
        )
        self.queue_size = max(1, queue_size)
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._pub: aioredis.Redis | None = None
        self._last_failure = 0.0
        self.up: bool | None = None  # the last publish or ping: None before any
        self._pinged_at = 0.0
        self.dropped = Counter(
            "proctor_cluster_fanout_dropped",
            "Socket.IO events not sent to other nodes (Redis down, or the queue full)",
            registry=registry,
        )
        self.published = Counter(
            "proctor_cluster_fanout_published", "Socket.IO events sent to other nodes",
            registry=registry,
        )
        Gauge(
            "proctor_cluster_fanout_queue_depth", "Socket.IO events waiting for Redis",
            registry=registry,
        ).set_function(lambda: float(self._queue.qsize()) if self._queue else 0.0)
        Gauge("proctor_cluster_redis_up", "1 when Redis answered last", registry=registry
              ).set_function(lambda: 1.0 if self.up else 0.0)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start publishing and listening (the server is attached)."""
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._pub = aioredis.Redis.from_url(
            self.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=CONNECT_TIMEOUT_S,
            socket_keepalive=True,
        )
        self._publisher = asyncio.create_task(self._publish_loop(), name="fanout-publisher")
        if not self.server.manager_initialized:
            self.server.manager_initialized = True
            self.initialize()  # starts python-socketio's listener task (self.thread)
        await self.ping()

    async def close(self) -> None:
        """Send what is queued (briefly), then stop both tasks and the connections."""
        if self._queue is not None and self._publisher is not None and self.up is not False:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._queue.join()
        tasks = [t for t in (self._publisher, getattr(self, "thread", None)) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self._publisher = None
        for client in (self._pub, self.redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._pub = None

    # --- publishing --------------------------------------------------------------------

    async def _publish(self, data: Any) -> None:
        if self._queue is None:
            self.dropped.inc()
            return
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped.inc()

    async def _publish_loop(self) -> None:
        assert self._queue is not None and self._pub is not None
        while True:
            data = await self._queue.get()
            try:
                await self._send(data)
            finally:
                self._queue.task_done()

    async def _send(self, data: dict[str, Any]) -> None:
        assert self._pub is not None
        now = time.monotonic()
        if self.up is False and now - self._last_failure < RETRY_INTERVAL_S:
            self.dropped.inc()
            return
        try:
            await self._pub.publish(self.channel, self.json.dumps(data))
        except Exception as exc:
            self.dropped.inc()
            if self.up is not False:
                log.error("Redis is unreachable (%s): events reach other nodes again "
                          "once it is back", exc)
            self.up = False
            self._last_failure = now
            return
        if self.up is False:
            log.info("Redis is reachable again: events reach other nodes")
        self.up = True
        self.published.inc()

    # --- health ------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether Redis answers (cached for a second: /health is public)."""
        now = time.monotonic()
        if self._pub is None:
            return False
        if now - self._pinged_at < PING_CACHE_S and self.up is not None:
            return self.up
        self._pinged_at = now
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._pub.ping()
        except Exception:
            self.up = False
            self._last_failure = now
        else:
            self.up = True
        return self.up
