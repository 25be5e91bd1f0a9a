"""The offline analyser backend: real models shipped inside registry packages, no account,
no network. It returns the same `Observation` as the Rekognition backend.

Per frame (`local_models`): faces and 468 landmarks (mediapipe's models in LiteRT), head
pose and eyes/mouth openness from the landmarks, apparent expression (`fer`'s model),
frame quality; when asked, COCO objects as labels (SSD-MobileNet, OpenCV DNN) and text
lines (RapidOCR).

Concurrency. Model objects are not thread-safe, so each worker thread loads its own
models once, at `start()`, and warms them up; nothing is loaded per frame.

- The face pool, one thread per core, does faces (+ pose, expression, quality) on every
  call: ≈7 ms a frame. Threads, not processes: the model calls release the GIL (LiteRT,
  OpenCV) and the Python glue is ≈0.3 ms a frame; measured on 640×480 frames, one
  thread does 97 frames/s and two do 165 (three: 93, contention). An asyncio semaphore
  with one slot per thread is held until the thread is done, so the pool's own queue
  never grows; waiting happens on the event loop, cancellably.
- Labels (≈60 ms) and text (≈150–250 ms) each have a single worker thread of their own,
  so a slow check never holds a face worker and never delays another session's faces.
  At most `SLOW_MAX_WAITING` jobs wait behind the running one; a check beyond that is
  answered at once as degraded ("labels:busy", "text:busy") rather than queued, so a
  burst costs some slow answers, never face latency. The three kinds of work for one
  frame run concurrently.

With EMOTION_ANALYSIS=off the expression model is never loaded nor run: faces carry no
emotions and no smile.

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
from typing import Generic, TypeVar

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

M = TypeVar("M")
R = TypeVar("R")

#: Faces, pose, expression and objects see the frame with its longest side at most this.
#: The detectors' inputs are 128–300 px, so more pixels only cost resizing time.
ANALYSIS_MAX_DIM = 640
#: OCR sees more pixels: its detector works at ≤480 px (`ocr.DET_MAX_SIDE`), but the
#: recogniser reads its 48-px-high line crops from this image.
OCR_MAX_DIM = 960
#: Labels or text jobs allowed to wait behind the running one before further checks of
#: that kind are refused as busy.
SLOW_MAX_WAITING = 1
#: HAPPY at or above this (0–100) reads as a smile.
SMILE_MIN_HAPPY = 50.0
#: Per-model timings kept for `timings()` (most recent calls).
TIMING_WINDOW = 512

_LOAD_ERRORS = (ModelUnavailable, OSError, ValueError)


@dataclass
class _FaceModels:
    faces: FaceDetector
    expression: ExpressionModel | None
    missing: tuple[str, ...]


@dataclass
class _FaceResult:
    faces: tuple[Face, ...]
    quality: Quality
    timings: dict[str, float] = field(default_factory=dict)


class _SingleWorker(Generic[M, R]):
    """One thread owning one slow model, with a bounded wait (see the module doc)."""

    def __init__(
        self,
        check: str,
        load: Callable[[], M],
        run: Callable[[M, Frame], R],
        on_load_error: Callable[[str, Exception], None],
        max_waiting: int = SLOW_MAX_WAITING,
    ) -> None:
        self.check = check
        self._load = load
        self._run = run
        self._on_load_error = on_load_error
        self.max_waiting = max_waiting
        self._pool: ThreadPoolExecutor | None = None
        self._model: M | None = None
        self.inflight = 0

    async def start(self) -> bool:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"local-{self.check}")
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load_model)
        if self._model is None:
            self._pool.shutdown(wait=False)
            self._pool = None
        return self._pool is not None

    def _load_model(self) -> None:
        try:
            self._model = self._load()
        except _LOAD_ERRORS as exc:
            self._on_load_error(self.check, exc)

    def submit(self, frame: Frame, degraded: list[str]) -> asyncio.Future[R] | None:
        """Queue the job, or refuse it at once. Counted synchronously, so a burst of calls
        cannot all slip past the check before any is counted."""
        pool, model = self._pool, self._model
        if pool is None or model is None:
            degraded.append(f"{self.check}:unavailable")
            return None
        if self.inflight > self.max_waiting:
            degraded.append(f"{self.check}:busy")
            return None
        loop = asyncio.get_running_loop()
        self.inflight += 1
        try:
            future = pool.submit(self._run, model, frame)
        except RuntimeError:  # shut down
            self.inflight -= 1
            degraded.append(f"{self.check}:unavailable")
            return None
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._finished))
        return asyncio.wrap_future(future)

    def _finished(self) -> None:
        self.inflight -= 1

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


class LocalAnalyser:
    name = "local"
    billed = False  # costs CPU only: bounded by its own worker pool, not the API budget
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
        self._slots: asyncio.Semaphore | None = None
        self._start_lock = asyncio.Lock()
        self._missing: set[str] = set()
        self._logged: set[str] = set()
        self._log_lock = threading.Lock()
        self._timings: dict[str, deque[float]] = {}
        self._timings_lock = threading.Lock()
        self._labels: _SingleWorker[ObjectDetector, tuple[Label, ...]] = _SingleWorker(
            "labels", _load_objects, self._labels_job, self._load_failed
        )
        self._text: _SingleWorker[TextReader, tuple[TextLine, ...]] = _SingleWorker(
            "text", TextReader, self._text_job, self._load_failed
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._pool is None:
                await self._start()

    async def _start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="local-faces")
        self._slots = asyncio.Semaphore(self.workers)
        # One warm-up task per thread; the barrier makes the pool start all its threads
        # (it otherwise starts them lazily) and each loads and runs its own models.
        barrier = threading.Barrier(self.workers)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            self._labels.start(),
            self._text.start(),
            *(loop.run_in_executor(self._pool, self._warm_worker, barrier)
              for _ in range(self.workers)),
        )
        log.info(
            "local analyser ready: %d face workers%s",
            self.workers,
            f", unavailable: {', '.join(sorted(self._missing))}" if self._missing else "",
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
        await self._labels.close()
        await self._text.close()

    @property
    def missing(self) -> frozenset[str]:
        """Capabilities that could not be loaded ("pose", "expression", "labels", "text")."""
        return frozenset(self._missing)

    # --- analysis ----------------------------------------------------------------------

    async def analyse(self, frame: Frame, checks: Checks) -> Observation:
        if self._pool is None:
            await self.start()
        started = time.perf_counter()
        degraded: list[str] = []
        face_task = (
            asyncio.ensure_future(self._run_face_job(frame)) if checks.faces else None
        )
        labels_task = self._labels.submit(frame, degraded) if checks.labels else None
        text_task = self._text.submit(frame, degraded) if checks.text else None
        tasks = [t for t in (face_task, labels_task, text_task) if t is not None]
        # Cancelling this call cancels the waits; threads finish and free their slots.
        await asyncio.gather(*tasks, return_exceptions=True)

        faces: tuple[Face, ...] | None = None
        quality: Quality | None = None
        face_result = self._outcome(face_task, "faces", degraded)
        if face_result is not None:
            faces, quality = face_result.faces, face_result.quality
            self._record(face_result.timings)
            if "pose" in self._missing:
                degraded.append("pose:unavailable")
            if "expression" in self._missing:
                degraded.append("expression:unavailable")
        labels = self._outcome(labels_task, "labels", degraded)
        text = self._outcome(text_task, "text", degraded)
        # analyser_latency is observed by the session manager, around this call.
        elapsed = time.perf_counter() - started
        return Observation(
            backend=self.name,
            checks=checks,
            faces=faces,
            labels=labels,
            text=text,
            quality=quality,
            degraded=tuple(dict.fromkeys(degraded)),
            calls={},
            latency_ms=elapsed * 1000.0,
            width=frame.width,
            height=frame.height,
        )

    def _outcome(
        self, task: asyncio.Future[R] | None, check: str, degraded: list[str]
    ) -> R | None:
        """A finished job's result; a bad frame raises, any other failure degrades."""
        if task is None or task.cancelled():
            return None
        exc = task.exception()
        if isinstance(exc, FrameError):
            raise exc
        if exc is not None:
            self._log_once(f"{check}-job", "local %s analysis failed: %r", check, exc)
            degraded.append(f"{check}:error")
            return None
        return task.result()

    def timings(self) -> dict[str, dict[str, float]]:
        """Recent per-model time in ms (median, p95, count): "decode", "detect+mesh",
        "quality", "expression", "faces_total", "labels", "text"."""
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

    # --- face pool ---------------------------------------------------------------------------

    async def _run_face_job(self, frame: Frame) -> _FaceResult:
        assert self._slots is not None
        pool = self._pool
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            if pool is None:
                raise RuntimeError("local analyser is closed")
            future = pool.submit(self._face_job, frame)
        except BaseException:
            self._slots.release()
            raise
        # The slot is freed when the thread is done, not when this wait is cancelled.
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._slots_release))
        return await asyncio.wrap_future(future)

    def _slots_release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _warm_worker(self, barrier: threading.Barrier) -> None:
        models = self._face_models()
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        # First inference allocates buffers and picks kernels: do it before traffic.
        dummy = _warmup_frame()
        models.faces.detect(dummy)
        if models.expression is not None:
            gray = cv2.cvtColor(dummy, cv2.COLOR_BGR2GRAY)
            models.expression.emotions(gray, DetectedFace(200, 120, 200, 200, 1.0))

    def _face_models(self) -> _FaceModels:
        models: _FaceModels | None = getattr(self._local, "models", None)
        if models is not None:
            return models
        missing: list[str] = []
        faces: FaceDetector
        try:
            faces = MediapipeFaces()
        except _LOAD_ERRORS as exc:
            self._log_once("faces", "face landmark models unavailable, "
                           "falling back to OpenCV's Haar cascade: %s", exc)
            faces = CascadeFaces()  # ships with OpenCV itself
            missing.append("pose")  # and eyes/mouth: no landmarks
        expression: ExpressionModel | None = None
        if self.settings.emotion_analysis:  # off: no expression is ever inferred
            try:
                expression = ExpressionModel()
            except _LOAD_ERRORS as exc:
                self._load_failed("expression", exc)
                missing.append("expression")
        models = _FaceModels(faces, expression, tuple(missing))
        self._missing.update(missing)
        self._local.models = models
        return models

    def _face_job(self, frame: Frame) -> _FaceResult:
        models = self._face_models()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        bgr = frame.bgr(ANALYSIS_MAX_DIM)
        t1 = time.perf_counter()
        timings["decode"] = (t1 - t0) * 1000
        h, w = bgr.shape[:2]
        found = models.faces.detect(bgr)
        t2 = time.perf_counter()
        timings["detect+mesh"] = (t2 - t1) * 1000
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        quality = assess(gray, found)
        t3 = time.perf_counter()
        timings["quality"] = (t3 - t2) * 1000
        faces: list[Face] = []
        for f in found:
            emotions = models.expression.emotions(gray, f) if models.expression else {}
            faces.append(_to_face(f, w, h, emotions))
        t4 = time.perf_counter()
        if found and models.expression is not None:
            timings["expression"] = (t4 - t3) * 1000
        timings["faces_total"] = (t4 - t1) * 1000
        return _FaceResult(tuple(faces), quality, timings)

    # --- single workers -------------------------------------------------------------------

    def _labels_job(self, model: ObjectDetector, frame: Frame) -> tuple[Label, ...]:
        bgr = frame.bgr(ANALYSIS_MAX_DIM)
        t = time.perf_counter()
        labels = model.labels(bgr)
        self._record({"labels": (time.perf_counter() - t) * 1000})
        return labels

    def _text_job(self, model: TextReader, frame: Frame) -> tuple[TextLine, ...]:
        bgr = frame.bgr(OCR_MAX_DIM)
        t = time.perf_counter()
        lines = model.read(bgr)
        self._record({"text": (time.perf_counter() - t) * 1000})
        return lines

    # --- bookkeeping -------------------------------------------------------------------------

    def _load_failed(self, capability: str, exc: Exception) -> None:
        self._missing.add(capability)
        self._log_once(capability, "%s model unavailable: %s", capability, exc)

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


def _load_objects() -> ObjectDetector:
    detector = ObjectDetector()
    detector.labels(_warmup_frame())  # first forward pass allocates and picks kernels
    return detector


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


