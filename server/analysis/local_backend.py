"""The offline analyser backend: real models shipped inside registry packages, no account,
no network. It returns the same `Observation` as the Rekognition backend.

Per frame (`local_models`): faces and 468 landmarks (mediapipe's models in LiteRT), head
pose and eyes/mouth openness from the landmarks, apparent expression (`fer`'s model),
frame quality; when asked, COCO objects as labels (SSD-MobileNet, OpenCV DNN) and text
lines (RapidOCR).

Concurrency. Model objects are not thread-safe, so each worker thread loads its own set
once, at `start()`, and warms it up; nothing is loaded per frame. Two pools:

- the face pool, one thread per core: faces (+ pose, expression, quality) on every call,
  plus labels when asked (≈50 ms, every 5 s per session). Threads, not processes: every
  model call releases the GIL (LiteRT, OpenCV), the Python glue is ≈0.3 ms a frame, and
  a thread reads the `Frame` it is given without pickling pixels across processes. An
  asyncio semaphore with one slot per thread is held until the thread is done, so the
  pool's own queue never grows; waiting happens on the event loop, cancellably.
- the OCR pool, a single thread with ONNX Runtime limited to one core: OCR takes
  ≈0.25 s a frame and would otherwise occupy face workers and starve every other
  session's faces. At most `OCR_MAX_WAITING` jobs wait behind the running one; a text
  check beyond that is answered `text:busy` (degraded) at once instead of queueing, so
  a burst of text checks costs some text answers, never face latency.

Faces and text for one frame run concurrently, each in its pool.

Degradation. A model whose package or file is missing, or that fails to load, is logged
once and its capability is reported in `Observation.degraded` ("pose:unavailable",
"expression:unavailable", "labels:unavailable", "text:unavailable"); without the face
models, faces come from OpenCV's Haar cascade (boxes only). The server always starts.

The pose is the face's own (minus the face model's mean bias); `needs_pose_baseline`
tells the session pipeline to make it relative to the candidate with
`pose_baseline.PoseBaseline`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cv2
import numpy as np

from server.analysis.local_models import ModelUnavailable
from server.analysis.local_models import head_pose as hp
from server.analysis.local_models.expression import ExpressionModel
from server.analysis.local_models.faces import (
    CascadeFaces,
    DetectedFace,
    FaceDetector,
    MediapipeFaces,
)
from server.analysis.local_models.objects import ObjectDetector
from server.analysis.local_models.ocr import TextReader
from server.analysis.local_models.quality import assess
from server.analysis.observation import (
    Box,
    Checks,
    Face,
    Label,
    Observation,
    Pose,
    Quality,
    TextLine,
)
from server.config import Settings
from server.media.frames import Frame, FrameError
from server.observability import Instruments

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Faces, pose, expression and objects see the frame with its longest side at most this.
#: The detectors' inputs are 128–300 px, so more pixels only cost resizing time.
ANALYSIS_MAX_DIM = 640
#: OCR sees more pixels: text is small and the recogniser reads 48-px-high line crops.
OCR_MAX_DIM = 960
#: Text jobs allowed to wait behind the running one before text checks are refused.
OCR_MAX_WAITING = 1
#: HAPPY at or above this (0–100) reads as a smile.
SMILE_MIN_HAPPY = 50.0
#: Per-model timings kept for `timings()` (most recent calls).
TIMING_WINDOW = 512


@dataclass
class _WorkerModels:
    faces: FaceDetector
    expression: ExpressionModel | None
    objects: ObjectDetector | None
    missing: tuple[str, ...]


@dataclass
class _FaceResult:
    faces: tuple[Face, ...] | None
    labels: tuple[Label, ...] | None
    quality: Quality | None
    degraded: list[str]
    timings: dict[str, float] = field(default_factory=dict)


class LocalAnalyser:
    name = "local"
    #: Pose is absolute w.r.t. a generic face: the session makes it per-candidate.
    needs_pose_baseline = True

    def __init__(
        self,
        settings: Settings,
        instruments: Instruments | None = None,
        *,
        workers: int | None = None,
    ) -> None:
        self.settings = settings
        self.instruments = instruments
        self.workers = workers or _cores()
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._ocr_pool: ThreadPoolExecutor | None = None
        self._ocr_reader: TextReader | None = None
        self._ocr_inflight = 0
        self._slots: asyncio.Semaphore | None = None
        self._start_lock = asyncio.Lock()
        self._missing: set[str] = set()
        self._logged: set[str] = set()
        self._log_lock = threading.Lock()
        self._timings: dict[str, deque[float]] = {}
        self._timings_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._pool is None:
                await self._start()

    async def _start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="local-analyser")
        self._slots = asyncio.Semaphore(self.workers)
        # One warm-up task per thread; the barrier makes the pool start all its threads
        # (it otherwise starts them lazily) and each loads and runs its own models.
        barrier = threading.Barrier(self.workers)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._warm_worker, barrier)
              for _ in range(self.workers))
        )
        self._ocr_pool = ThreadPoolExecutor(1, thread_name_prefix="local-ocr")
        await loop.run_in_executor(self._ocr_pool, self._warm_ocr)
        if self._ocr_reader is None:
            self._ocr_pool.shutdown(wait=False)
            self._ocr_pool = None
        log.info(
            "local analyser ready: %d face workers, OCR %s%s",
            self.workers,
            "on" if self._ocr_pool else "off",
            f", missing: {', '.join(sorted(self._missing))}" if self._missing else "",
        )

    async def close(self) -> None:
        pools = [p for p in (self._pool, self._ocr_pool) if p is not None]
        self._pool = self._ocr_pool = None
        for pool in pools:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    @property
    def missing(self) -> frozenset[str]:
        """Capabilities that could not be loaded ("pose", "expression", "labels", ...)."""
        return frozenset(self._missing)

    # --- analysis ----------------------------------------------------------------------

    async def analyse(self, frame: Frame, checks: Checks) -> Observation:
        if self._pool is None or self._slots is None:
            await self.start()
        started = time.perf_counter()
        degraded: list[str] = []
        tasks: list[asyncio.Future[Any]] = []
        face_task: asyncio.Future[_FaceResult] | None = None
        text_task: asyncio.Future[tuple[TextLine, ...]] | None = None
        if checks.faces or checks.labels:
            face_task = asyncio.ensure_future(
                self._run_face_job(frame, checks.faces, checks.labels)
            )
            tasks.append(face_task)
        if checks.text:
            text_task = self._start_ocr(frame, degraded)
            if text_task is not None:
                tasks.append(text_task)
        # Cancelling this call cancels the waits; threads finish and free their slots.
        await asyncio.gather(*tasks, return_exceptions=True)

        faces: tuple[Face, ...] | None = None
        labels: tuple[Label, ...] | None = None
        text: tuple[TextLine, ...] | None = None
        quality: Quality | None = None
        if face_task is not None:
            exc = face_task.exception()
            if isinstance(exc, FrameError):
                raise exc
            if exc is not None:
                self._log_once("face-job", "local face analysis failed: %r", exc)
                degraded.extend(f"{c}:error" for c in ("faces", "labels")
                                if getattr(checks, c))
            else:
                result = face_task.result()
                faces, labels, quality = result.faces, result.labels, result.quality
                degraded.extend(result.degraded)
                self._record(result.timings)
        if text_task is not None:
            exc = text_task.exception()
            if isinstance(exc, FrameError):
                raise exc
            if exc is not None:
                self._log_once("ocr-job", "local OCR failed: %r", exc)
                degraded.append("text:error")
            else:
                text = text_task.result()

        # analyser_latency is observed by the session manager, around this call.
        elapsed = time.perf_counter() - started
        return Observation(
            backend=self.name,
            checks=checks,
            faces=faces if checks.faces else None,
            labels=labels,
            text=text,
            quality=quality if checks.faces else None,
            degraded=tuple(dict.fromkeys(degraded)),
            calls={},
            latency_ms=elapsed * 1000.0,
            width=frame.width,
            height=frame.height,
        )

    def timings(self) -> dict[str, dict[str, float]]:
        """Recent per-model time in ms (median, p95, count): "detect", "mesh",
        "expression", "quality", "faces_total", "labels", "text", "decode"."""
        with self._timings_lock:
            data = {k: list(v) for k, v in self._timings.items()}
        return {
            k: {
                "median": float(np.median(v)),
                "p95": float(np.percentile(v, 95)),
                "count": float(len(v)),
            }
            for k, v in data.items()
            if v
        }

    # --- event-loop side of the pools -----------------------------------------------------

    async def _run_face_job(self, frame: Frame, faces: bool, labels: bool) -> _FaceResult:
        assert self._slots is not None
        await self._slots.acquire()
        return await self._submit(
            self._pool, self._slots.release, self._face_job, frame, faces, labels
        )

    def _start_ocr(
        self, frame: Frame, degraded: list[str]
    ) -> asyncio.Future[tuple[TextLine, ...]] | None:
        """Queue an OCR job, or refuse it at once (`text:busy`) when the OCR worker already
        has one running and `OCR_MAX_WAITING` waiting. Counted synchronously, so a burst
        of calls cannot all slip past the check before any is counted."""
        pool = self._ocr_pool
        if pool is None:
            degraded.append("text:unavailable")
            return None
        if self._ocr_inflight > OCR_MAX_WAITING:
            degraded.append("text:busy")
            return None
        loop = asyncio.get_running_loop()
        self._ocr_inflight += 1
        try:
            future = pool.submit(self._ocr_job, frame)
        except RuntimeError:  # shut down
            self._ocr_inflight -= 1
            degraded.append("text:unavailable")
            return None
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._ocr_finished))
        return asyncio.wrap_future(future)

    def _ocr_finished(self) -> None:
        self._ocr_inflight -= 1

    async def _submit(
        self,
        pool: ThreadPoolExecutor | None,
        on_done: Callable[[], None],
        fn: Callable[..., T],
        *args: Any,
    ) -> T:
        """Run fn in the pool; `on_done` runs on the loop when the thread has finished
        (not when an awaiting coroutine is cancelled), keeping the accounting honest."""
        loop = asyncio.get_running_loop()
        if pool is None:
            on_done()
            raise RuntimeError("local analyser is closed")
        try:
            future = pool.submit(fn, *args)
        except RuntimeError:
            on_done()
            raise
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(on_done))
        return await asyncio.wrap_future(future)

    # --- worker side ---------------------------------------------------------------------------

    def _warm_worker(self, barrier: threading.Barrier) -> None:
        models = self._models()
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        # First inference allocates buffers and JIT-picks kernels: do it before traffic.
        dummy = _warmup_frame()
        models.faces.detect(dummy)
        if models.expression is not None:
            gray = cv2.cvtColor(dummy, cv2.COLOR_BGR2GRAY)
            models.expression.emotions(gray, DetectedFace(200, 120, 200, 200, 1.0))
        if models.objects is not None:
            models.objects.labels(dummy)

    def _models(self) -> _WorkerModels:
        models: _WorkerModels | None = getattr(self._local, "models", None)
        if models is not None:
            return models
        missing: list[str] = []
        faces: FaceDetector
        try:
            faces = MediapipeFaces()
        except (ModelUnavailable, OSError, ValueError) as exc:
            self._log_once("faces", "face landmark models unavailable, "
                           "falling back to OpenCV's Haar cascade: %s", exc)
            faces = CascadeFaces()  # ships with OpenCV itself
            missing.append("pose")  # and eyes/mouth: no landmarks
        expression = self._load("expression", ExpressionModel, missing)
        objects = self._load("labels", ObjectDetector, missing)
        models = _WorkerModels(faces, expression, objects, tuple(missing))
        self._missing.update(missing)
        self._local.models = models
        return models

    def _load(self, capability: str, factory: Callable[[], T], missing: list[str]) -> T | None:
        try:
            return factory()
        except (ModelUnavailable, OSError, ValueError) as exc:
            self._log_once(capability, "%s model unavailable: %s", capability, exc)
            missing.append(capability)
            return None

    def _warm_ocr(self) -> None:
        try:
            self._ocr_reader = TextReader()
        except (ModelUnavailable, OSError, ValueError) as exc:
            self._log_once("text", "text (OCR) model unavailable: %s", exc)
            self._missing.add("text")

    def _face_job(self, frame: Frame, want_faces: bool, want_labels: bool) -> _FaceResult:
        models = self._models()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        bgr = frame.bgr(ANALYSIS_MAX_DIM)
        t1 = time.perf_counter()
        timings["decode"] = (t1 - t0) * 1000
        degraded: list[str] = []
        faces: tuple[Face, ...] | None = None
        quality: Quality | None = None
        if want_faces:
            faces, quality = self._faces(models, bgr, timings)
            timings["faces_total"] = (time.perf_counter() - t1) * 1000
            if "pose" in models.missing:
                degraded.append("pose:unavailable")
            if models.expression is None:
                degraded.append("expression:unavailable")
        labels: tuple[Label, ...] | None = None
        if want_labels:
            if models.objects is None:
                degraded.append("labels:unavailable")
            else:
                t = time.perf_counter()
                labels = models.objects.labels(bgr)
                timings["labels"] = (time.perf_counter() - t) * 1000
        return _FaceResult(faces, labels, quality, degraded, timings)

    def _faces(
        self, models: _WorkerModels, bgr: np.ndarray, timings: dict[str, float]
    ) -> tuple[tuple[Face, ...], Quality]:
        h, w = bgr.shape[:2]
        t = time.perf_counter()
        found = models.faces.detect(bgr)
        timings["detect+mesh"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        quality = assess(gray, found)
        timings["quality"] = (time.perf_counter() - t) * 1000
        out: list[Face] = []
        t_expr = 0.0
        for f in found:
            emotions: dict[str, float] = {}
            if models.expression is not None:
                t = time.perf_counter()
                emotions = models.expression.emotions(gray, f)
                t_expr += time.perf_counter() - t
            out.append(_to_face(f, w, h, emotions))
        if found and models.expression is not None:
            timings["expression"] = t_expr * 1000
        return tuple(out), quality

    def _ocr_job(self, frame: Frame) -> tuple[TextLine, ...]:
        reader = self._ocr_reader
        if reader is None:
            raise ModelUnavailable("OCR is not loaded")
        t = time.perf_counter()
        lines = reader.read(frame.bgr(OCR_MAX_DIM))
        self._record({"text": (time.perf_counter() - t) * 1000})
        return lines

    # --- bookkeeping -------------------------------------------------------------------------

    def _record(self, timings: dict[str, float]) -> None:
        with self._timings_lock:
            for name, ms in timings.items():
                self._timings.setdefault(name, deque(maxlen=TIMING_WINDOW)).append(ms)

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        with self._log_lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.warning(msg, *args)


def _to_face(f: DetectedFace, width: int, height: int, emotions: dict[str, float]) -> Face:
    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    box = Box(
        left=clip(f.left / width),
        top=clip(f.top / height),
        width=clip(f.width / width),
        height=clip(f.height / height),
    )
    pose = eyes_open = mouth_open = None
    if f.landmarks is not None:
        angles = hp.head_pose(f.landmarks)
        if angles is not None:
            pose = Pose(yaw=angles[0], pitch=angles[1], roll=angles[2])
        eyes_open = hp.eye_ratio(f.landmarks) >= hp.EYES_OPEN_MIN_RATIO
        mouth_open = hp.mouth_ratio(f.landmarks) >= hp.MOUTH_OPEN_MIN_RATIO
    smile = emotions["HAPPY"] >= SMILE_MIN_HAPPY if "HAPPY" in emotions else None
    return Face(
        box=box,
        confidence=f.score * 100.0,
        pose=pose,
        emotions=emotions,
        eyes_open=eyes_open,
        mouth_open=mouth_open,
        smile=smile,
    )


def _warmup_frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


