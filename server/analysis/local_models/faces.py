"""Faces: boxes, detection confidence and 468 landmarks.

The models are mediapipe's own (BlazeFace short- and full-range detectors and the
face-mesh landmark model, shipped inside the `mediapipe` wheel), but they run directly in
a LiteRT interpreter rather than through `mediapipe.solutions`, whose Python package is
never imported. Measured on this 2-core machine, a 640×480 frame costs 3.1 ms
(detection) + 7.1 ms (mesh, which re-runs its own detector) through the solution graphs,
against 1.4 ms + 1.6 ms of model time here; and a plain interpreter per worker thread has
none of the solution objects' thread-safety questions.

The pre- and post-processing replicates mediapipe's graphs: a letterboxed 128×128 (or
192×192) input in [-1, 1], SSD anchors, weighted non-maximum suppression, then a 192×192
landmark crop 1.5× the box, rotated so the eyes are level. On the astronaut and a
640×480 frame the landmarks match `mediapipe.solutions.face_mesh` to within 0.4 px
(median) and the box and score to within 2 px and 0.01.

`CascadeFaces` is the fallback when those models cannot load: OpenCV's shipped Haar
cascade, boxes only (no landmarks, hence no pose or eyes/mouth).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from server.analysis.local_models import ModelUnavailable, litert_interpreter, package_file

log = logging.getLogger(__name__)

#: BlazeFace scores below this are not faces. mediapipe's default (0.5) let 11 of
#: lfw_subset's 100 non-face patches through as faces; 0.6 lets 2 through and still
#: finds all 100 faces (a webcam face scores ≈0.85–0.95).
MIN_DETECTION_SCORE = 0.6
#: A second, third... face must score at least this: a false extra face raises the
#: critical multiple-faces alert, a missed one only delays it (0.7: 0/100 non-faces).
MIN_EXTRA_FACE_SCORE = 0.7
#: Boxes overlapping more than this (IoU) are one face (mediapipe's value).
NMS_IOU = 0.3
#: The landmark model's "is a face" flag below this means the crop holds no face: the
#: landmarks are then meaningless and are dropped (the box is kept).
MIN_LANDMARK_SCORE = 0.5
#: Landmarks are computed for at most this many faces per frame, largest first: the
#: candidate, and a second person whose pose nobody scores.
MESH_MAX_FACES = 2

DETECTOR_FILE = "modules/face_detection/face_detection_short_range.tflite"
FULL_RANGE_FILE = "modules/face_detection/face_detection_full_range_sparse.tflite"
MESH_FILE = "modules/face_landmark/face_landmark.tflite"

#: Keypoint order of the detector (the subject's right eye appears on the image's left).
KP_RIGHT_EYE, KP_LEFT_EYE, KP_NOSE, KP_MOUTH, KP_RIGHT_EAR, KP_LEFT_EAR = range(6)


@dataclass(frozen=True, slots=True)
class DetectedFace:
    """One face, in pixels of the analysed image."""

    left: float
    top: float
    width: float
    height: float
    score: float  # 0..1
    keypoints: np.ndarray | None = None  # (6, 2) pixels
    landmarks: np.ndarray | None = None  # (468, 3) pixels; z in the same scale as x

    @property
    def area(self) -> float:
        return self.width * self.height


class FaceDetector(Protocol):
    name: str

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]: ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))
    return out


def ssd_anchors(size: int, strides: tuple[int, ...], per_layer: int) -> np.ndarray:
    """Anchor centres (N, 2) as mediapipe's SsdAnchorsCalculator lays them out with fixed
    anchor size: consecutive layers of one stride share a grid, `per_layer` anchors each."""
    centres: list[np.ndarray] = []
    i = 0
    while i < len(strides):
        stride = strides[i]
        count = 0
        while i < len(strides) and strides[i] == stride:
            count += per_layer
            i += 1
        grid = math.ceil(size / stride)
        ys, xs = np.mgrid[0:grid, 0:grid]
        cells = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(cells, count, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box against many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out: np.ndarray = inter / np.maximum(area + areas - inter, 1e-9)
    return out


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """mediapipe's WEIGHTED suppression: each cluster of overlapping candidates becomes
    their score-weighted mean, with the best candidate's score."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    alive = np.ones(len(scores), dtype=bool)
    for i in range(len(scores)):
        if not alive[i]:
            continue
        members = alive & (_iou(boxes[i], boxes) > iou)
        members[i] = True
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(0) / w.sum()
        kps = (keypoints[members] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kps, float(scores[i])))
        alive &= ~members
    return out


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    file: str
    size: int
    strides: tuple[int, ...]
    anchors_per_layer: int


