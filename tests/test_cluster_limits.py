"""Shared limits of a cluster (REDIS_URL): two nodes on one real Redis and one PostgreSQL
store share one Rekognition call budget (counted at the fake Rekognition, which both reach),
still serve live before background on each node, fall back to a local share while Redis
is down (bounded, visible, sessions unharmed) and share again when it is back; they
share the daily Rekognition cap and the per-address start limit, and a Redis restart does
not give the day back."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.app import REDIS
from server.cluster.redis_link import RedisLink
from server.cluster.shared_budget import SharedBudget
from server.observability import Instruments
from tests.cluster_kit import start_node
from tests.conftest import RunningServer, make_settings
from tests.fakes.rekognition import FakeRekognition
from tests.services import RedisServer
from tests.test_spend_caps import assert_rate_limited, frame, json_of, metric, rest_start

RATE = 12  # calls a second for the whole cluster: four frames of three calls


async def until(predicate: Callable[[], Any], timeout: float = 15.0) -> None:
    """Wait until `predicate()` (a value or an awaitable) is true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def cluster(redis_server: RedisServer, postgres_url: str) -> dict[str, Any]:
    """What every node of a test shares: Redis and a fresh PostgreSQL database."""
    return {"redis": redis_server, "database_url": postgres_url}


def cluster_settings(tmp_path: Path, cluster: dict[str, Any], **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "redis_url": cluster["redis"].url,
        "database_url": cluster["database_url"],
        "redis_ping_interval_s": 0.2,
        "analyser_calls_per_s": RATE,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@contextlib.asynccontextmanager
async def two_nodes(settings: Any, **app_kwargs: Any) -> AsyncIterator[list[RunningServer]]:
    nodes = [
        await start_node(settings, "node-a", **app_kwargs),
        await start_node(settings, "node-b", **app_kwargs),
    ]
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def start_sessions(
    http: aiohttp.ClientSession, nodes: list[RunningServer], n: int
) -> list[tuple[str, str]]:
    """`n` REST sessions, alternating between the nodes: (node url, session id)."""
    out = []
    for i in range(n):
        url = nodes[i % len(nodes)].url
        started = await json_of(http, "POST", f"{url}/api/sessions/start", json={"job_data": {}})
        out.append((url, started["session_id"]))
    return out


class Load:
    """Every session pushes frames back to back (each waits for its answer) until
    stopped; answers are kept."""

    def __init__(self, http: aiohttp.ClientSession, sessions: list[tuple[str, str]]) -> None:
        self.http = http
        self.results: list[dict[str, Any]] = []
        self.tasks = [asyncio.create_task(self._push(url, sid)) for url, sid in sessions]

    async def _push(self, url: str, sid: str) -> None:
        while True:
            self.results.append(await frame(self.http, url, sid))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def calls_between(fake: FakeRekognition, t0: float, t1: float) -> list[float]:
    return sorted(c.at for c in fake.calls if t0 <= c.at < t1)


def most_in_a_window(times: list[float], window: float) -> int:
    """The most calls that arrived within any `window` seconds."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def assert_under(times: list[float], rate: float) -> None:
    """At most `rate` calls per second, as the fake saw them: over the whole span (a
    rolling one-second window lets through at most rate × (span + 1)), and in any half
    second (the budget counts grants in any second; a grant reaches the fake a moment
    later, so a shorter window leaves room for that delay). Two budgets of `rate` that
    did not share would pass both about twice over."""
    assert times, "no calls at all"
    span = times[-1] - times[0]
    assert len(times) <= rate * (span + 1.0) + 3, (len(times), span)
    assert most_in_a_window(times, 0.5) <= rate, most_in_a_window(times, 0.5)


async def test_two_nodes_share_one_call_budget_and_fall_back_to_a_share_without_redis(
    tmp_path: Path,
    rekognition: FakeRekognition,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    cluster: dict[str, Any],
) -> None:
    settings = cluster_settings(tmp_path, cluster)
    async with two_nodes(settings) as nodes:
        sessions = await start_sessions(http, nodes, 20)
        load = Load(http, sessions)
        try:
            # 1. Shared: each node alone would allow RATE; together they stay under it.
            t0 = time.monotonic()
            await asyncio.sleep(3.0)
            shared = calls_between(rekognition, t0, time.monotonic())
            assert_under(shared, RATE)
            assert len(shared) >= RATE  # and the budget is used, not starved
            for node in nodes:
                budget = node.manager.budget.to_json()
                assert budget["mode"] == "shared" and budget["scope"] == "cluster"

            # 2. Redis gone: each node falls back to RATE / 2 (two nodes were seen).
            await asyncio.to_thread(redis_server.stop)
            t1 = time.monotonic()
            for node in nodes:
                await until(lambda n=node: n.manager.budget.to_json()["mode"] == "local-fallback")
            served = len(load.results)
            await asyncio.sleep(3.0)
            fallback = calls_between(rekognition, t1, time.monotonic())
            assert_under(fallback, RATE)
            assert len(load.results) > served  # sessions keep being answered
            for node in nodes:
                health = await json_of(http, "GET", f"{node.url}/health")
                assert health["status"] == "degraded"
                assert health["redis"]["status"] == "down" and health["redis"]["last_error"]
                assert health["redis"]["budget"]["mode"] == "local-fallback"
                assert health["redis"]["budget"]["fallback_rate_per_s"] == RATE / 2
                assert health["redis"]["spend"] == "local-fallback"
                assert await metric(http, node.url, "proctor_redis_up") == 0
                assert await metric(http, node.url, "proctor_budget_shared") == 0

            # 3. Redis back: the nodes share again.
            await asyncio.to_thread(redis_server.start)
            for node in nodes:
                await until(lambda n=node: n.manager.budget.to_json()["mode"] == "shared")
            t2 = time.monotonic()
            await asyncio.sleep(2.0)
            assert_under(calls_between(rekognition, t2, time.monotonic()), RATE)

            # 4. Redis restarted (its log lost, maybe between two pings): the nodes write
            # their last second's grants back, and the budget holds across it.
            t3 = time.monotonic() - 1.0
            await asyncio.to_thread(redis_server.restart)
            await asyncio.sleep(2.0)
            assert_under(calls_between(rekognition, t3, time.monotonic()), RATE)
        finally:
            await load.stop()
        # Over the whole run too (the switches included).
        assert_under(sorted(c.at for c in rekognition.calls), RATE)
        assert all(not r["degraded"] for r in load.results)  # every answer a real one
        for node in nodes:
            health = await json_of(http, "GET", f"{node.url}/health")
            assert health["status"] == "ok" and health["redis"]["budget"]["mode"] == "shared"
            # Once for the stop; the restart may have been seen as a short outage too.
            assert await metric(http, node.url, "proctor_budget_fallbacks_total") in (1, 2)
            assert await metric(http, node.url, "proctor_redis_up") == 1


async def test_live_requests_go_first_on_a_node_and_across_nodes(
    redis_server: RedisServer,
) -> None:
    # Generous Redis timeouts: a loaded CI machine stalling a ping for 0.5 s must not put
    # a node on its local share (which writes no live mark) in a test about priorities.
    settings = make_settings(Path("/nonexistent"), redis_url=redis_server.url, redis_timeout_s=5.0)
    links = [RedisLink(settings, Instruments()) for _ in range(2)]
    for link in links:
        await link.start()
    # A live request's mark outlasts its slot by a full second here (250 ms in service),
    # so a loaded machine waking B's pump late cannot let A's background request in.
    a, b = (SharedBudget(2, link, link.instruments, live_margin_s=1.0) for link in links)
    order: list[str] = []

    async def ask(budget: SharedBudget, name: str, priority: Any) -> None:
        await budget.acquire(1, priority)
        order.append(name)

    async def queued() -> None:
        await asyncio.sleep(0.1)  # each has asked and waits behind the full window

    try:
        # On one node: background requests queued first, a live one after them.
        await b.acquire(2)  # the window is full
        tasks = [asyncio.create_task(ask(a, f"a-background-{i}", "background")) for i in range(3)]
        await queued()
        tasks.append(asyncio.create_task(ask(a, "a-live", "live")))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert order == ["a-live", "a-background-0", "a-background-1", "a-background-2"]
        assert a.to_json()["waited"] == 4

        # Across nodes: A has background requests waiting, then B a live one; the live
        # one gets the next slot although A asked first.
        order.clear()
        # The window filled by two grants 0.3 s apart, so slots free one at a time: two
        # freed at once would go to B's live request and then, a millisecond later, to
        # A's background one, and which task appends first is the event loop's choice.
        await a.acquire(1)
        await asyncio.sleep(0.3)
        await a.acquire(1)
        tasks = [asyncio.create_task(ask(a, f"a-background-{i}", "background")) for i in range(2)]
        await queued()
        tasks.append(asyncio.create_task(ask(b, "b-live", "live")))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert (a.fallbacks, b.fallbacks) == (0, 0)  # both on the shared window throughout
        assert order[0] == "b-live", order
    finally:
        for budget in (a, b):
            budget.close()
        for link in links:
            await link.stop()


@pytest.fixture
async def offline() -> AsyncIterator[Any]:
    """One real offline backend for both nodes (sessions past the cap move to it)."""
    from server.analysis.local_backend import LocalAnalyser

    analyser = LocalAnalyser(
        make_settings(Path("/nonexistent"), analyser_backend="local"), Instruments()
    )
    await analyser.start()
    yield analyser
    await analyser.close()


async def test_two_nodes_share_the_daily_rekognition_cap_across_a_redis_restart(
    tmp_path: Path,
    rekognition: FakeRekognition,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    cluster: dict[str, Any],
    offline: Any,
) -> None:
    # Every frame asks three calls: four frames, on either node, use the cap of 12.
    settings = cluster_settings(tmp_path, cluster, rekognition_daily_calls=12)
    async with two_nodes(settings, offline_analyser=offline) as nodes:
        (url_a, sid_a), (url_b, sid_b) = await start_sessions(http, nodes, 2)
        assert (await frame(http, url_a, sid_a))["backend"] == "rekognition"
        assert (await frame(http, url_b, sid_b))["backend"] == "rekognition"
        assert rekognition.count() == 6
        # Half the day's cap is used; the store holds it once each node has flushed.
        store, day = nodes[0].manager.store, nodes[0].manager.spend.day

        async def stored_six() -> bool:
            return (await store.usage_on(day)).get("rekognition_calls") == 6

        await until(stored_six)
        await asyncio.to_thread(redis_server.restart)  # no persistence: Redis forgets today's count

        assert (await frame(http, url_b, sid_b))["backend"] == "rekognition"
        assert (await frame(http, url_a, sid_a))["backend"] == "rekognition"
        assert rekognition.count() == 12  # the cap, reached by the two nodes' sum
        for url, sid in ((url_a, sid_a), (url_b, sid_b)):
            assert (await frame(http, url, sid))["backend"] == "local"
        assert rekognition.count() == 12  # and never passed
        for node in nodes:
            health = await json_of(http, "GET", f"{node.url}/health")
            assert health["spend"]["mode"] == "shared"
            assert health["spend"]["rekognition_calls"] == {"used": 12, "cap": 12, "reached": True}
        # A new session on either node starts offline.
        started = await json_of(http, "POST", f"{url_b}/api/sessions/start", json={"job_data": {}})
        assert started["backend"] == "local"
        await nodes[0].manager.store.flush()
        await nodes[1].manager.store.flush()
    # The store's record: each node wrote its own share, the sum is the day's.
    async with two_nodes(settings, offline_analyser=offline) as nodes:
        health = await json_of(http, "GET", f"{nodes[0].url}/health")
        assert health["spend"]["rekognition_calls"]["used"] == 12


async def test_the_start_limit_counts_every_node(
    tmp_path: Path,
    rekognition: FakeRekognition,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    cluster: dict[str, Any],
) -> None:
    settings = cluster_settings(tmp_path, cluster, session_starts_per_minute=3)
    async with two_nodes(settings) as (a, b):
        assert (await rest_start(http, a.url)).status == 200
        assert (await rest_start(http, b.url)).status == 200
        assert (await rest_start(http, a.url)).status == 200
        for node in (b, a):  # the fourth start, wherever it asks
            async with http.post(f"{node.url}/api/sessions/start", json={}) as r:
                assert_rate_limited(r.status, await r.json(), r.headers)
        # A Redis restart forgets the minute's starts; the store gives them back.
        await asyncio.to_thread(redis_server.restart)
        for node in (a, b):
            link = node.app[REDIS].link
            await until(lambda lk=link: lk.outages + lk.data_losses > 0)
        async with http.post(f"{b.url}/api/sessions/start", json={}) as r:
            assert_rate_limited(r.status, await r.json(), r.headers)
