"""Spend-cap counters shared by every node (REDIS_URL): today's Rekognition calls and LLM
tokens, and each client address' session starts of the last minute.

The store stays the durable record (every node still writes its own usage and starts
there, `server.session.spend`); Redis holds the cluster's running figures so N nodes
share one cap. Each operation is one Lua script, so a check and its count are atomic
across nodes:

- Usage, per UTC day and kind (`proctor:usage:<day>:<kind>`, expiring after two days):
  `reserve` refuses when today's total plus the calls would pass the cap, else adds them
  at once (the calls an analysis plans are charged before it runs, and corrected by what
  it really billed afterwards), so the nodes together never pass the cap. Every script
  that finds the key missing (a Redis restart, or the first node of the day) first sets
  it to the store's figure for today, and each node regularly raises it to at least the
  store's figure (`raise_to`), so a Redis restart never sets the day back to zero.
- Starts, per address (`proctor:starts:<address>`, a sorted set of start times trimmed to
  the window, expiring with it): `check`, `admit` (check and count in one step) and
  `record`. Members are the start times as the store keeps them, so writing the store's
  rows back after a Redis restart (`seed_starts`) is idempotent. Until a node has done
  so (a mark in Redis), the scripts answer "unseeded" and the node counts from the
  store.

A failing Redis command is reported to the link (logged once per outage, counted) and
raised as `SharedUnavailable`: the caller (`SpendCaps`) falls back to its store-based
counting.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from server.cluster.redis_link import PREFIX, REDIS_ERRORS, RedisLink
from server.session.spend import SharedUnavailable

USAGE_TTL_S = 2 * 86_400
SEEDED_KEY = PREFIX + "starts:seeded"

# KEYS: usage key. ARGV: cap (0 = none), amount, seed, ttl. {granted, total}.
RESERVE_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  cur = ARGV[3]
end
cur = tonumber(cur)
local cap, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if cap > 0 and cur + amount > cap then
  return {0, cur}
end
local v = redis.call('INCRBY', KEYS[1], amount)
if v < 0 then
  redis.call('SET', KEYS[1], 0)
  v = 0
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, v}
"""

# KEYS: usage key. ARGV: floor, ttl. The total, raised to at least `floor`.
RAISE_LUA = """
local cur = redis.call('GET', KEYS[1])
local floor = tonumber(ARGV[1])
if (not cur) or tonumber(cur) < floor then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return floor
end
return tonumber(cur)
"""

# KEYS: the address' start set, the mark that the store's starts were written in. ARGV:
# now, window, limit, mode (check | admit | record), member. '0' when allowed (and
# counted, unless mode is check), else the seconds until the oldest start leaves the
# window (as text: a fraction); 'unseeded' when the mark is missing (Redis lost them).
START_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 'unseeded'
end
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local mode = ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - window))
if mode ~= 'record' and limit > 0 then
  if redis.call('ZCARD', KEYS[1]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return string.format('%.3f', tonumber(oldest[2]) + window - now)
  end
end
if mode ~= 'check' then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
end
return '0'
"""


class SharedCounters:
    def __init__(self, link: RedisLink) -> None:
        self.link = link
        client = link.client
        self._reserve = client.register_script(RESERVE_LUA)
        self._raise = client.register_script(RAISE_LUA)
        self._start = client.register_script(START_LUA)

    @property
    def up(self) -> bool:
        return self.link.up

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as exc:
            self.link.failed("spend", exc)
            raise SharedUnavailable(str(exc)) from exc

    @staticmethod
    def usage_key(day: str, kind: str) -> str:
        return f"{PREFIX}usage:{day}:{kind}"

    @staticmethod
    def starts_key(address: str) -> str:
        return f"{PREFIX}starts:{address}"

    # --- daily usage ---------------------------------------------------------------------

    async def reserve(
        self, day: str, kind: str, amount: int, cap: int, seed: int
    ) -> tuple[bool, int]:
        """Add `amount` unless that passes `cap` (0: no cap): (added, today's total)."""
        with self._guard():
            reply = await self._reserve(
                keys=[self.usage_key(day, kind)], args=[cap, amount, seed, USAGE_TTL_S]
            )
        return bool(int(reply[0])), int(reply[1])

    async def add(self, day: str, kind: str, amount: int, seed: int) -> int:
        """Add `amount` (negative: a correction); today's total."""
        return (await self.reserve(day, kind, amount, 0, seed))[1]

    async def raise_to(self, day: str, kind: str, floor: int) -> int:
        """Today's total, raised to at least `floor` (the store's figure) first."""
        with self._guard():
            reply = await self._raise(keys=[self.usage_key(day, kind)], args=[floor, USAGE_TTL_S])
        return int(reply)

    # --- session starts --------------------------------------------------------------------

    async def start(
        self, address: str, mode: str, now: float, window_s: float, limit: int
    ) -> float | None:
        """0.0 when allowed (counted unless `mode` is "check"), else seconds to wait;
        None when Redis has not got the store's starts (after it lost them)."""
        with self._guard():
            reply = await self._start(
                keys=[self.starts_key(address), SEEDED_KEY],
                args=[repr(now), window_s, limit, mode, repr(now)],
            )
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return None if text == "unseeded" else float(text)

    async def seed_starts(self, rows: Iterable[tuple[str, float]], window_s: float) -> None:
        """Write the store's recent starts back (members already there stay as they are)."""
        with self._guard():
            await self._seed_starts(rows, window_s)

    async def _seed_starts(self, rows: Iterable[tuple[str, float]], window_s: float) -> None:
        async with self.link.client.pipeline(transaction=False) as pipe:
            for address, at in rows:
                key = self.starts_key(address)
                pipe.zadd(key, {repr(at): at}, nx=True)
                pipe.expire(key, int(window_s) + 1)
            pipe.set(SEEDED_KEY, "1")
            await pipe.execute()
