"""The Rekognition backend through real boto3/botocore against the local fake service."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import cv2
import numpy as np
import pytest

from server.analysis.observation import Checks, Gaze, Observation
from server.analysis.rekognition import AnalyserClosed, RekognitionAnalyser
from server.config import Settings
from server.media.frames import Frame, FrameTooLarge, MalformedFrame
from server.observability import Instruments
from tests.fakes import FakeRekognition, error, fake_face, fake_label
from tests.fakes.rekognition import FAKE_ACCESS_KEY

MakeAnalyser = Callable[..., Awaitable[RekognitionAnalyser]]


def jpeg_frame(width: int = 640, height: int = 480, seed: int = 1) -> Frame:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return Frame.from_encoded(buf.tobytes(), "image/jpeg")


def calls_counted(instruments: Instruments, operation: str, outcome: str) -> float:
    value = instruments.registry.get_sample_value(
        "proctor_rekognition_calls_total", {"operation": operation, "outcome": outcome}
    )
    return value or 0.0


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeRekognition]:
    server = FakeRekognition()
    await server.start()
    # Nothing from the machine's AWS setup may leak into the client.
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    yield server
    await server.stop()


@pytest.fixture
def instruments() -> Instruments:
    return Instruments()


@pytest.fixture
async def make_analyser(
    fake: FakeRekognition, instruments: Instruments
) -> AsyncIterator[MakeAnalyser]:
    made: list[RekognitionAnalyser] = []

    async def make(**overrides: Any) -> RekognitionAnalyser:
        values: dict[str, Any] = {
            "aws_access_key_id": "",  # default chain: the fake's env credentials
            "aws_secret_access_key": "",
            "aws_session_token": "",
            "aws_profile": "",
            "aws_region": "us-east-1",
            "analyser_max_concurrency": 4,
            "rekognition_max_attempts": 1,
            "rekognition_connect_timeout_s": 1.0,
            "rekognition_read_timeout_s": 2.0,
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        analyser = RekognitionAnalyser(settings, instruments)
        made.append(analyser)
        await analyser.start()
        return analyser

    yield make
    for analyser in made:
        await analyser.close()


# --- parsing ---------------------------------------------------------------------------------


def image_frame(image: np.ndarray) -> Frame:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return Frame.from_encoded(buf.tobytes(), "image/jpeg")


async def test_a_dark_camera_is_insufficient_unless_rekognition_sees_a_face(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    from tests.media import astronaut_bgr

    analyser = await make_analyser()
    dark = image_frame((astronaut_bgr() * 0.15).astype(np.uint8))  # textured, mean luma < 30
    fake.set_scene(faces=[])
    unseen = await analyser.analyse(dark, Checks(faces=True))
    assert unseen.faces == () and unseen.quality is not None
    assert unseen.insufficient and unseen.quality.reason == "too_dark"
    # The service found a face in the same pixels: the frame was judgeable after all.
    fake.set_scene(faces=[fake_face()])
    seen = await analyser.analyse(dark, Checks(faces=True))
    assert seen.quality is not None and not seen.insufficient
    assert seen.quality.brightness is not None and seen.quality.brightness < 30
    # A covered lens (flat black) is a judgeable absence, not a dark camera.
    fake.set_scene(faces=[])
    covered = await analyser.analyse(image_frame(np.full((480, 640, 3), 3, np.uint8)), Checks())
    assert covered.faces == () and not covered.insufficient
    # A blurred camera with nothing recognisable in it is insufficient too.
    blurred = cv2.GaussianBlur(astronaut_bgr(), (0, 0), 8)
    out = await analyser.analyse(image_frame(blurred), Checks())
    assert out.insufficient and out.quality is not None and out.quality.reason == "too_blurred"


async def test_eye_direction_is_optional(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    fake.set_scene(faces=[fake_face(gaze=None)])
    analyser = await make_analyser()
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))
    assert obs.faces is not None and obs.faces[0].gaze is None and obs.faces[0].pose is not None



async def test_faces_pose_emotions_and_flags_are_parsed(
    fake: FakeRekognition, make_analyser: MakeAnalyser, instruments: Instruments
) -> None:
    fake.set_scene(
        faces=[
            fake_face(
                yaw=35.5,
                pitch=-12.25,
                roll=4.0,
                emotions={"HAPPY": 81.0, "CALM": 12.0},
                box=(0.2, 0.1, 0.3, 0.4),
                eyes_open=False,
                mouth_open=True,
                smile=True,
                gaze=(-20.0, 5.5, 97.0),
            ),
            fake_face(confidence=30.0),  # below rekognition_min_face_confidence
        ]
    )
    analyser = await make_analyser(rekognition_min_face_confidence=50.0)
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))

    assert obs.backend == "rekognition"
    assert obs.faces is not None and len(obs.faces) == 1
    face = obs.faces[0]
    assert face.confidence == pytest.approx(99.9)
    assert face.pose is not None
    assert (face.pose.yaw, face.pose.pitch, face.pose.roll) == (35.5, -12.25, 4.0)
    assert face.emotions["HAPPY"] == 81.0 and face.emotions["CALM"] == 12.0
    assert set(face.emotions) == {
        "HAPPY", "SAD", "ANGRY", "CONFUSED", "DISGUSTED", "SURPRISED", "CALM", "FEAR"
    }  # fmt: skip
    assert face.dominant_emotion == "HAPPY"
    assert (face.eyes_open, face.mouth_open, face.smile) == (False, True, True)
    assert (face.box.left, face.box.top, face.box.width, face.box.height) == pytest.approx(
        (0.2, 0.1, 0.3, 0.4)
    )
    assert face.gaze == Gaze(yaw=-20.0, pitch=5.5, confidence=97.0)
    assert obs.labels is None and obs.text is None
    # Our pixel check, not Rekognition's face Quality: a face was found, so judgeable.
    assert obs.quality is not None and not obs.quality.insufficient
    assert obs.quality.brightness is not None and obs.quality.face_size == pytest.approx(0.4)
    assert obs.degraded == ()
    assert obs.calls == {"DetectFaces": 1}
    assert (obs.width, obs.height) == (640, 480)
    assert obs.latency_ms > 0
    # Exactly one request, asking for all attributes, signed for the configured region.
    assert fake.count() == 1
    call = fake.calls[0]
    assert call.operation == "DetectFaces" and call.params["Attributes"] == ["ALL"]
    assert (call.width, call.height) == (640, 480)
    assert call.access_key == FAKE_ACCESS_KEY and call.region == "us-east-1"
    assert calls_counted(instruments, "DetectFaces", "ok") == 1


async def test_face_box_outside_the_frame_is_clipped(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    fake.set_scene(faces=[fake_face(box=(-0.1, 0.8, 0.3, 0.4))])
    analyser = await make_analyser()
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))
    assert obs.faces is not None
    box = obs.faces[0].box
    assert (box.left, box.top) == (0.0, 0.8)
    assert box.width == pytest.approx(0.2) and box.height == pytest.approx(0.2)


async def test_labels_with_instances(fake: FakeRekognition, make_analyser: MakeAnalyser) -> None:
    fake.set_scene(
        labels=[
            fake_label("Mobile Phone", 92.5, instances=2, parents=["Electronics"]),
            fake_label("Person", 99.1, instances=1),
            fake_label("Wall", 41.0),  # under MinConfidence: the service leaves it out
        ]
    )
    analyser = await make_analyser(rekognition_min_label_confidence=60.0)
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=False, labels=True))

    assert obs.labels is not None
    assert [(lb.name, lb.confidence, lb.instances) for lb in obs.labels] == [
        ("Mobile Phone", 92.5, 2),
        ("Person", 99.1, 1),
    ]
    # Each instance's BoundingBox reaches the observation (evidence snapshots box them).
    phone = obs.labels[0]
    assert [(b.left, b.top, b.width, b.height) for b in phone.boxes] == [
        pytest.approx((0.0, 0.6, 0.1, 0.1)),
        pytest.approx((0.1, 0.6, 0.1, 0.1)),
    ]
    assert obs.faces is None and obs.text is None
    assert obs.calls == {"DetectLabels": 1}
    assert fake.count() == 1 and fake.count("DetectLabels") == 1
    assert fake.calls[0].params["MinConfidence"] == 60.0


async def test_text_keeps_lines_only(fake: FakeRekognition, make_analyser: MakeAnalyser) -> None:
    fake.set_scene(text=["ANSWER KEY QUESTION 3", ("x = 42", 91.0)])
    analyser = await make_analyser()
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=False, text=True))

    assert obs.text is not None
    assert [(t.text, t.confidence) for t in obs.text] == [
        ("ANSWER KEY QUESTION 3", 98.0),
        ("x = 42", 91.0),
    ]
    box = obs.text[0].box  # the LINE's Geometry.BoundingBox
    assert box is not None and (box.left, box.top, box.width, box.height) == pytest.approx(
        (0.1, 0.1, 0.3, 0.05)
    )
    assert obs.calls == {"DetectText": 1}
    assert fake.count("DetectText") == 1


async def test_unrequested_checks_make_no_calls(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    analyser = await make_analyser()
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=False))
    assert (obs.faces, obs.labels, obs.text) == (None, None, None)
    assert obs.calls == {} and obs.degraded == ()
    assert fake.count() == 0

    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True, labels=True, text=True))
    assert obs.faces is not None and obs.labels == () and obs.text == ()
    assert obs.calls == {"DetectFaces": 1, "DetectLabels": 1, "DetectText": 1}
    assert sorted(c.operation for c in fake.calls) == ["DetectFaces", "DetectLabels", "DetectText"]


# --- configuration -----------------------------------------------------------------------------


async def test_region_and_credentials_come_from_settings(
    fake: FakeRekognition, make_analyser: MakeAnalyser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # boto3 itself would read AWS_DEFAULT_REGION; the configured AWS_REGION must win.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    analyser = await make_analyser(
        aws_region="eu-west-2",
        aws_access_key_id="AKIASETTINGSKEY00000",
        aws_secret_access_key="settings-secret",
    )
    await analyser.analyse(jpeg_frame(), Checks(faces=True))
    assert fake.calls[0].region == "eu-west-2"
    assert fake.calls[0].access_key == "AKIASETTINGSKEY00000"


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["ThrottlingException", "ProvisionedThroughputExceededException"])
async def test_throttling_degrades_the_check_and_is_counted(
    fake: FakeRekognition, make_analyser: MakeAnalyser, instruments: Instruments, code: str
) -> None:
    # One check only: after a throttle botocore's adaptive limiter paces every later call
    # of a cold client at ~0.5/s, which would only slow this test down.
    fake.push("DetectFaces", error(code))
    analyser = await make_analyser(rekognition_max_attempts=1)
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))

    assert obs.faces is None  # unknown, not "no face"
    assert obs.degraded == ("faces:throttled",)
    assert obs.calls == {}  # the throttled call is not billed
    assert fake.count("DetectFaces") == 1
    assert calls_counted(instruments, "DetectFaces", "throttled") == 1
    assert calls_counted(instruments, "DetectFaces", "ok") == 0


async def test_adaptive_retry_recovers_from_a_single_throttle(
    fake: FakeRekognition,
    make_analyser: MakeAnalyser,
    instruments: Instruments,
) -> None:
    # Takes ~1–2 s: after the throttle botocore backs off rand()×1 s and its adaptive token
    # bucket, cold at 0.5 token/s, makes the retry wait for a token. That is the real
    # behaviour of mode="adaptive", so it is left as is.
    fake.push("DetectFaces", error("ThrottlingException"))
    analyser = await make_analyser(rekognition_max_attempts=3)
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))

    assert obs.faces is not None and len(obs.faces) == 1
    assert obs.degraded == ()
    assert fake.count("DetectFaces") == 2  # the throttled attempt and the retry
    assert obs.calls == {"DetectFaces": 1}
    assert calls_counted(instruments, "DetectFaces", "ok") == 1
    assert calls_counted(instruments, "DetectFaces", "retried") == 1


@pytest.mark.parametrize(
    ("answer", "reason", "outcome"),
    [
        (error("InternalServerError", 500), "faces:unavailable", "unavailable"),
        (error("ServiceUnavailableException", 503), "faces:unavailable", "unavailable"),
        (error("SomethingNewException", 400), "faces:error", "error"),
    ],
)
async def test_service_faults_degrade_only_the_failed_check(
    fake: FakeRekognition,
    make_analyser: MakeAnalyser,
    instruments: Instruments,
    answer: Any,
    reason: str,
    outcome: str,
) -> None:
    fake.push("DetectFaces", answer)
    fake.set_scene(labels=[fake_label("Book", 88.0)])
    analyser = await make_analyser(rekognition_max_attempts=1)
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True, labels=True))
    assert obs.faces is None
    assert obs.labels is not None and [lb.name for lb in obs.labels] == ["Book"]
    assert obs.degraded == (reason,)
    assert obs.calls == {"DetectLabels": 1}
    assert calls_counted(instruments, "DetectFaces", outcome) == 1
    assert calls_counted(instruments, "DetectLabels", "ok") == 1


async def test_bad_credentials_degrade_and_are_logged_once(
    fake: FakeRekognition,
    make_analyser: MakeAnalyser,
    instruments: Instruments,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for code in ("UnrecognizedClientException", "InvalidSignatureException"):
        fake.push("DetectFaces", error(code))
    fake.push("DetectText", error("AccessDeniedException"))
    analyser = await make_analyser()
    with caplog.at_level(logging.ERROR, logger="server.analysis.rekognition"):
        first = await analyser.analyse(jpeg_frame(), Checks(faces=True, text=True))
        second = await analyser.analyse(jpeg_frame(), Checks(faces=True))

    assert first.degraded == ("faces:auth", "text:auth")
    assert second.degraded == ("faces:auth",)
    assert first.faces is None and first.text is None
    assert calls_counted(instruments, "DetectFaces", "auth") == 2
    assert calls_counted(instruments, "DetectText", "auth") == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "credentials" in errors[0].getMessage()


async def test_read_timeout_degrades(fake: FakeRekognition, make_analyser: MakeAnalyser) -> None:
    fake.latency_s = 1.0
    analyser = await make_analyser(rekognition_read_timeout_s=0.2, rekognition_max_attempts=1)
    started = time.monotonic()
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))
    assert obs.degraded == ("faces:timeout",)
    assert obs.faces is None
    assert time.monotonic() - started < 0.9


async def test_unreachable_endpoint_degrades(
    fake: FakeRekognition, make_analyser: MakeAnalyser, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_REKOGNITION", f"http://127.0.0.1:{port}")
    analyser = await make_analyser()
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True, labels=True))
    assert obs.degraded == ("faces:unavailable", "labels:unavailable")
    assert obs.calls == {}


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        ("InvalidImageFormatException", MalformedFrame),
        ("InvalidParameterException", MalformedFrame),
        ("ImageTooLargeException", FrameTooLarge),
    ],
)
async def test_image_refused_by_the_service_is_a_frame_error(
    fake: FakeRekognition,
    make_analyser: MakeAnalyser,
    instruments: Instruments,
    code: str,
    exc_type: type[Exception],
) -> None:
    fake.push("DetectFaces", error(code, message="Request has invalid image"))
    analyser = await make_analyser()
    with pytest.raises(exc_type, match="invalid image"):
        await analyser.analyse(jpeg_frame(), Checks(faces=True))
    outcome = "too_large" if exc_type is FrameTooLarge else "bad_image"
    assert calls_counted(instruments, "DetectFaces", outcome) == 1
    # The analyser is still fine for the next frame.
    obs = await analyser.analyse(jpeg_frame(), Checks(faces=True))
    assert obs.faces is not None and obs.degraded == ()


async def test_truncated_jpeg_is_refused_as_malformed(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    # A valid header with no body passes our cheap checks; the real service (and the fake)
    # cannot decode it and says InvalidImageFormatException.
    data = jpeg_frame().encoded
    assert data is not None
    frame = Frame.from_encoded(data[: len(data) // 2], "image/jpeg")
    analyser = await make_analyser()
    with pytest.raises(MalformedFrame):
        await analyser.analyse(frame, Checks(faces=True))


# --- images sent -------------------------------------------------------------------------------


async def test_large_frame_is_downscaled_before_sending(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    # 4000×3000 (a smooth upscaled pattern): well under 5 MB, yet too many pixels to send.
    small = np.random.default_rng(7).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    image = cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok and len(buf) < 5 * 1024 * 1024
    frame = Frame.from_encoded(buf.tobytes(), "image/jpeg")
    assert (frame.width, frame.height) == (4000, 3000)

    analyser = await make_analyser(max_frame_dimension=1920)
    obs = await analyser.analyse(frame, Checks(faces=True, labels=True))

    assert (obs.width, obs.height) == (4000, 3000)  # the observation describes the frame
    assert fake.count() == 2
    for call in fake.calls:
        assert max(call.width, call.height) <= 1920
        assert (call.width, call.height) == (1920, 1440)
        assert call.image_bytes <= 5 * 1024 * 1024


async def test_small_frame_is_sent_as_is(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    frame = jpeg_frame(320, 240)
    analyser = await make_analyser()
    await analyser.analyse(frame, Checks(faces=True))
    assert frame.encoded is not None
    assert fake.calls[0].image_bytes == len(frame.encoded)
    assert (fake.calls[0].width, fake.calls[0].height) == (320, 240)


# --- concurrency -------------------------------------------------------------------------------


async def test_calls_in_flight_are_bounded_and_the_loop_stays_responsive(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    fake.latency_s = 0.05
    analyser = await make_analyser(analyser_max_concurrency=4)
    checks = Checks(faces=True, labels=True, text=True)
    frames = [jpeg_frame(seed=i) for i in range(20)]

    # What the event loop saw of the fake while the calls ran: a blocking call on the loop
    # would hold it until that call returned, so no tick could ever see one in flight.
    seen_in_flight: list[int] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.005)
            seen_in_flight.append(fake.in_flight)

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    observations = await asyncio.gather(*(analyser.analyse(f, checks) for f in frames))
    elapsed = time.monotonic() - started
    stop.set()
    await tick

    assert all(o.degraded == () and o.faces is not None for o in observations)
    assert fake.count() == 60
    # The bound is calls in flight, not frames: never more than the pool's 4 threads...
    assert fake.max_in_flight <= 4
    # ...and the pool is actually used in parallel.
    assert fake.max_in_flight == 4
    assert elapsed >= 60 / 4 * 0.05 * 0.95
    # The event loop kept turning while blocking calls ran in threads (how promptly is
    # the benchmarks' business, not a test's).
    assert max(seen_in_flight) >= 1


async def test_close_stops_the_worker_threads(
    fake: FakeRekognition, instruments: Instruments
) -> None:
    settings = Settings(_env_file=None, aws_profile="")  # type: ignore[call-arg]
    analyser = RekognitionAnalyser(settings, instruments)
    await analyser.start()
    await analyser.analyse(jpeg_frame(), Checks(faces=True, labels=True))
    assert any(t.name.startswith("rekognition") for t in threading.enumerate())
    await analyser.close()
    assert not any(t.name.startswith("rekognition") for t in threading.enumerate())
    with pytest.raises(AnalyserClosed):
        await analyser.analyse(jpeg_frame(), Checks(faces=True))


async def test_close_with_frames_waiting(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    fake.latency_s = 0.3
    analyser = await make_analyser(analyser_max_concurrency=1)
    tasks = [asyncio.create_task(analyser.analyse(jpeg_frame(seed=i), Checks())) for i in range(3)]
    async with asyncio.timeout(5):
        await fake.wait_for_calls(1)
    await analyser.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    # The call already running finishes; frames still waiting get a clear error, not a
    # CancelledError their caller never asked for.
    assert isinstance(results[0], Observation) and results[0].faces is not None
    assert all(isinstance(r, AnalyserClosed) for r in results[1:])
    assert fake.count() == 1


# --- the fake itself -----------------------------------------------------------------------------


async def test_fake_faces_from_image_mode(
    fake: FakeRekognition, make_analyser: MakeAnalyser
) -> None:
    fake.faces_from_image = True
    analyser = await make_analyser()
    textured = await analyser.analyse(jpeg_frame(), Checks(faces=True))
    ok, buf = cv2.imencode(".jpg", np.full((480, 640, 3), 3, np.uint8))
    assert ok
    blank = await analyser.analyse(Frame.from_encoded(buf.tobytes(), "image/jpeg"), Checks())
    assert textured.faces is not None and len(textured.faces) == 1
    assert blank.faces == ()
