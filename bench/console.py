"""The proctor's console under load, in real headless Chromium against the real server
(its own process; fake Rekognition in this process, answering each image for its scene).

(a) Alert latency: an aiortc sender streams 640×480@15 fps H.264 of a face; each trial
    switches it to a second face (`multiple_faces_detected`, an instant rule). The time
    from the alert's onset arriving on the sender's data channel (its wall clock) to the
    same episode appearing in the console's alert feed (the page's own feed code stamps
    performance.timeOrigin + performance.now() when it inserts the item) — both clocks
    on this machine. Target: p50 ≤ 100 ms.

(b) 50 live Socket.IO push sessions (one machine holds fewer WebRTC ones), each sending
    320×240 JPEG frames at --fps (one outstanding), alternating one face and two every
    --toggle frames so alerts start and end all the time. The console watches everything
    and shows one session's live view; measured over --seconds: events per second the
    page received (from its own Socket.IO handlers), and its frame time
    (requestAnimationFrame intervals p50 / p95 / max, and long tasks ≥ 50 ms).

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/console.py'
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import socketio
from webrtc_kit import Peer, ServerProcess, build_clips, new_fake, pct, require_netns

from tests.browser_kit import CHROMIUM_FLAGS, require_chromium
from tests.media import data_url
from tests.rtc_client import alert_events

# Frame time of the page: rAF intervals and long tasks, collected in the page.
FRAME_PROBE = """() => {
  window.__frames = []; window.__long = [];
  let last = performance.now();
  const loop = (t) => { window.__frames.push(t - last); last = t; requestAnimationFrame(loop); };
  requestAnimationFrame(loop);
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__long.push(e.duration);
    }).observe({ entryTypes: ["longtask"] });
  } catch (e) {}
}"""


async def open_console(url: str, profile: Path) -> tuple[Any, Any, Any]:
    from playwright.async_api import async_playwright

    pw = await async_playwright().start()
    context = await pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=require_chromium(),
        headless=True,
        args=list(CHROMIUM_FLAGS),
        viewport={"width": 1400, "height": 900},
    )
    page = context.pages[0] if context.pages else await context.new_page()
    await page.goto(f"{url}/console")
    await page.wait_for_selector("body[data-state=ready]", state="attached", timeout=20_000)
    await page.wait_for_selector("#socket-state.ok", timeout=20_000)
    await page.wait_for_function("() => window.proctorConsole.marks.watching_all > 0")
    return pw, context, page


async def shown_at(page: Any, episode_id: str, within: float = 10.0) -> float | None:
    """Wall time (s) at which the console's feed showed `episode_id`, or None."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        at = await page.evaluate(
            "(id) => { const e = window.proctorConsole.stats.alertShown.find(x => x[0] === id);"
            " return e ? e[1] : null; }",
            episode_id,
        )
        if at is not None:
            return float(at) / 1000
        await asyncio.sleep(0.02)
    return None


async def bench_latency(trials: int, latency: float) -> list[float]:
    fake = new_fake(latency, per_image=True)
    await fake.start()
    server = ServerProcess(fake)
    await server.start()
    clips = build_clips()
    pw = context = None
    out: list[float] = []
    try:
        pw, context, page = await open_console(server.url, Path(tempfile.mkdtemp()))
        peer = await Peer.connect(server.url, clips)
        try:
            for _ in range(trials):
                await asyncio.sleep(1.5)
                mark = peer.show("two_faces")
                msg = await peer.client.wait_for(
                    "alerts",
                    lambda m: bool(alert_events(m, "multiple_faces_detected", "onset")),
                    within=15,
                    start=mark,
                )
                arrived = peer.client.arrivals[peer.client.index_of(msg)]
                [onset] = alert_events(msg, "multiple_faces_detected", "onset")
                at = await shown_at(page, onset["episode_id"])
                if at is not None:
                    out.append(at - arrived)
                mark = peer.show("face")
                await peer.client.wait_for(
                    "alerts",
                    lambda m: bool(alert_events(m, "multiple_faces_detected", "ended")),
                    within=15,
                    start=mark,
                )
        finally:
            await peer.close()
    finally:
        if context is not None:
            await context.close()
        if pw is not None:
            await pw.stop()
        await server.stop()
        await fake.stop()
    return out


