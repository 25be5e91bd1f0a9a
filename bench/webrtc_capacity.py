"""Capacity: concurrent WebRTC sessions at 640×480@15 fps while alerts stay on time.

One server (own process, adaptive sampler, Rekognition fake at 50 ms in the bench
process). Sessions are added in steps (--levels); at each level every sender streams a
person sitting still (pre-encoded H.264, so the senders cost little CPU), the server's
CPU and RSS are sampled over --window seconds, and every session runs one face → covered
trial at a random moment in that window: glass-to-alert of `no_face_detected` as seen on
its data channel, less the rule's 2 s capture-time dwell (its lateness). A level passes
when no alert is missed or early and the lateness p95 is ≤ 2 s. Frame lag and frame age
come from the sessions' live_metrics.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/webrtc_capacity.py'
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
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

from tests.rtc_client import OfferRefused

DWELL_S = 2.0  # no_face_detected: 3 frames at the brief's 1 s pace


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--levels", type=int, nargs="+", default=[5, 10, 20, 25, 30, 35])
    ap.add_argument("--window", type=float, default=20.0, help="seconds measured per level")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds before measuring")
    args = ap.parse_args()
    require_netns()
    print("encoding camera clips…", flush=True)
    clips = build_clips()
    fake = new_fake(0.05)
    await fake.start()
    server = ServerProcess(fake, max_live_sessions=500, rtc_max_peers=500)
    await server.start()
    rng = random.Random(3)
    peers: list[Peer] = []
    rows = []
    try:
        await asyncio.sleep(2)
        cpu0, t0 = server.cpu_s(), time.monotonic()
        await asyncio.sleep(5)
        idle_cpu = (server.cpu_s() - cpu0) / (time.monotonic() - t0)
        idle_rss = server.rss_mb()
        print(f"idle server: {idle_cpu * 100:.1f} % CPU, {idle_rss:.0f} MB RSS", flush=True)
        for level in args.levels:
            refused = 0
            while len(peers) < level:
                try:
                    peers.append(await Peer.connect(server.url, clips))
                except OfferRefused as exc:
                    refused += 1
                    print(f"  offer refused: {exc.status} {exc.body['error']['code']}")
                    break
            if refused:
                break
            await asyncio.sleep(args.settle)
            cpu0, own0, t0 = server.cpu_s(), self_cpu_s(), time.monotonic()

            async def trial(peer: Peer) -> float | None:
                await asyncio.sleep(rng.uniform(0.0, max(0.0, args.window - 6)))
                onset = await peer.switch_and_wait("covered", "no_face_detected", "onset", 8)
                peer.camera.show("face")
                return None if onset is None else onset - DWELL_S

            results = await asyncio.gather(*(trial(p) for p in peers))
            elapsed = time.monotonic() - t0
            cpu = (server.cpu_s() - cpu0) / elapsed
            own = (self_cpu_s() - own0) / elapsed
            rss = server.rss_mb()
            await asyncio.sleep(1.5)
            # A page that gets no live_metrics within 10 s fails the level; it must not
            # abort the run.
            replies = await asyncio.gather(*(p.metrics() for p in peers), return_exceptions=True)
            rtc = [m["rtc"] for m in replies if not isinstance(m, BaseException)]
            silent = len(replies) - len(rtc)
            onsets = [r for r in results if r is not None]
            missed = len(results) - len(onsets)
            early = sum(1 for v in onsets if v < 0)
            p50, p95 = pct(onsets, 0.5), pct(onsets, 0.95)
            fps = statistics.median(r["fps"] for r in rtc) if rtc else 0.0
            lag95 = max(((r["lag_ms_p95"] or 0.0) for r in rtc), default=0.0)
            age95 = max(((r["frame_age_ms_p95"] or 0.0) for r in rtc), default=0.0)
            ok = missed == 0 and early == 0 and p95 <= 2.0 and silent == 0
            if silent:
                print(f"  {silent} session(s) sent no live_metrics within 10 s", flush=True)
            rows.append((level, cpu, rss, p50, p95, missed, fps, lag95, age95, own, ok))
            print(
                f"  {level:3d} sessions: CPU {cpu * 100:5.1f} %  RSS {rss:6.0f} MB  "
                f"lateness p50 {fmt_s(p50)} p95 {fmt_s(p95)} missed {missed} early {early}  "
                f"fps {fps:4.1f}  lag p95 {lag95:5.0f} ms  age p95 {age95:4.0f} ms  "
                f"(bench {own * 100:.0f} %)",
                flush=True,
            )
            if not ok:
                break
    finally:
        for p in peers:
            await p.close()
        await server.stop()
        await fake.stop()

    print()
    print(
        "capacity at 640×480@15 fps H.264, adaptive sampler, fake Rekognition at 50 ms "
        "(2-core machine; server in its own process)"
    )
    print(
        f"{'sessions':>8} {'CPU %':>6} {'RSS MB':>7} {'CPU %/sess':>10} {'MB/sess':>8} "
        f"{'late50':>6} {'late95':>6} {'missed':>6} {'fps':>5} {'lag95':>6} {'age95':>6}"
    )
    for level, cpu, rss, p50, p95, missed, fps, lag95, age95, _own, _ok in rows:
        print(
            f"{level:>8} {cpu * 100:6.1f} {rss:7.0f} {(cpu - idle_cpu) * 100 / level:10.2f} "
            f"{(rss - idle_rss) / level:8.1f} {fmt_s(p50):>6} {fmt_s(p95):>6} {missed:>6} "
            f"{fps:5.1f} {lag95:6.0f} {age95:6.0f}"
        )
    passed = [r[0] for r in rows if r[-1]]
    print(
        "largest level with lateness p95 ≤ 2 s after the dwell and no missed or early alert: "
        f"{max(passed) if passed else 0} "
        "sessions (target ≥ 20)"
    )


if __name__ == "__main__":
    asyncio.run(main())
