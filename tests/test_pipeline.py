"""The live pipeline's shape: one direction, one owner, nothing blocking on analysis.

- media/ imports nothing of sessions, transports, HTTP or analysis;
- the WebRTC sample loop only offers frames (never waits on analysis) and survives a bug;
- the session worker owns the budget (API calls, live before background) and never lets
  a timed-out analysis overlap the next one;
- reconnect grace is the session layer's, per transport;
- idle sampling follows the backend's cost.
"""

from __future__ import annotations

import ast
import asyncio
import fractions
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from server.analysis.budget import CallBudget
from server.media.frames import Frame
from server.media.sample_loop import SampleLoop
from server.media.sampler import AdaptiveSampler, Reason, SamplerConfig, SamplingState
from server.media.track_drain import TrackDrain
from server.session.pacing import IdlePacing
from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition
from tests.media import astronaut_bgr, data_url

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_MEDIA = ("server.session", "server.signaling", "server.analysis", "aiohttp",
                      "socketio", "server.errors")


def test_media_knows_nothing_of_sessions_http_or_analysis() -> None:
    offenders = []
    for path in sorted((ROOT / "server" / "media").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith(FORBIDDEN_IN_MEDIA):
                    offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders
    assert (ROOT / "server" / "media" / "sample_loop.py").exists()


# --- the sample loop only offers ----------------------------------------------------------


class _Track:
    """A track that yields decoded frames as fast as the loop takes them (no network)."""

    kind = "video"

    def __init__(self, frames: int) -> None:
        self.left = frames
        self.image = av.VideoFrame.from_ndarray(astronaut_bgr(160, 120), format="bgr24")

    async def recv(self) -> av.VideoFrame:
        from aiortc.mediastreams import MediaStreamError

        if self.left <= 0:
            raise MediaStreamError
        self.left -= 1
        await asyncio.sleep(0.005)
        frame = self.image.reformat(format="yuv420p")
        frame.pts = 1000 - self.left
        frame.time_base = fractions.Fraction(1, 90)
        return frame


class _Sink:
    """A session whose analysis never finishes once it has taken a frame."""

    def __init__(self, take_after: int = 0, fail_first: bool = False) -> None:
        self.offers: list[Frame] = []
        self.waiting = False
        self.in_flight = False
        self.take_after = take_after
        self.fail_first = fail_first

    def offer(self, frame: Frame, scene_changed: bool) -> bool:
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("injected sampler-side bug")
        self.offers.append(frame)
        if len(self.offers) > self.take_after:
            self.waiting, self.in_flight = False, True  # taken, and stuck in analysis
        else:
            self.waiting = True  # the worker waits for the budget
        return True


def _loop(drain: TrackDrain, sink: _Sink, errors: list[str] | None = None) -> SampleLoop:
    return SampleLoop(
        drain,
        AdaptiveSampler(SamplerConfig(min_interval_s=0.0)),
        sink,
        lambda captured_at: SamplingState(idle_interval_s=0.0),
        on_error=(lambda where, exc: errors.append(where)) if errors is not None else None,
    )


async def test_sample_loop_never_waits_on_analysis() -> None:
    drain = TrackDrain(_Track(40))
    sink = _Sink()
    loop = _loop(drain, sink)
    await asyncio.wait_for(asyncio.gather(drain.run(), loop.run()), 10)
    # Every decoded frame was taken from the track although the one analysis never ended.
    assert drain.decoded == 40
    assert len(sink.offers) == 1  # one in flight: nothing more offered meanwhile


async def test_a_waiting_frame_is_replaced_by_the_newest() -> None:
    drain = TrackDrain(_Track(30))
    sink = _Sink(take_after=5)  # the budget holds the first frames back
    loop = _loop(drain, sink)
    await asyncio.wait_for(asyncio.gather(drain.run(), loop.run()), 10)
    assert len(sink.offers) == 6 and loop.replaced == 5
    times = [f.captured_at for f in sink.offers]
    assert times == sorted(times) and len(set(times)) == 6  # always a newer frame


async def test_a_bug_in_the_sampler_is_reported_and_survived() -> None:
    drain = TrackDrain(_Track(20))
    sink = _Sink(fail_first=True)
    errors: list[str] = []
    loop = _loop(drain, sink, errors)
    await asyncio.wait_for(asyncio.gather(drain.run(), loop.run()), 10)
    assert errors == ["sampler"] and loop.errors == 1
    assert len(sink.offers) == 1  # the next frame was offered after the failure


def test_the_policy_samples_exactly_when_a_dwell_completes() -> None:
    policy = AdaptiveSampler(SamplerConfig(pending_interval_s=0.5, min_interval_s=0.1))
    assert policy.decide(0.0, None, SamplingState()) is not None  # first frame
    pending = SamplingState(pending=True)
    assert policy.decide(0.2, False, pending) is None
    due = policy.decide(0.3, False, SamplingState(pending=True, due=True))
    assert due is not None and due.reason == Reason.ALERT_DUE
    # The idle interval is the session's to choose (it follows the backend's cost).
    assert policy.decide(1.2, False, SamplingState(idle_interval_s=1.0)) is None
    assert policy.decide(1.35, False, SamplingState(idle_interval_s=1.0)) is not None


# --- budget ---------------------------------------------------------------------------------


async def test_budget_counts_api_calls_not_analyses() -> None:
    budget = CallBudget(rate_per_s=6)
    await budget.acquire(3)
    await budget.acquire(3)
    assert budget.grants_in_window() == 6
    started = time.monotonic()
    await budget.acquire(1)  # the window is full: waits for the oldest calls to expire
    assert time.monotonic() - started > 0.5
    budget.close()


async def test_live_sessions_go_before_background_work() -> None:
    budget = CallBudget(rate_per_s=2)
    await budget.acquire(2)  # the window is full
    order: list[str] = []

    async def ask(name: str, priority: Any) -> None:
        await budget.acquire(1, priority)
        order.append(name)

    background = asyncio.create_task(ask("video", "background"))
    await asyncio.sleep(0.01)
    live = asyncio.create_task(ask("live", "live"))
    await asyncio.wait_for(asyncio.gather(background, live), 5)
    assert order == ["live", "video"]  # the live request came later and went first
    budget.close()


# --- the worker -------------------------------------------------------------------------------


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "analyser_timeout_s": 0.3,
        "rekognition_read_timeout_s": 5.0,
        "labels_interval_s": 3600.0,  # after the first frame, DetectFaces only
        "text_interval_s": 3600.0,
        "rtc_reconnect_grace_s": 0.3,
    }


