"""Text: RapidOCR (PP-OCRv6 small detection + recognition, ONNX Runtime) → text lines.

RapidOCR downloads a model whenever its configured file is missing, so every model path
is given explicitly from the files the `rapidocr` wheel ships, and a missing one raises
`ModelUnavailable` here instead of reaching for the network. The recognition model
carries its character table inside, so no dictionary file is fetched either
(tests/test_offline_no_network.py runs this with networking disabled).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from server.analysis.local_models import ModelUnavailable, package_file
from server.analysis.observation import Box, TextLine

log = logging.getLogger(__name__)

DET_FILE = "models/PP-OCRv6_det_small.onnx"
REC_FILE = "models/PP-OCRv6_rec_small.onnx"
CLS_FILE = "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"

#: Lines the recogniser scores below this (0–1) are dropped.
MIN_TEXT_SCORE = 0.5
#: ONNX Runtime threads for OCR: one, so a long OCR job occupies at most one core and
#: face analysis keeps the other.
OCR_THREADS = 1
#: The text detector sees the image with its longest side at most this; recognition
#: still reads its line crops from the full image. Detection time grows with pixels
#: (measured, 640×480 frame: 205 ms at 640, 144 ms at 480, 55 ms at 320) while 15-px-high
#: printed lines are still found at 320; RapidOCR's default ("shortest side at least
#: 736") would upscale the frame to 981×736 and cost twice as much again.
DET_MAX_SIDE = 480


def rapidocr_params(threads: int = OCR_THREADS) -> dict[str, Any]:
    """RapidOCR settings pinned to the shipped model files (no download possible)."""
    return {
        "Global.log_level": "error",
        "Global.text_score": MIN_TEXT_SCORE,
        # Upside-down text is not what a webcam shows; the angle classifier costs time.
        "Global.use_cls": False,
        "Det.model_path": str(package_file("rapidocr", DET_FILE)),
        "Rec.model_path": str(package_file("rapidocr", REC_FILE)),
        "Cls.model_path": str(package_file("rapidocr", CLS_FILE)),
        "Det.limit_type": "max",
        "Det.limit_side_len": DET_MAX_SIDE,
        "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    }


def warmup_image() -> np.ndarray:
    import cv2

    image = np.full((96, 480, 3), 255, np.uint8)
    cv2.putText(image, "Warm up 123", (10, 64), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (0, 0, 0), 3)
    return image


class TextReader:
    def __init__(self, threads: int = OCR_THREADS) -> None:
        try:
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise ModelUnavailable(f"rapidocr is not installed: {exc}") from None
        try:
            self._ocr: Any = RapidOCR(params=rapidocr_params(threads))
            # RapidOCR loads its sessions on first use: do it now, not on a live frame,
            # with text in the image so that recognition runs too.
            self.read(warmup_image())
        except ModelUnavailable:
            raise
        except Exception as exc:  # rapidocr raises plain exceptions of many kinds
            raise ModelUnavailable(f"RapidOCR failed to load: {exc}") from None

    def read(self, bgr: np.ndarray) -> tuple[TextLine, ...]:
        result = self._ocr(bgr)
        texts = getattr(result, "txts", None) or ()
        scores = getattr(result, "scores", None) or ()
        boxes = getattr(result, "boxes", None)
        quads = list(boxes) if boxes is not None else []
        height, width = bgr.shape[:2]
        return tuple(
            TextLine(
                str(text).strip(),
                float(score) * 100.0,
                _box(quads[i], width, height) if i < len(quads) else None,
            )
            for i, (text, score) in enumerate(zip(texts, scores, strict=False))
            if str(text).strip()
        )


def _box(quad: Any, width: int, height: int) -> Box | None:
    """A line's four corners in pixels → its bounding box as ratios of the image."""
    try:
        points = np.asarray(quad, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return None
    if points.size == 0 or width <= 0 or height <= 0:
        return None
    left = min(1.0, max(0.0, float(points[:, 0].min()) / width))
    top = min(1.0, max(0.0, float(points[:, 1].min()) / height))
    right = min(1.0, max(0.0, float(points[:, 0].max()) / width))
    bottom = min(1.0, max(0.0, float(points[:, 1].max()) / height))
    return Box(left, top, max(0.0, right - left), max(0.0, bottom - top))
