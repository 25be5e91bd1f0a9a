"""The candidate page (public/, served at /) in real headless Chromium against the real
server, over real WebRTC on loopback.

Chromium's fake camera plays a .y4m made here from real face imagery followed by a blank
scene; Chromium loops the file, so the face comes and goes. The Rekognition fake (reached
through real boto3) reports a face for a textured image and none for a blank one. Run
inside a loopback-only network namespace:

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python -m pytest \
        tests/test_public_page_browser.py -q'
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from server.app import RTC
from tests.browser_kit import (
    ConsoleWatch,
    blank_frames,
    face_frames,
    launch_browser,
    require_chromium,
    write_y4m,
)
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.llm import FakeOpenAI, FakeReply
from tests.fakes.rekognition import FakeRekognition
from tests.netns import require_netns

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.netns]

SCREENSHOTS = Path("/tmp")  # for a human look; never committed

LOOPBACK_RTC: dict[str, Any] = {
    # aioice skips 127.0.0.1 unless told; and only UDP 127.0.0.1 candidates are checked.
    "rtc_host_addresses": ["127.0.0.1"],
    "rtc_remote_candidate_addresses": ["127.0.0.1"],
    "llm_provider": "none",
    "api_token": "",
}


@pytest.fixture
async def page_server(
    tmp_path: Path, rekognition: FakeRekognition, settings_overrides: dict[str, Any]
) -> AsyncIterator[RunningServer]:
    require_netns()
    require_chromium()
    rekognition.faces_from_image = True  # textured frame: one face; blank frame: none
    settings = make_settings(tmp_path, **{**LOOPBACK_RTC, **settings_overrides})
    running = await start_server(settings)
    yield running
    await running.stop()


@pytest.fixture
async def openai_fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    """An OpenAI fake for the report's AI summary; request it before `page_server`."""
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    fake.reply = FakeReply(
        content='{"summary": "Calm and attentive throughout.", '
        '"cultural_fit": "Attentive, as the role needs."}',
        prompt_tokens=321,
        completion_tokens=54,
    )
    yield fake
    await fake.stop()


def _camera(tmp_path: Path, face: int = 30, blank: int = 60) -> Path:
    """2 s of a face then 4 s of an empty scene at 15 fps, looped by Chromium (WebRTC
    rules count capture time: no_face_detected needs 2 s of absence)."""
    return write_y4m(tmp_path / "camera.y4m", face_frames(face) + blank_frames(blank))


async def _open(page: Page, url: str) -> None:
    await page.goto(f"{url}/")
    # The preview opens the camera at load; Start Session is enabled once the page is idle.
    await page.wait_for_function("document.body.dataset.state === 'idle'")
    await page.wait_for_function("window.proctorPage.marks.camera_ready !== undefined")


async def _number(page: Page, selector: str) -> float:
    text = (await page.inner_text(selector)).strip()
    match = re.search(r"-?\d+(\.\d+)?", text)
    assert match, f"{selector} shows no number: {text!r}"
    return float(match.group())


async def _connect(page: Page, job_title: str = "Site Reliability Engineer") -> str:
    await page.fill("#job-title", job_title)
    # By its label: the README tells the user to "start a session".
    await page.get_by_role("button", name="Start Session", exact=True).click()
    await page.wait_for_function("document.body.dataset.state === 'live'", timeout=20_000)
    return (await page.inner_text("#session-id")).strip()


