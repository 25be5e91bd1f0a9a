"""The sampling policy, the change score and the server-wide analyser budget (no network)."""

from __future__ import annotations

import asyncio
import itertools
import time

import av
import cv2
import numpy as np
import pytest

from server.analysis.budget import CallBudget
from server.media.sampler import (
    AdaptiveSampler,
    ChangeDetector,
    FixedRateSampler,
    Reason,
    SamplerConfig,
    SamplingState,
    thumbnail,
    thumbnail_cost_us,
)
from server.media.track_drain import ArrivalLag
from tests.media import astronaut_bgr, blank_bgr

IDLE = SamplingState()
PENDING = SamplingState(pending=True)
ACTIVE = SamplingState(active=True)


def frame_of(bgr: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")


def noisy(bgr: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = bgr.astype(np.int16) + rng.normal(0, sigma, bgr.shape).astype(np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


# --- policy ---------------------------------------------------------------------------------


def test_first_frame_is_sampled_with_every_check() -> None:
    policy = AdaptiveSampler()
    decision = policy.decide(0.0, None, IDLE)
    assert decision is not None and decision.reason == Reason.FIRST and decision.scene_changed


def test_stable_scene_is_sampled_at_the_idle_rate_only() -> None:
    config = SamplerConfig(idle_interval_s=10.0)
    policy = AdaptiveSampler(config)
    taken = []
    for i in range(15 * 60):  # one minute of a stable 15 fps stream
        t = i / 15
        d = policy.decide(t, False if i else None, IDLE)
        if d is not None:
            taken.append((round(t, 2), d.reason))
    assert taken[0] == (0.0, Reason.FIRST)
    assert [r for _, r in taken[1:]] == [Reason.IDLE] * 5
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(taken)]
    assert gaps == pytest.approx([10.0] * 5, abs=0.07)


def test_scene_change_is_sampled_at_once_and_labels_follow_at_most_every_interval() -> None:
    config = SamplerConfig(min_interval_s=0.1, change_min_interval_s=0.5,
                           scene_checks_interval_s=2.0)
    policy = AdaptiveSampler(config)
    policy.decide(0.0, None, IDLE)
    assert policy.decide(0.05, True, IDLE) is None  # under the floor between two samples
    first = policy.decide(0.5, True, IDLE)
    assert first is not None and first.reason == Reason.SCENE_CHANGE
    assert not first.scene_changed  # the first frame's labels/text were 0.5 s ago
    assert policy.decide(0.8, True, IDLE) is None  # changes sampled at most every 0.5 s
    second = policy.decide(1.0, True, IDLE)
    assert second is not None and not second.scene_changed
    later = policy.decide(2.1, True, IDLE)
    assert later is not None and later.scene_changed
    assert policy.decide(2.8, False, IDLE) is None  # no change, nothing pending: wait


def test_pending_and_active_alerts_boost_the_rate() -> None:
    config = SamplerConfig(idle_interval_s=10, pending_interval_s=0.2, active_interval_s=1.0)
    policy = AdaptiveSampler(config)
    policy.decide(0.0, None, IDLE)
    assert policy.decide(0.1, False, PENDING) is None
    d = policy.decide(0.21, False, PENDING)
    assert d is not None and d.reason == Reason.ALERT_PENDING and not d.scene_changed
    assert policy.decide(0.8, False, ACTIVE) is None
    d = policy.decide(1.22, False, ACTIVE)
    assert d is not None and d.reason == Reason.ALERT_ACTIVE
    assert policy.interval(PENDING) == 0.2 and policy.interval(ACTIVE) == 1.0
    assert policy.interval(IDLE) == 10


def test_fixed_rate_sampler_ignores_everything_but_the_clock() -> None:
    policy = FixedRateSampler(1.0)
    assert policy.decide(0.0, None, IDLE) is not None
    assert policy.decide(0.5, True, PENDING) is None
    assert policy.decide(1.0, False, IDLE) is not None


# --- change score ---------------------------------------------------------------------------


def warp(img: np.ndarray, dx: float = 0, dy: float = 0, angle: float = 0) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[0, 2] += dx
    m[1, 2] += dy
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def with_box(img: np.ndarray, x: int, y: int, w: int, h: int, value: int) -> np.ndarray:
    out = img.copy()
    cv2.rectangle(out, (x, y), (x + w, y + h), (value, value, value), -1)
    return out


FACE = astronaut_bgr(640, 480)


@pytest.mark.parametrize(
    ("name", "image", "changed"),
    [
        ("sensor noise", noisy(FACE, 8, 2), False),
        ("3 px sway", warp(FACE, 3, 1), False),
        ("10 px move", warp(FACE, 10, 5), False),
        ("5° head tilt", warp(FACE, angle=5), False),
        ("auto exposure +15", np.clip(FACE.astype(int) + 15, 0, 255).astype(np.uint8), False),
        ("camera covered", blank_bgr(640, 480, 20), True),
        ("candidate left", blank_bgr(640, 480, 128), True),
        ("big move", warp(FACE, 40, 20), True),
        ("phone in hand", with_box(FACE, 300, 300, 80, 140, 15), True),
        ("small dark object", with_box(FACE, 100, 350, 60, 100, 15), True),
        ("sheet of paper", with_box(FACE, 120, 330, 70, 110, 235), True),
    ],
)
def test_change_detector_ignores_noise_and_small_moves_but_sees_new_things(
    name: str, image: np.ndarray, changed: bool
) -> None:
    detector = ChangeDetector()
    reference = thumbnail(frame_of(noisy(FACE, 4, 1)))
    score = detector.score(thumbnail(frame_of(image)), reference)
    assert score.changed is changed, (name, score)


def test_thumbnail_is_cheap_enough_for_the_event_loop() -> None:
    frame = frame_of(astronaut_bgr(640, 480))
    assert thumbnail(frame).shape == (48, 64)
    assert thumbnail_cost_us(frame) < 200  # measured ≈ 45 µs
    detector = ChangeDetector()
    a, b = thumbnail(frame), thumbnail(frame_of(warp(FACE, 6, 3)))
    t0 = time.thread_time()
    for _ in range(200):
        detector.score(b, a)
    assert (time.thread_time() - t0) / 200 < 200e-6  # measured ≈ 30–85 µs


def test_thumbnail_of_an_odd_layout_uses_a_reformat() -> None:
    rgb = av.VideoFrame.from_ndarray(astronaut_bgr(320, 240), format="rgb24")
    assert thumbnail(rgb).shape == (48, 64)


def test_arrival_lag_measures_queueing_above_the_baseline() -> None:
    lag = ArrivalLag(window_s=30)
    # A steady stream: arrival − media time constant → no lag.
    assert all(lag.update(100 + i / 15, i / 15) == pytest.approx(0) for i in range(30))
    # Frames that arrive 300 ms late (a decode backlog) show it.
    assert lag.update(100 + 2.0 + 0.3, 2.0) == pytest.approx(0.3)
    # A timestamp discontinuity is not a backlog.
    assert lag.update(200.0, 2.1) == 0.0


# --- budget ---------------------------------------------------------------------------------


async def test_budget_holds_the_quota_and_shares_it_fairly() -> None:
    budget = CallBudget(rate_per_s=20)
    grants: dict[int, list[float]] = {i: [] for i in range(20)}

    async def session(i: int, stop: float) -> None:
        # Every session wants 5 analyses per second (boosted): 100/s in all.
        while time.monotonic() < stop:
            await budget.acquire()
            grants[i].append(time.monotonic())
            await asyncio.sleep(0.2)

    stop = time.monotonic() + 2.5
    await asyncio.gather(*(session(i, stop) for i in range(20)))
    times = sorted(t for ts in grants.values() for t in ts)
    # Never more than 20 grants in any rolling second.
    worst = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert worst <= 20
    counts = [len(ts) for ts in grants.values()]
    assert min(counts) >= 2  # nobody starves
    assert max(counts) - min(counts) <= 1  # round robin
    budget.close()


async def test_budget_cancelled_waiter_consumes_nothing() -> None:
    budget = CallBudget(rate_per_s=1)
    await budget.acquire()  # the one call this second
    waiter = asyncio.create_task(budget.acquire())
    await asyncio.sleep(0.05)
    assert budget.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.waiting == 0
    assert budget.stats.granted == 1
    budget.close()


async def test_unlimited_budget_never_waits() -> None:
    budget = CallBudget(rate_per_s=0)
    t0 = time.monotonic()
    for _ in range(1000):
        await budget.acquire()
    assert time.monotonic() - t0 < 0.5
    assert budget.unlimited and budget.stats.granted == 1000
