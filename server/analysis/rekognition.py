"""The AWS Rekognition backend: DetectFaces (all attributes), DetectLabels and DetectText
through boto3.

With EMOTION_ANALYSIS=off DetectFaces asks only for what the product then uses — the
default attributes (box, confidence, pose, quality, landmarks) plus EYE_DIRECTION,
EYES_OPEN and MOUTH_OPEN (`FACE_ATTRIBUTES_NO_EMOTION`) — so the service infers no
emotion or smile at all; any that came back anyway would be ignored.

boto3 is blocking, so every call runs in a bounded thread pool. One `asyncio.Semaphore`
with as many slots as the pool has threads is held from submission until the thread is
done (not merely until the awaiting coroutine is cancelled), so the pool's own queue never
grows and at most `analyser_max_concurrency` requests are ever in flight server-wide.

Retries are botocore's "adaptive" mode: up to `rekognition_max_attempts` attempts per call
with exponential back-off, and, once the service has throttled, a client-side token bucket
that paces every later call from this client. A call that still fails leaves that check
unanswered (`None`) with a reason in `Observation.degraded` ("faces:throttled",
"labels:timeout", "text:unavailable", "faces:auth", "faces:error"); it never raises.

The one exception is an image the service refuses as such. We send only constant request
parameters (attributes, and a MinConfidence clamped to 0–100), so when Rekognition answers
InvalidImageFormatException or InvalidParameterException the image itself is at fault
(undecodable body behind a valid header, dimensions below the service's minimum) and we
raise `MalformedFrame`; ImageTooLargeException raises `FrameTooLarge`. Retrying or
degrading would only repeat the same refusal for every check of every such frame.

Frame quality. Rekognition's per-face Quality says nothing when it finds no face, and a
camera too dark or blurred to see one would otherwise read as "no face" — a behaviour flag
for a camera problem. So every analysis also runs the local backend's frame-level pixel
check (`local_models.quality.assess_frame`: mean luma, Laplacian sharpness, flatness; a
reduced-scale JPEG decode) in the pool thread that prepares the image bytes, before the
API calls: 0.5–2 ms (640×480 to 1080p), and no extra pool slot.
A frame where Rekognition found a face is judgeable whatever its pixels (the service saw
it); a frame with no face found that the pixel check calls too dark, too bright or too
blurred is insufficient (an absence cannot be told from darkness); a flat frame (covered
lens) stays a judgeable absence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    UnknownCredentialError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError as BotoHTTPClientError

from server.analysis.local_models.quality import assess_frame
from server.analysis.observation import (
    EMOTIONS,
    Box,
    Checks,
    Face,
    Gaze,
    Label,
    Observation,
    Pose,
    Quality,
    TextLine,
)
from server.config import Settings
from server.media.frames import Frame, FrameTooLarge, MalformedFrame
from server.observability import Instruments

log = logging.getLogger(__name__)

#: Rekognition refuses image bytes above this whatever our own setting says.
REKOGNITION_MAX_IMAGE_BYTES = 5 * 1024 * 1024

OPERATIONS: dict[str, str] = {
    "faces": "DetectFaces",
    "labels": "DetectLabels",
    "text": "DetectText",
}

THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "TooManyRequestsException",
        "Throttling",
        "RequestLimitExceeded",
    }
)
AUTH_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "RequestExpired",  # signature outside the allowed clock skew
        "SignatureDoesNotMatch",
        "AuthFailure",
    }
)
UNAVAILABLE_CODES = frozenset(
    {"InternalServerError", "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException"}
)
MALFORMED_IMAGE_CODES = frozenset({"InvalidImageFormatException", "InvalidParameterException"})
TOO_LARGE_CODES = frozenset({"ImageTooLargeException"})
CREDENTIAL_ERRORS = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    UnknownCredentialError,
)

_WARN_EVERY_S = 30.0  # one warning per (check, outcome) per this interval, not per frame


class AnalyserClosed(RuntimeError):
    """analyse() on an analyser that was closed (or closed while the frame waited)."""


@dataclass(slots=True)
class _CheckResult:
    value: Any = None  # the parsed tuple, None when the check has no answer
    outcome: str = "ok"  # instrument outcome
    billed: bool = False
    detail: str | None = None  # the service's message when the call failed


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _box(bb: dict[str, Any]) -> Box:
    # Rekognition boxes may start outside the frame (negative Left/Top); clip to it.
    left = float(bb.get("Left", 0.0))
    top = float(bb.get("Top", 0.0))
    right = _clamp01(left + float(bb.get("Width", 0.0)))
    bottom = _clamp01(top + float(bb.get("Height", 0.0)))
    left, top = _clamp01(left), _clamp01(top)
    return Box(left=left, top=top, width=max(0.0, right - left), height=max(0.0, bottom - top))


def _flag(detail: dict[str, Any], key: str) -> bool | None:
    attr = detail.get(key)
    if not isinstance(attr, dict) or "Value" not in attr:
        return None
    return bool(attr["Value"])


def _gaze(detail: dict[str, Any]) -> Gaze | None:
    eyes = detail.get("EyeDirection")
    if not isinstance(eyes, dict) or "Yaw" not in eyes or "Pitch" not in eyes:
        return None
    return Gaze(
        yaw=float(eyes["Yaw"]),
        pitch=float(eyes["Pitch"]),
        confidence=float(eyes.get("Confidence", 0.0)),
    )


def frame_quality(pixels: Quality | None, faces: tuple[Face, ...] | None) -> Quality | None:
    """The frame's quality from the pixel check and what DetectFaces found (module doc)."""
    if pixels is None:
        return None
    if not faces:
        return pixels
    return Quality(
        brightness=pixels.brightness,
        sharpness=pixels.sharpness,
        face_size=round(max(f.box.height for f in faces), 4),
    )


