"""Recorded videos made in the test run with PyAV: face and no-face segments from
scikit-image imagery, any codec PyAV has, optional rotation metadata, variable frame rate
and a non-zero first timestamp."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from tests.media import astronaut_bgr, blank_bgr

CONTAINERS = {"h264": "mp4", "libx264": "mp4", "vp9": "webm", "vp8": "webm"}
ENCODERS = {"h264": "libx264", "libx264": "libx264", "vp9": "libvpx-vp9", "vp8": "libvpx"}


def scene(kind: str, width: int, height: int) -> np.ndarray:
    if kind == "face":
        return astronaut_bgr(width, height)
    if kind == "blank":
        return blank_bgr(width, height)
    if kind == "marker":  # bright top-left quadrant: shows which way a picture was turned
        img = blank_bgr(width, height, 30)
        img[: height // 2, : width // 2] = 230
        return img
    raise ValueError(kind)


def make_video(
    path: Path,
    segments: Sequence[tuple[float, str]],
    *,
    codec: str = "h264",
    fps: float = 10.0,
    size: tuple[int, int] = (320, 240),
    rotation: int = 0,
    vfr: bool = False,
    start_s: float = 0.0,
    gop: int | None = None,
) -> Path:
    """Write `segments` [(seconds, "face" | "blank" | "marker")] as a video. `vfr`
    alternates frame gaps of 0.5/fps and 1.5/fps; `start_s` is the first timestamp."""
    width, height = size
    images = {kind: scene(kind, width, height) for _d, kind in segments}
    with av.open(str(path), mode="w", format=CONTAINERS[codec]) as out:
        stream = out.add_stream(ENCODERS[codec], rate=int(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        if gop is not None:
            stream.codec_context.gop_size = gop
        if codec in ("vp8", "vp9"):
            stream.options = {"deadline": "realtime", "cpu-used": "8", "b": "400k"}
        else:
            stream.options = {"preset": "ultrafast", "bf": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        t, i = 0.0, 0
        seg_end = 0.0
        for duration, kind in segments:
            seg_end += duration
            rgb = cv2.cvtColor(images[kind], cv2.COLOR_BGR2RGB)
            while t < seg_end - 1e-9:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = round((start_s + t) * 1000)
                frame.time_base = Fraction(1, 1000)
                for packet in stream.encode(frame):
                    out.mux(packet)
                step = 1.0 / fps
                if vfr:
                    step *= 0.5 if i % 2 == 0 else 1.5
                t += step
                i += 1
        for packet in stream.encode(None):
            out.mux(packet)
    return path