async def push_session(
    url: str,
    frames: dict[str, str],
    fps: float,
    toggle: int,
    stop: asyncio.Event,
    ids: list[str],
    all_started: asyncio.Event,
    sessions: int,
) -> int:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, transports=["websocket"])
    sent = 0
    try:
        ack = await sio.call(
            "start_session", {"job_data": {"jobTitle": "load", "candidateName": f"c{len(ids)}"}}
        )
        sid = ack["session_id"]
        ids.append(sid)
        if len(ids) == sessions:
            all_started.set()
        period = 1.0 / fps
        next_at = time.monotonic()
        while not stop.is_set():
            scene = "two_faces" if (sent // toggle) % 2 else "face"
            await sio.call("analyze_frame", {"session_id": sid, "frame": frames[scene]}, timeout=30)
            sent += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await sio.call("end_session", {"session_id": sid}, timeout=60)
    finally:
        await sio.disconnect()
    return sent


async def bench_load(sessions: int, fps: float, toggle: int, seconds: float) -> dict[str, Any]:
    from webrtc_kit import scene_images

    fake = new_fake(0.02, per_image=True)
    await fake.start()
    # The fake is free: no analyser budget (25 billed calls/s would pace 50 sessions).
    server = ServerProcess(fake, max_live_sessions=sessions + 10, analyser_calls_per_s=0)
    await server.start()
    images = scene_images()
    frames = {
        name: data_url(cv2.resize(images[name], (320, 240))) for name in ("face", "two_faces")
    }
    pw = context = None
    stop, all_started = asyncio.Event(), asyncio.Event()
    ids: list[str] = []
    try:
        pw, context, page = await open_console(server.url, Path(tempfile.mkdtemp()))
        tasks = [
            asyncio.create_task(
                push_session(server.url, frames, fps, toggle, stop, ids, all_started, sessions)
            )
            for _ in range(sessions)
        ]
        await asyncio.wait_for(all_started.wait(), 60)
        await asyncio.sleep(3)  # every session pushing
        await page.evaluate(f"() => {{ location.hash = '#/session/{ids[0]}'; }}")
        await page.wait_for_selector("[data-testid=chart-live] canvas")
        await asyncio.sleep(2)
        before = await page.evaluate("() => ({...window.proctorConsole.stats.events})")
        cpu0, t0 = server.cpu_s(), time.monotonic()
        await page.evaluate(FRAME_PROBE)
        await asyncio.sleep(seconds)
        wall = time.monotonic() - t0
        cpu = server.cpu_s() - cpu0
        after = await page.evaluate("() => ({...window.proctorConsole.stats.events})")
        frames_ms = await page.evaluate("() => window.__frames.slice(1)")
        longs = await page.evaluate("() => window.__long")
        rows = await page.locator("[data-testid=live-session]").count()
        stop.set()
        sent = await asyncio.gather(*tasks)
    finally:
        stop.set()
        if context is not None:
            await context.close()
        if pw is not None:
            await pw.stop()
        await server.stop()
        await fake.stop()
    events = {k: (after.get(k, 0) - before.get(k, 0)) / wall for k in after}
    return {
        "events": events,
        "total": sum(events.values()),
        "frames": frames_ms,
        "long": longs,
        "rows": rows,
        "sent": sum(sent),
        "server_cpu": cpu / wall * 100,
        "wall": wall,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=30, help="(a) alert trials")
    ap.add_argument("--latency", type=float, default=0.05, help="(a) fake Rekognition latency, s")
    ap.add_argument("--sessions", type=int, default=50, help="(b) Socket.IO push sessions")
    ap.add_argument("--fps", type=float, default=1.5, help="(b) frames per second per session")
    ap.add_argument("--toggle", type=int, default=3, help="(b) frames per scene (face / two)")
    ap.add_argument("--seconds", type=float, default=30.0, help="(b) measuring window")
    ap.add_argument("--skip", choices=["a", "b"], help="skip one part")
    args = ap.parse_args()
    require_netns()
    require_chromium()
    if args.skip != "a":
        lat = await bench_latency(args.trials, args.latency)
        ms = [v * 1000 for v in lat]
        print(
            f"(a) data channel → console feed, {len(ms)} of {args.trials} alerts: "
            f"p50 {pct(ms, 0.5):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, "
            f"min {min(ms) if ms else float('nan'):.1f} ms, max {max(ms) if ms else float('nan'):.1f} ms "
            "(target p50 ≤ 100 ms)",
            flush=True,
        )
    if args.skip != "b":
        r = await bench_load(args.sessions, args.fps, args.toggle, args.seconds)
        ev = r["events"]
        print(
            f"(b) {args.sessions} Socket.IO push sessions at {args.fps:g} frames/s "
            f"({r['sent']} frames pushed; {r['rows']} rows in the live table); "
            f"over {r['wall']:.0f} s the console received {r['total']:.1f} events/s: "
            + ", ".join(f"{k} {v:.1f}/s" for k, v in sorted(ev.items()) if v)
        )
        f = r["frames"]
        print(
            f"    page frame time: rAF interval p50 {pct(f, 0.5):.1f} ms, p95 {pct(f, 0.95):.1f} ms, "
            f"max {max(f) if f else float('nan'):.1f} ms over {len(f)} frames; "
            f"{len(r['long'])} long tasks (≥ 50 ms), longest "
            f"{max(r['long']) if r['long'] else 0:.0f} ms; server CPU {r['server_cpu']:.0f} % of a core"
        )


if __name__ == "__main__":
    asyncio.run(main())