SHORT_RANGE = DetectorSpec(DETECTOR_FILE, 128, (8, 16, 16, 16), 2)
FULL_RANGE = DetectorSpec(FULL_RANGE_FILE, 192, (4,), 1)


class BlazeFaceDetector:
    """mediapipe's BlazeFace detector."""

    name = "blazeface"

    def __init__(
        self, min_score: float = MIN_DETECTION_SCORE, spec: DetectorSpec = SHORT_RANGE
    ) -> None:
        self.min_score = min_score
        self.SIZE = spec.size
        self._net = litert_interpreter(package_file("mediapipe", spec.file))
        self._input = self._net.get_input_details()[0]["index"]
        outputs = sorted(self._net.get_output_details(), key=lambda d: int(d["shape"][-1]))
        shapes = [tuple(int(x) for x in d["shape"]) for d in outputs]
        anchors = ssd_anchors(spec.size, spec.strides, spec.anchors_per_layer)
        if shapes != [(1, len(anchors), 1), (1, len(anchors), 16)]:
            raise ModelUnavailable(f"unexpected detector outputs {shapes}")
        self._scores, self._regressors = outputs[0]["index"], outputs[1]["index"]
        self._anchors = anchors

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        h, w = bgr.shape[:2]
        scale = self.SIZE / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        pad_x, pad_y = (self.SIZE - nw) // 2, (self.SIZE - nh) // 2
        small = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((self.SIZE, self.SIZE, 3), np.uint8)
        canvas[pad_y : pad_y + nh, pad_x : pad_x + nw] = small
        tensor = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0
        self._net.set_tensor(self._input, tensor[None])
        self._net.invoke()
        raw = self._net.get_tensor(self._regressors)[0]
        scores = _sigmoid(self._net.get_tensor(self._scores)[0, :, 0])
        keep = scores >= self.min_score
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], self._anchors[keep]
        # Offsets are in input pixels relative to the anchor centre (x, y, w, h order).
        cx = raw[:, 0] / self.SIZE + anchors[:, 0]
        cy = raw[:, 1] / self.SIZE + anchors[:, 1]
        bw, bh = raw[:, 2] / self.SIZE, raw[:, 3] / self.SIZE
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        kps = raw[:, 4:16].reshape(-1, 6, 2) / self.SIZE + anchors[:, None, :]
        faces: list[DetectedFace] = []
        for box, kp, score in weighted_nms(boxes, kps, scores, NMS_IOU):
            # Undo the letterbox: input-normalised → original pixels.
            x1, y1, x2, y2 = (box * self.SIZE - [pad_x, pad_y, pad_x, pad_y]) / scale
            x1, y1 = max(0.0, float(x1)), max(0.0, float(y1))
            x2, y2 = min(float(w), float(x2)), min(float(h), float(y2))
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            kp_px = (kp * self.SIZE - [pad_x, pad_y]) / scale
            faces.append(DetectedFace(x1, y1, x2 - x1, y2 - y1, score, kp_px.astype(np.float32)))
        return faces