async def test_page_connects_streams_alerts_and_shows_the_report(
    page_server: RunningServer, rekognition: FakeRekognition, tmp_path: Path
) -> None:
    y4m = _camera(tmp_path)
    async with launch_browser(y4m, tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        console = ConsoleWatch().attach(page)
        await _open(page, page_server.url)
        assert await page.is_enabled("#connect-btn")
        assert await page.is_disabled("#end-btn")

        offers: list[dict] = []
        page.on(
            "request",
            lambda req: (
                offers.append(req.post_data_json) if req.url.endswith("/api/rtc/offer") else None
            ),
        )
        session_id = await _connect(page)
        live = page_server.manager.live_sessions()
        assert [s.id for s in live] == [session_id]
        assert live[0].transport == "webrtc"
        assert live[0].job_data == {"jobTitle": "Site Reliability Engineer"}
        assert await page.get_attribute("#rtc-state", "data-state") == "connected"
        assert await page.get_attribute("#dc-state", "data-state") == "open"
        assert await page.is_disabled("#connect-btn")
        # The page's offer: H.264 preferred, abs-send-time left out (no REMB; see app.js).
        [peer] = page_server.app[RTC].peers()
        assert peer.codec == "H264"
        offer_sdp = peer.pc.remoteDescription.sdp
        assert "a=sendonly" in offer_sdp and "webrtc-datachannel" in offer_sdp
        # The server strips abs-send-time itself; the page must not offer it either (other
        # servers, or a server older than that fix).
        assert offers and "abs-send-time" not in offers[0]["sdp"]
        assert "abs-send-time" not in offer_sdp
        await page.wait_for_function(
            "document.getElementById('backend').textContent === 'rekognition'"
        )

        # Analyses arrive on the data channel and move the bars: a face frame fills them.
        await page.wait_for_function(
            """() => Number(document.getElementById('frames-analysed').textContent) >= 2
                  && document.getElementById('faces-count').dataset.value === '1'
                  && parseFloat(document.getElementById('bar-confidence').style.width) > 0
                  && parseFloat(document.getElementById('bar-eye_contact').style.width) > 0""",
            timeout=20_000,
        )

        # The blank half of the loop raises no_face_detected; the face's return ends it.
        alert = page.locator("#alerts-list li[data-type='no_face_detected']").first
        await alert.wait_for(timeout=20_000)
        assert await alert.get_attribute("data-severity") == "warning"
        await page.wait_for_selector(
            "#alerts-list li[data-type='no_face_detected'][data-status='ended']", timeout=20_000
        )
        ended = page.locator("#alerts-list li[data-type='no_face_detected'][data-status='ended']")
        meta = await ended.first.locator(".meta").inner_text()
        assert "onset" in meta and "lasted" in meta
        assert float(await ended.first.get_attribute("data-duration") or "0") > 0

        # live_metrics (pushed and requested) fill the averages and the server counters.
        await page.wait_for_function(
            "document.getElementById('avg-confidence').textContent.startsWith('avg')",
            timeout=15_000,
        )
        # Scene changes get through at once: the first face frame after the blank scene
        # is not stuck behind a starved send rate (see withoutAbsSendTime in app.js).
        ages: list[int] = await page.evaluate("[...window.proctorPage.frameAges]")
        assert max(ages) < 2000, ages
        assert "received" in await page.inner_text("#server-counters")
        assert "H264" in await page.inner_text("#server-video")
        await page.screenshot(path=str(SCREENSHOTS / "public_page_live.png"), full_page=True)

        analysed_on_page = await _number(page, "#frames-analysed")
        await page.click("#end-btn")
        await page.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
        assert await page.is_visible("#report")
        marks: dict[str, int] = await page.evaluate("({...window.proctorPage.marks})")
        assert "report_received" in marks, "the report must arrive on the data channel"
        summary_analysed = await _number(page, "#report-summary tr[data-key='frames_analysed'] td")
        assert summary_analysed >= analysed_on_page
        assert (
            await page.inner_text("#report-summary tr[data-key='transport'] td")
        ).strip() == "webrtc"
        for metric in ("eye_contact", "engagement", "facial_expression", "posture", "confidence"):
            assert await page.locator(f"#report-scores tr[data-metric='{metric}']").count() == 1
        history = page.locator("#report-alerts tr[data-testid='report-alert']")
        assert await history.locator("xpath=self::*[@data-type='no_face_detected']").count() >= 1
        assert "Site Reliability Engineer" in await page.inner_text("#report-cultural-fit")
        assert (await page.inner_text("#report-body-language")).strip()
        assert (await page.inner_text("#report-headline")).strip()
        raw = json.loads(await page.text_content("#report-raw") or "{}")
        assert raw["session_id"] == session_id
        assert raw["summary"]["frames_analysed"] == summary_analysed
        assert await page.is_enabled("#connect-btn")
        assert await page.locator("#alerts-list li[data-status='onset']").count() == 0
        await page.screenshot(path=str(SCREENSHOTS / "public_page_report.png"), full_page=True)

    assert page_server.manager.live_count == 0
    assert rekognition.count("DetectFaces") >= summary_analysed
    assert console.errors == []
    print("page timings (ms after navigation start):", marks, "frame ages (ms):", ages)


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            # Every peer looks "behind", so the server asks the page for less video.
            "rtc_overload_frame_lag_ms": -1.0,
            "rtc_adjust_max_width": 320,
            "rtc_adjust_max_fps": 8,
            "rtc_overload_cooldown_s": 60.0,
            # A steady scene is sampled every 12 s by default; sooner keeps this test short.
            "sampler_idle_interval_s": 1.0,
            "llm_provider": "openai",
            "openai_api_key": "sk-test",
        }
    ],
)
async def test_page_obeys_adjust_video_reconnects_and_shows_the_ai_summary(
    openai_fake: FakeOpenAI, page_server: RunningServer, tmp_path: Path
) -> None:
    y4m = _camera(tmp_path, face=30, blank=0)
    async with launch_browser(y4m, tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        console = ConsoleWatch().attach(page)
        await _open(page, page_server.url)
        session_id = await _connect(page)

        # adjust_video → RTCRtpSender.setParameters: the encoder sends at most 320 px wide.
        await page.wait_for_function(
            "document.getElementById('video-limits').textContent.includes('320')", timeout=15_000
        )
        await page.wait_for_function(
            """() => { const m = document.getElementById('send-stats').textContent
                                 .match(/^(\\d+)×(\\d+)/);
                       return m && Number(m[1]) <= 320; }""",
            timeout=15_000,
        )

        # The server loses the peer (as when the network drops); the page offers again
        # with the same session id and the session carries on.
        rtc = page_server.app[RTC]
        [peer] = rtc.peers()
        before = await _number(page, "#frames-analysed")
        rtc.peer_lost(peer, "test_drop")
        await page.wait_for_function(
            "document.getElementById('reconnects').textContent === '1'", timeout=20_000
        )
        await page.wait_for_function("document.body.dataset.state === 'live'", timeout=20_000)
        assert (await page.inner_text("#session-id")).strip() == session_id
        assert [s.id for s in page_server.manager.live_sessions()] == [session_id]
        [new_peer] = rtc.peers()
        assert new_peer is not peer and new_peer.session is not None
        assert new_peer.session.id == session_id
        # Analyses keep coming on the new channel.
        await page.wait_for_function(
            f"Number(document.getElementById('frames-analysed').textContent) > {before}",
            timeout=20_000,
        )
        assert "320" in await page.inner_text("#video-limits")  # re-applied to the new sender
        await page.screenshot(path=str(SCREENSHOTS / "public_page_reconnected.png"), full_page=True)

        await page.click("#end-btn")
        await page.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
        assert await page.is_visible("#report")
        assert await page.inner_text("#report-ai-summary") == "Calm and attentive throughout."
        assert "openai" in await page.inner_text("#report-ai-provider")
        assert await page.inner_text("[data-testid='report-ai-assessment']") == (
            "Attentive, as the role needs."
        )
        assert "= 375 tokens" in await page.inner_text("#report-tokens")
        assert (
            await page.inner_text("#report-summary tr[data-key='frames_analysed'] td")
        ).strip() != "0"

    assert "Site Reliability Engineer" in openai_fake.requests[-1].prompt_text()
    assert console.errors == []


@pytest.mark.parametrize("settings_overrides", [{"rtc_max_peers": 0}])
async def test_offer_refusal_is_shown_with_its_status_and_code(
    page_server: RunningServer, tmp_path: Path
) -> None:
    y4m = _camera(tmp_path, face=15, blank=0)
    async with launch_browser(y4m, tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        console = ConsoleWatch().attach(page)
        await _open(page, page_server.url)
        await page.click("#connect-btn")
        await page.wait_for_selector("#error-banner:not([hidden])", timeout=15_000)
        text = await page.inner_text("#error-banner-text")
        assert "HTTP 429" in text and "too_many_peers" in text
        assert "limit of 0 WebRTC peers" in text
        assert await page.evaluate("document.body.dataset.state") == "idle"
        assert await page.is_enabled("#connect-btn")
        assert page_server.manager.live_count == 0
        await page.screenshot(path=str(SCREENSHOTS / "public_page_refused.png"), full_page=True)

    # The only console error is Chromium's own note of the refused request.
    assert console.errors and all("429" in line for line in console.errors), console.errors
