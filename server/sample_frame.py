"""`proctor sample-frame > face.jpg`: a JPEG of a real face for a first frame.

The photo is scikit-image's astronaut (Eileen Collins, a NASA portrait in the public
domain), which ships inside the scikit-image package: nothing is downloaded. One smiling,
frontal face, so both backends give a real result on it.
"""

from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np


def astronaut_bgr(width: int = 640, height: int = 480) -> np.ndarray:
    """The astronaut photo (512×512) centred on a dark `width`×`height` canvas."""
    from skimage import data

    bgr = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    canvas = np.full((height, width, 3), 40, np.uint8)
    scale = min(width / bgr.shape[1], height / bgr.shape[0])
    resized = cv2.resize(bgr, (int(bgr.shape[1] * scale), int(bgr.shape[0] * scale)))
    y = (height - resized.shape[0]) // 2
    x = (width - resized.shape[1]) // 2
    canvas[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
    return canvas


def sample_jpeg(width: int = 640, height: int = 480, quality: int = 85) -> bytes:
    image = astronaut_bgr(width, height)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR image
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sample-frame",
        help="write a JPEG of a real face to stdout: proctor sample-frame > face.jpg",
        description="Write a JPEG of a real face (scikit-image's astronaut photo) to stdout, "
        "for a first frame: proctor sample-frame > face.jpg",
    )
    p.add_argument("--width", type=int, default=640, help="frame width (default 640)")
    p.add_argument("--height", type=int, default=480, help="frame height (default 480)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not (16 <= args.width <= 4096 and 16 <= args.height <= 4096):
        print("proctor sample-frame: --width and --height must be 16–4096", file=sys.stderr)
        return 2
    if sys.stdout.isatty():
        print("proctor sample-frame writes a JPEG: redirect it, e.g. "
              "proctor sample-frame > face.jpg", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(sample_jpeg(args.width, args.height))
    sys.stdout.buffer.flush()
    return 0
