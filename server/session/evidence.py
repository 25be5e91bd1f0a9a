"""Alert evidence: one snapshot per alert onset, of the frame whose analysis raised it.

The snapshot is a JPEG at most `EVIDENCE_MAX_WIDTH` (640) px wide with every face and
every boxed object and text line of that frame drawn on it, and a caption band below the
picture with the numbers that made the rule fire (face count; yaw and pitch against
their thresholds; label and confidence; text). Its quality, then its size, shrink until
it fits `EVIDENCE_MAX_BYTES`; one that cannot fit is not stored (counted).

The live path never waits for it: the session's worker hands the onset frame, which it
still holds right after the analysis, to `EvidenceWriter.offer`, which never blocks. The
writer keeps a small bounded queue (a full queue drops the snapshot and counts it) and
renders in its own thread, so neither the event loop nor the analysis of the next frame
waits on Pillow; the writer's task and thread belong to the session manager, which stops
them. A queued frame is the only pixel data kept, and only until it is rendered.

`render()` is a pure function of a job, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.analysis.observation import Box, Observation
from server.config import Settings
from server.media.frames import Frame
from server.observability import Instruments, short_id
from server.session.store import Store

log = logging.getLogger(__name__)

FACE_COLOUR = (0, 230, 0)
OBJECT_COLOUR = (255, 30, 30)
TEXT_COLOUR = (30, 120, 255)
BAND_COLOUR = (16, 16, 16)
CAPTION_COLOUR = (245, 245, 245)
#: JPEG qualities tried in turn; then the picture itself shrinks.
QUALITIES = (85, 75, 65, 55, 45, 35)
SHRINK = 0.8
MIN_WIDTH = 160
FONT_SIZE = 13
#: How much nicer the evidence thread is than the rest of the process.
EVIDENCE_NICE = 10
LINE_HEIGHT = 17
#: Details not worth a caption line (the streak bookkeeping is in the alert's record).
_CAPTION_SKIP = frozenset({"lines", "first_frame", "required_dwell_s"})


@dataclass(frozen=True)
class EvidenceJob:
    session_id: str
    alert: dict[str, Any]  # the onset event, as the alert rules raised it
    frame: Frame
    observation: Observation


@dataclass(frozen=True)
class Evidence:
    jpeg: bytes
    width: int
    height: int
    details: dict[str, Any]


_font_lock = threading.Lock()
_font: Any = None


def _caption_font() -> Any:
    from PIL import ImageFont

    global _font
    with _font_lock:
        if _font is None:
            _font = ImageFont.load_default(size=FONT_SIZE)
        return _font


def _px(box: Box, width: int, height: int) -> list[int]:
    """A ratio box as pixel corners [x0, y0, x1, y1] of a `width`×`height` picture."""
    x0 = round(box.left * width)
    y0 = round(box.top * height)
    x1 = round((box.left + box.width) * width)
    y1 = round((box.top + box.height) * height)
    return [
        min(max(0, x0), width - 1),
        min(max(0, y0), height - 1),
        min(max(0, x1), width - 1),
        min(max(0, y1), height - 1),
    ]


def _ratio(box: Box) -> dict[str, float]:
    return {
        "left": round(box.left, 4),
        "top": round(box.top, 4),
        "width": round(box.width, 4),
        "height": round(box.height, 4),
    }


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return str(v)


def caption_lines(alert: dict[str, Any], frame_index: Any, captured_at: float) -> list[str]:
    """What the band under the picture says: the alert, then its numbers."""
    when = datetime.fromtimestamp(captured_at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-4]
    raw = alert.get("details")
    details: dict[str, Any] = raw if isinstance(raw, dict) else {}
    lines = [
        f"{alert.get('type')} ({alert.get('severity')}) · frame {frame_index} · {when} UTC",
        str(alert.get("message") or ""),
    ]
    numbers = [f"{k} {_value(v)}" for k, v in details.items() if k not in _CAPTION_SKIP]
    if numbers:
        lines.append(" · ".join(numbers))
    text = details.get("lines")
    if isinstance(text, list) and text:
        lines.append("text: " + " | ".join(f'"{t}"' for t in text))
    return lines


@dataclass(frozen=True)
class _Boxed:
    box: Box
    colour: tuple[int, int, int]
    tag: str
    entry: dict[str, Any]  # its record in the snapshot's details (gets "px")


def _what_is_boxed(obs: Observation) -> tuple[list[_Boxed], list[_Boxed], list[_Boxed]]:
    faces: list[_Boxed] = []
    primary = obs.primary_face
    for i, face in enumerate(obs.faces or ()):
        entry: dict[str, Any] = {
            "box": _ratio(face.box),
            "confidence": round(face.confidence, 1),
            "primary": face is primary,
        }
        tag = f"face {i + 1} {face.confidence:.1f}%"
        if face.pose is not None:
            entry["pose"] = {"yaw": round(face.pose.yaw, 1), "pitch": round(face.pose.pitch, 1)}
            tag += f" yaw {face.pose.yaw:.1f} pitch {face.pose.pitch:.1f}"
        faces.append(_Boxed(face.box, FACE_COLOUR, tag, entry))
    objects = [
        _Boxed(
            b,
            OBJECT_COLOUR,
            f"{lb.name} {lb.confidence:.1f}%",
            {"label": lb.name, "confidence": round(lb.confidence, 1), "box": _ratio(b)},
        )
        for lb in obs.labels or ()
        for b in lb.boxes
    ]
    texts = [
        _Boxed(
            t.box,
            TEXT_COLOUR,
            "",
            {"text": t.text[:200], "confidence": round(t.confidence, 1), "box": _ratio(t.box)},
        )
        for t in obs.text or ()
        if t.box is not None
    ]
    return faces, objects, texts


def _compose(picture: Any, width: int, height: int, boxes: list[_Boxed], lines: list[str]) -> Any:
    """The picture at `width`×`height` with the boxes drawn (each entry gets its pixel
    corners, "px") and the caption band below."""
    from PIL import Image, ImageDraw

    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    font = _caption_font()
    wrap = max(20, int(width / (FONT_SIZE * 0.55)))
    wrapped = [part for line in lines for part in textwrap.wrap(line, wrap) or [""]][:12]
    band = LINE_HEIGHT * len(wrapped) + 8
    canvas = Image.new("RGB", (width, height + band), BAND_COLOUR)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    stroke = max(2, round(width / 200))
    for item in boxes:
        corners = _px(item.box, width, height)
        item.entry["px"] = corners
        draw.rectangle(corners, outline=item.colour, width=stroke)
        if item.tag:
            x, y = corners[0], max(0, corners[1] - LINE_HEIGHT)
            right = min(width - 1, x + int(draw.textlength(item.tag, font=font)) + 6)
            draw.rectangle([x, y, right, y + LINE_HEIGHT - 2], fill=item.colour)
            draw.text((x + 3, y + 1), item.tag, fill=(0, 0, 0), font=font)
    for i, line in enumerate(wrapped):
        draw.text((6, height + 4 + i * LINE_HEIGHT), line, fill=CAPTION_COLOUR, font=font)
    return canvas


def render(job: EvidenceJob, max_width: int, max_bytes: int) -> Evidence | None:
    """The snapshot of a job (blocking pixel work: run it in a thread); None when even
    the smallest picture does not fit `max_bytes`."""
    import cv2
    from PIL import Image

    frame, obs, alert = job.frame, job.observation, job.alert
    scale = min(1.0, max_width / max(1, frame.width))
    bgr = frame.bgr(max(1, round(max(frame.width, frame.height) * scale)))
    # OpenCV converts without the GIL, 3× faster than Pillow copying a reversed view.
    picture = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if picture.width > max_width:
        height = max(1, round(picture.height * max_width / picture.width))
        picture = picture.resize((max_width, height), Image.Resampling.LANCZOS)
    faces, objects, texts = _what_is_boxed(obs)
    lines = caption_lines(alert, alert.get("frame_index"), frame.captured_at)
    width, height = picture.size
    while True:
        canvas = _compose(picture, width, height, [*faces, *objects, *texts], lines)
        for quality in QUALITIES:
            buf = io.BytesIO()
            # No `optimize`: it halves the encoder's speed for 2 % fewer bytes.
            canvas.save(buf, "JPEG", quality=quality)
            if buf.tell() > max_bytes:
                continue
            details = {
                "alert_id": alert.get("episode_id"),
                "type": alert.get("type"),
                "message": alert.get("message"),
                "numbers": alert.get("details"),
                "frame_index": alert.get("frame_index"),
                "captured_at": frame.captured_at,
                "frame_size": [frame.width, frame.height],
                # The picture is the top `picture_height` rows; the caption is below.
                "picture_height": height,
                "jpeg_quality": quality,
                "faces_count": None if obs.faces is None else len(obs.faces),
                "faces": [f.entry for f in faces],
                "objects": [o.entry for o in objects],
                "text": [t.entry for t in texts],
                "caption": lines,
            }
            return Evidence(buf.getvalue(), canvas.width, canvas.height, details)
        if width * SHRINK < MIN_WIDTH:
            return None
        width, height = round(width * SHRINK), max(1, round(height * SHRINK))


def _lower_priority() -> None:
    """The evidence thread yields the CPU to analysis and the event loop when cores are
    short (Linux: a thread's nice value is its own)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, tid)  # inherited from the process
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + EVIDENCE_NICE))


