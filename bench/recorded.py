"""Benchmark of recorded-video analysis through the product's own job path.

1. A generated 10-minute 1280×720 H.264 video (25 fps, a keyframe every 10 s as phone
   and screen recorders write them) analysed at one frame every --interval seconds by
   `VideoJobs` → `SessionManager` → a zero-latency in-process fake analyser, with the
   analyser budget turned off (ANALYSER_CALLS_PER_S=0): video-seconds analysed per
   wall-second, beside the same job decoding every frame (no keyframe seeks) in the same
   run, and their ratio.
2. The rate the default budget (25 billed API calls/s server-wide, live sessions served
   first) leaves a recorded video while --live live sessions each push one frame a second.
3. Peak memory above baseline while fetching a 1 GB file (generated locally, served on
   loopback by a separate process, deleted afterwards) with the product's fetcher.

    .venv/bin/python bench/recorded.py [--minutes 10] [--interval 2] [--live 10] [--fetch-mb 1024]
        [--video /tmp/bench-10min.mp4]   # keep the generated video for the next run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.analysis.observation import Box, Checks, Face, Observation, Pose
from server.config import Settings
from server.media.frames import Frame
from server.observability import Instruments
from server.session.manager import SessionManager
from server.session.store import Store
from server.video.fetch import FetchLimits, UrlGuard, fetch_to_file
from server.video.jobs import FINISHED, Job, VideoJobs


class ZeroLatencyAnalyser:
    """Answers at once with one frontal calm face: only the pipeline's own cost remains."""

    name = "fake"
    billed = True  # stands in for Rekognition: the budget of step 2 applies to it

    async def start(self) -> None:
        return None

    async def analyse(self, frame: Frame, checks: Checks) -> Observation:
        face = Face(Box(0.35, 0.25, 0.3, 0.45), 99.0, Pose(0.0, 0.0, 0.0), {"CALM": 90.0})
        return Observation(
            backend=self.name,
            checks=checks,
            faces=(face,),
            labels=() if checks.labels else None,
            text=() if checks.text else None,
            width=frame.width,
            height=frame.height,
        )

    async def close(self) -> None:
        return None