#: DetectFaces attributes with EMOTION_ANALYSIS=off: no EMOTIONS, no SMILE (nor ALL).
FACE_ATTRIBUTES_NO_EMOTION: tuple[str, ...] = (
    "DEFAULT",
    "EYE_DIRECTION",
    "EYES_OPEN",
    "MOUTH_OPEN",
)


def parse_faces(
    response: dict[str, Any], min_confidence: float, emotions: bool = True
) -> tuple[Face, ...]:
    """`emotions`: False drops Emotions and Smile whatever the service sent."""
    faces = []
    for fd in response.get("FaceDetails", []):
        confidence = float(fd.get("Confidence", 0.0))
        if confidence < min_confidence:
            continue
        pose = fd.get("Pose")
        faces.append(
            Face(
                box=_box(fd.get("BoundingBox", {})),
                confidence=confidence,
                pose=None
                if not pose
                else Pose(
                    yaw=float(pose.get("Yaw", 0.0)),
                    pitch=float(pose.get("Pitch", 0.0)),
                    roll=float(pose.get("Roll", 0.0)),
                ),
                gaze=_gaze(fd),
                # The service may add "UNKNOWN"; observations carry only the eight emotions.
                emotions={
                    e["Type"]: float(e.get("Confidence", 0.0))
                    for e in (fd.get("Emotions", []) if emotions else ())
                    if e.get("Type") in EMOTIONS
                },
                eyes_open=_flag(fd, "EyesOpen"),
                mouth_open=_flag(fd, "MouthOpen"),
                smile=_flag(fd, "Smile") if emotions else None,
            )
        )
    return tuple(faces)


def parse_labels(response: dict[str, Any]) -> tuple[Label, ...]:
    return tuple(
        Label(
            name=str(lb.get("Name", "")),
            confidence=float(lb.get("Confidence", 0.0)),
            instances=len(lb.get("Instances") or ()),
            boxes=tuple(
                _box(inst["BoundingBox"])
                for inst in lb.get("Instances") or ()
                if isinstance(inst, dict) and isinstance(inst.get("BoundingBox"), dict)
            ),
        )
        for lb in response.get("Labels", [])
    )


def parse_text(response: dict[str, Any]) -> tuple[TextLine, ...]:
    # Every WORD is also inside its LINE; keeping both would count text twice.
    return tuple(
        TextLine(
            text=str(td.get("DetectedText", "")),
            confidence=float(td.get("Confidence", 0.0)),
            box=_text_box(td),
        )
        for td in response.get("TextDetections", [])
        if td.get("Type") == "LINE"
    )


def _text_box(detection: dict[str, Any]) -> Box | None:
    geometry = detection.get("Geometry")
    bb = geometry.get("BoundingBox") if isinstance(geometry, dict) else None
    return _box(bb) if isinstance(bb, dict) else None


