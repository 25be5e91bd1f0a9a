"""Shared kit for tests that drive real headless Chromium with a fake camera.

- `require_chromium()`: the browser binary, or skip (locally) / fail (CI=true).
- `write_y4m()`, `face_frames()`, `blank_frames()`: a YUV4MPEG2 file Chromium plays as the
  camera (`--use-file-for-fake-video-capture`); Chromium loops it.
- `launch_browser()`: a Playwright persistent context with the flags that keep media and
  WebRTC working offline and on loopback (see ../shared/WEBRTC_TESTING.md).
- `ConsoleWatch`: collects console errors and uncaught page errors so tests can assert a
  page ran clean.

Never run `playwright install`: the kit always uses the system Chromium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import pytest

from tests.netns import in_ci

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, ConsoleMessage, Error, Page

DEFAULT_CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 640, 480

# Flags verified on this machine kind. The last two stop Chromium hiding or dropping
# 127.0.0.1 host candidates, which loopback-only WebRTC tests need.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)


def chromium_path() -> str | None:
    """The Chromium binary: $CHROMIUM if set, else /usr/bin/chromium, else one on PATH."""
    candidates = [os.environ.get("CHROMIUM", ""), DEFAULT_CHROMIUM]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """The Chromium path and a usable Playwright, or skip the test; under CI=true a missing
    browser is a failure, so CI cannot go green by skipping the browser tests."""
    problem = ""
    path = chromium_path()
    if path is None:
        problem = "Chromium not found (set CHROMIUM or apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = "python playwright is not installed"
    if problem:
        if in_ci():
            pytest.fail(problem)
        pytest.skip(problem)
    assert path is not None
    return path


# --- fake camera ---------------------------------------------------------------------------


def write_y4m(
    path: Path | str,
    frames: Sequence[np.ndarray],
    fps: int = 15,
    *,
    color: Literal["bgr", "rgb"] = "bgr",
) -> Path:
    """Write frames (H×W×3 uint8, all the same even size) as a YUV4MPEG2 4:2:0 file for
    Chromium's fake capture device. `color` says the channel order of the input."""
    if not frames:
        raise ValueError("write_y4m needs at least one frame")
    height, width = frames[0].shape[:2]
    if width % 2 or height % 2:
        raise ValueError("4:2:0 needs even frame dimensions")
    code = cv2.COLOR_BGR2YUV_I420 if color == "bgr" else cv2.COLOR_RGB2YUV_I420
    out = Path(path)
    with out.open("wb") as fh:
        fh.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for frame in frames:
            if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
                raise ValueError(f"frame {frame.shape} {frame.dtype} != ({height},{width},3) uint8")
            # cvtColor to I420 yields the Y, U and V planes back to back, as y4m wants them.
            planes = cv2.cvtColor(np.ascontiguousarray(frame), code)
            fh.write(b"FRAME\n")
            fh.write(planes.tobytes())
    return out


def _letterbox(image: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Fit `image` into width×height on a neutral grey background, centred."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = round(w * scale), round(h * scale)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    canvas = np.full((height, width, 3), 128, dtype=np.uint8)
    x, y = (width - new_w) // 2, (height - new_h) // 2
    canvas[y : y + new_h, x : x + new_w] = resized
    return canvas


def face_frames(count: int = 15, jitter_px: int = 2) -> list[np.ndarray]:
    """640×480 BGR frames of one frontal face (scikit-image's astronaut), with a tiny
    horizontal sway so consecutive frames differ like a real camera's while the head
    stays steady."""
    from skimage import data  # test-only dependency, imported where needed

    base = _letterbox(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    frames = []
    for i in range(count):
        dx = round(jitter_px * np.sin(2 * np.pi * i / max(count, 1)))
        shift = np.array([[1, 0, dx], [0, 1, 0]], dtype=np.float32)
        frames.append(cv2.warpAffine(base, shift, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REPLICATE))
    return frames


def blank_frames(count: int = 15, value: int = 128) -> list[np.ndarray]:
    """640×480 BGR frames of a uniform grey: a camera that sees no one."""
    return [np.full((HEIGHT, WIDTH, 3), value, dtype=np.uint8) for _ in range(count)]


# --- browser ---------------------------------------------------------------------------------


def chromium_args(y4m_path: Path | str | None, extra_args: Iterable[str] = ()) -> list[str]:
    """Command-line flags for a fake-camera Chromium playing `y4m_path` (absolute path)."""
    args = list(CHROMIUM_FLAGS)
    if y4m_path is not None:
        args.append(f"--use-file-for-fake-video-capture={Path(y4m_path).resolve()}")
    args.extend(extra_args)
    return args


@asynccontextmanager
async def launch_browser(
    y4m_path: Path | str | None,
    tmp_dir: Path | str,
    *,
    extra_args: Iterable[str] = (),
    viewport: tuple[int, int] = (1280, 900),
) -> AsyncIterator[BrowserContext]:
    """A headless Chromium persistent context (profile in `tmp_dir`) whose fake camera plays
    `y4m_path` (Chromium's synthetic pattern when None). Always closed on exit."""
    from playwright.async_api import async_playwright

    executable = require_chromium()
    args = chromium_args(y4m_path, extra_args)
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_dir),
            executable_path=executable,
            headless=True,
            args=args,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context
        finally:
            await context.close()


@dataclass
class ConsoleWatch:
    """Records a page's console errors and uncaught exceptions. Attach before navigating."""

    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> ConsoleWatch:
        page.on("console", self._on_console)
        page.on("pageerror", self._on_pageerror)
        return self

    def _on_console(self, msg: ConsoleMessage) -> None:
        line = f"[{msg.type}] {msg.text}"
        self.messages.append(line)
        if msg.type == "error":
            self.errors.append(line)

    def _on_pageerror(self, exc: Error) -> None:
        self.errors.append(f"[pageerror] {exc}")
