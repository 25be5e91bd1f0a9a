"""client_example.html in real headless Chromium, with a fake camera, against a real server.

The camera plays a .y4m file (Chromium loops it); the page captures frames to a canvas,
pushes JPEG data URLs over Socket.IO, and renders what the server sends back.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from server.config import Settings
from tests.browser_kit import (
    ConsoleWatch,
    blank_frames,
    face_frames,
    launch_browser,
    require_chromium,
    write_y4m,
)
from tests.conftest import make_settings, start_server
from tests.fakes.rekognition import FakeRekognition

if TYPE_CHECKING:
    from playwright.async_api import Page

DEFAULTS = Settings.model_fields
SCREENSHOT = Path("/tmp/client_example_browser.png")  # for a human look; never committed


@pytest.fixture(params=["local", "rekognition"])
async def demo_server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """The real app on a free loopback port; yields its base URL. `local` is what a fresh
    install runs; `rekognition` goes through real boto3 to the fake service, which reports
    a face in any textured image, so the page is covered whatever the local models do."""
    backend: str = request.param
    async with AsyncExitStack() as stack:
        if backend == "rekognition":
            fake = await stack.enter_async_context(FakeRekognition(faces_from_image=True))
            for key, value in fake.env().items():
                monkeypatch.setenv(key, value)
        settings = make_settings(
            tmp_path,
            analyser_backend=backend,
            # The product's cadence: labels and text are slower, rarer signals.
            labels_interval_s=DEFAULTS["labels_interval_s"].default,
            text_interval_s=DEFAULTS["text_interval_s"].default,
            llm_provider="none",
        )
        running = await start_server(settings)
        stack.push_async_callback(running.stop)
        yield running.url


def test_y4m_file_decodes_to_the_frames_written(tmp_path: Path) -> None:
    """The fake-camera file is valid YUV4MPEG2 that a real demuxer (FFmpeg, via PyAV)
    reads back as the frames written."""
    import av

    frames = face_frames(count=3)
    path = write_y4m(tmp_path / "cam.y4m", frames, fps=15)
    header = path.read_bytes().split(b"\n", 1)[0]
    assert header == b"YUV4MPEG2 W640 H480 F15:1 Ip A1:1 C420jpeg"
    assert path.stat().st_size == len(header) + 1 + 3 * (len(b"FRAME\n") + 640 * 480 * 3 // 2)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(decoded) == 3
    for original, back in zip(frames, decoded, strict=True):
        # Only chroma subsampling and rounding separate them.
        assert np.abs(original.astype(int) - back.astype(int)).mean() < 6


async def _number(page: Page, selector: str) -> float:
    text = (await page.inner_text(selector)).strip()
    match = re.search(r"-?\d+(\.\d+)?", text)
    assert match, f"{selector} shows no number: {text!r}"
    return float(match.group())


@pytest.mark.browser
async def test_demo_page_shows_live_metrics_and_report(demo_server: str, tmp_path: Path) -> None:
    require_chromium()
    y4m = write_y4m(tmp_path / "face.y4m", face_frames())
    async with launch_browser(y4m, tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        console = ConsoleWatch().attach(page)
        await page.goto(f"{demo_server}/client_example.html")

        await page.wait_for_function(
            "document.getElementById('connection-status').textContent === 'connected'"
        )
        assert await page.is_disabled("#end-btn")
        await page.fill("#job-title", "Site Reliability Engineer")
        await page.fill("#fps", "5")  # quicker than the 2 fps default, still paced by acks
        await page.click("#start-btn")
        await page.wait_for_function("document.body.dataset.state === 'running'")
        assert re.fullmatch(r"[\w-]{16,}", (await page.inner_text("#session-id")).strip())
        assert await page.is_disabled("#start-btn")

        # Several analysed frames in which the bars show a face's scores.
        await page.wait_for_function(
            """() => {
                const n = Number(document.getElementById('frames-analysed').textContent);
                const c = Number(document.getElementById('value-confidence').dataset.value || 0);
                return n >= 3 && c > 0;
            }""",
            timeout=30_000,
        )
        assert await _number(page, "#faces-count") == 1
        assert await _number(page, "#value-confidence") > 0
        assert await _number(page, "#value-eye_contact") > 0
        width = await page.eval_on_selector("#bar-eye_contact", "e => e.style.width")
        assert float(width.rstrip("%")) > 0
        assert (await page.inner_text("#dominant-emotion")).strip() not in ("", "—")
        assert (await page.inner_text("#backend")).strip() not in ("", "—")
        sent = await _number(page, "#frames-sent")
        assert sent >= await _number(page, "#frames-analysed") - 1
        await page.screenshot(path=str(SCREENSHOT), full_page=True)

        await page.click("#end-btn")
        await page.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
        assert await page.is_visible("#report")
        analysed = await _number(page, "#report-summary tr[data-key='frames_analysed'] td")
        assert analysed > 0
        # Paced by acknowledgements, one frame outstanding: the server never had to drop.
        assert await _number(page, "#report-summary tr[data-key='frames_dropped'] td") == 0
        assert await page.locator("#report-scores tr[data-metric='eye_contact']").count() == 1
        assert (await page.inner_text("#report-text")).strip()  # narrative rendered
        raw = await page.text_content("#report-raw")  # inside a closed <details>
        assert raw is not None and '"behavioural_scores"' in raw
        assert await page.is_enabled("#start-btn")

    assert console.errors == []


@pytest.mark.browser
@pytest.mark.parametrize("demo_server", ["local"], indirect=True)
async def test_demo_page_lists_no_face_alert(demo_server: str, tmp_path: Path) -> None:
    require_chromium()
    y4m = write_y4m(tmp_path / "blank.y4m", blank_frames())
    async with launch_browser(y4m, tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        console = ConsoleWatch().attach(page)
        await page.goto(f"{demo_server}/client_example.html")
        await page.wait_for_function(
            "document.getElementById('connection-status').textContent === 'connected'"
        )
        await page.fill("#fps", "5")
        await page.click("#start-btn")

        # The spec's default: three faceless frames raise one no_face_detected episode.
        alert = page.locator("#alerts-list li[data-type='no_face_detected']")
        await alert.wait_for(timeout=30_000)
        assert await alert.get_attribute("data-status") == "onset"
        assert await alert.get_attribute("data-severity") == "warning"
        assert await _number(page, "#faces-count") == 0
        assert (await page.inner_text("#value-eye_contact")).strip() == "—"
        assert "1 active" in await page.inner_text("#active-alerts")

        await page.click("#end-btn")
        await page.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
        history = page.locator("#report-alerts tr[data-testid='report-alert']")
        assert await history.count() >= 1
        assert "No face detected" in await history.first.inner_text()

    assert console.errors == []
