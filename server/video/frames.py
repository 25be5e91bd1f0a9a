"""Sampling a recorded video with PyAV: one frame per interval of video time.

Video time is presentation time from the first frame (streams whose first timestamp is not
zero start at 0 too) and is read from each frame's own timestamp, so variable frame rate
is handled. The frame sampled at time t is the one on screen at t: the last frame whose
time is ≤ t. When the next sample is far ahead, the demuxer seeks to the keyframe before
it instead of decoding everything in between. Rotation metadata (phone videos) is applied
so the analyser sees the picture upright. All of this is blocking: run it in a thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.video.errors import UnreadableVideo

EPSILON_S = 1e-3  # timestamps are rounded by time bases; a frame "at" t may be 0.5 ms late


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    width: int  # as displayed (after rotation)
    height: int
    rotation: int  # degrees counter-clockwise applied for display
    codec: str
    container: str
    first_pts_s: float  # the stream's first presentation time (what video time 0 is)

    def to_json(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.duration_s, 3),
            "width": self.width,
            "height": self.height,
            "rotation": self.rotation,
            "codec": self.codec,
            "container": self.container,
        }


def sample_count(duration_s: float, interval_s: float) -> int:
    """Samples at 0, interval, 2·interval, … strictly before the end."""
    if duration_s <= 0:
        return 1
    return max(1, math.ceil(duration_s / interval_s - 1e-9))


def _why(exc: BaseException) -> str:
    """FFmpeg's reason without the file name (a server path must not reach clients)."""
    return str(getattr(exc, "strerror", None) or type(exc).__name__)


def _open(path: Path) -> Any:
    import av

    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise UnreadableVideo(f"not a readable video file: {_why(exc)}") from None
    if not container.streams.video:
        container.close()
        raise UnreadableVideo("the file has no video stream")
    return container


def _rotation(frame: Any) -> int:
    # PyAV reports the display matrix's rotation in degrees counter-clockwise.
    return round(getattr(frame, "rotation", 0) or 0) % 360


def _upright(frame: Any, rotation: int) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24")
    if rotation:
        image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
    return image


def probe(path: Path) -> VideoInfo:
    """Open the file and decode its first frame; raises `UnreadableVideo`."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        first = None
        try:
            for frame in container.decode(stream):
                first = frame
                break
        except (av.FFmpegError, ValueError) as exc:
            raise UnreadableVideo(f"the video stream cannot be decoded: {_why(exc)}") from None
        if first is None or first.time is None:
            raise UnreadableVideo("the video stream has no decodable frame")
        first_s = float(first.time)
        end_s = _end_time(container, stream, first_s)
        rotation = _rotation(first)
        w, h = int(first.width), int(first.height)
        if rotation in (90, 270):
            w, h = h, w
        return VideoInfo(
            duration_s=round(max(0.0, end_s - first_s), 6),
            width=w,
            height=h,
            rotation=rotation,
            codec=stream.codec_context.name,
            container=container.format.name,
            first_pts_s=first_s,
        )
    finally:
        container.close()


def _end_time(container: Any, stream: Any, first_s: float) -> float:
    """When the last frame stops showing. Container durations disagree (Matroska counts
    from 0, MP4 from the first timestamp, some files have none), so the packets near the
    end are read: a seek to the last keyframe, then demuxing only (no decoding)."""
    import av

    tb = stream.time_base
    if tb is None:
        raise UnreadableVideo("the video stream has no time base")
    estimate = first_s
    if stream.duration is not None:
        estimate = float((stream.start_time or 0) * tb) + float(stream.duration * tb)
    elif container.duration is not None:
        estimate = float(container.duration / av.time_base) + first_s
    end = first_s
    try:
        container.seek(int(max(estimate, first_s) / tb) + 1, stream=stream, backward=True)
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            end = max(end, float((packet.pts + (packet.duration or 0)) * tb))
    except av.FFmpegError:
        end = max(end, estimate)
    if end <= first_s:
        raise UnreadableVideo("the video has no known duration")
    return end


@dataclass(frozen=True)
class Sample:
    index: int  # the sample number k (target time k·interval)
    video_time_s: float  # the sampled frame's own video time
    image: np.ndarray  # BGR, upright


class FrameSampler:
    """Iterates samples from `start_index` on. Blocking; one thread at a time."""

    def __init__(
        self,
        path: Path,
        info: VideoInfo,
        interval_s: float,
        *,
        start_index: int = 0,
        seek_min_gap_s: float = 4.0,
    ) -> None:
        """`seek_min_gap_s`: seek when the next sample is at least this far ahead of the
        decoder (math.inf decodes every frame)."""
        self.path = path
        self.info = info
        self.interval_s = interval_s
        self.start_index = start_index
        self.seek_min_gap_s = seek_min_gap_s
        self.frames_decoded = 0
        self.seeks = 0

    def __iter__(self) -> Iterator[Sample]:
        import av

        container = _open(self.path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first = self.info.first_pts_s
            frames = self._decode(container, stream)
            prev: Any = None  # newest decoded frame at or before the target
            ahead: Any = None  # a decoded frame past the target, kept for a later one
            last_yielded: Any = None
            ended = False
            k = self.start_index
            while k == 0 or k * self.interval_s < self.info.duration_s - 1e-6:
                target = k * self.interval_s
                newest = ahead if ahead is not None else prev
                # Nothing decoded yet: the decoder stands at the start of the stream.
                position = 0.0 if newest is None and not ended else self._time(newest, first)
                if target - position >= self.seek_min_gap_s and stream.time_base is not None:
                    container.seek(int((target + first) / stream.time_base), stream=stream)
                    self.seeks += 1
                    frames = self._decode(container, stream)
                    prev = ahead = None
                    ended = False
                if ahead is not None and self._time(ahead, first) <= target + EPSILON_S:
                    prev, ahead = ahead, None
                while ahead is None and not ended:
                    try:
                        frame = next(frames)
                    except StopIteration:
                        ended = True
                        break
                    except (av.FFmpegError, ValueError) as exc:
                        raise UnreadableVideo(
                            f"decoding failed near {target:.1f} s: {_why(exc)}"
                        ) from None
                    if self._time(frame, first) <= target + EPSILON_S:
                        prev = frame
                    else:
                        ahead = frame
                chosen = prev if prev is not None else ahead
                if chosen is None or (ended and chosen is last_yielded):
                    return  # the stream ended before this target
                last_yielded = chosen
                t = max(0.0, self._time(chosen, first))
                yield Sample(k, t, _upright(chosen, self.info.rotation))
                k += 1
        finally:
            container.close()

    @staticmethod
    def _time(frame: Any, first: float) -> float:
        return -math.inf if frame is None else float(frame.time) - first

    def _decode(self, container: Any, stream: Any) -> Iterator[Any]:
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            self.frames_decoded += 1
            yield frame
