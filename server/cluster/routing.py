"""This node in a cluster: identity, lease, fan-out and forwarding, and the one question
every transport asks of it — is this session someone else's, and whose?

A session belongs to the node that started it, for its whole life (`sessions.node_id`).
A request naming a session this node does not run live is looked up in the store: a live
session of another node whose lease holds is forwarded to it; one whose owner's lease
lapsed is answered 503 `owner_unavailable` until a reaper marks it interrupted, then
like any ended session (409, or its report) by this node itself. Ended, interrupted
and unknown sessions are answered here from the store. Owners never change, so a
session's owner is cached once seen.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Gauge

from server.cluster.fanout import ClusterRedisManager
from server.cluster.forwarding import (
    Answer,
    Forwarder,
    OwnerUnavailable,
    forwarded,
)
from server.cluster.leases import LeaseKeeper, Peer
from server.cluster.node import ClusterConfigError, NodeIdentity
from server.config import Settings
from server.observability import Instruments
from server.session.store import StoreError
from server.signaling.http_api import DEFAULT_BODY_MAX, read_body

if TYPE_CHECKING:
    from server.session.manager import SessionManager

log = logging.getLogger(__name__)

OWNER_CACHE_MAX = 100_000


def check_cluster_settings(settings: Settings) -> None:
    """Raises ClusterConfigError (a ConfigError) for cluster settings that cannot work."""
    if not settings.cluster_secret:
        raise ClusterConfigError(
            "REDIS_URL is set but CLUSTER_SECRET is not: every node needs the same "
            "CLUSTER_SECRET to sign the requests it forwards to the others"
        )
    if settings.node_lease_s < 0.3:
        raise ClusterConfigError("NODE_LEASE_S must be at least 0.3 s")


class ClusterNode:
    def __init__(
        self,
        settings: Settings,
        identity: NodeIdentity,
        manager: SessionManager,
        instruments: Instruments,
    ) -> None:
        check_cluster_settings(settings)
        self.settings = settings
        self.identity = identity
        self.manager = manager
        registry = instruments.registry
        Gauge(
            "proctor_cluster_node_info", "This node (value 1)", ["node_id", "tag"],
            registry=registry,
        ).labels(node_id=identity.node_id, tag=identity.tag).set(1)
        self.leases = LeaseKeeper(
            identity, manager.store, settings.node_lease_s, registry,
            live_ids=lambda: [s.id for s in manager.live_sessions()],
            abandon=self._abandon,
        )
        self.forwarder = Forwarder(
            identity.node_id, settings.cluster_secret, settings.cluster_connect_timeout_s,
            max(1, round(settings.node_lease_s)), registry,
        )
        self.fanout = ClusterRedisManager(settings.redis_url, settings.fanout_queue_size,
                                          registry)
        self._owners: OrderedDict[str, str] = OrderedDict()

    # --- lifecycle (the store is open before start; sessions have ended before stop) ------

    async def start(self) -> None:
        await self.forwarder.start()
        await self.fanout.start()
        await self.leases.start()

    async def leave(self) -> None:
        """Give the lease back: before the store closes, after sessions have ended."""
        await self.leases.stop()

    async def close(self) -> None:
        await self.fanout.close()
        await self.forwarder.close()

    async def _abandon(self, session_ids: list[str]) -> None:
        for sid in session_ids:
            await self.manager.suspend_session(sid, "node_lost")

    # --- whose session is it ----------------------------------------------------------

    async def owner_of(self, session_id: object, request: web.Request | None = None) -> Peer | None:
        """The peer that runs `session_id` live, when it is not this node; None: answer
        here. Raises OwnerUnavailable when its owner is live in the store but holds no
        lease (dead, not yet reaped)."""
        if not isinstance(session_id, str) or not session_id or len(session_id) > 128:
            return None
        if self.manager.has_live(session_id):
            return None
        if request is not None and forwarded(request) is not None:
            return None  # forwarded to us: never forwarded again (no loops)
        node_id = self._owners.get(session_id)
        if node_id is None:
            try:
                found = await self.manager.store.session_owner(session_id)
            except StoreError:
                return None  # answered here: the store's own error follows
            if found is None:
                return None
            node_id, status = found
            if status != "live" or node_id is None or node_id == self.identity.node_id:
                return None
            self._remember(session_id, node_id)
        if node_id == self.identity.node_id:
            return None
        peer = await self.leases.peer(node_id)
        if peer is not None and peer.alive():
            return peer
        # Dead or gone: once a reaper has marked it interrupted it is answered here.
        try:
            found = await self.manager.store.session_owner(session_id)
        except StoreError:
            found = ("", "live")
        if found is None or found[1] != "live":
            self._owners.pop(session_id, None)
            return None
        error = OwnerUnavailable(
            f"the node running this session ({node_id}) holds no lease; it is marked "
            "interrupted within NODE_LEASE_S"
        )
        error.retry_after_s = max(1, round(self.settings.node_lease_s))
        raise error

    def _remember(self, session_id: str, node_id: str) -> None:
        self._owners[session_id] = node_id
        while len(self._owners) > OWNER_CACHE_MAX:
            self._owners.popitem(last=False)

    # --- forwarding ---------------------------------------------------------------------

    def timeout_for(self, kind: str) -> float:
        s = self.settings
        if kind == "frame":
            return s.analyser_timeout_s + s.store_flush_timeout_s + 5.0
        if kind in ("end", "erase"):  # stop the worker, build the report (and narrative)
            return s.analyser_timeout_s + s.llm_timeout_s + 2 * s.store_flush_timeout_s + 10.0
        if kind == "offer":
            return 30.0
        return 10.0

    async def forward(
        self,
        request: web.Request,
        kind: str,
        max_body: int = DEFAULT_BODY_MAX,
        too_large_code: str = "request_too_large",
    ) -> web.Response | None:
        """The owner's answer to a REST request naming a session (`{session_id}` in its
        path) another node runs, its body read under the route's own limit first; None:
        answer here. Call it after authorising the request."""
        session_id = request.match_info.get("session_id")
        if not session_id or self.manager.has_live(session_id):
            return None
        peer = await self.owner_of(session_id, request)
        if peer is None:
            return None
        body = await read_body(request, max_body, too_large_code)
        return await self.proxy(request, peer, body, kind)

    async def proxy(
        self, request: web.Request, peer: Peer, body: bytes | None, kind: str
    ) -> web.Response:
        return await self.forwarder.proxy(
            request, peer.address, body, kind=kind, timeout_s=self.timeout_for(kind)
        )

    async def call(
        self,
        peer: Peer,
        method: str,
        path: str,
        *,
        kind: str,
        token: str | None,
        client: str | None,
        host: str,
        scheme: str,
        body: bytes | None = None,
    ) -> Answer:
        """A Socket.IO event passed to the owner as its REST request (`via` socketio)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return await self.forwarder.send(
            peer.address, method, path, kind=kind, timeout_s=self.timeout_for(kind),
            client=client or "", host=host, scheme=scheme, via="socketio",
            headers=headers, body=body,
        )

    # --- health -------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        redis_ok = await self.fanout.ping()
        lease = self.leases.to_json()
        return {
            "node": self.identity.to_json(),
            "redis": "ok" if redis_ok else "down",
            "lease": lease,
            "peers_alive": sum(1 for p in lease["peers"] if p["alive"]),
            "healthy": redis_ok and lease["state"] == "held",
        }


CLUSTER = web.AppKey("cluster", ClusterNode)


async def forward_to_owner(
    request: web.Request,
    kind: str,
    max_body: int = DEFAULT_BODY_MAX,
    too_large_code: str = "request_too_large",
) -> web.Response | None:
    """For a handler of a route with `{session_id}`, after it has authorised the request:
    the owner's answer when another node of the cluster runs that session, else None."""
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        return None
    return await cluster.forward(request, kind, max_body, too_large_code)
