"""Frames: one image to analyse, whatever transport brought it.

Parsing a data URL is cheap and done on the event loop so bad input is refused at once
(base64, magic bytes, size, header dimensions). Pixel work — decoding, resizing,
re-encoding — is done lazily by `Frame.jpeg()` / `Frame.bgr()`, which callers run in a
worker thread (the analyser backends do), never on the loop.
"""

from __future__ import annotations

import base64
import binascii
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import av

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Refused from the header, never decoded: a small file can declare gigapixels.
MAX_FRAME_PIXELS = 40_000_000


class FrameError(ValueError):
    """A frame we refuse; `code` is the stable machine-readable error code. Transports
    map it to their own form (`server.errors.from_frame_error`): media knows no HTTP."""

    code = "invalid_frame"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedFrame(FrameError):
    code = "malformed_frame"


class UnsupportedImage(FrameError):
    code = "unsupported_image"


class FrameTooLarge(FrameError):
    code = "frame_too_large"


def _b64_decoded_size(text: str) -> int:
    return len(text) * 3 // 4 - text[-2:].count("=")


def parse_data_url(value: object, max_bytes: int) -> tuple[bytes, str]:
    """Decode `data:image/jpeg;base64,...` (or bare base64) to bytes and its MIME type.

    Raises a `FrameError` subclass saying exactly what is wrong.
    """
    if not isinstance(value, str | bytes):
        raise MalformedFrame("frame must be a data URL or base64 string")
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        raise MalformedFrame("frame is empty")
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep:
            raise MalformedFrame("data URL has no ',' separating header and payload")
        if ";base64" not in header:
            raise MalformedFrame("data URL must be base64-encoded (';base64')")
        text = payload
    # Refuse before decoding so a huge payload costs no memory or time.
    if _b64_decoded_size(text) > max_bytes:
        raise FrameTooLarge(f"frame exceeds the maximum of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedFrame(f"frame is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise FrameTooLarge(f"frame exceeds the maximum of {max_bytes} bytes")
    return data, sniff_image(data)


def sniff_image(data: bytes) -> str:
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    if data.startswith(PNG_MAGIC):
        return "image/png"
    raise UnsupportedImage("frame is not a JPEG or PNG image")


# JPEG start-of-frame markers (they carry the dimensions); C4, C8 and CC are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header only (no pixel decode). A direct marker walk:
    it runs on the event loop for every pushed frame, where PIL's parser cost ~0.4 ms."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise MalformedFrame("PNG header is truncated or has no IHDR chunk")
        return struct.unpack(">II", data[16:24])
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise MalformedFrame("JPEG header is corrupt (expected a marker)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            raise MalformedFrame("JPEG header is corrupt (bad segment length)")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + length
    raise MalformedFrame("JPEG header is truncated (no frame header found)")


def _scale_for(width: int, height: int, max_dim: int) -> float:
    longest = max(width, height)
    return 1.0 if longest <= max_dim else max_dim / longest


@dataclass(eq=False)
class Frame:
    """One image plus when it was captured. Exactly one source is set at construction;
    conversions are cached and thread-safe, so several checks share one decode."""

    captured_at: float = field(default_factory=time.time)
    encoded: bytes | None = None
    mime: str | None = None
    width: int = 0
    height: int = 0
    _bgr: np.ndarray | None = None
    _video_frame: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _jpeg_cache: dict[tuple[int, int], bytes] = field(default_factory=dict, repr=False)
    _bgr_cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_data_url(
        cls,
        value: object,
        max_bytes: int,
        captured_at: float | None = None,
        max_pixels: int = MAX_FRAME_PIXELS,
    ) -> Frame:
        data, mime = parse_data_url(value, max_bytes)
        return cls.from_encoded(data, mime, captured_at, max_pixels)

    @classmethod
    def from_encoded(
        cls,
        data: bytes,
        mime: str,
        captured_at: float | None = None,
        max_pixels: int = MAX_FRAME_PIXELS,
    ) -> Frame:
        width, height = image_size(data)
        if width < 1 or height < 1:
            raise MalformedFrame("image has no pixels")
        if width * height > max_pixels:
            raise FrameTooLarge(
                f"frame declares {width}×{height} pixels, above the maximum of {max_pixels}"
            )
        return cls(
            captured_at=captured_at if captured_at is not None else time.time(),
            encoded=data,
            mime=mime,
            width=width,
            height=height,
        )

    @classmethod
    def from_bgr(cls, image: np.ndarray, captured_at: float | None = None) -> Frame:
        if image.ndim != 3 or image.shape[2] != 3:
            raise MalformedFrame("expected an H×W×3 BGR image")
        return cls(
            captured_at=captured_at if captured_at is not None else time.time(),
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            _bgr=image,
        )

    @classmethod
    def from_video_frame(cls, frame: av.VideoFrame, captured_at: float | None = None) -> Frame:
        """Wrap a decoded WebRTC frame without converting it (conversion happens only if
        the frame is sampled for analysis)."""
        return cls(
            captured_at=captured_at if captured_at is not None else time.time(),
            width=int(frame.width),
            height=int(frame.height),
            _video_frame=frame,
        )

    # --- pixel work: call these off the event loop -------------------------------------

    def bgr(self, max_dim: int = 1920) -> np.ndarray:
        """The frame as a BGR uint8 array, downscaled so its longest side ≤ max_dim."""
        with self._lock:
            cached = self._bgr_cache.get(max_dim)
            if cached is not None:
                return cached
            image = self._to_bgr(max_dim)
            self._bgr_cache[max_dim] = image
            return image

    def _to_bgr(self, max_dim: int) -> np.ndarray:
        import cv2

        scale = _scale_for(self.width, self.height, max_dim)
        if self._video_frame is not None:
            vf = self._video_frame
            if scale < 1.0:
                w = max(2, int(vf.width * scale) // 2 * 2)
                h = max(2, int(vf.height * scale) // 2 * 2)
                return vf.reformat(width=w, height=h, format="bgr24").to_ndarray()
            return vf.to_ndarray(format="bgr24")
        if self._bgr is not None:
            image = self._bgr
        else:
            assert self.encoded is not None
            arr = np.frombuffer(self.encoded, dtype=np.uint8)
            decoded = cv2.imdecode(arr, cv2.IMREAD_COLOR)
            if decoded is None:
                raise MalformedFrame("image data cannot be decoded")
            image = decoded
        if scale < 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return image

    def jpeg(self, max_dim: int = 1920, quality: int = 85, max_bytes: int = 5 << 20) -> bytes:
        """Bytes fit for an image API: the original when it already fits, otherwise
        re-encoded (and downscaled) until it is under max_bytes."""
        key = (max_dim, quality)
        with self._lock:
            cached = self._jpeg_cache.get(key)
            if cached is not None:
                return cached
        if (
            self.encoded is not None
            and len(self.encoded) <= max_bytes
            and max(self.width, self.height) <= max_dim
        ):
            return self.encoded
        import cv2

        image = self.bgr(max_dim)
        q = quality
        while True:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                raise MalformedFrame("frame cannot be encoded as JPEG")
            data = buf.tobytes()
            if len(data) <= max_bytes or q <= 30:
                break
            q -= 15
        with self._lock:
            self._jpeg_cache[key] = data
        return data
