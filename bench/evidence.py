"""Evidence must not slow the live path: glass-to-alert and analysis rate with alert
evidence on (EVIDENCE=snapshot) and off (EVIDENCE=none), side by side in the same run,
and the evidence bytes per alert.

Two servers run at once (each in its own process, each with its own Rekognition fake
answering after --latency seconds and telling the scenes apart by the image), both with
the adaptive sampler; each gets --sessions aiortc senders streaming 640×480@15 fps H.264
of a person sitting still. Each trial switches a sender to a scene at a random moment and
times the first frame of the new scene → the alert's onset on its data channel, then
switches back and waits for the `ended` event. Scenes: a second face
(`multiple_faces_detected`, instant; two faces boxed), a phone (`suspicious_object`,
instant; the phone boxed) and a covered camera (`no_face_detected`, 2 s of capture time:
its lateness after that dwell is what counts). Every onset renders a snapshot on the
evidence server, so it renders about one per sender every few seconds, in bursts when
senders' trials coincide.

Analysis rate: frames analysed per second per session over the run (the sessions' own
counters). Evidence: every snapshot's size, fetched through the operator API at the end,
and the render time from the server's /metrics.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/evidence.py'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from webrtc_kit import (
    Peer,
    ServerProcess,
    build_clips,
    fmt_s,
    new_fake,
    pct,
    require_netns,
)

#: (scene, alert, dwell before an onset may come)
TRIALS = (
    ("two_faces", "multiple_faces_detected", 0.0),
    ("phone", "suspicious_object", 0.0),
    ("covered", "no_face_detected", 2.0),
)


async def evidence_sizes(url: str, session_ids: list[str]) -> tuple[list[int], int]:
    """Sizes of every stored snapshot of these sessions, and how many alerts had none."""
    sizes: list[int] = []
    without = 0
    async with aiohttp.ClientSession() as http:
        for sid in session_ids:
            async with http.get(f"{url}/api/sessions/{sid}/alerts") as r:
                alerts = (await r.json())["alerts"]
            for alert in alerts:
                if alert["evidence_url"] is None:
                    without += 1
                    continue
                async with http.get(url + alert["evidence_url"]) as r:
                    assert r.status == 200 and r.content_type == "image/jpeg"
                    sizes.append(len(await r.read()))
    return sizes, without


async def render_seconds(url: str) -> tuple[float, int]:
    """Mean render time and count from the server's own histogram."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("proctor_evidence_render_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("proctor_evidence_render_seconds_count"):
            count = float(line.split()[-1])
    return (total / count if count else float("nan")), int(count)