#: Told about an unexpected error (where, exception): it logs and counts.
ErrorHook = Callable[[str, BaseException], None]


class EvidenceWriter:
    """The bounded queue and thread that render and store the snapshots (module doc)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        instruments: Instruments,
        on_error: ErrorHook | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.instruments = instruments
        self.on_error = on_error
        self.enabled = settings.evidence == "snapshot"
        self._queue: asyncio.Queue[EvidenceJob] = asyncio.Queue(
            maxsize=max(1, settings.evidence_queue_size)
        )
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix="evidence", initializer=_lower_priority
        )
        self._task: asyncio.Task[None] | None = None
        self._taken: dict[str, int] = {}  # snapshots accepted per live session
        self._pending: dict[str, int] = {}  # queued or rendering, per session
        self.outcomes: dict[str, int] = {}
        self._finished = asyncio.Event()  # set whenever a job is done with

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="evidence-writer")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Render what is queued within `timeout_s`, then cancel the rest."""
        task, self._task = self._task, None
        if task is not None:
            await self._wait(lambda: not self._pending, timeout_s)
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def settle(self, session_id: str, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until no snapshot of `session_id` is queued or being rendered."""
        await self._wait(lambda: session_id not in self._pending, timeout_s)

    async def _wait(self, done: Callable[[], bool], timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not done():
                    self._finished.clear()
                    await self._finished.wait()

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.instruments.evidence.labels(outcome=outcome).inc()

    def offer(self, job: EvidenceJob) -> bool:
        """Queue a snapshot; never waits. False when it will not be made."""
        if not self.enabled or self._task is None:
            return False
        taken = self._taken.get(job.session_id, 0)
        if taken >= self.settings.evidence_max_per_session:
            self._count("session_limit")
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._count("dropped")
            return False
        self._taken[job.session_id] = taken + 1
        self._pending[job.session_id] = self._pending.get(job.session_id, 0) + 1
        return True

    def forget(self, session_id: str) -> None:
        """The session left the live set: forget its count (queued snapshots still
        render; one for a session erased meanwhile inserts nothing)."""
        self._taken.pop(session_id, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            try:
                t0 = time.perf_counter()
                evidence = await loop.run_in_executor(
                    self._thread,
                    render,
                    job,
                    self.settings.evidence_max_width,
                    self.settings.evidence_max_bytes,
                )
                self.instruments.evidence_render.observe(time.perf_counter() - t0)
                if evidence is None:
                    self._count("too_large")
                    log.warning(
                        "evidence of alert %s does not fit %d bytes: not stored",
                        job.alert.get("episode_id"),
                        self.settings.evidence_max_bytes,
                        extra={"session_id": job.session_id},
                    )
                else:
                    await self.store.save_evidence(
                        job.session_id,
                        str(job.alert["episode_id"]),
                        time.time(),
                        evidence.jpeg,
                        evidence.width,
                        evidence.height,
                        evidence.details,
                    )
                    self.instruments.evidence_bytes.observe(len(evidence.jpeg))
                    self._count("stored")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad frame must not stop every later snapshot
                self._count("failed")
                if self.on_error is not None:
                    self.on_error("evidence", exc)
                else:
                    log.exception("evidence for session %s failed", short_id(job.session_id))
            finally:
                left = self._pending.get(job.session_id, 1) - 1
                if left > 0:
                    self._pending[job.session_id] = left
                else:
                    self._pending.pop(job.session_id, None)
                self._finished.set()
