"""Apparent facial expression: the `fer` package's 7-class model (64×64 grey face, FER-2013
classes) run in LiteRT, mapped onto Rekognition's emotion names.

It reads the *apparent expression* of a face, not the person's inner state. Rekognition's
CONFUSED has no counterpart among the seven classes and is always reported as 0.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from server.analysis.local_models import ModelUnavailable, litert_interpreter, package_file
from server.analysis.local_models.faces import KP_LEFT_EYE, KP_RIGHT_EYE, DetectedFace

MODEL_FILE = "data/emotion_model_quantized.tflite"

#: The model's output order → Rekognition's names.
CLASSES: tuple[str, ...] = ("ANGRY", "DISGUSTED", "FEAR", "HAPPY", "SAD", "SURPRISED", "CALM")
#: Names Rekognition has and the model does not: present in every result, at 0.
UNMODELLED: tuple[str, ...] = ("CONFUSED",)

#: The crop is the face box squared and grown by this share on each side, as `fer` does
#: with its 10-pixel offsets around a cascade box.
CROP_MARGIN = 0.1


class ExpressionModel:
    SIZE = 64

    def __init__(self) -> None:
        self._net = litert_interpreter(package_file("fer", MODEL_FILE))
        inp = self._net.get_input_details()[0]
        out = self._net.get_output_details()[0]
        if tuple(inp["shape"]) != (1, self.SIZE, self.SIZE, 1) or int(out["shape"][-1]) != 7:
            raise ModelUnavailable(f"unexpected expression model shapes {inp['shape']}")
        self._input, self._output = inp["index"], out["index"]

    def crop(self, gray: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The face as the model's 64×64 input, rotated so the eyes are level."""
        cx, cy = face.left + face.width / 2, face.top + face.height / 2
        side = max(face.width, face.height) * (1 + 2 * CROP_MARGIN)
        angle = 0.0
        if face.keypoints is not None:
            (rx, ry), (lx, ly) = face.keypoints[KP_RIGHT_EYE], face.keypoints[KP_LEFT_EYE]
            angle = math.degrees(math.atan2(ly - ry, lx - rx))
        m = cv2.getRotationMatrix2D((cx, cy), angle, self.SIZE / side)
        m[0, 2] += self.SIZE / 2 - cx
        m[1, 2] += self.SIZE / 2 - cy
        return cv2.warpAffine(
            gray, m, (self.SIZE, self.SIZE), flags=cv2.INTER_AREA,
            borderMode=cv2.BORDER_REPLICATE,
        )

    def emotions(self, gray: np.ndarray, face: DetectedFace) -> dict[str, float]:
        """Rekognition-named emotions, 0–100, summing to 100 (CONFUSED always 0)."""
        crop = self.crop(gray, face).astype(np.float32)
        tensor = (crop / 255.0 - 0.5) * 2.0
        self._net.set_tensor(self._input, tensor[None, :, :, None])
        self._net.invoke()
        probs = self._net.get_tensor(self._output)[0].astype(np.float64)
        total = float(probs.sum())
        if not math.isfinite(total) or total <= 0:
            return {}
        out = {name: 100.0 * float(p) / total for name, p in zip(CLASSES, probs, strict=True)}
        for name in UNMODELLED:
            out[name] = 0.0
        return out