def classify(exc: BaseException) -> str:
    """The outcome of a failed call: throttled, timeout, unavailable, auth, bad_image,
    too_large or error."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in THROTTLE_CODES or status == 429:
            return "throttled"
        if code in AUTH_CODES or status in (401, 403):
            return "auth"
        if code in TOO_LARGE_CODES or status == 413:
            return "too_large"
        if code in MALFORMED_IMAGE_CODES:
            return "bad_image"
        if code in UNAVAILABLE_CODES or status >= 500:
            return "unavailable"
        return "error"
    if isinstance(exc, CREDENTIAL_ERRORS):
        return "auth"
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return "timeout"
    if isinstance(exc, BotoConnectionError | BotoHTTPClientError):
        return "unavailable"
    return "error"


class RekognitionAnalyser:
    name = "rekognition"
    billed = True  # every call costs money and counts against the account's TPS quota

    def __init__(self, settings: Settings, instruments: Instruments | None = None) -> None:
        self._settings = settings
        self._instruments = instruments
        self._workers = max(1, settings.analyser_max_concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="rekognition"
        )
        # Slots of the pool: held while a job is queued or running in it.
        self._slots = asyncio.Semaphore(self._workers)
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._closed = False
        self._auth_logged = False
        self._last_warned: dict[tuple[str, str], float] = {}
        self._max_image_bytes = min(settings.max_frame_bytes, REKOGNITION_MAX_IMAGE_BYTES)
        self._min_label_confidence = min(100.0, max(0.0, settings.rekognition_min_label_confidence))

    # --- lifecycle -------------------------------------------------------------------------

    def _make_client(self) -> Any:
        s = self._settings
        config = Config(
            retries={"mode": "adaptive", "total_max_attempts": max(1, s.rekognition_max_attempts)},
            connect_timeout=s.rekognition_connect_timeout_s,
            read_timeout=s.rekognition_read_timeout_s,
            max_pool_connections=max(10, self._workers),
            tcp_keepalive=True,
            user_agent_extra="proctor-server",
        )
        # A named profile from settings; otherwise boto3's default chain (env, AWS_PROFILE,
        # SSO, container/instance roles). Explicit keys from settings win over both.
        session = boto3.session.Session(profile_name=s.aws_profile or None)
        explicit = bool(s.aws_access_key_id and s.aws_secret_access_key)
        # region_name explicitly: boto3 reads AWS_DEFAULT_REGION, not AWS_REGION. No
        # endpoint_url here, so AWS_ENDPOINT_URL_REKOGNITION keeps working.
        return session.client(
            "rekognition",
            region_name=s.aws_region or None,
            config=config,
            aws_access_key_id=s.aws_access_key_id if explicit else None,
            aws_secret_access_key=s.aws_secret_access_key if explicit else None,
            aws_session_token=(s.aws_session_token or None) if explicit else None,
        )

    async def start(self) -> None:
        """Build the boto3 client (loads service models: blocking, so in the pool).
        A configuration error such as an unknown profile raises here, at startup."""
        if self._closed:
            raise AnalyserClosed("analyser is closed")
        async with self._client_lock:
            if self._client is None:
                self._client = await self._run(self._make_client)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Calls already running end within botocore's timeouts; wait for them a while so
        # no thread outlives us in the normal case, but never hang shutdown on them.
        s = self._settings
        grace = s.rekognition_connect_timeout_s + s.rekognition_read_timeout_s
        try:
            await asyncio.wait_for(asyncio.to_thread(self._executor.shutdown, True), grace)
        except TimeoutError:
            log.warning("rekognition calls still running after %.1fs at close", grace)
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- the pool ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], Any]) -> Any:
        await self._slots.acquire()
        try:
            if self._closed:
                raise AnalyserClosed("analyser is closed")
            future = self._executor.submit(fn)
        except BaseException:
            self._slots.release()
            raise
        loop = asyncio.get_running_loop()

        def release(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(self._slots.release)
            except RuntimeError:  # loop already closed: nobody is waiting for a slot
                pass

        future.add_done_callback(release)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and self._closed and not (task and task.cancelling()):
                # close() dropped this queued job; the caller was not cancelled.
                raise AnalyserClosed("analyser closed while the frame waited") from None
            raise

    # --- analysis ------------------------------------------------------------------------------

    async def analyse(self, frame: Frame, checks: Checks) -> Observation:
        started = time.perf_counter()
        if self._client is None:
            await self.start()
        wanted = checks.names()
        results: dict[str, _CheckResult] = {}
        pixels: Quality | None = None
        if wanted:
            image, pixels = await self._run(functools.partial(self._prepare, frame))
            if len(image) > self._max_image_bytes:
                # Frame.jpeg gives up at its lowest quality; the service would refuse it.
                raise FrameTooLarge(
                    f"frame is still {len(image)} bytes after re-encoding; "
                    f"the limit is {self._max_image_bytes}"
                )
            outcomes = await asyncio.gather(*(self._check(name, image) for name in wanted))
            results = dict(zip(wanted, outcomes, strict=True))

        calls: dict[str, int] = {}
        degraded: list[str] = []
        for name, res in results.items():
            if res.billed:
                calls[OPERATIONS[name]] = calls.get(OPERATIONS[name], 0) + 1
            if res.outcome in ("bad_image", "too_large"):
                continue
            if res.value is None:
                degraded.append(f"{name}:{res.outcome}")
        bad = [(n, r) for n, r in results.items() if r.outcome in ("bad_image", "too_large")]
        if bad:
            name, res = bad[0]
            message = f"Rekognition refused the image: {res.detail or res.outcome}"
            if res.outcome == "too_large":
                raise FrameTooLarge(message)
            raise MalformedFrame(message)

        faces = results["faces"].value if "faces" in results else None
        return Observation(
            backend=self.name,
            checks=checks,
            faces=faces,
            labels=results["labels"].value if "labels" in results else None,
            text=results["text"].value if "text" in results else None,
            # Ours, not Rekognition's 0–100 face Quality (other units, and no face, no value).
            quality=frame_quality(pixels, faces),
            degraded=tuple(degraded),
            calls=calls,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            width=frame.width,
            height=frame.height,
        )

    def _prepare(self, frame: Frame) -> tuple[bytes, Quality | None]:
        """In a pool thread: the bytes to send, and the frame's pixel quality."""
        s = self._settings
        image = frame.jpeg(s.max_frame_dimension, s.jpeg_quality, self._max_image_bytes)
        try:
            pixels: Quality | None = assess_frame(frame)
        except Exception as exc:  # e.g. undecodable pixels: the service's answer decides
            log.debug("pixel quality check failed: %r", exc)
            pixels = None
        return image, pixels

    async def _check(self, name: str, image: bytes) -> _CheckResult:
        operation = OPERATIONS[name]
        client = self._client
        if client is None:
            raise AnalyserClosed("analyser closed while the frame waited")
        if name == "faces":
            attributes = (
                ["ALL"] if self._settings.emotion_analysis else list(FACE_ATTRIBUTES_NO_EMOTION)
            )
            call = functools.partial(
                client.detect_faces, Image={"Bytes": image}, Attributes=attributes
            )
        elif name == "labels":
            call = functools.partial(
                client.detect_labels,
                Image={"Bytes": image},
                MinConfidence=self._min_label_confidence,
            )
        else:
            call = functools.partial(client.detect_text, Image={"Bytes": image})

        try:
            response: dict[str, Any] = await self._run(call)
        except AnalyserClosed:
            raise
        except Exception as exc:  # service faults must degrade the check, never raise
            outcome = classify(exc)
            self._count(operation, outcome, _retries(getattr(exc, "response", None)))
            self._report(name, operation, outcome, exc)
            detail = None
            if isinstance(exc, ClientError):
                detail = exc.response.get("Error", {}).get("Message") or None
            return _CheckResult(outcome=outcome, detail=detail)

        self._count(operation, "ok", _retries(response))
        if name == "faces":
            value: Any = parse_faces(
                response,
                self._settings.rekognition_min_face_confidence,
                self._settings.emotion_analysis,
            )
        elif name == "labels":
            value = parse_labels(response)
        else:
            value = parse_text(response)
        return _CheckResult(value=value, outcome="ok", billed=True)

    # --- reporting -------------------------------------------------------------------------------

    def _count(self, operation: str, outcome: str, retries: int) -> None:
        if self._instruments is None:
            return
        counter = self._instruments.rekognition_calls
        counter.labels(operation=operation, outcome=outcome).inc()
        if retries:
            # Extra attempts botocore made inside this call (throttles, transient faults).
            counter.labels(operation=operation, outcome="retried").inc(retries)

    def _report(self, name: str, operation: str, outcome: str, exc: BaseException) -> None:
        if outcome == "auth":
            if not self._auth_logged:
                self._auth_logged = True
                log.error(
                    "Rekognition rejected our credentials (%s: %s). Every check will be "
                    "degraded until AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE and "
                    "the IAM policy (rekognition:DetectFaces, DetectLabels, DetectText) are "
                    "fixed.",
                    operation,
                    exc,
                )
            return
        if outcome in ("bad_image", "too_large"):
            log.info("%s refused the image: %s", operation, exc)
            return
        if outcome == "error" and not isinstance(exc, ClientError | BotoCoreError):
            log.exception("unexpected failure in %s", operation, exc_info=exc)
            return
        now = time.monotonic()
        key = (name, outcome)
        if now - self._last_warned.get(key, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._last_warned[key] = now
            log.warning("%s %s after retries: %s", operation, outcome, exc)


def _retries(response: Any) -> int:
    if not isinstance(response, dict):
        return 0
    try:
        return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
    except (TypeError, ValueError):
        return 0
