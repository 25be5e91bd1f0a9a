"""The Redis-backed parts of a cluster node, built together by the composition root when
REDIS_URL is set: the link, the shared call budget, the shared spend counters and the
video job queue, and what /health says about them."""

from __future__ import annotations

from typing import Any

from server.cluster.redis_link import RedisLink
from server.cluster.shared_budget import SharedBudget
from server.cluster.shared_spend import SharedCounters
from server.cluster.video_queue import VideoQueue
from server.config import Settings
from server.observability import Instruments


class RedisParts:
    def __init__(
        self, settings: Settings, instruments: Instruments, node_id: str | None = None
    ) -> None:
        """`node_id`: this node's NODE_ID (default: host, pid and a random tail)."""
        self.link = RedisLink(settings, instruments, node_id)
        self.budget = SharedBudget(
            settings.analyser_calls_per_s,
            self.link,
            instruments,
            size_hint=settings.cluster_size_hint,
        )
        self.counters = SharedCounters(self.link)
        self.queue = VideoQueue(self.link, settings, instruments)

    async def start(self) -> None:
        """After the store, the spend caps and the video jobs are started: the first
        successful ping runs their resync (seeding counters, enqueueing queued jobs)."""
        await self.link.start()

    async def stop(self) -> None:
        await self.link.stop()

    @property
    def up(self) -> bool:
        return self.link.up

    def health(self) -> dict[str, Any]:
        b = self.budget
        return {
            **self.link.to_json(),
            "budget": {
                "mode": b.mode,
                "rate_per_s": b.rate_per_s,
                "fallback_rate_per_s": round(b.fallback_rate_per_s, 3),
                "fallbacks": b.fallbacks,
            },
            "spend": "shared" if self.link.up else "local-fallback",
            "video_queue": self.queue.to_json(),
        }
