"""Leases: each node renews one row in the shared store's `nodes` table every
NODE_LEASE_S / 3 (`lease_until` = now + NODE_LEASE_S); a session is alive while its
owner's lease is. One lease per node, not per session: sessions never move between live
nodes (their media and worker are in the owner's memory), so a node's liveness is all a
session's needs, and renewing costs one write per node however many sessions it runs.

The reaper runs on every node (no leader: its UPDATE changes only rows still `live`, so
nodes reaping the same dead peer agree): live sessions whose owner holds no lease become
`interrupted` (end_reason `node_lost`), their frames, alerts and reports untouched, so
their report is built from the store by whichever node is asked. A node reaps only once
its own renewals have succeeded for a whole lease: after an outage of the store every
lease has lapsed, and a node that came back first must give its live peers one lease to
renew before it judges them.

A node whose renewals failed for longer than its lease may have been reaped while it was
cut off: once renewals succeed again it drops (suspends) the sessions the store no longer
lists as live, so a session never has two owners.

Leases compare the owner's clock with the reaper's: node clocks must agree within a small
fraction of NODE_LEASE_S (NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from server.cluster.node import NodeIdentity
from server.session.store import Store, StoreError

log = logging.getLogger(__name__)

REAP_REASON = "node_lost"
#: Nodes gone this long (and owning no live session) are forgotten.
FORGET_AFTER_S = 3600.0


@dataclass(frozen=True)
class Peer:
    node_id: str
    address: str
    incarnation: str
    started_at: float
    renewed_at: float
    lease_until: float

    def alive(self, now: float | None = None) -> bool:
        return self.lease_until >= (time.time() if now is None else now)


#: Told the ids of this node's sessions that peers marked interrupted while its lease
#: had lapsed; drops them from memory.
AbandonHook = Callable[[list[str]], Awaitable[None]]


class LeaseKeeper:
    def __init__(
        self,
        identity: NodeIdentity,
        store: Store,
        lease_s: float,
        registry: CollectorRegistry,
        *,
        live_ids: Callable[[], list[str]],
        abandon: AbandonHook,
    ) -> None:
        self.identity = identity
        self.store = store
        self.lease_s = lease_s
        self.interval_s = lease_s / 3
        self._live_ids = live_ids
        self._abandon = abandon
        self.peers: dict[str, Peer] = {}
        self.renewed_at: float | None = None  # the last renewal that succeeded
        self.lease_until = 0.0
        self.healthy_since: float | None = None  # renewals succeeding since then
        self.last_error: str | None = None
        self.conflict: str | None = None  # another process renewing our NODE_ID
        self._task: asyncio.Task[None] | None = None
        self.reaped = Counter(
            "proctor_cluster_sessions_reaped",
            "Live sessions of nodes whose lease lapsed, marked interrupted by this node",
            registry=registry,
        )
        self.abandoned = Counter(
            "proctor_cluster_sessions_abandoned",
            "Sessions this node dropped because peers reaped them while its lease had lapsed",
            registry=registry,
        )
        self.renew_failures = Counter(
            "proctor_cluster_lease_renew_failures", "Lease renewals that failed",
            registry=registry,
        )
        Gauge(
            "proctor_cluster_lease_age_seconds",
            "Seconds since this node's lease was last renewed",
            registry=registry,
        ).set_function(lambda: -1.0 if self.renewed_at is None else time.time() - self.renewed_at)
        Gauge(
            "proctor_cluster_peers_alive",
            "Other nodes holding a lease",
            registry=registry,
        ).set_function(lambda: float(len(self.alive_peers())))

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take the lease (the store is open) and start renewing and reaping."""
        await self._renew()
        await self._refresh()
        self._task = asyncio.create_task(self._run(), name="cluster-leases")
        log.info("node %s (%s) joined the cluster: %d other node(s) alive",
                 self.identity.node_id, self.identity.address, len(self.alive_peers()))

    async def stop(self) -> None:
        """Stop renewing and give the lease back (sessions have ended by now)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        try:
            async with asyncio.timeout(2.0):
                await self.store.remove_node(self.identity.node_id, self.identity.incarnation)
        except (StoreError, TimeoutError) as exc:
            log.warning("could not give the lease back (%s); it lapses by itself", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:  # the lease must keep being renewed
                log.exception("lease keeping failed")

    async def tick(self) -> None:
        lapsed_before = self.renewed_at is None or (
            time.time() - self.renewed_at > self.lease_s
        )
        if not await self._renew():
            return
        if lapsed_before:
            await self._check_abandoned()
        await self._refresh()
        await self.reap()

    # --- renewing ----------------------------------------------------------------------

    async def _renew(self) -> bool:
        now = time.time()
        ident = self.identity
        try:
            await self.store.renew_node(
                ident.node_id, ident.address, ident.incarnation, ident.started_at, now,
                now + self.lease_s,
            )
        except Exception as exc:  # StoreError, or any failure: the lease is at risk
            self.renew_failures.inc()
            self.healthy_since = None
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("lease renewal failed (%s); it lapses at %.0f", exc, self.lease_until)
            return False
        if self.healthy_since is None:
            self.healthy_since = now
        self.renewed_at = now
        self.lease_until = now + self.lease_s
        return True

    async def _refresh(self) -> None:
        rows = await self.store.nodes()
        peers: dict[str, Peer] = {}
        for row in rows:
            peer = Peer(
                str(row["node_id"]), str(row["address"]), str(row["incarnation"]),
                float(row["started_at"]), float(row["renewed_at"]), float(row["lease_until"]),
            )
            if peer.node_id == self.identity.node_id:
                if peer.incarnation != self.identity.incarnation:
                    if self.conflict is None:
                        log.error("another process renews the lease of NODE_ID %s (at %s): "
                                  "every node needs its own NODE_ID", peer.node_id, peer.address)
                    self.conflict = peer.address
                else:
                    self.conflict = None
                continue
            peers[peer.node_id] = peer
        self.peers = peers

    async def peer(self, node_id: str) -> Peer | None:
        """A peer by node id; the table is read again for one not seen yet."""
        if node_id not in self.peers:
            with contextlib.suppress(StoreError):
                await self._refresh()
        return self.peers.get(node_id)

    def alive_peers(self, now: float | None = None) -> list[Peer]:
        return [p for p in self.peers.values() if p.alive(now)]

    # --- reaping -----------------------------------------------------------------------

    async def reap(self) -> list[str]:
        """Mark interrupted the live sessions of nodes without a lease; their ids."""
        now = time.time()
        if self.healthy_since is None or now - self.healthy_since < self.lease_s:
            return []  # give live peers a whole lease to renew after our own outage
        orphans = await self.store.orphaned_sessions(now, self.identity.node_id)
        if not orphans:
            with contextlib.suppress(StoreError):
                await self.store.prune_nodes(now - max(FORGET_AFTER_S, 10 * self.lease_s))
            return []
        ids = [sid for sid, _owner in orphans]
        await self.store.interrupt_sessions(ids, REAP_REASON)
        self.reaped.inc(len(ids))
        for owner in sorted({o for _sid, o in orphans}):
            count = sum(1 for _sid, o in orphans if o == owner)
            log.warning("node %s holds no lease: %d live session(s) marked interrupted",
                        owner, count)
        return ids

    async def _check_abandoned(self) -> None:
        """After our lease had lapsed: drop the sessions peers reaped meanwhile."""
        ids = self._live_ids()
        if not ids:
            return
        statuses = await self.store.node_session_statuses(self.identity.node_id, ids)
        gone = [sid for sid in ids if statuses.get(sid, "live") != "live"]
        if gone:
            log.error("this node's lease had lapsed and peers marked %d of its sessions "
                      "interrupted: dropping them", len(gone))
            self.abandoned.inc(len(gone))
            await self._abandon(gone)

    # --- health ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        now = time.time()
        if self.conflict is not None:
            state = "conflict"
        elif self.renewed_at is not None and now <= self.lease_until:
            state = "held"
        else:
            state = "lapsed"
        return {
            "state": state,
            "lease_s": self.lease_s,
            "age_s": None if self.renewed_at is None else round(now - self.renewed_at, 3),
            "expires_in_s": round(self.lease_until - now, 3),
            "last_error": self.last_error,
            "peers": [
                {
                    "node_id": p.node_id,
                    "address": p.address,
                    "alive": p.alive(now),
                    "lease_age_s": round(now - p.renewed_at, 3),
                }
                for p in sorted(self.peers.values(), key=lambda p: p.node_id)
            ],
        }
