"""Shared parts of the WebRTC benchmarks: the server in its own process (so its CPU and
memory are measured alone), a Rekognition fake per server in the bench process, camera
clips encoded once, and glass-to-alert trials.

Run the benchmarks inside a loopback-only network namespace, like the tests:

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/webrtc_latency.py'
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.rekognition import FakeRekognition, fake_face, fake_label
from tests.media import astronaut_bgr
from tests.netns import in_loopback_only_netns
from tests.rtc_client import (
    EncodedCamera,
    RtcTestClient,
    alert_events,
    encode_clip,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def require_netns() -> None:
    if not in_loopback_only_netns():
        sys.exit(
            "run inside a loopback-only network namespace:\n"
            "  unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python "
            + " ".join(sys.argv)
            + "'"
        )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the server under test ----------------------------------------------------------------


class ServerProcess:
    """`proctor serve` in a child process, Rekognition backend pointed at `fake`."""

    def __init__(self, fake: FakeRekognition, **settings: Any) -> None:
        self.fake = fake
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="webrtc-bench-"))
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        values: dict[str, Any] = {
            "ANALYSER_BACKEND": "rekognition",
            "DATABASE_PATH": str(self.dir / "bench.sqlite3"),
            "RTC_HOST_ADDRESSES": '["127.0.0.1"]',
            "RTC_REMOTE_CANDIDATE_ADDRESSES": '["127.0.0.1"]',
            "LLM_PROVIDER": "none",
            "OPENAI_API_KEY": "",
            "ANTHROPIC_API_KEY": "",
            "LOG_LEVEL": "WARNING",
            "REKOGNITION_MAX_ATTEMPTS": "1",
            # Every bench client starts from 127.0.0.1.
            "SESSION_STARTS_PER_MINUTE": "0",
        }
        values.update({k.upper(): v for k, v in self.settings.items()})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RTC_", "SAMPLER_"))}
        env.update(self.fake.env())
        env.update({k: str(v) for k, v in values.items()})
        env["PYTHONPATH"] = str(ROOT)
        return env

    async def start(self) -> None:
        import aiohttp

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
            cwd=self.dir, env=self.env(),
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"{self.url}/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("server did not come up")

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.proc.wait, 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# --- camera clips -------------------------------------------------------------------------

W, H, FPS = 640, 480, 15


def _warp(img: np.ndarray, dx: float = 0, dy: float = 0, angle: float = 0,
          scale: float = 1.0) -> np.ndarray:
    m = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), angle, scale)
    m[0, 2] += dx
    m[1, 2] += dy
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)


def scene_images(w: int = W, h: int = H) -> dict[str, np.ndarray]:
    face = astronaut_bgr(w, h)
    phone = face.copy()
    cv2.rectangle(phone, (w * 47 // 100, h * 60 // 100), (w * 60 // 100, h * 92 // 100),
                  (15, 15, 15), -1)
    pair = np.full_like(face, 40)
    small = cv2.resize(astronaut_bgr(w // 2, h), (w // 2, h))
    pair[:, : w // 2] = small
    pair[:, w // 2 :] = cv2.flip(small, 1)
    notes = face.copy()
    x0, y0 = w * 5 // 100, h * 55 // 100
    cv2.rectangle(notes, (x0, y0), (x0 + w * 35 // 100, y0 + h * 35 // 100), (235, 235, 235), -1)
    for i, line in enumerate(("def solve(a):", "  return sorted(a)", "O(n log n)")):
        cv2.putText(notes, line, (x0 + 8, y0 + 30 + 30 * i), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6, (20, 20, 20), 2)
    return {
        "face": face,
        "covered": np.full_like(face, 22),
        "phone": phone,
        "two_faces": pair,
        "away": _warp(face, dx=w * 0.12, angle=28, scale=0.9),
        "notes": notes,
    }


def build_clips(w: int = W, h: int = H, frames: int = 30, noise: float = 3.0,
                sway_px: float = 3.0) -> dict[str, list[bytes]]:
    """One closed-GOP H.264 clip per scene. The person sways a few pixels and tilts a
    degree (periodically, so the loop is seamless) over camera noise, like someone sitting
    still in front of a webcam."""
    rng = np.random.default_rng(7)
    clips = {}
    for name, image in scene_images(w, h).items():
        moving = name not in ("covered",)
        images = []
        for i in range(frames):
            phase = 2 * math.pi * i / frames
            img = _warp(image, sway_px * math.sin(phase), sway_px / 2 * math.sin(phase + 1),
                        angle=math.sin(phase + 2)) if moving else image
            noisy = img.astype(np.int16) + rng.normal(0, noise, img.shape).astype(np.int16)
            images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        clips[name] = encode_clip(images, fps=FPS)
    return clips


#: What the fake Rekognition answers while a scene is shown (faces only when the image is
#: textured: `faces_from_image`), and the alert the scene should raise.
SCENE_ANSWERS: dict[str, dict[str, Any]] = {
    "face": {"faces": [fake_face()], "labels": [], "text": []},
    "covered": {"faces": [fake_face()], "labels": [], "text": []},
    # The phone boxed where scene_images draws it (evidence snapshots box it).
    "phone": {"faces": [fake_face()],
              "labels": [fake_label("Mobile Phone", 93.0, boxes=[(0.47, 0.6, 0.13, 0.32)])],
              "text": []},
    "two_faces": {"faces": [fake_face(), fake_face(box=(0.6, 0.2, 0.25, 0.4))],
                  "labels": [("Person", 97.0, 2)], "text": []},
    "away": {"faces": [fake_face(yaw=48.0)], "labels": [], "text": []},
    "notes": {"faces": [fake_face()], "labels": [("Paper", 91.0)],
              "text": ["def solve(a):", "return sorted(a)", "O(n log n)"]},
}
EXPECTED_ALERT = {
    "covered": "no_face_detected",
    "phone": "suspicious_object",
    "two_faces": "multiple_faces_detected",
    "away": "looking_away",
    "notes": "text_detected",
}


def show_scene(fake: FakeRekognition, scene: str) -> None:
    fake.set_scene(**SCENE_ANSWERS[scene])


def new_fake(latency_s: float = 0.05, per_image: bool = False) -> FakeRekognition:
    """`per_image`: the fake tells the scenes apart by the image itself (nearest of the
    scenes' 32×24 grey thumbnails), so senders showing different scenes at once are each
    answered for their own (a global `show_scene` would leak one's scene into the others)."""
    fake = FakeRekognition(latency_s=latency_s, faces_from_image=True)
    if per_image:
        for name, answers in SCENE_ANSWERS.items():
            fake.define_scene(name, **answers)
        fake.scene_of_image = scene_classifier()
    return fake


def _grey_thumb(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return cv2.resize(grey, (32, 24), interpolation=cv2.INTER_AREA).astype(np.float32)


def scene_classifier(w: int = W, h: int = H) -> Any:
    refs = {name: _grey_thumb(img) for name, img in scene_images(w, h).items()}

    def scene_of(jpeg: bytes) -> str | None:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            return None
        thumb = _grey_thumb(image)
        return min(refs, key=lambda name: float(np.mean((refs[name] - thumb) ** 2)))

    return scene_of


# --- sessions and trials ------------------------------------------------------------------


@dataclass
class Peer:
    client: RtcTestClient
    camera: EncodedCamera
    onsets: dict[str, list[float]] = field(default_factory=dict)
    ends: dict[str, list[float]] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)

    @classmethod
    async def connect(cls, url: str, clips: dict[str, list[bytes]]) -> Peer:
        camera = EncodedCamera(clips, "face", fps=FPS)
        client = RtcTestClient(url, camera, codecs=["H264"])
        await client.connect(job_data={"jobTitle": "bench"})
        await client.wait_for("frame_analysis", within=20)
        return cls(client, camera)

    def show(self, scene: str) -> int:
        """Switch the camera to `scene`; returns the message mark to wait from."""
        mark = len(self.client.messages)
        self.camera.show(scene)
        return mark

    async def switched(self, scene: str) -> float:
        """Wall time of the first frame of `scene` (waits for it to be sent)."""
        while not self.camera.switches or self.camera.switches[-1][0] != scene:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return self.camera.switches[-1][1]

    async def await_alert(
        self, mark: int, scene: str, alert: str, status: str, within: float
    ) -> float | None:
        """Seconds from the first frame of `scene` to the `alert` `status` message on the
        data channel, or None when it did not come within `within` seconds."""
        try:
            msg = await self.client.wait_for(
                "alerts", lambda m: bool(alert_events(m, alert, status)),
                within=within, start=mark,
            )
        except TimeoutError:
            return None
        return self.client.arrivals[self.client.index_of(msg)] - await self.switched(scene)

    async def switch_and_wait(
        self, scene: str, alert: str, status: str, within: float
    ) -> float | None:
        return await self.await_alert(self.show(scene), scene, alert, status, within)

    async def metrics(self) -> dict[str, Any]:
        mark = len(self.client.messages)
        self.client.send({"type": "get_live_metrics"})
        return await self.client.wait_for("live_metrics", start=mark, within=10)

    async def close(self) -> None:
        await self.client.close()


def fmt_s(value: float) -> str:
    return "   n/a" if value != value else f"{value:6.2f}"
