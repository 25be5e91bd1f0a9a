"""The one report renderer (public/report_view.js) in real headless Chromium, on a real
report: one band per alert episode in the metrics chart and in the alert timeline, the
operator's reviews in the alert history, "not computed" where the server computed nothing
(instead of an empty chart), job data shown as text. The page is the standalone HTML of
`proctor analyze` (server/video/html_report.py), which inlines the same files the
console and the candidate page load."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from server.video.html_report import render_html
from tests.browser_kit import ConsoleWatch, launch_browser, require_chromium
from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition, fake_face
from tests.media import face_data_url

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.browser]


async def _report_with_episodes(
    server: RunningServer, rekognition: FakeRekognition, episodes: int
) -> dict[str, Any]:
    """A real session over REST: one face, then two faces for a frame, `episodes` times,
    a frame every 0.2 s."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{server.url}/api/sessions/start",
            json={"job_data": {"jobTitle": "Analyst", "candidateName": "<b>Bob</b>"}},
        ) as r:
            sid = (await r.json())["session_id"]
        for i in range(2 * episodes + 1):
            faces = [fake_face(), fake_face()] if i % 2 else [fake_face(yaw=5.0 * (i % 3))]
            rekognition.set_scene(faces=faces)
            async with http.post(
                f"{server.url}/api/sessions/{sid}/frame", json={"frame": face_data_url()}
            ) as r:
                assert r.status == 200
            await asyncio.sleep(0.2)  # episodes and the gaps between them, visibly wide
        async with http.post(f"{server.url}/api/sessions/{sid}/end") as r:
            report: dict[str, Any] = await r.json()
    assert len(report["alerts"]) == episodes and report["metrics_timeline"]
    return report


async def _open(
    page: Page, tmp_path: Path, report: dict[str, Any], name: str, settings: Any
) -> None:
    path = tmp_path / f"{name}.html"
    path.write_text(render_html(report, settings))
    await page.goto(path.as_uri())
    await page.wait_for_selector("body[data-rendered=true]")
    await page.wait_for_timeout(100)  # uPlot draws on its next frame


async def _lane_runs(page: Page) -> int:
    """Separate runs of the critical colour along the alert lane's most coloured row."""
    runs: int = await page.evaluate(
        """() => {
            const c = document.querySelector('[data-testid=chart-alerts] canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const red = (x, y) => {
                const i = 4 * (y * c.width + x);
                return d[i + 3] > 200 && d[i] > 150 && d[i + 1] < 90 && d[i + 2] < 90;
            };
            let best = 0, bestRow = 0;
            for (let y = 0; y < c.height; y++) {
                let n = 0;
                for (let x = 0; x < c.width; x++) if (red(x, y)) n++;
                if (n > best) { best = n; bestRow = y; }
            }
            let count = 0, inside = false;
            for (let x = 0; x < c.width; x++) {
                const r = red(x, bestRow);
                if (r && !inside) count++;
                inside = r;
            }
            return count;
        }"""
    )
    return runs


async def test_bands_reviews_and_not_computed(
    server: RunningServer, rekognition: FakeRekognition, tmp_path: Path
) -> None:
    require_chromium()
    report = await _report_with_episodes(server, rekognition, episodes=3)
    first = report["alerts"][0]
    first["review"] = {"verdict": "dismissed", "note": "A colleague <i>walked by</i>", "at": 1.0}
    report["alerts"][1]["review"] = {"verdict": "confirmed", "note": None, "at": 2.0}

    off = copy.deepcopy(report)  # as EMOTION_ANALYSIS=off reports it
    off["not_computed"] = [
        "facial_expression",
        "dominant_emotion",
        "emotion_distribution",
        "dominant_emotion_counts",
        "emotion_timeline",
    ]
    off["behavioural_scores"]["facial_expression"] = None
    off["emotion_distribution"] = None
    off["emotion_timeline"] = []

    async with launch_browser(None, tmp_path / "profile") as context:
        page = await context.new_page()
        watch = ConsoleWatch().attach(page)
        await _open(page, tmp_path, report, "full", server.settings)
        for chart in ("chart-metrics", "chart-alerts"):
            assert await page.get_attribute(f"[data-testid={chart}]", "data-bands") == "3"
        assert await page.locator("[data-testid=chart-emotions] canvas").count() == 1
        # The alert lane is drawn as three separate bars, not one from first to last.
        assert await _lane_runs(page) == 3
        rows = page.locator("[data-testid=report-alert]")
        assert await rows.count() == 3
        reviews = rows.locator("[data-testid=report-alert-review]")
        assert await reviews.nth(0).get_attribute("data-verdict") == "dismissed"
        assert "A colleague <i>walked by</i>" in await reviews.nth(0).inner_text()  # as text
        assert await reviews.nth(1).get_attribute("data-verdict") == "confirmed"
        assert await reviews.nth(2).inner_text() == "not reviewed"
        assert await page.locator("i").count() == 0 and await page.locator("b").count() == 0
        assert "<b>Bob</b>" in await page.inner_text("#report-who")
        assert await page.locator(".not-computed").count() == 0
        await page.emulate_media(media="print")
        assert await page.is_visible("#report") and not await page.is_visible("#report-print")

        await page.emulate_media(media="screen")
        await _open(page, tmp_path, off, "off", server.settings)
        emotions = page.locator("[data-testid=chart-emotions]")
        assert await emotions.locator("canvas").count() == 0
        assert "Not computed" in await emotions.inner_text()
        row = page.locator("#report-scores tr[data-metric=facial_expression]")
        assert "not computed" in await row.inner_text()
        # The metrics chart still draws eye contact and engagement, with every band.
        metrics = page.locator("[data-testid=chart-metrics]")
        assert await metrics.locator("canvas").count() == 1
        assert await metrics.get_attribute("data-bands") == "3"
        assert "Not computed: Expression" in await metrics.inner_text()
        assert "Expression" not in await metrics.locator(".u-legend").inner_text()
        assert watch.errors == []
