"""Benchmark of the offline local analyser on this machine.

1. ms per frame (median / p95 over --runs) for each model and for the combined
   observation, on a 640×480 JPEG frame with one face and a line of text;
2. how many simulated live sessions the backend sustains at --rate analyses per second
   per session (labels every --labels-interval s, text every --text-interval s, as the
   session cadence asks) while the p95 frame-to-result latency stays ≤ --p95-ms and
   at most 10 % of a session's frames are skipped because its previous one was still
   being analysed (a text check can take longer than the 0.5 s between frames, and
   then the frame after it is skipped). "text busy" is the share of text checks
   refused because the single OCR worker was full. It also reports the event loop's
   lag (p99) under that load: how long the server's own requests (a health check)
   would wait for the loop.

    .venv/bin/python bench/local_backend.py [--runs 50] [--rate 2] [--step-seconds 10]

Frame-to-result is measured from the moment a frame is due to the moment its
observation is returned, as the sampler sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.analysis.cadence import CheckCadence
from server.analysis.local_backend import LocalAnalyser
from server.analysis.local_models import head_pose as hp
from server.analysis.local_models.expression import ExpressionModel
from server.analysis.local_models.faces import BlazeFaceDetector, FaceMesh
from server.analysis.local_models.objects import ObjectDetector
from server.analysis.local_models.ocr import TextReader
from server.analysis.local_models.quality import assess
from server.analysis.observation import Checks
from server.analysis.pose_baseline import PoseBaseline
from server.config import Settings
from server.media.frames import Frame
from server.observability import Instruments
from server.session.manager import SessionManager
from server.session.store import Store


def test_frame() -> bytes:
    """640×480 JPEG: the astronaut's head in an indoor-ish scene, a line of text."""
    from skimage import data

    scene = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (640, 480))
    scene = (scene * 0.6).astype(np.uint8)
    head = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:320, 110:370]
    head = cv2.resize(head, (208, 240))
    scene[60:300, 216:424] = head
    cv2.putText(scene, "Exam notes page 3", (40, 420), cv2.FONT_HERSHEY_SIMPLEX, 1.2,
                (255, 255, 255), 3, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


def stats(ms: list[float]) -> str:
    return f"median {statistics.median(ms):7.2f} ms   p95 {np.percentile(ms, 95):7.2f} ms"


def time_it(fn: Callable[[], object], runs: int) -> list[float]:
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def per_model(jpeg: bytes, runs: int) -> None:
    print(f"== per model, 640×480, {runs} runs, called one at a time "
          f"(OpenCV DNN uses its own threads) ==")
    bgr = Frame.from_encoded(jpeg, "image/jpeg").bgr(640)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    det, mesh, expr = BlazeFaceDetector(), FaceMesh(), ExpressionModel()
    face = det.detect(bgr)[0]
    lm = mesh.landmarks(bgr, face)
    assert lm is not None
    objects, reader = ObjectDetector(), TextReader()
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("decode JPEG", lambda: Frame.from_encoded(jpeg, "image/jpeg").bgr(640), runs),
        ("face detection", lambda: det.detect(bgr), runs),
        ("face mesh (1 face)", lambda: mesh.landmarks(bgr, face), runs),
        ("head pose + eyes/mouth", lambda: (hp.head_pose(lm), hp.eye_ratio(lm),
                                           hp.mouth_ratio(lm)), runs),
        ("expression (1 face)", lambda: expr.emotions(gray, face), runs),
        ("quality", lambda: assess(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), [face]), runs),
        ("objects (SSD-MobileNet)", lambda: objects.labels(bgr), max(5, runs // 3)),
        ("text (RapidOCR, 1 thread)", lambda: reader.read(bgr), max(5, runs // 5)),
    ]
    for name, fn, n in rows:
        print(f"  {name:28s} {stats(time_it(fn, n))}")


async def combined(jpeg: bytes, runs: int, workers: int | None) -> None:
    analyser = LocalAnalyser(Settings(), workers=workers)
    t = time.perf_counter()
    await analyser.start()
    print(f"== combined observation through LocalAnalyser.analyse() "
          f"(start-up incl. model loading: {time.perf_counter() - t:.1f} s) ==")
    for label, checks, n in [
        ("faces+pose+expression+quality", Checks(), runs),
        ("+ labels", Checks(labels=True), max(5, runs // 3)),
        ("+ labels + text", Checks(labels=True, text=True), max(5, runs // 5)),
    ]:
        ms = []
        for _ in range(n + 1):
            frame = Frame.from_encoded(jpeg, "image/jpeg")
            obs = await analyser.analyse(frame, checks)
            ms.append(obs.latency_ms)
        print(f"  {label:30s} {stats(ms[1:])}")
    inside = analyser.timings()["faces_total"]
    print(f"  (inside the worker, faces+pose+expression+quality: median "
          f"{inside['median']:.2f} ms, p95 {inside['p95']:.2f} ms)")
    await analyser.close()


async def sessions_run(
    analyser: LocalAnalyser, jpeg: bytes, sessions: int, rate: float, seconds: float,
    labels_interval: float, text_interval: float, manager: SessionManager | None = None,
) -> dict[str, float]:
    """`manager` given: every frame takes the product's path (session slot → worker →
    analyser → pose baseline → scoring → rules → SQLite store → events); otherwise the
    analyser is called directly (the baseline)."""
    latencies: list[float] = []
    skipped = 0
    frames = 0
    text_busy = 0
    text_asked = 0
    lags: list[float] = []
    stop = time.monotonic() + seconds
    period = 1.0 / rate

    rng = random.Random(sessions)

    async def session(i: int) -> None:
        nonlocal skipped, frames, text_busy, text_asked
        # Live sessions start at random moments: random phases for frames, labels, text
        # (a session that had just started would ask for all three at once).
        start = time.monotonic()
        cadence = CheckCadence(
            labels_interval, text_interval,
            _last_labels=start - rng.uniform(0, labels_interval),
            _last_text=start - rng.uniform(0, text_interval),
        )
        live = None
        if manager is not None:
            live = await manager.start_session({"jobTitle": f"bench {i}"}, transport="rest")
            live.cadence = cadence  # same random phases as the baseline's sessions
        due = start + rng.uniform(0, period)
        while True:
            now = time.monotonic()
            if now >= stop:
                if manager is not None and live is not None:
                    await manager.end_session(live.id, use_llm=False)
                return
            if due > now:
                await asyncio.sleep(due - now)
            frame = Frame.from_encoded(jpeg, "image/jpeg")
            if manager is not None and live is not None:
                result = await manager.submit(live, frame)
                checks = Checks(faces=True, labels="labels" in result["checks"],
                                text="text" in result["checks"])
                degraded = result["degraded"]
            else:
                checks = cadence.next(time.monotonic())
                degraded = list((await analyser.analyse(frame, checks)).degraded)
            done = time.monotonic()
            latencies.append((done - due) * 1000)
            frames += 1
            if checks.text:
                text_asked += 1
                text_busy += "text:busy" in degraded
            due += period
            while due < done:  # the sampler drops frames that fell due meanwhile
                due += period
                skipped += 1

    async def ticker() -> None:
        while time.monotonic() < stop:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append((time.monotonic() - t - 0.01) * 1000)

    await asyncio.gather(ticker(), *(session(i) for i in range(sessions)))
    return {
        "p50": float(np.percentile(latencies, 50)),
        "p95": float(np.percentile(latencies, 95)),
        "skipped": skipped / max(1, frames + skipped),
        "fps": frames / seconds,
        "text_busy": text_busy / max(1, text_asked),
        "loop_lag_p99": float(np.percentile(lags, 99)),
    }


async def capacity(args: argparse.Namespace, jpeg: bytes) -> None:
    import tempfile

    settings = Settings(_env_file=None, analyser_backend="local",  # type: ignore[call-arg]
                        labels_interval_s=args.labels_interval,
                        text_interval_s=args.text_interval)
    analyser = LocalAnalyser(settings, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.sqlite3")
        manager = SessionManager(
            settings.model_copy(update={"database_path": Path(tmp) / "bench.sqlite3",
                                        "max_live_sessions": 10_000}),
            analyser, store, Instruments(), pose_calibration_factory=PoseBaseline,
        )
        await manager.start()  # starts the analyser too
        print(f"== live sessions at {args.rate:g} analyses/s each, labels every "
              f"{args.labels_interval:g} s, text every {args.text_interval:g} s; "
              f"{analyser.workers} face workers + 1 labels + 1 OCR worker; "
              f"{args.step_seconds:g} s a step; each level through the session manager "
              f"(the product's path) and, as the baseline, the analyser alone ==")
        best = {"manager": 0, "analyser": 0}
        over = {"manager": False, "analyser": False}
        sessions = args.start_sessions
        while sessions <= args.max_sessions and not all(over.values()):
            for mode in ("manager", "analyser"):
                if over[mode]:
                    continue
                r = await sessions_run(analyser, jpeg, sessions, args.rate, args.step_seconds,
                                       args.labels_interval, args.text_interval,
                                       manager if mode == "manager" else None)
                ok = r["p95"] <= args.p95_ms and r["skipped"] <= 0.10
                print(f"  {mode:<8} {sessions:3d} sessions: {r['fps']:6.1f} frames/s  "
                      f"frame-to-result p50 {r['p50']:6.1f} ms p95 {r['p95']:6.1f} ms  "
                      f"skipped {r['skipped']:5.1%}  text busy {r['text_busy']:5.1%}  "
                      f"loop lag p99 {r['loop_lag_p99']:5.1f} ms  {'ok' if ok else 'OVER'}",
                      flush=True)
                if ok:
                    best[mode] = sessions
                else:
                    over[mode] = True
            sessions += args.step
        await manager.stop()
    print(f"sustained on {os.cpu_count()} cores at {args.rate:g} analyses/s per session "
          f"(p95 frame-to-result ≤ {args.p95_ms:g} ms): {best['manager']} sessions through the "
          f"session manager, {best['analyser']} calling the analyser alone")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rate", type=float, default=2.0, help="analyses/s per session")
    p.add_argument("--labels-interval", type=float, default=5.0)
    p.add_argument("--text-interval", type=float, default=10.0)
    p.add_argument("--p95-ms", type=float, default=500.0)
    p.add_argument("--step-seconds", type=float, default=10.0)
    p.add_argument("--start-sessions", type=int, default=5)
    p.add_argument("--step", type=int, default=5)
    p.add_argument("--max-sessions", type=int, default=80)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-capacity", action="store_true")
    args = p.parse_args()
    jpeg = test_frame()
    if not args.skip_models:
        per_model(jpeg, args.runs)
        asyncio.run(combined(jpeg, args.runs, args.workers))
    if not args.skip_capacity:
        asyncio.run(capacity(args, jpeg))


if __name__ == "__main__":
    main()
