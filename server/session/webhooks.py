"""Webhooks: alert onsets (critical ones by default) and session ends, POSTed as JSON to
`WEBHOOK_URL`, signed with HMAC-SHA256 of `WEBHOOK_SECRET`.

Never in the way of analysis: a session's listener only puts the delivery in a bounded
queue (`WEBHOOK_QUEUE_SIZE`; when full the new delivery is dropped and counted), and one
sender task owned by the app delivers them in order. Each attempt has its own timeout
(`WEBHOOK_TIMEOUT_S`); 5xx, 429 (honouring a numeric `Retry-After`), timeouts and
connection errors are retried with exponential backoff and jitter up to
`WEBHOOK_MAX_ATTEMPTS`; any other answer (4xx, or a redirect, which is not followed) is
final. `proctor_webhook_deliveries_total{outcome}` counts delivered, rejected, failed
(attempts exhausted), dropped (queue full) and abandoned (still queued at shutdown).

A delivery: `{"event", "delivery_id", "session_id", "at", "data"}` with the headers
`X-Proctor-Event`, `X-Proctor-Delivery` (the same id on every retry: receivers
de-duplicate on it), `X-Proctor-Timestamp` (Unix seconds of this attempt) and
`X-Proctor-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`. A
receiver recomputes the HMAC over the raw body, compares in constant time, and refuses a
timestamp too far from its clock (replay protection) — `verify()` does exactly that.

`session_ended` carries the report's summary, alert summary and review status, never the
job data or the alert list (the receiver fetches the report with the operator token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from server import __version__
from server.config import ConfigError, Settings
from server.observability import Instruments

log = logging.getLogger(__name__)

EVENTS: tuple[str, ...] = ("alert", "session_ended")
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
SECRET_MIN_CHARS = 16
#: A receiver accepts timestamps this close to its clock (see `verify`).
DEFAULT_TOLERANCE_S = 300.0
#: Report parts a `session_ended` delivery carries.
ENDED_PARTS = ("summary", "alert_summary", "review_status", "review_counts", "partial")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Proctor-Signature` value for this timestamp and raw body."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver does: the signature matches (constant-time) and the timestamp is
    within `tolerance_s` of its clock."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class Delivery:
    id: str
    event: str
    body: bytes


class WebhookSender:
    """Raises ConfigError for WEBHOOK_URL without a WEBHOOK_SECRET (or a short one), a URL
    that is not http(s), or an unknown event or severity."""

    def __init__(self, settings: Settings, instruments: Instruments) -> None:
        self.settings = settings
        self.instruments = instruments
        self.url = settings.webhook_url.strip()
        self.events = frozenset(settings.webhook_events)
        self.severities = frozenset(settings.webhook_alert_severities)
        if self.url:
            self._check()
        self._secret = settings.webhook_secret
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(
            maxsize=max(1, settings.webhook_queue_size)
        )
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        instruments.webhook_queue_depth.set_function(self._queue.qsize)

    def _check(self) -> None:
        s = self.settings
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("WEBHOOK_URL must be an http:// or https:// URL with a host")
        if not s.webhook_secret:
            raise ConfigError(
                "WEBHOOK_URL is set but WEBHOOK_SECRET is not: deliveries must be signed"
            )
        if len(s.webhook_secret) < SECRET_MIN_CHARS:
            raise ConfigError(f"WEBHOOK_SECRET is shorter than {SECRET_MIN_CHARS} characters")
        unknown = self.events - set(EVENTS)
        if unknown:
            raise ConfigError(f"WEBHOOK_EVENTS: unknown {sorted(unknown)}; known {list(EVENTS)}")
        unknown = self.severities - set(SEVERITIES)
        if unknown:
            raise ConfigError(
                f"WEBHOOK_ALERT_SEVERITIES: unknown {sorted(unknown)}; known {list(SEVERITIES)}"
            )
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("WEBHOOK_URL is plain http: deliveries are signed but not encrypted")

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled or self._task is not None:
            return
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            headers={"User-Agent": f"proctor-webhooks/{__version__}"},
        )
        self._task = asyncio.create_task(self._run(), name="webhook-sender")
        log.info("webhooks: %s to %s", ", ".join(sorted(self.events)), _where(self.url))

    async def stop(self) -> None:
        """Give queued deliveries WEBHOOK_SHUTDOWN_DRAIN_S, then abandon the rest."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle(), self.settings.webhook_shutdown_drain_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        abandoned = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            abandoned += 1
        if abandoned:
            self.instruments.webhook_deliveries.labels(outcome="abandoned").inc(abandoned)
            log.warning("webhooks: %d delivery(ies) abandoned at shutdown", abandoned)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def idle(self) -> None:
        """Wait until every delivery queued so far has its final outcome."""
        await self._queue.join()

    # --- events in ------------------------------------------------------------------------

    async def on_session_event(self, session_id: str, event: str, payload: dict[str, Any]) -> None:
        """A session listener: never waits (the queue is bounded, full means dropped)."""
        if not self.enabled:
            return
        if event == "alerts" and "alert" in self.events:
            for alert in payload.get("alerts") or ():
                if alert.get("status") == "onset" and alert.get("severity") in self.severities:
                    self.offer("alert", session_id, alert)
        elif event == "session_ended" and "session_ended" in self.events:
            report = payload.get("report") or {}
            self.offer("session_ended", session_id, {k: report.get(k) for k in ENDED_PARTS})

    def offer(self, event: str, session_id: str | None, data: dict[str, Any]) -> bool:
        delivery_id = str(uuid.uuid4())
        body = json.dumps(
            {
                "event": event,
                "delivery_id": delivery_id,
                "session_id": session_id,
                "at": time.time(),
                "data": data,
            },
            separators=(",", ":"),
            default=str,
        ).encode()
        try:
            self._queue.put_nowait(Delivery(delivery_id, event, body))
        except asyncio.QueueFull:
            self.instruments.webhook_deliveries.labels(outcome="dropped").inc()
            log.warning(
                "webhooks: queue full (%d): %s delivery dropped", self._queue.maxsize, event
            )
            return False
        return True

    # --- delivering -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                outcome = await self._deliver(delivery)
            except asyncio.CancelledError:
                self.instruments.webhook_deliveries.labels(outcome="abandoned").inc()
                raise
            except Exception:  # the sender must outlive any bug of its own
                log.exception("webhook delivery %s failed unexpectedly", delivery.id)
                outcome = "failed"
            finally:
                self._queue.task_done()
            self.instruments.webhook_deliveries.labels(outcome=outcome).inc()

    async def _deliver(self, delivery: Delivery) -> str:
        s = self.settings
        attempts = max(1, s.webhook_max_attempts)
        for attempt in range(1, attempts + 1):
            result, retry_after = await self._attempt(delivery, attempt)
            self.instruments.webhook_attempts.labels(result=result).inc()
            if result == "ok":
                return "delivered"
            if result == "rejected":
                log.warning(
                    "webhook %s %s refused by the receiver: not retried",
                    delivery.event,
                    delivery.id,
                )
                return "rejected"
            if attempt == attempts:
                break
            backoff = min(
                s.webhook_retry_max_backoff_s, s.webhook_retry_backoff_s * 2 ** (attempt - 1)
            )
            delay = backoff / 2 + random.uniform(0, backoff / 2)  # equal jitter
            if retry_after is not None:
                delay = max(delay, min(retry_after, s.webhook_retry_max_backoff_s))
            log.info(
                "webhook %s %s: %s on attempt %d of %d, next in %.1f s",
                delivery.event,
                delivery.id,
                result,
                attempt,
                attempts,
                delay,
            )
            await asyncio.sleep(delay)
        log.warning(
            "webhook %s %s not delivered after %d attempts", delivery.event, delivery.id, attempts
        )
        return "failed"

    async def _attempt(self, delivery: Delivery, attempt: int) -> tuple[str, float | None]:
        """("ok" | "rejected" | a retryable result, Retry-After seconds or None)."""
        assert self._http is not None
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Proctor-Event": delivery.event,
            "X-Proctor-Delivery": delivery.id,
            "X-Proctor-Attempt": str(attempt),
            "X-Proctor-Timestamp": timestamp,
            "X-Proctor-Signature": sign(self._secret, timestamp, delivery.body),
        }
        try:
            async with self._http.post(
                self.url, data=delivery.body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except TimeoutError:
            return "timeout", None
        except (aiohttp.ClientError, OSError):
            return "connection_error", None
        if 200 <= status < 300:
            return "ok", None
        if status == 429:
            return "http_429", retry_after
        if status >= 500:
            return "http_5xx", None
        return "rejected", None


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: our own backoff applies
    return seconds if seconds is not None and 0 <= seconds < 86_400 else None


def _where(url: str) -> str:
    """The URL as a log shows it: no credentials, query or path (they may hold secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