async def run_server(
    name: str,
    evidence: str,
    clips: dict[str, list[bytes]],
    sessions: int,
    trials: int,
    latency: float,
    seed: int,
) -> dict[str, Any]:
    fake = new_fake(latency, per_image=True)
    await fake.start()
    server = ServerProcess(fake, sampler_policy="adaptive", evidence=evidence)
    await server.start()
    peers: list[Peer] = []
    out: dict[str, Any] = {alert: {"onsets": [], "missed": 0} for _, alert, _ in TRIALS}
    rng = random.Random(seed)
    try:
        peers = [await Peer.connect(server.url, clips) for _ in range(sessions)]

        async def trials_of(peer: Peer) -> None:
            for _ in range(trials):
                for scene, alert, _dwell in TRIALS:
                    await asyncio.sleep(rng.uniform(2.0, 4.0))  # a random phase vs the sampler
                    onset = await peer.switch_and_wait(scene, alert, "onset", 15)
                    if onset is None:
                        out[alert]["missed"] += 1
                    else:
                        out[alert]["onsets"].append(onset)
                    await asyncio.sleep(rng.uniform(0.5, 1.5))
                    await peer.switch_and_wait("face", alert, "ended", 15)

        await asyncio.gather(*(trials_of(p) for p in peers))
        rates = []
        for p in peers:
            m = await p.metrics()
            rates.append(m["frames_analysed"] / max(1e-9, m["duration_s"]))
        out["rate"] = rates
        out["sizes"], out["without"] = await evidence_sizes(
            server.url, [p.client.session_id for p in peers]
        )
        out["render_s"], out["renders"] = await render_seconds(server.url)
        out["cpu_s"] = server.cpu_s()
    finally:
        for p in peers:
            await p.close()
        await server.stop()
        await fake.stop()
    print(f"  {name}: done", flush=True)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sessions", type=int, default=4, help="senders per server")
    ap.add_argument("--trials", type=int, default=5, help="trials of each scene per sender")
    ap.add_argument("--latency", type=float, default=0.05, help="fake Rekognition latency, s")
    args = ap.parse_args()
    require_netns()
    print("encoding camera clips…", flush=True)
    clips = build_clips()
    load0 = os.getloadavg()
    t0 = asyncio.get_running_loop().time()
    on, off = await asyncio.gather(
        run_server("evidence on", "snapshot", clips, args.sessions, args.trials, args.latency, 1),
        run_server("evidence off", "none", clips, args.sessions, args.trials, args.latency, 1),
    )
    wall = asyncio.get_running_loop().time() - t0
    load1 = os.getloadavg()
    print()
    print(
        f"evidence on vs off, same run: fake Rekognition at {args.latency * 1000:.0f} ms, "
        f"{args.sessions} senders per server, 640×480@15 fps H.264, {args.trials} trials of "
        f"each scene per sender, {wall:.0f} s"
    )
    print(
        f"load average (1 min) {load0[0]:.2f} at the start, {load1[0]:.2f} at the end "
        f"({os.cpu_count()} cores, shared)"
    )
    print(
        f"{'evidence':<13} {'alert':<24} {'trials':>6} {'missed':>6} {'p50':>6} {'p95':>6} "
        f"{'max':>6} {'late p95':>8}"
    )
    for name, r in (("on", on), ("off", off)):
        for _scene, alert, dwell in TRIALS:
            values = r[alert]["onsets"]
            late = [v - dwell for v in values]
            print(
                f"{name:<13} {alert:<24} {len(values):>6} {r[alert]['missed']:>6} "
                f"{fmt_s(pct(values, 0.5)):>6} {fmt_s(pct(values, 0.95)):>6} "
                f"{fmt_s(max(values) if values else float('nan')):>6} "
                f"{fmt_s(pct(late, 0.95)):>8}"
            )
    print()
    for name, r in (("on", on), ("off", off)):
        rate = r["rate"]
        print(
            f"analysis rate, evidence {name:<3}: {statistics.mean(rate):.2f} frames/s per "
            f"session (min {min(rate):.2f}, max {max(rate):.2f}); server CPU "
            f"{r['cpu_s'] / wall * 100:.0f} % of a core"
        )
    # Lateness: after the dwell for no_face, the whole latency for the instant rules.
    late_on = [v - d for _s, a, d in TRIALS for v in on[a]["onsets"]]
    late_off = [v - d for _s, a, d in TRIALS for v in off[a]["onsets"]]
    p95_on, p95_off = pct(late_on, 0.95), pct(late_off, 0.95)
    print(
        f"glass-to-alert lateness over every trial: p50 {pct(late_on, 0.5):.2f} s on vs "
        f"{pct(late_off, 0.5):.2f} s off; p95 {p95_on:.2f} s on vs {p95_off:.2f} s off "
        f"({(p95_on / p95_off - 1) * 100:+.0f} %; target within 10 %)"
    )
    sizes = on["sizes"]
    if sizes:
        print(
            f"evidence: {len(sizes)} snapshots ({on['without']} alerts without one), "
            f"{statistics.mean(sizes) / 1000:.1f} kB mean, {max(sizes) / 1000:.1f} kB max "
            f"per alert; render {on['render_s'] * 1000:.1f} ms mean over {on['renders']} "
            "(evidence thread)"
        )
    print(f"evidence off stored {len(off['sizes'])} snapshots (expected 0)")


if __name__ == "__main__":
    asyncio.run(main())