class FaceMesh:
    """mediapipe's 468-point face-mesh landmark model, run on the detector's face."""

    SIZE = 192
    ROI_SCALE = 1.5  # mediapipe's crop: 1.5× the detection box, square

    def __init__(self, min_score: float = MIN_LANDMARK_SCORE) -> None:
        self.min_score = min_score
        self._net = litert_interpreter(package_file("mediapipe", MESH_FILE))
        self._input = self._net.get_input_details()[0]["index"]
        outputs = {d["name"]: d["index"] for d in self._net.get_output_details()}
        try:
            self._points = outputs["conv2d_21"]
            self._flag = outputs["conv2d_31"]
        except KeyError:
            raise ModelUnavailable(f"unexpected mesh outputs {sorted(outputs)}") from None

    def landmarks(self, bgr: np.ndarray, face: DetectedFace) -> np.ndarray | None:
        """(468, 3) landmarks in image pixels, or None when the crop holds no face."""
        cx, cy = face.left + face.width / 2, face.top + face.height / 2
        angle = 0.0
        if face.keypoints is not None:
            (rx, ry), (lx, ly) = face.keypoints[KP_RIGHT_EYE], face.keypoints[KP_LEFT_EYE]
            angle = math.degrees(math.atan2(ly - ry, lx - rx))
        size = max(face.width, face.height) * self.ROI_SCALE
        # Rotate about the face centre so the eyes are level, scale to the model's input.
        m = cv2.getRotationMatrix2D((cx, cy), angle, self.SIZE / size)
        m[0, 2] += self.SIZE / 2 - cx
        m[1, 2] += self.SIZE / 2 - cy
        crop = cv2.warpAffine(
            bgr, m, (self.SIZE, self.SIZE), flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        tensor = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        self._net.set_tensor(self._input, tensor[None])
        self._net.invoke()
        flag = float(_sigmoid(self._net.get_tensor(self._flag).reshape(-1))[0])
        if flag < self.min_score:
            return None
        pts = self._net.get_tensor(self._points).reshape(-1, 3).astype(np.float64)
        inv = cv2.invertAffineTransform(m)
        out = np.empty_like(pts)
        out[:, :2] = pts[:, :2] @ inv[:, :2].T + inv[:, 2]
        out[:, 2] = pts[:, 2] * size / self.SIZE
        return out


class MediapipeFaces:
    """Detector + mesh: boxes and confidence for every face, landmarks for the largest
    `mesh_max_faces` of them (the mesh costs as much as the detector).

    The short-range detector (1.4 ms) is sure of faces taller than ~20 % of a 640×480
    frame but misses faces under ~100 px (a candidate leaning back); the full-range one
    (4.9 ms) finds those. Measured on the astronaut's head scaled into a 640×480 frame,
    face ≈75 px: short-range 0.31, full-range 0.93; face ≈100 px: 0.74 and 0.92. So the
    full-range detector runs only on frames where the short-range one found nobody. A
    small second face next to a large candidate is left to the object detector's
    "Person" count (labels)."""

    name = "mediapipe"

    def __init__(
        self,
        mesh_max_faces: int = MESH_MAX_FACES,
        min_extra_score: float = MIN_EXTRA_FACE_SCORE,
    ) -> None:
        self.detector = BlazeFaceDetector()
        self.far_detector: BlazeFaceDetector | None
        try:
            self.far_detector = BlazeFaceDetector(spec=FULL_RANGE)
        except ModelUnavailable as exc:
            log.warning("full-range face detector unavailable: %s", exc)
            self.far_detector = None
        self.mesh = FaceMesh()
        self.mesh_max_faces = mesh_max_faces
        self.min_extra_score = min_extra_score

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        found = self.detector.detect(bgr)
        if not found and self.far_detector is not None:
            found = self.far_detector.detect(bgr)
        faces = sorted(found, key=lambda f: f.area, reverse=True)
        faces = faces[:1] + [f for f in faces[1:] if f.score >= self.min_extra_score]
        out: list[DetectedFace] = []
        for i, face in enumerate(faces):
            if i < self.mesh_max_faces:
                lm = self.mesh.landmarks(bgr, face)
                if lm is not None:
                    face = DetectedFace(
                        face.left, face.top, face.width, face.height, face.score,
                        face.keypoints, lm.astype(np.float32),
                    )
            out.append(face)
        return out


class CascadeFaces:
    """OpenCV's shipped frontal-face Haar cascade: boxes only. Run on a ≤320 px image
    (a webcam face stays ≥ 40 px there) to keep it at a few milliseconds."""

    name = "haar"
    MAX_DIM = 320
    CASCADE = "haarcascade_frontalface_default.xml"

    def __init__(self) -> None:
        data: Any = getattr(cv2, "data", None)
        path = getattr(data, "haarcascades", "") + self.CASCADE
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ModelUnavailable(f"OpenCV cascade {path} cannot be loaded")

    def detect(self, bgr: np.ndarray) -> list[DetectedFace]:
        h, w = bgr.shape[:2]
        scale = min(1.0, self.MAX_DIM / max(h, w))
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        rects, _levels, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24), outputRejectLevels=True
        )
        faces: list[DetectedFace] = []
        for (x, y, fw, fh), weight in zip(rects, np.ravel(weights), strict=False):
            # The cascade's final-stage weight is not a probability; this maps its usual
            # range (≈0..6 for true faces) onto 50..99 so confidences stay comparable.
            score = min(0.99, max(0.5, 0.5 + float(weight) / 12.0))
            faces.append(DetectedFace(x / scale, y / scale, fw / scale, fh / scale, score))
        return faces

