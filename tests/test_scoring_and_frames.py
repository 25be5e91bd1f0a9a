"""Per-frame metrics and frame parsing."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from server.analysis.observation import Box, Checks, Face, Observation, Pose
from server.analysis.scoring import Scorer
from server.errors import from_frame_error
from server.media.frames import (
    Frame,
    FrameTooLarge,
    MalformedFrame,
    UnsupportedImage,
    parse_data_url,
)
from tests.media import astronaut_bgr, data_url, jpeg_bytes


def observation(
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    emotions: dict[str, float] | None = None,
    confidence: float = 98.0,
) -> Observation:
    face = Face(
        Box(0.3, 0.2, 0.3, 0.4),
        confidence,
        Pose(yaw, pitch, roll),
        emotions if emotions is not None else {"HAPPY": 50.0, "SAD": 50.0},
    )
    return Observation("test", Checks(), faces=(face,))


def test_frontal_face_scores_full_eye_contact() -> None:
    m = Scorer().score(observation())
    assert m.eye_contact == 100.0
    assert m.facial_expression == 50.0
    assert m.engagement == pytest.approx(0.6 * 100 + 0.4 * 50)
    assert m.confidence == 98.0


def test_eye_contact_is_50_at_the_threshold_and_0_at_twice_it() -> None:
    assert Scorer().score(observation(yaw=30)).eye_contact == pytest.approx(50.0)
    assert Scorer().score(observation(pitch=-25)).eye_contact == pytest.approx(50.0)
    assert Scorer().score(observation(yaw=70)).eye_contact == 0.0


def test_posture_drops_when_the_head_moves() -> None:
    steady, moving = Scorer(), Scorer()
    for i in range(10):
        steady.score(observation(yaw=2.0))
        moving.score(observation(yaw=(-15.0 if i % 2 else 15.0)))
    assert steady.score(observation(yaw=2.0)).posture == 100.0
    assert moving.score(observation(yaw=15.0)).posture < 70.0


def test_no_face_has_no_metrics() -> None:
    m = Scorer().score(Observation("test", Checks(), faces=()))
    assert m.eye_contact is None and m.engagement is None and m.confidence is None


def test_data_url_and_bare_base64_are_accepted() -> None:
    raw = jpeg_bytes(astronaut_bgr())
    assert parse_data_url("data:image/jpeg;base64," + base64.b64encode(raw).decode(), 5 << 20) == (
        raw,
        "image/jpeg",
    )
    assert parse_data_url(base64.b64encode(raw).decode(), 5 << 20)[0] == raw


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("data:image/jpeg;base64,@@@not-base64@@@", MalformedFrame),
        ("", MalformedFrame),
        (12345, MalformedFrame),
        ("data:image/jpeg,rawdata", MalformedFrame),
        (
            "data:image/gif;base64," + base64.b64encode(b"GIF89a" + b"\0" * 20).decode(),
            UnsupportedImage,
        ),
        (
            "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff" + b"\0" * 10).decode(),
            MalformedFrame,
        ),
    ],
)
def test_bad_frames_get_specific_errors(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        Frame.from_data_url(value, 5 << 20)


def test_too_large_is_refused_before_decoding() -> None:
    with pytest.raises(FrameTooLarge) as info:
        parse_data_url("A" * 4000, max_bytes=1000)
    assert info.value.code == "frame_too_large"
    assert from_frame_error(info.value).status == 413


def test_large_dimensions_are_downscaled_not_refused() -> None:
    big = np.random.default_rng(1).integers(0, 255, (2400, 3200, 3), dtype=np.uint8)
    frame = Frame.from_data_url(data_url(big, quality=50), 20 << 20)
    assert (frame.width, frame.height) == (3200, 2400)
    assert max(frame.bgr(1920).shape[:2]) == 1920
    import cv2

    sent = cv2.imdecode(np.frombuffer(frame.jpeg(1920), np.uint8), cv2.IMREAD_COLOR)
    assert max(sent.shape[:2]) == 1920


def test_small_jpeg_is_sent_unchanged() -> None:
    raw = jpeg_bytes(astronaut_bgr())
    frame = Frame.from_encoded(raw, "image/jpeg")
    assert frame.jpeg(1920) is raw


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("size", [(640, 480), (1, 1), (4001, 123)])
def test_header_size_matches_the_decoder(ext: str, size: tuple[int, int]) -> None:
    import cv2

    from server.media.frames import image_size

    image = np.random.default_rng(2).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    assert image_size(buf.tobytes()) == size


def test_progressive_jpeg_header_is_read() -> None:
    import io

    from PIL import Image

    from server.media.frames import image_size

    out = io.BytesIO()
    Image.fromarray(astronaut_bgr()).save(out, "JPEG", progressive=True)
    assert image_size(out.getvalue()) == (640, 480)


@pytest.mark.parametrize("data", [b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"\x89PNG\r\n\x1a\n" + bytes(8)])
def test_truncated_headers_are_malformed(data: bytes) -> None:
    from server.media.frames import image_size

    with pytest.raises(MalformedFrame):
        image_size(data)
