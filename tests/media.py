"""Test media made in the test run: real face imagery from scikit-image, blank frames."""

from __future__ import annotations

import base64
import functools

import cv2
import numpy as np

from server import sample_frame


@functools.cache
def astronaut_bgr(width: int = 640, height: int = 480) -> np.ndarray:
    """One smiling frontal face (the photo `proctor sample-frame` writes)."""
    return sample_frame.astronaut_bgr(width, height)


def blank_bgr(width: int = 640, height: int = 480, value: int = 128) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def data_url(image: np.ndarray, quality: int = 85) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(image, quality)).decode()


@functools.cache
def face_data_url() -> str:
    return data_url(astronaut_bgr())


@functools.cache
def blank_data_url() -> str:
    return data_url(blank_bgr())
