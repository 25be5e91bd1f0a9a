"""Glass-to-alert latency over WebRTC: adaptive sampler vs a fixed 1 fps sampler, same run.

Two servers run side by side (each in its own process, each with its own Rekognition fake
answering after --latency seconds): one with the adaptive sampler, one with the fixed
1 fps sampler (the seed's client-side rate). Each gets --sessions aiortc senders streaming
640×480@15 fps H.264 of a person sitting still. A trial switches one sender from the face
to a covered camera at a random moment and times, on the sender's clock, the first frame
of the covered scene → the `no_face_detected` onset arriving on its data channel; then the
face comes back and the `ended` event is timed the same way.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/webrtc_latency.py'
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webrtc_kit import (
    Peer,
    ServerProcess,
    build_clips,
    fmt_s,
    new_fake,
    pct,
    require_netns,
    self_cpu_s,
)


async def run_policy(
    name: str, settings: dict[str, object], clips: dict[str, list[bytes]],
    sessions: int, trials: int, latency: float, seed: int,
) -> dict[str, list[float] | int]:
    fake = new_fake(latency)
    await fake.start()
    server = ServerProcess(fake, **settings)
    await server.start()
    peers: list[Peer] = []
    onsets: list[float] = []
    ends: list[float] = []
    missed = 0
    rng = random.Random(seed)
    try:
        peers = [await Peer.connect(server.url, clips) for _ in range(sessions)]

        async def trials_of(peer: Peer) -> None:
            nonlocal missed
            for _ in range(trials):
                await asyncio.sleep(rng.uniform(2.0, 4.0))  # a random phase vs the sampler
                onset = await peer.switch_and_wait("covered", "no_face_detected", "onset", 15)
                if onset is None:
                    missed += 1
                else:
                    onsets.append(onset)
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                end = await peer.switch_and_wait("face", "no_face_detected", "ended", 15)
                if end is not None:
                    ends.append(end)

        await asyncio.gather(*(trials_of(p) for p in peers))
        calls = fake.count()
    finally:
        for p in peers:
            await p.close()
        await server.stop()
        await fake.stop()
    print(f"  {name}: {len(onsets)} trials, {missed} missed, {calls} Rekognition calls",
          flush=True)
    return {"onsets": onsets, "ends": ends, "missed": missed}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4, help="senders per server")
    ap.add_argument("--trials", type=int, default=6, help="trials per sender")
    ap.add_argument("--latency", type=float, default=0.05, help="fake Rekognition latency, s")
    args = ap.parse_args()
    require_netns()
    print("encoding camera clips…", flush=True)
    clips = build_clips()
    cpu0 = self_cpu_s()
    t0 = asyncio.get_running_loop().time()
    adaptive, fixed = await asyncio.gather(
        run_policy("adaptive", {"sampler_policy": "adaptive"}, clips,
                   args.sessions, args.trials, args.latency, 1),
        run_policy("fixed 1 fps", {"sampler_policy": "fixed", "sampler_fixed_interval_s": 1.0},
                   clips, args.sessions, args.trials, args.latency, 2),
    )
    wall = asyncio.get_running_loop().time() - t0
    print()
    print(f"glass-to-alert, no_face_detected, fake Rekognition at {args.latency * 1000:.0f} ms, "
          f"{args.sessions} senders per server, 640×480@15 fps H.264")
    print(f"{'sampler':<12} {'trials':>6} {'missed':>6} {'onset p50':>9} {'onset p95':>9} "
          f"{'onset max':>9} {'end p50':>8} {'end p95':>8}")
    for name, r in (("adaptive", adaptive), ("fixed 1 fps", fixed)):
        on, en = r["onsets"], r["ends"]
        assert isinstance(on, list) and isinstance(en, list)
        print(f"{name:<12} {len(on):>6} {r['missed']:>6} {fmt_s(pct(on, 0.5)):>9} "
              f"{fmt_s(pct(on, 0.95)):>9} {fmt_s(max(on) if on else float('nan')):>9} "
              f"{fmt_s(pct(en, 0.5)):>8} {fmt_s(pct(en, 0.95)):>8}")
    print(f"(targets: p50 ≤ 1.0 s, p95 ≤ 2.0 s; bench process CPU "
          f"{(self_cpu_s() - cpu0) / wall * 100:.0f} % of a core over {wall:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
