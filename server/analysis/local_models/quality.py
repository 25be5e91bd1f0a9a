"""Frame quality: can this frame tell us anything about the candidate's behaviour?

- brightness: mean luma (0–255) of the frame;
- sharpness: variance of the Laplacian of the largest face, resized to 128×128 so it does
  not depend on the face's size; with no face, of the whole frame at 320 px;
- face_size: the largest face's height over the frame's height.

A frame is insufficient when it is too dark or too bright, when the face (or, with no
face, a frame that has detail to lose) is too blurred, or when the face is too small for
pose and expression to mean anything. A flat frame (a wall, a covered lens, a black
frame) is *not* insufficient, however dark: it shows that there is no face, and covering
the camera must raise `no_face_detected`, not hide it.

Measured on scikit-image's astronaut/camera/coffee images: sharp faces read 170–380,
Gaussian blur σ=2 reads 8–18, σ=3 5–9 (the detector still finds faces there, σ=5 not);
whole frames read 360–1200 sharp and 2–6 at σ=5.
"""

from __future__ import annotations

import cv2
import numpy as np

from server.analysis.local_models.faces import DetectedFace
from server.analysis.observation import Quality
from server.media.frames import Frame, MalformedFrame

#: Mean luma below this: too dark to judge (the astronaut at 30 % exposure reads 34).
TOO_DARK_BRIGHTNESS = 30.0
#: Mean luma above this: washed out.
TOO_BRIGHT_BRIGHTNESS = 235.0
#: Face sharpness (Laplacian variance of the 128×128 face) below this: too blurred.
FACE_BLURRED_SHARPNESS = 10.0
#: Whole-frame sharpness (at 320 px) below this, with no face: too blurred...
FRAME_BLURRED_SHARPNESS = 8.0
#: ...unless the frame is flat (luma standard deviation below this): nothing to blur.
FLAT_FRAME_STD = 10.0
#: Largest face shorter than this share of the frame's height: too small to judge.
FACE_TOO_SMALL_RATIO = 0.1

FACE_SIDE = 128
FRAME_SIDE = 320


def _laplacian_var(gray: np.ndarray) -> float:
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def assess(gray: np.ndarray, faces: list[DetectedFace]) -> Quality:
    """Quality of a frame (grey, analysis resolution) and the faces found in it."""
    h, w = gray.shape[:2]
    brightness = float(gray.mean())
    face = max(faces, key=lambda f: f.area) if faces else None
    face_size: float | None = None
    flat = False
    if face is not None:
        face_size = face.height / h
        x0, y0 = max(0, int(face.left)), max(0, int(face.top))
        x1, y1 = min(w, int(face.left + face.width)), min(h, int(face.top + face.height))
        crop = gray[y0:y1, x0:x1]
        sharpness = (
            _laplacian_var(cv2.resize(crop, (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_AREA))
            if crop.size
            else 0.0
        )
        blurred = sharpness < FACE_BLURRED_SHARPNESS
    else:
        scale = min(1.0, FRAME_SIDE / max(h, w))
        small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        sharpness = _laplacian_var(small)
        flat = float(small.std()) < FLAT_FRAME_STD
        blurred = sharpness < FRAME_BLURRED_SHARPNESS and not flat

    reason: str | None = None
    if brightness < TOO_DARK_BRIGHTNESS and not flat:
        reason = "too_dark"
    elif brightness > TOO_BRIGHT_BRIGHTNESS and not flat:
        reason = "too_bright"
    elif blurred:
        reason = "too_blurred"
    elif face_size is not None and face_size < FACE_TOO_SMALL_RATIO:
        reason = "face_too_small"
    return Quality(
        brightness=round(brightness, 1),
        sharpness=round(sharpness, 1),
        face_size=None if face_size is None else round(face_size, 4),
        insufficient=reason is not None,
        reason=reason,
    )


_REDUCED_GREY = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                 (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def frame_grey(frame: Frame) -> np.ndarray:
    """The frame in grey at about `FRAME_SIDE` (never below it when the frame is larger),
    cheaply: an encoded JPEG is decoded at a reduced scale (DCT scaling), a decoded frame
    is converted at that size. Blocking pixel work: call it in a worker thread."""
    longest = max(frame.width, frame.height)
    if frame.encoded is not None:
        flag = cv2.IMREAD_GRAYSCALE
        if frame.mime == "image/jpeg":
            flag = next((f for k, f in _REDUCED_GREY if longest // k >= FRAME_SIDE), flag)
        grey = cv2.imdecode(np.frombuffer(frame.encoded, dtype=np.uint8), flag)
        if grey is None:
            raise MalformedFrame("image data cannot be decoded")
        return grey
    return cv2.cvtColor(frame.bgr(FRAME_SIDE), cv2.COLOR_BGR2GRAY)


def assess_frame(frame: Frame) -> Quality:
    """Frame-level quality (brightness, whole-frame sharpness, flatness) for a backend
    whose faces come from elsewhere (Rekognition): the face-free half of `assess`."""
    return assess(frame_grey(frame), [])
