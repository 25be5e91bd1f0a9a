"""The `proctoring` data channel: its message protocol and its backpressure.

Messages are JSON objects with a `type` (README, "WebRTC"). Server → page:
session_started, frame_analysis, alerts, live_metrics, session_ended, adjust_video, pong,
error. Page → server: get_live_metrics, end_session, ping.

Inbound messages are untrusted: the size is checked before parsing, parsing goes through
`server.safe_json` (depth, numbers, NaN refused), and whatever a page sends is answered
with at most an `error` message — nothing it sends can stop its session's analysis or
close its peer (`parse_inbound` raises only `ChannelMessageError`).

Outbound, alerts and the other essential messages are never dropped; metric updates
(`frame_analysis`, `live_metrics`) are coalesced, latest wins, while the channel's
`bufferedAmount` is above the high-water mark (`ChannelSender`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any

from aiortc import RTCSctpTransport
from aiortc.exceptions import InvalidStateError

from server import safe_json

log = logging.getLogger(__name__)

CHANNEL_LABEL = "proctoring"
MAX_INBOUND_MESSAGE = 16 * 1024
INBOUND_TYPES = ("get_live_metrics", "end_session", "ping")
#: Metric updates may be coalesced (latest wins) when the channel backs up; everything
#: else — alerts above all — is always sent.
COALESCED_TYPES = frozenset({"frame_analysis", "live_metrics"})
EARLY_MESSAGES_MAX = 512  # essential messages held before the channel opens
REPORT_MAX_BYTES = 60 * 1024  # under every browser's data-channel message limit


class ChannelMessageError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def parse_inbound(data: object) -> dict[str, Any]:
    """One page → server message as a dict with a known `type`; anything else raises
    `ChannelMessageError` with the code to answer."""
    if isinstance(data, bytes | bytearray | memoryview):
        raise ChannelMessageError("binary_not_supported", "send JSON text messages")
    if not isinstance(data, str):
        raise ChannelMessageError("invalid_message", "messages must be JSON text")
    if len(data) > MAX_INBOUND_MESSAGE:
        raise ChannelMessageError(
            "message_too_large", f"messages are limited to {MAX_INBOUND_MESSAGE} characters"
        )
    try:
        message = safe_json.loads(data, max_depth=8)
    except safe_json.JsonRejected as exc:
        raise ChannelMessageError("invalid_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ChannelMessageError(
            "invalid_message", "a message must be a JSON object with a string 'type'"
        )
    if message["type"] not in INBOUND_TYPES:
        raise ChannelMessageError(
            "unknown_type",
            f"unknown message type {message['type'][:40]!r}; expected "
            + ", ".join(INBOUND_TYPES),
        )
    return message


def fit_report(message: dict[str, Any]) -> dict[str, Any]:
    """A `session_ended` message small enough for any browser's data channel: a very
    long session's report goes without its per-alert detail and timeline, which stay
    available from GET /api/sessions/{id}/report."""
    text = json.dumps(message, default=str)
    if len(text.encode()) <= REPORT_MAX_BYTES:
        return message
    report = dict(message.get("report") or {})
    alerts = report.pop("alerts", None) or []
    report.pop("emotion_timeline", None)
    report.pop("metrics_timeline", None)
    report["alerts_count"] = len(alerts)
    report["truncated"] = True
    return {**message, "report": report}


class ChannelSender:
    """Sends JSON messages on the data channel. Before the channel is open, essential
    messages wait (bounded) and metric updates keep only their latest; once open, metric
    updates are coalesced (latest wins, one per type) whenever bufferedAmount is above the
    high-water mark, and flushed when it drains."""

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self.channel: Any = None
        self._early: deque[str] = deque()
        self._held: dict[str, str] = {}
        self.sent = 0
        self.coalesced = 0
        self.lost_early = 0

    @property
    def open(self) -> bool:
        return self.channel is not None and self.channel.readyState == "open"

    def attach(self, channel: Any) -> None:
        self.channel = channel
        channel.bufferedAmountLowThreshold = max(1, self.high_water // 4)
        channel.on("bufferedamountlow", self.flush)
        self.flush()

    def send(self, message: dict[str, Any]) -> None:
        """Send one message, or hold it (bounded) until the channel can take it."""
        kind = str(message.get("type"))
        text = json.dumps(message, default=str)
        if not self.open:
            if self.channel is not None:
                return  # closed: nothing can be delivered any more
            if kind in COALESCED_TYPES:
                self.coalesced += kind in self._held
                self._held[kind] = text
            elif len(self._early) < EARLY_MESSAGES_MAX:
                self._early.append(text)
            else:
                self.lost_early += 1
                log.error("data channel never opened: %s message not delivered", kind)
            return
        if kind in COALESCED_TYPES and (
            kind in self._held or self.channel.bufferedAmount > self.high_water
        ):
            self.coalesced += kind in self._held
            self._held[kind] = text
            return
        self._send_text(text)

    def _send_text(self, text: str) -> None:
        try:
            self.channel.send(text)
            self.sent += 1
        except InvalidStateError:
            pass  # closed under us; the peer is going away
        except ValueError as exc:  # above the page's max-message-size
            log.error("data channel message not sent: %s", exc)

    def flush(self) -> None:
        if not self.open:
            return
        while self._early:
            self._send_text(self._early.popleft())
        for kind in list(self._held):
            if self.channel.bufferedAmount > self.high_water:
                break
            self._send_text(self._held.pop(kind))

    async def drained(self, timeout_s: float) -> None:
        """Wait (bounded) until everything queued has left the channel's buffer."""
        deadline = time.monotonic() + timeout_s
        while self.open and (self.channel.bufferedAmount > 0 or self._held or self._early):
            if time.monotonic() > deadline:
                return
            self.flush()
            await asyncio.sleep(0.02)

    def to_json(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "sent": self.sent,
            "coalesced": self.coalesced,
            "buffered_bytes": self.channel.bufferedAmount if self.channel is not None else 0,
        }


def sctp_settled(sctp: RTCSctpTransport | None) -> bool:
    """True when the SCTP association has nothing left to send or to get acknowledged (or
    is gone). aiortc has no public API for this: a data channel's `bufferedAmount` drops
    as soon as a message is cut into chunks on the transport's outbound queue, long before
    they are sent and SACKed, and `pc.close()` aborts the association, dropping whatever
    is still queued. So this reads aiortc 1.x's private queues (rtcsctptransport.py):
    messages not yet chunked, chunks not yet sent, chunks sent but not acknowledged.
    tests/test_webrtc_lifecycle.py checks the fields still exist."""
    if sctp is None or sctp.state == "closed":
        return True
    return not (sctp._data_channel_queue or sctp._outbound_queue or sctp._sent_queue)
