"""An aiortc client peer that plays the candidate's browser: a synthetic camera track, the
`proctoring` data channel, the offer/answer exchange with `POST /api/rtc/offer`.

Two camera tracks:
- `SyntheticCamera` hands raw frames to aiortc, which encodes them live (VP8 or H.264) —
  the real sender path, keyframe requests included; fine for a few streams in tests.
- `EncodedCamera` replays H.264 clips encoded once up front (libx264, closed GOPs, camera
  noise included), so a benchmark can run dozens of senders without their encoders
  eating the CPU the server is being measured on. Switching scenes starts the new clip
  at its IDR frame, so the decoder never sees a broken reference.

Both record, per scene switch, the wall time at which the first frame of the new scene
was handed to the sender: the "glass" instant of glass-to-alert latency.

Everything stays on loopback: ICE servers are none, host candidates are pinned to
127.0.0.1 and the answer's candidates are filtered to UDP 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)

from server.signaling.datachannel import CHANNEL_LABEL
from server.signaling.ice import pin_host_addresses
from server.signaling.sdp import restrict_candidates
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition
from tests.netns import require_netns

VIDEO_CLOCK = 90_000
LOOPBACK = ["127.0.0.1"]


def to_video_frame(bgr: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")


class _Paced(MediaStreamTrack):
    kind = "video"

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps = fps
        self._start: float | None = None
        self._index = 0
        self.sent = 0
        self.switches: list[tuple[str, float]] = []  # (scene, wall time of its first frame)
        self._switch_pending: str | None = None

    async def _pace(self) -> int:
        """Sleep until the next frame is due; returns its pts in 1/90000 s."""
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:  # fell far behind (paused loop): do not burst to catch up
            self._start = time.monotonic() - self._index / self.fps
        pts = int(self._index * VIDEO_CLOCK / self.fps)
        self._index += 1
        self.sent += 1
        return pts

    def _mark_switch(self) -> None:
        if self._switch_pending is not None:
            self.switches.append((self._switch_pending, time.time()))
            self._switch_pending = None


class SyntheticCamera(_Paced):
    """Raw frames of named scenes (BGR images); aiortc encodes them."""

    def __init__(self, scenes: dict[str, np.ndarray], first: str, fps: float = 15.0,
                 noise: float = 0.0) -> None:
        super().__init__(fps)
        self._frames = {name: to_video_frame(img) for name, img in scenes.items()}
        self._images = scenes
        self.noise = noise
        self.scene = first
        self._rng = np.random.default_rng(1)

    def show(self, scene: str) -> None:
        if scene != self.scene:
            self.scene = scene
            self._switch_pending = scene

    async def recv(self) -> av.VideoFrame:
        pts = await self._pace()
        if self.noise > 0:
            img = self._images[self.scene].astype(np.int16)
            img += self._rng.normal(0, self.noise, img.shape).astype(np.int16)
            frame = to_video_frame(np.clip(img, 0, 255).astype(np.uint8))
        else:
            src = self._frames[self.scene]
            frame = av.VideoFrame.from_ndarray(src.to_ndarray(), format="yuv420p")
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._mark_switch()
        return frame


def encode_clip(images: list[np.ndarray], fps: int = 15, bitrate: int = 600_000) -> list[bytes]:
    """H.264 constrained-baseline Annex B access units, one IDR first (a closed GOP), with
    SPS/PPS in band so the clip can start a stream or follow another one."""
    h, w = images[0].shape[:2]
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height = w, h
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = bitrate
    codec.framerate = fractions.Fraction(fps, 1)
    codec.time_base = fractions.Fraction(1, fps)
    codec.profile = "Baseline"
    codec.options = {
        "level": "31",
        "tune": "zerolatency",
        "x264-params": f"keyint={len(images)}:min-keyint={len(images)}:scenecut=0:repeat-headers=1",
    }
    out: list[bytes] = []
    for i, img in enumerate(images):
        frame = to_video_frame(img)
        frame.pts = i
        kinds = av.video.frame.PictureType
        frame.pict_type = kinds.I if i == 0 else kinds.NONE
        out.extend(bytes(p) for p in codec.encode(frame))
    out.extend(bytes(p) for p in codec.encode(None))
    return out


def noisy_clip(image: np.ndarray, frames: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = image.astype(np.int16)
    return [
        np.clip(base + rng.normal(0, noise, base.shape).astype(np.int16), 0, 255).astype(np.uint8)
        for _ in range(frames)
    ]


class EncodedCamera(_Paced):
    """Replays pre-encoded H.264 clips (one per scene) as packets: no encoding at run time."""

    def __init__(self, clips: dict[str, list[bytes]], first: str, fps: float = 15.0) -> None:
        super().__init__(fps)
        self.clips = clips
        self.scene = first
        self._pos = 0

    def show(self, scene: str) -> None:
        if scene != self.scene:
            self.scene, self._pos = scene, 0
            self._switch_pending = scene

    async def recv(self) -> av.Packet:
        pts = await self._pace()
        clip = self.clips[self.scene]
        packet = av.Packet(clip[self._pos % len(clip)])
        self._pos = (self._pos + 1) % len(clip)
        packet.pts = pts
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._mark_switch()
        return packet


class OfferRefused(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body
        self.headers = headers


class RtcTestClient:
    def __init__(
        self,
        base_url: str,
        track: MediaStreamTrack | None,
        *,
        codecs: list[str] | None = None,
        host_addresses: list[str] | None = None,
        data_channel: bool = True,
    ) -> None:
        self.base_url = base_url
        self.track = track
        self.codecs = codecs
        self.data_channel = data_channel
        self.messages: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # wall time each message arrived
        self.raw: list[str] = []
        self.answer: dict[str, Any] = {}
        self.pc: RTCPeerConnection | None = None
        self.channel: Any = None
        self._new = asyncio.Event()
        self._opened = asyncio.Event()
        self._unpin = pin_host_addresses(host_addresses or LOOPBACK)

    @property
    def session_id(self) -> str:
        return str(self.answer["session_id"])

    async def make_offer(self) -> str:
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if self.data_channel:
            self.channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True)
            self.channel.on("message", self._on_message)
            self.channel.on("open", self._opened.set)
        if self.track is not None:
            transceiver = pc.addTransceiver(self.track, direction="sendonly")
            if self.codecs:
                caps = RTCRtpSender.getCapabilities("video")
                assert caps is not None
                wanted = [c for c in caps.codecs if c.name in self.codecs or c.name == "rtx"]
                transceiver.setCodecPreferences(wanted)
        await pc.setLocalDescription(await pc.createOffer())  # gathers ICE completely
        return pc.localDescription.sdp

    async def post_offer(self, sdp: str, **extra: Any) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.base_url}/api/rtc/offer", json={"sdp": sdp, "type": "offer", **extra}
            ) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise OfferRefused(resp.status, body, dict(resp.headers))
                return body

    async def connect(self, job_data: dict[str, Any] | None = None,
                      session_id: str | None = None,
                      munge: Callable[[str], str] | None = None) -> dict[str, Any]:
        sdp = await self.make_offer()
        if munge is not None:
            sdp = munge(sdp)
        extra: dict[str, Any] = {}
        if session_id is not None:
            extra["session_id"] = session_id
        if job_data is not None:
            extra["job_data"] = job_data
        try:
            self.answer = await self.post_offer(sdp, **extra)
        except BaseException:
            await self.close()
            raise
        assert self.pc is not None
        remote = restrict_candidates(self.answer["sdp"], LOOPBACK)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=remote, type="answer"))
        return self.answer

    async def opened(self, within: float = 10.0) -> None:
        await asyncio.wait_for(self._opened.wait(), within)

    def _on_message(self, data: str | bytes) -> None:
        text = data if isinstance(data, str) else data.decode()
        self.raw.append(text)
        self.messages.append(json.loads(text))
        self.arrivals.append(time.time())
        self._new.set()

    def send(self, message: dict[str, Any] | str | bytes) -> None:
        assert self.channel is not None
        self.channel.send(json.dumps(message) if isinstance(message, dict) else message)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def wait_for(
        self,
        kind: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        within: float = 10.0,
        start: int = 0,
    ) -> dict[str, Any]:
        """The first message of `kind` (from index `start`) satisfying `predicate`."""
        deadline = time.monotonic() + within
        seen = start
        while True:
            for i in range(seen, len(self.messages)):
                m = self.messages[i]
                if m.get("type") == kind and (predicate is None or predicate(m)):
                    return m
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [m.get("type") for m in self.messages[-20:]]
                raise TimeoutError(f"no {kind!r} message within {within} s (last: {kinds})")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass

    def index_of(self, message: dict[str, Any]) -> int:
        return next(i for i, m in enumerate(self.messages) if m is message)

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        if self.track is not None:
            self.track.stop()
        self._unpin()
        self._unpin = lambda: None


LOOPBACK_RTC: dict[str, Any] = {
    "rtc_host_addresses": LOOPBACK,
    "rtc_remote_candidate_addresses": LOOPBACK,
    # The defaults' slower checks: faces every analysed frame, labels ≤ 1/5 s, text ≤ 1/10 s.
    "labels_interval_s": 5.0,
    "text_interval_s": 10.0,
}


def face_blank_scenes(w: int = 320, h: int = 240) -> dict[str, np.ndarray]:
    from tests.media import astronaut_bgr, blank_bgr

    return {"face": astronaut_bgr(w, h), "blank": blank_bgr(w, h)}


async def start_rtc_server(tmp_path: Path, rekognition: FakeRekognition,
                           **overrides: Any) -> RunningServer:
    """The real app on loopback, WebRTC pinned to 127.0.0.1, the Rekognition fake seeing a
    face in textured images and none in blank ones. Skips outside a loopback netns."""
    require_netns()
    rekognition.faces_from_image = True
    return await start_server(make_settings(tmp_path, **{**LOOPBACK_RTC, **overrides}))


async def until(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll `condition` (server-side state has no event to wait on) until true or timeout."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def alert_events(message: dict[str, Any], kind: str, status: str) -> list[dict[str, Any]]:
    return [a for a in message.get("alerts", []) if a["type"] == kind and a["status"] == status]