def make_long_video(path: Path, minutes: float, fps: int = 25) -> Path:
    from skimage import data

    base = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2RGBA)[:, :, :3], (1280, 720))
    frames = int(minutes * 60 * fps)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.codec_context.gop_size = fps * 10
        stream.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(frames):
            # A slow pan so every frame differs like a camera's.
            img = np.roll(base, (i // 5) % 1280, axis=1)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def settings_for(tmp: Path, name: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_path": tmp / f"{name}.sqlite3",
        "video_work_dir": tmp / f"{name}-work",
        "analyser_calls_per_s": 0.0,
        "video_progress_save_s": 1.0,
        "openai_api_key": "",
        "anthropic_api_key": "",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def run_job(
    settings: Settings, video: Path, interval: float, live: int = 0, wall_limit_s: float = 0
) -> dict[str, Any]:
    manager = SessionManager(settings, ZeroLatencyAnalyser(), Store(settings.database_path), Instruments())
    done = asyncio.Event()

    def on_progress(job: Job) -> None:
        if job.state in FINISHED:
            done.set()

    jobs = VideoJobs(manager, settings, on_progress=on_progress)
    await manager.start()
    await jobs.start()
    live_frames = 0
    stop_live = asyncio.Event()

    async def live_session() -> None:
        nonlocal live_frames
        session = await manager.start_session({"jobTitle": "live"}, transport="rest")
        image = np.full((480, 640, 3), 90, np.uint8)
        next_at = time.monotonic()
        while not stop_live.is_set():
            await manager.submit(session, Frame.from_bgr(image))
            live_frames += 1
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    live_tasks = [asyncio.create_task(live_session()) for _ in range(live)]
    if live:
        await asyncio.sleep(1.0)  # the live sessions are running before the video starts
    try:
        t0 = time.perf_counter()
        record = await jobs.submit_local(video, interval, {"jobTitle": "bench"})
        if wall_limit_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), wall_limit_s)
        else:
            await done.wait()
        wall = time.perf_counter() - t0
        job = jobs._jobs[record["id"]]
        video_s = job.progress.video_seconds_done
        frames = job.progress.frames_done
        if job.state not in FINISHED:
            await jobs.cancel_or_erase(job.id)
    finally:
        stop_live.set()
        for t in live_tasks:
            t.cancel()
        await asyncio.gather(*live_tasks, return_exceptions=True)
        await jobs.stop()
        await manager.stop()
    return {
        "wall_s": wall,
        "video_s": video_s,
        "frames": frames,
        "rate": video_s / wall,
        "live_fps": live_frames / max(wall + (1.0 if live else 0.0), 1e-9),
    }


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fetch_memory(tmp: Path, size_mb: int) -> dict[str, float]:
    served = tmp / "served"
    served.mkdir()
    big = served / "big.mp4"
    chunk = os.urandom(1 << 20)
    with big.open("wb") as fh:
        for _ in range(size_mb):
            fh.write(chunk)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dest = tmp / "fetched.video"
    try:
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        baseline = rss_mb()
        peak = baseline
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_mb())
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        await fetch_to_file(
            f"http://127.0.0.1:{port}/big.mp4",
            dest,
            UrlGuard(["127.0.0.1"]),
            FetchLimits(max_bytes=(size_mb + 1) << 20, timeout_s=600),
        )
        wall = time.perf_counter() - t0
        stop.set()
        await sampler
        assert dest.stat().st_size == size_mb << 20
    finally:
        server.terminate()
        server.wait()
        big.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
    return {"baseline_mb": baseline, "peak_mb": peak, "wall_s": wall}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--live", type=int, default=10, help="live sessions at 1 frame/s for step 2")
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--fetch-mb", type=int, default=1024)
    parser.add_argument("--long-interval", type=float, default=10.0, help="a second, sparser run")
    parser.add_argument("--video", type=Path, help="the generated video: made there if missing, kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-recorded-") as name:
        tmp = Path(name)
        # The fetch first: its baseline is then the process before any decoding.
        mem = await fetch_memory(tmp, args.fetch_mb)
        print(
            f"fetch {args.fetch_mb} MB over loopback: {mem['wall_s']:.1f} s, RSS baseline "
            f"{mem['baseline_mb']:.0f} MB, peak {mem['peak_mb']:.0f} MB "
            f"(+{mem['peak_mb'] - mem['baseline_mb']:.1f} MB)"
        )
        video = args.video or tmp / "long.mp4"
        if not video.exists():
            t0 = time.perf_counter()
            make_long_video(video, args.minutes)
            print(f"generated {args.minutes:g} min 1280×720 H.264 in {time.perf_counter() - t0:.0f} s "
                  f"({video.stat().st_size / 1e6:.0f} MB)")
        seek = await run_job(settings_for(tmp, "seek"), video, args.interval)
        full = await run_job(settings_for(tmp, "full", video_seek_min_gap_s=math.inf), video, args.interval)
        print(f"interval {args.interval:g} s, zero-latency analyser, budget off:")
        print(f"  keyframe seeks : {seek['rate']:7.1f} video-s per wall-s ({seek['frames']} frames in {seek['wall_s']:.1f} s)")
        print(f"  decode every frame: {full['rate']:7.1f} video-s per wall-s ({full['frames']} frames in {full['wall_s']:.1f} s)")
        print(f"  ratio          : {seek['rate'] / full['rate']:.2f}×")
        seek = await run_job(settings_for(tmp, "seek2"), video, args.long_interval)
        full = await run_job(settings_for(tmp, "full2", video_seek_min_gap_s=math.inf), video, args.long_interval)
        print(f"interval {args.long_interval:g} s: keyframe seeks {seek['rate']:.1f}, decode every frame "
              f"{full['rate']:.1f} video-s per wall-s ({seek['rate'] / full['rate']:.2f}×)")
        budget = Settings(_env_file=None).analyser_calls_per_s  # type: ignore[call-arg]
        shared = await run_job(
            settings_for(tmp, "shared", analyser_calls_per_s=budget),
            video,
            args.interval,
            live=args.live,
            wall_limit_s=args.live_seconds,
        )
        print(
            f"default budget ({budget:g} API calls/s) with {args.live} live sessions at 1 frame/s: "
            f"{shared['rate']:.1f} video-s per wall-s ({shared['frames']} frames in {shared['wall_s']:.1f} s); "
            f"live sessions got {shared['live_fps']:.1f} frames/s in total"
        )


if __name__ == "__main__":
    asyncio.run(main())
