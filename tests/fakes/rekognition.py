"""A local fake of Amazon Rekognition speaking its real wire protocol (JSON 1.1).

boto3 talks to it unchanged once `AWS_ENDPOINT_URL_REKOGNITION` points here (see `env()`):
`POST /` with `X-Amz-Target: RekognitionService.<Operation>` and a JSON body whose
`Image.Bytes` is base64; answers are `application/x-amz-json-1.1`, errors are
`{"__type": ..., "message": ...}` with a 4xx/5xx status, exactly what botocore parses into
`ClientError` (and what its retry logic classifies as throttling / transient).

Usable from async tests and from benchmark scripts running inside an event loop:

    fake = FakeRekognition()
    url = await fake.start()
    for k, v in fake.env().items(): monkeypatch.setenv(k, v)
    fake.set_scene(faces=[fake_face(yaw=40)], labels=[fake_label("Mobile Phone", 92)])
    fake.push("DetectFaces", error("ThrottlingException"))   # next DetectFaces throttles
    ...
    await fake.stop()

It is cheap per call (no pixel decoding, only an image-header parse) unless
`faces_from_image` is on, because benchmarks drive it with many clients.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

JSON_CT = "application/x-amz-json-1.1"
TARGET_PREFIX = "RekognitionService."
OPERATIONS = ("DetectFaces", "DetectLabels", "DetectText")
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # the real service's limit on raw image bytes
FAKE_ACCESS_KEY = "AKIAFAKEFAKEFAKEFAKE"
FAKE_SECRET_KEY = "fake-secret-key-for-local-tests-only"

FaceSpec = dict[str, Any]  # a Rekognition FaceDetail, as built by `fake_face()`
#: DetectFaces `Attributes` values beyond DEFAULT / ALL, and the FaceDetail key of each.
FACE_ATTRIBUTES = {
    "AGE_RANGE": "AgeRange",
    "BEARD": "Beard",
    "EMOTIONS": "Emotions",
    "EYE_DIRECTION": "EyeDirection",
    "EYEGLASSES": "Eyeglasses",
    "EYES_OPEN": "EyesOpen",
    "GENDER": "Gender",
    "MOUTH_OPEN": "MouthOpen",
    "MUSTACHE": "Mustache",
    "FACE_OCCLUDED": "FaceOccluded",
    "SMILE": "Smile",
    "SUNGLASSES": "Sunglasses",
}


@dataclass(frozen=True, slots=True)
class ScriptedError:
    """A scripted error answer: `__type` and HTTP status as the real service sends them."""

    type_name: str
    status: int = 400
    message: str = ""


@dataclass(frozen=True, slots=True)
class Call:
    operation: str
    image_bytes: int  # raw (decoded) image size in bytes
    width: int  # from the image header; 0 when it cannot be read
    height: int
    at: float  # time.monotonic() when the request arrived
    params: dict[str, Any]  # request parameters other than Image
    access_key: str  # from the SigV4 credential scope: who signed the request
    region: str  # the region the request was signed for


Scripted = dict[str, Any] | ScriptedError


def error(type_name: str, status: int = 400, message: str | None = None) -> ScriptedError:
    """A scripted error, e.g. `error("ThrottlingException")`,
    `error("InternalServerError", 500)`."""
    return ScriptedError(type_name, status, message if message is not None else type_name)


def _emotions(emotions: dict[str, float]) -> list[dict[str, Any]]:
    names = ("HAPPY", "SAD", "ANGRY", "CONFUSED", "DISGUSTED", "SURPRISED", "CALM", "FEAR")
    given = {k.upper(): float(v) for k, v in emotions.items()}
    rest = [n for n in names if n not in given]
    # Rekognition reports all eight, the unlisted ones with small confidences.
    leftover = max(0.0, 100.0 - sum(given.values()))
    small = leftover / len(rest) if rest else 0.0
    out = [{"Type": n, "Confidence": c} for n, c in given.items()]
    out += [{"Type": n, "Confidence": round(small, 4)} for n in rest]
    return sorted(out, key=lambda e: -e["Confidence"])


def fake_face(
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    emotions: dict[str, float] | None = None,
    confidence: float = 99.9,
    box: tuple[float, float, float, float] = (0.35, 0.25, 0.3, 0.45),
    eyes_open: bool = True,
    mouth_open: bool = False,
    smile: bool = False,
    brightness: float = 80.0,
    sharpness: float = 90.0,
    gaze: tuple[float, float, float] | None = (0.0, 0.0, 98.0),
) -> FaceSpec:
    """A realistic `FaceDetail` as DetectFaces(Attributes=["ALL"]) returns it.
    `box` is (left, top, width, height) as ratios of the frame. `gaze` is EyeDirection
    (yaw, pitch, confidence): where the eyes point relative to the head ("independent of
    the head pose"), (0, 0) being the eyes following the head; None leaves it out."""
    left, top, width, height = box
    cx, cy = left + width / 2, top + height / 2

    def point(kind: str, dx: float, dy: float) -> dict[str, Any]:
        return {"Type": kind, "X": cx + dx * width, "Y": cy + dy * height}

    detail: FaceSpec = {
        "BoundingBox": {"Width": width, "Height": height, "Left": left, "Top": top},
        "AgeRange": {"Low": 25, "High": 35},
        "Smile": {"Value": smile, "Confidence": 97.1},
        "Eyeglasses": {"Value": False, "Confidence": 98.2},
        "Sunglasses": {"Value": False, "Confidence": 99.6},
        "Gender": {"Value": "Female", "Confidence": 95.0},
        "Beard": {"Value": False, "Confidence": 93.4},
        "Mustache": {"Value": False, "Confidence": 96.8},
        "EyesOpen": {"Value": eyes_open, "Confidence": 96.3},
        "MouthOpen": {"Value": mouth_open, "Confidence": 94.7},
        "Emotions": _emotions(emotions if emotions is not None else {"CALM": 90.0}),
        "Landmarks": [
            point("eyeLeft", -0.18, -0.12),
            point("eyeRight", 0.18, -0.12),
            point("nose", 0.0, 0.05),
            point("mouthLeft", -0.12, 0.22),
            point("mouthRight", 0.12, 0.22),
        ],
        "Pose": {"Roll": roll, "Yaw": yaw, "Pitch": pitch},
        "Quality": {"Brightness": brightness, "Sharpness": sharpness},
        "Confidence": confidence,
        "FaceOccluded": {"Value": False, "Confidence": 99.0},
    }
    if gaze is not None:
        detail["EyeDirection"] = {"Yaw": gaze[0], "Pitch": gaze[1], "Confidence": gaze[2]}
    return detail


def fake_label(
    name: str,
    confidence: float = 95.0,
    instances: int = 0,
    parents: Iterable[str] = (),
    boxes: Iterable[tuple[float, float, float, float]] | None = None,
) -> dict[str, Any]:
    """A DetectLabels `Label`, with `instances` boxed instances (in a row at the frame's
    lower left), or one instance per `boxes` entry (left, top, width, height)."""
    where = (
        [(0.1 * i, 0.6, 0.1, 0.1) for i in range(instances)] if boxes is None else list(boxes)
    )
    return {
        "Name": name,
        "Confidence": confidence,
        "Instances": [
            {
                "BoundingBox": {"Width": w, "Height": h, "Left": left, "Top": top},
                "Confidence": confidence,
            }
            for left, top, w, h in where
        ],
        "Parents": [{"Name": p} for p in parents],
        "Aliases": [],
        "Categories": [],
    }


def fake_text(lines: Iterable[str | tuple[str, float]]) -> list[dict[str, Any]]:
    """DetectText `TextDetections`: a LINE per line followed by its WORDs, as the real
    service returns them (so a client must filter on Type)."""
    out: list[dict[str, Any]] = []
    next_id = 0
    entries = [(x, 98.0) if isinstance(x, str) else x for x in lines]
    line_ids = []
    for text, conf in entries:
        line_ids.append(next_id)
        out.append(_text_detection(text, "LINE", next_id, None, conf))
        next_id += 1
    for (text, conf), parent in zip(entries, line_ids, strict=True):
        for word in text.split():
            out.append(_text_detection(word, "WORD", next_id, parent, conf))
            next_id += 1
    return out


def _text_detection(
    text: str, kind: str, ident: int, parent: int | None, conf: float
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "DetectedText": text,
        "Type": kind,
        "Id": ident,
        "Confidence": conf,
        "Geometry": {
            "BoundingBox": {"Width": 0.3, "Height": 0.05, "Left": 0.1, "Top": 0.1},
            "Polygon": [{"X": 0.1, "Y": 0.1}, {"X": 0.4, "Y": 0.1}, {"X": 0.4, "Y": 0.15}],
        },
    }
    if parent is not None:
        d["ParentId"] = parent
    return d


def _credential_scope(authorization: str) -> tuple[str, str]:
    """Access key id and region from `Credential=AKID/date/region/service/aws4_request`."""
    for part in authorization.removeprefix("AWS4-HMAC-SHA256 ").split(","):
        name, _, value = part.strip().partition("=")
        if name == "Credential":
            fields = value.split("/")
            if len(fields) == 5:
                return fields[0], fields[2]
    return "", ""


def _image_header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            return int(img.width), int(img.height)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 0, 0


def _truncated(data: bytes) -> bool:
    """Cheap stand-in for the service's full decode: a JPEG must end with its EOI marker
    (allowing a little trailing padding), a PNG with its IEND chunk."""
    if data.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in data[-64:]
    if data.startswith(b"\x89PNG"):
        return not data.endswith(b"IEND\xaeB`\x82")
    return False


def _has_texture(data: bytes, threshold: float) -> bool:
    """True when the decoded image is not near-uniform (grey std-dev above threshold)."""
    import cv2
    import numpy as np

    arr = np.frombuffer(data, dtype=np.uint8)
    grey = cv2.imdecode(arr, cv2.IMREAD_REDUCED_GRAYSCALE_4)
    if grey is None:
        return False
    return float(grey.std()) > threshold


class FakeRekognition:
    def __init__(self, latency_s: float = 0.0, faces_from_image: bool = False) -> None:
        self.latency_s = latency_s
        self.faces_from_image = faces_from_image
        #: Optional: names the scene an image shows (see `define_scene`), so each image is
        #: answered for what it shows even when many clients show different scenes.
        self.scene_of_image: Callable[[bytes], str | None] | None = None
        self._named: dict[str, tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]]]] = {}
        self.texture_threshold = 8.0  # grey std-dev above which an image "has a face"
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._scripts: dict[str, deque[Scripted]] = {}
        self._faces: list[FaceSpec] = [fake_face()]
        self._labels: list[dict[str, Any]] = []
        self._text: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._arrived: asyncio.Condition | None = None  # made in the loop on first use
        self.url = ""

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/", self._handle)
        # Short shutdown: stop() must not wait out a slow scripted latency.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeRekognition:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def env(self) -> dict[str, str]:
        """Environment for boto3 to reach this fake with fake credentials and nothing
        read from the machine (`~/.aws`, instance metadata)."""
        assert self.url, "start() the fake first"
        return {
            "AWS_ENDPOINT_URL_REKOGNITION": self.url,
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }

    # --- scripting ------------------------------------------------------------------------

    def set_scene(
        self,
        faces: Iterable[FaceSpec] | None = None,
        labels: Iterable[dict[str, Any] | str | tuple[str, float] | tuple[str, float, int]]
        | None = None,
        text: Iterable[str | tuple[str, float]] | None = None,
    ) -> None:
        """The steady answer to every call not scripted by `push`. Arguments left as None
        keep their current value; pass [] for "nothing there"."""
        if faces is not None:
            self._faces = list(faces)
        if labels is not None:
            out = []
            for lb in labels:
                if isinstance(lb, dict):
                    out.append(lb)
                elif isinstance(lb, str):
                    out.append(fake_label(lb))
                else:
                    out.append(fake_label(*lb))
            self._labels = out
        if text is not None:
            self._text = fake_text(text)

    def define_scene(
        self,
        name: str,
        faces: Iterable[FaceSpec],
        labels: Iterable[dict[str, Any] | str | tuple[str, float] | tuple[str, float, int]] = (),
        text: Iterable[str | tuple[str, float]] = (),
    ) -> None:
        """The answers for images `scene_of_image` names `name`."""
        saved = (self._faces, self._labels, self._text)
        self.set_scene(faces=faces, labels=labels, text=text)
        self._named[name] = (self._faces, self._labels, self._text)
        self._faces, self._labels, self._text = saved

    def push(self, operation: str, answer: Scripted) -> None:
        """Queue one scripted answer (a response dict or `error(...)`) for the next call of
        `operation`; queued answers are consumed in order before the scene."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        self._scripts.setdefault(operation, deque()).append(answer)

    def count(self, operation: str | None = None) -> int:
        if operation is None:
            return len(self.calls)
        return sum(1 for c in self.calls if c.operation == operation)

    async def wait_for_calls(self, n: int, operation: str | None = None) -> None:
        """Wait until at least `n` requests (of `operation`) have arrived; wrap it in
        `asyncio.timeout()` to bound the wait."""
        if self._arrived is None:
            self._arrived = asyncio.Condition()
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.count(operation) >= n)

    def reset(self) -> None:
        self.calls.clear()
        self._scripts.clear()
        self.max_in_flight = 0

    # --- protocol -------------------------------------------------------------------------

    @staticmethod
    def _error(type_name: str, message: str, status: int = 400) -> web.Response:
        body = json.dumps({"__type": type_name, "message": message})
        return web.Response(status=status, body=body.encode(), content_type=JSON_CT)

    async def _handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        target = request.headers.get("X-Amz-Target", "")
        if not request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return self._error(
                "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        operation = target.removeprefix(TARGET_PREFIX)
        if not target.startswith(TARGET_PREFIX) or operation not in OPERATIONS:
            return self._error("UnknownOperationException", f"unknown target {target!r}")
        try:
            body = json.loads(await request.read())
            raw = base64.b64decode(body["Image"]["Bytes"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return self._error("ValidationException", "Image.Bytes must be base64 image bytes")
        width, height = _image_header_size(raw)
        params = {k: v for k, v in body.items() if k != "Image"}
        access_key, region = _credential_scope(request.headers["Authorization"])
        self.calls.append(
            Call(operation, len(raw), width, height, arrived, params, access_key, region)
        )
        if self._arrived is not None:
            async with self._arrived:
                self._arrived.notify_all()
        unknown = set(params.get("Attributes") or ()) - {"DEFAULT", "ALL", *FACE_ATTRIBUTES}
        if operation == "DetectFaces" and unknown:
            return self._error("ValidationException", f"unknown attributes {sorted(unknown)}")
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)

        script = self._scripts.get(operation)
        if script:
            answer = script.popleft()
            if isinstance(answer, ScriptedError):
                return self._error(answer.type_name, answer.message, answer.status)
            return web.Response(body=json.dumps(answer).encode(), content_type=JSON_CT)

        if len(raw) > MAX_IMAGE_BYTES:
            return self._error("ImageTooLargeException", "Image size is too large.")
        if width == 0 or _truncated(raw):
            return self._error(
                "InvalidImageFormatException", "Request has unsupported image format"
            )
        result = await self._scene_answer(operation, raw, params)
        return web.Response(body=json.dumps(result).encode(), content_type=JSON_CT)

    async def _scene_answer(
        self, operation: str, raw: bytes, params: dict[str, Any]
    ) -> dict[str, Any]:
        faces, labels_, text_ = self._faces, self._labels, self._text
        if self.scene_of_image is not None:
            name = await asyncio.to_thread(self.scene_of_image, raw)
            if name in self._named:
                faces, labels_, text_ = self._named[name]
        if operation == "DetectFaces":
            if self.faces_from_image:
                textured = await asyncio.to_thread(_has_texture, raw, self.texture_threshold)
                faces = (faces or [fake_face()]) if textured else []
            asked = params.get("Attributes") or ["DEFAULT"]
            if "ALL" not in asked:
                # Without ALL, Rekognition returns the default attributes plus those asked.
                keep = {"BoundingBox", "Confidence", "Landmarks", "Pose", "Quality"}
                keep |= {FACE_ATTRIBUTES[a] for a in asked if a in FACE_ATTRIBUTES}
                faces = [{k: f[k] for k in keep if k in f} for f in faces]
            return {"FaceDetails": faces}
        if operation == "DetectLabels":
            min_conf = float(params.get("MinConfidence", 55.0))
            labels = [lb for lb in labels_ if lb["Confidence"] >= min_conf]
            if "MaxLabels" in params:
                labels = labels[: int(params["MaxLabels"])]
            return {"Labels": labels, "LabelModelVersion": "3.0"}
        return {"TextDetections": text_, "TextModelVersion": "3.0"}
