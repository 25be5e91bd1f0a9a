"""Hostile inputs shared by the bad-input battery (tests/test_bad_input.py): JSON texts,
frame values and timestamps that a client may send on any transport. Each entry names
the status (or a set of them) a server must answer; all are 4xx."""

from __future__ import annotations

import base64
import struct
import time
import zlib
from typing import Any

JPEG = b"\xff\xd8"


def png(width: int, height: int, *, bit_depth: int = 8, colour: int = 0, rows: bool = False) -> bytes:
    """A PNG declaring width×height. `rows`: with real (zero) pixel rows, compressed, so a
    decoder would really allocate them (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    if rows:
        stride = (width * bit_depth + 7) // 8
        comp = zlib.compressobj(9)
        row = b"\x00" * (stride + 1)
        body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        body = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_sof(width: int, height: int) -> bytes:
    """A JPEG whose frame header declares width×height, with no image data."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return JPEG + sof + b"\xff\xd9"


def b64url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# Whole JSON texts (bodies or payloads) no server may accept as valid.
HOSTILE_JSON: list[tuple[str, bytes]] = [
    ("deep array 100k", deep_array(100_000).encode()),
    ("deep object 50k", deep_object(50_000).encode()),
    ("deep array 40", deep_array(40).encode()),
    ("deep in job_data", ('{"job_data": {"x": ' + deep_array(40) + "}}").encode()),
    ("5000-digit int", b'{"job_data": {"n": ' + b"9" * 5000 + b"}}"),
    ("5000-digit float", b'{"job_data": {"n": 1.' + b"5" * 5000 + b"}}"),
    ("NaN", b'{"job_data": {"n": NaN}}'),
    ("Infinity", b'{"job_data": {"n": Infinity}}'),
    ("-Infinity", b'{"job_data": {"n": -Infinity}}'),
    ("1e400", b'{"job_data": {"n": 1e400}}'),
    ("-1e400", b'{"job_data": {"n": -1e400}}'),
    ("not json", b"not json"),
    ("truncated", b'{"job_data": {'),
    ("trailing comma", b'{"job_data": {},}'),
    ("invalid utf-8", b'{"job_data": {"a": "\xff\xfe"}}'),
    ("lone surrogate", b'{"job_data": {"a": "\\ud800"}}'),
    ("nul bytes", b"\x00" * 16),
    ("top-level array", b"[]"),
    ("top-level string", b'"job_data"'),
    ("top-level number", b"123"),
    ("top-level true", b"true"),
    ("job_data list", b'{"job_data": []}'),
    ("job_data string", b'{"job_data": "Software Engineer"}'),
    ("job_data number", b'{"job_data": 5}'),
    ("single quotes", b"{'job_data': {}}"),
    ("trailing garbage", b'{"job_data": {}} xyz'),
]

# JSON texts that are hostile only as a frame request (they parse; their fields do not).
NOW = time.time()
TIMESTAMPS: list[tuple[str, Any]] = [
    ("1e300", 1e300),
    ("-1e300", -1e300),
    ("zero", 0),
    ("negative", -1),
    ("two days ahead", NOW + 2 * 86400),
    ("two days ago", NOW - 2 * 86400),
    ("milliseconds", NOW * 1000),
    ("string", "1700000000"),
    ("bool", True),
    ("list", [NOW]),
    ("object", {"t": NOW}),
    ("1e20", 1e20),
]
# Raw fragments for timestamps json.dumps cannot write.
RAW_TIMESTAMPS: list[tuple[str, str]] = [
    ("NaN", "NaN"),
    ("Infinity", "Infinity"),
    ("1e400", "1e400"),
    ("5000 digits", "9" * 5000),
]

FRAMES: list[tuple[str, Any, int]] = [
    ("null", None, 400),
    ("number", 123, 400),
    ("list", [], 400),
    ("object", {}, 400),
    ("empty", "", 400),
    ("data: only", "data:", 400),
    ("not base64 url", "data:image/jpeg,abcd", 400),
    ("empty payload", "data:image/jpeg;base64,", 400),
    ("bad base64", "data:image/jpeg;base64,!!!!", 400),
    ("base64 with spaces", "data:image/jpeg;base64,/9j/ 4AAQ", 400),
    ("non-ascii", "data:image/jpeg;base64,ÿÿÿÿ", 400),
    ("text", b64url(b"hello world, not an image"), 400),
    ("gif", b64url(b"GIF89a" + b"\x00" * 20, "image/gif"), 400),
    ("jpeg magic only", b64url(b"\xff\xd8\xff"), 400),
    ("jpeg 0x0", b64url(jpeg_sof(0, 0)), 400),
    ("jpeg bad segment", b64url(JPEG + b"\xff\xe0\x00\x01"), 400),
    ("jpeg no frame header", b64url(JPEG + b"\xff\xda\x00\x02"), 400),
    ("png 100x100 with a corrupt stream", b64url(png(100, 100)[:40] + b"junk" * 10, "image/png"), 400),
    ("jpeg 60000x60000", b64url(jpeg_sof(60000, 60000)), 413),
    ("jpeg 8000x6000 header only", b64url(jpeg_sof(8000, 6000)), 413),
    ("png magic only", b64url(b"\x89PNG\r\n\x1a\n", "image/png"), 400),
    ("png no IHDR", b64url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "image/png"), 400),
    ("png 0x0", b64url(png(0, 0), "image/png"), 400),
    ("png 20000x20000", b64url(png(20000, 20000), "image/png"), 413),
    ("png 2^31 wide", b64url(png(2**31 - 1, 1), "image/png"), 413),
    ("huge data-url header", "data:" + "a" * 50_000 + ";base64,AAAA", 400),
    ("bare base64 garbage", "A" * 1001, 400),
]