async def test_timed_out_analyses_never_overlap(
    server: RunningServer, rekognition: FakeRekognition, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{server.url}/api/sessions/start", json={}) as resp:
        sid = (await resp.json())["session_id"]
    frame = {"frame": data_url(astronaut_bgr(320, 240))}
    async with http.post(f"{server.url}/api/sessions/{sid}/frame", json=frame) as resp:
        assert resp.status == 200  # the first frame asks all three APIs at once
    rekognition.max_in_flight = 0
    rekognition.latency_s = 1.0  # every call outlives the 0.3 s analysis timeout
    statuses = []
    for _ in range(3):
        async with http.post(f"{server.url}/api/sessions/{sid}/frame", json=frame) as resp:
            statuses.append((resp.status, (await resp.json())["error"]["code"]))
    # Each frame was answered at its timeout as the backend being unavailable ...
    assert statuses == [(503, "backend_unavailable")] * 3
    # ... but the next analysis began only once the timed-out call had really returned.
    assert rekognition.max_in_flight == 1
    async with http.get(f"{server.url}/api/sessions/{sid}/metrics") as resp:
        metrics = await resp.json()
    assert metrics["frames_analysed"] == 4 and metrics["frames_degraded"] == 3


async def test_reconnect_grace_belongs_to_the_session_layer(server: RunningServer) -> None:
    manager = server.manager
    rtc = await manager.start_session({}, transport="webrtc")
    manager.detach(rtc, "connection_failed")
    assert manager.grace_pending(rtc.id)
    manager.attach(rtc)  # the candidate came back in time
    assert not manager.grace_pending(rtc.id)
    manager.detach(rtc, "connection_failed")
    for _ in range(100):
        if rtc.status == "ended":
            break
        await asyncio.sleep(0.02)
    record = await manager.store.get_session(rtc.id)
    assert record is not None and record["end_reason"] == "peer_lost"
    # Push transports keep the idle timeout: losing a connection starts no grace.
    push = await manager.start_session({}, transport="socketio")
    manager.detach(push, "disconnect")
    assert not manager.grace_pending(push.id) and push.status == "live"


# --- idle sampling follows the backend's cost ---------------------------------------------


def test_idle_interval_follows_the_backends_cost() -> None:
    cloud = IdlePacing(True, cloud_idle_s=12.0, local_idle_s=1.0, workers=2)
    assert cloud.interval() == 12.0  # every call is billed
    local = IdlePacing(False, cloud_idle_s=12.0, local_idle_s=1.0, workers=2, window_s=5.0)
    assert local.interval() == 1.0  # headroom: about once a second
    for _ in range(50):
        local.record(0.1)  # 5 s of analyser time in 5 s on 2 workers: half busy
    assert local.interval() == 1.0
    for _ in range(50):
        local.record(0.1)  # now fully busy
    assert local.interval() == pytest.approx(12.0)
    fresh = IdlePacing(False, cloud_idle_s=12.0, local_idle_s=1.0, workers=2)
    fresh.overloaded_for(5.0)  # the WebRTC load monitor saw frames falling behind
    assert fresh.interval() == 12.0


@pytest.mark.netns
@pytest.mark.slow
async def test_a_still_candidate_on_the_offline_backend_is_analysed_about_once_a_second(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    from tests.rtc_client import RtcTestClient, SyntheticCamera, start_rtc_server

    server = await start_rtc_server(tmp_path, rekognition, analyser_backend="local")
    camera = SyntheticCamera({"face": astronaut_bgr(640, 480)}, "face", fps=15, noise=2.0)
    client = RtcTestClient(server.url, camera)
    try:
        await client.connect()
        await client.wait_for("frame_analysis", within=30)
        first = len(client.of_type("frame_analysis"))
        await asyncio.sleep(6.0)
        analysed = len(client.of_type("frame_analysis")) - first
        mark = len(client.messages)
        client.send({"type": "get_live_metrics"})
        metrics = await client.wait_for("live_metrics", start=mark)
    finally:
        await client.close()
        await server.stop()
    # The cloud's idle rate would give at most one analysis in these 6 s of a still scene.
    assert analysed >= 4, analysed
    assert metrics["rtc"]["reasons"].get("idle", 0) >= 3
    assert rekognition.count() == 0  # the offline backend: no cloud call at all
