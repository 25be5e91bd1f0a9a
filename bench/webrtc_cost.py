"""Rekognition calls per session-minute over WebRTC, steady and busy scenes, beside the
seed's design (3 calls per frame at the client's 1 fps ≈ 180 per minute).

Three servers run side by side, each in its own process with its own Rekognition fake
(answering after 50 ms): the adaptive sampler; a fixed 1 fps sampler with the default
labels/text cadence; and the seed's design (fixed 1 fps, labels and text on every frame).
Each gets --sessions aiortc senders streaming 640×480@15 fps H.264.

1. Steady scene (--steady seconds): a person sitting still (a few pixels of sway, a degree
   of tilt, camera noise).
2. Busy scene: a script, in lockstep on every sender, of a covered camera, a phone held
   up, a second person, looking away and a sheet of notes, each followed by the face
   again. Every event must raise its alert; glass-to-alert per event is reported, and an
   alert more than 0.5 s after its rule's capture-time dwell (2 s for no face, 4 s for
   looking away, none for the others) counts as late, one before it as early.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/webrtc_cost.py'
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webrtc_kit import (
    EXPECTED_ALERT,
    Peer,
    ServerProcess,
    build_clips,
    fmt_s,
    new_fake,
    pct,
    require_netns,
    show_scene,
)

from tests.fakes.rekognition import FakeRekognition

POLICIES: dict[str, dict[str, Any]] = {
    "adaptive": {"sampler_policy": "adaptive"},
    "fixed 1 fps": {"sampler_policy": "fixed", "sampler_fixed_interval_s": 1.0},
    "seed (1 fps × 3)": {"sampler_policy": "fixed", "sampler_fixed_interval_s": 1.0,
                         "sampler_labels_interval_s": 0.0, "sampler_text_interval_s": 0.0},
}
LATE_S = 0.5  # an alert later than this after its rule's dwell has passed is late
#: Capture-time dwell of each scripted alert's rule at the defaults: (N − 1) × 1 s.
DWELL_S = {"no_face_detected": 2.0, "looking_away": 4.0}
BUSY_SCRIPT = [("covered", 5.0), ("phone", 5.0), ("two_faces", 5.0), ("away", 7.0),
               ("notes", 5.0)]


class Rig:
    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        self.name = name
        self.fake: FakeRekognition = new_fake(0.05)
        self.settings = settings
        self.server: ServerProcess | None = None
        self.peers: list[Peer] = []

    async def start(self, clips: dict[str, list[bytes]], sessions: int) -> None:
        await self.fake.start()
        self.server = ServerProcess(self.fake, **self.settings)
        await self.server.start()
        self.peers = [await Peer.connect(self.server.url, clips) for _ in range(sessions)]

    async def stop(self) -> None:
        for p in self.peers:
            await p.close()
        if self.server is not None:
            await self.server.stop()
        await self.fake.stop()

    def calls(self) -> Counter[str]:
        return Counter(c.operation for c in self.fake.calls)


def per_minute(before: Counter[str], after: Counter[str], sessions: int,
               seconds: float) -> dict[str, float]:
    minutes = sessions * seconds / 60
    ops = ("DetectFaces", "DetectLabels", "DetectText")
    out = {op: (after[op] - before[op]) / minutes for op in ops}
    out["total"] = sum(out.values())
    return out


async def busy(rig: Rig, face_s: float) -> tuple[dict[str, list[float]], list[str]]:
    latencies: dict[str, list[float]] = {}
    problems: list[str] = []
    for scene, hold in BUSY_SCRIPT:
        await asyncio.sleep(face_s)
        alert = EXPECTED_ALERT[scene]
        marks = [p.show(scene) for p in rig.peers]
        # The fake answers for the new scene once its first frame is on the wire.
        await asyncio.gather(*(p.switched(scene) for p in rig.peers))
        show_scene(rig.fake, scene)
        results = await asyncio.gather(*(
            p.await_alert(m, scene, alert, "onset", hold)
            for p, m in zip(rig.peers, marks, strict=True)
        ))
        dwell = DWELL_S.get(alert, 0.0)
        for r in results:
            if r is None:
                problems.append(f"{scene}: {alert} missed")
            else:
                latencies.setdefault(alert, []).append(r)
                if r - dwell > LATE_S:
                    problems.append(f"{scene}: {alert} late ({r - dwell:.2f} s after dwell)")
                elif r < dwell:
                    problems.append(f"{scene}: {alert} early ({r:.2f} s < dwell {dwell} s)")
        await asyncio.sleep(max(0.0, hold - max((r or hold) for r in results)))
        show_scene(rig.fake, "face")
        for p in rig.peers:
            p.camera.show("face")
    await asyncio.sleep(face_s)
    return latencies, problems


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=3, help="senders per server")
    ap.add_argument("--steady", type=float, default=120.0, help="steady phase, seconds")
    ap.add_argument("--face", type=float, default=10.0,
                    help="seconds of face between busy-scene events")
    args = ap.parse_args()
    require_netns()
    print("encoding camera clips…", flush=True)
    clips = build_clips()
    rigs = [Rig(name, settings) for name, settings in POLICIES.items()]
    try:
        await asyncio.gather(*(r.start(clips, args.sessions) for r in rigs))
        await asyncio.sleep(2.0)  # past the first frame's all-checks analysis
        print(f"steady scene, {args.steady:.0f} s…", flush=True)
        before = [r.calls() for r in rigs]
        t0 = time.monotonic()
        await asyncio.sleep(args.steady)
        steady_s = time.monotonic() - t0
        steady = [per_minute(b, r.calls(), args.sessions, steady_s)
                  for b, r in zip(before, rigs, strict=True)]

        print("busy scene…", flush=True)
        before = [r.calls() for r in rigs]
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(busy(r, args.face) for r in rigs))
        busy_s = time.monotonic() - t0
        busy_cost = [per_minute(b, r.calls(), args.sessions, busy_s)
                     for b, r in zip(before, rigs, strict=True)]
    finally:
        await asyncio.gather(*(r.stop() for r in rigs), return_exceptions=True)

    print()
    print(f"Rekognition calls per session-minute ({args.sessions} senders per sampler, "
          f"steady {steady_s:.0f} s, busy {busy_s:.0f} s; the seed's design by definition: 180; "
          "target: adaptive steady ≤ 10)")
    print(f"{'sampler':<18} {'steady':>7} {'faces':>6} {'labels':>6} {'text':>5}   "
          f"{'busy':>6} {'faces':>6} {'labels':>6} {'text':>5}")
    for r, st, bu in zip(rigs, steady, busy_cost, strict=True):
        print(f"{r.name:<18} {st['total']:7.1f} {st['DetectFaces']:6.1f} "
              f"{st['DetectLabels']:6.1f} {st['DetectText']:5.1f}   {bu['total']:6.1f} "
              f"{bu['DetectFaces']:6.1f} {bu['DetectLabels']:6.1f} {bu['DetectText']:5.1f}")
    print()
    print(f"busy-scene alerts: glass-to-alert p50 / max per alert type "
          f"(late = > {LATE_S} s after the rule's dwell)")
    for r, (latencies, problems) in zip(rigs, outcomes, strict=True):
        cells = "  ".join(
            f"{alert} {fmt_s(pct(v, 0.5)).strip()}/{fmt_s(max(v)).strip()}"
            for alert, v in latencies.items()
        )
        print(f"{r.name:<18} {cells}")
        print(f"{'':<18} {len(problems)} missed, late or early"
              + (f": {problems}" if problems else ""))


if __name__ == "__main__":
    asyncio.run(main())
