"""A pushed frame (REST or Socket.IO) from an untrusted client: its timestamp checked and
its data URL parsed — base64 decode and header read, with the pixel cap — in a worker
thread when it is large, so a flood of big frames never stalls the event loop."""

from __future__ import annotations

import asyncio

from server.config import Settings
from server.media.frames import Frame
from server.signaling.schemas import frame_timestamp


async def frame_from_client(value: object, timestamp: object, settings: Settings) -> Frame:
    captured_at = frame_timestamp(timestamp, settings.timestamp_max_skew_s)
    args = (value, settings.max_frame_bytes, captured_at, settings.max_frame_pixels)
    if isinstance(value, str | bytes) and len(value) > settings.offload_bytes:
        return await asyncio.to_thread(Frame.from_data_url, *args)
    return Frame.from_data_url(*args)
