"""The proctor's console (/console) in real headless Chromium against the real server, in
secured mode, with a live WebRTC interview from the candidate page's fake camera in
another page of the same browser: sign in, create the session and read its join link,
watch the alert arrive in the feed, open its evidence, dismiss it, end the session and
read the report (the dismissal in it, one band per alert episode in its charts).

Screenshots of the console and of a report are kept in tests/artifacts/ (gitignored).
Run inside a loopback-only network namespace (see tests/netns.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.browser_kit import ConsoleWatch, launch_browser, require_chromium
from tests.conftest import RunningServer, make_settings, start_server
from tests.fakes.rekognition import FakeRekognition
from tests.netns import require_netns
from tests.test_public_page_browser import LOOPBACK_RTC, _camera

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.netns]

OPERATOR = "console-operator-token-7f3a"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
async def console_server(
    tmp_path: Path, rekognition: FakeRekognition
) -> AsyncIterator[RunningServer]:
    require_netns()
    require_chromium()
    rekognition.faces_from_image = True  # textured frame: one face; blank frame: none
    settings = make_settings(
        tmp_path,
        **{**LOOPBACK_RTC, "api_token": OPERATOR, "candidate_view": "results"},
        watch_metrics_interval_s=1.0,
    )
    running = await start_server(settings)
    yield running
    await running.stop()


def _clean(watch: ConsoleWatch) -> list[str]:
    """What must never appear: script errors and Content-Security-Policy refusals. (A 404
    for an evidence snapshot not stored yet is a normal network answer.)"""
    return [
        e
        for e in watch.errors + watch.messages
        if "[pageerror]" in e or "Content Security Policy" in e or "Refused to" in e
    ]


async def _state(page: Page, value: str, timeout: float = 20_000) -> None:
    # Selectors, not wait_for_function: the console's CSP forbids the eval the latter uses.
    await page.wait_for_selector(f"body[data-state={value}]", state="attached", timeout=timeout)


async def _sign_in(page: Page, url: str) -> None:
    await page.goto(f"{url}/console")
    await _state(page, "signed-out")
    await page.fill("#token", "not-the-token")
    await page.click("#signin-btn")
    await page.wait_for_selector("#signin-error:not([hidden])")
    assert "not valid" in await page.inner_text("#signin-error")
    await page.fill("#token", OPERATOR)
    await page.click("#signin-btn")
    await _state(page, "ready")
    assert await page.input_value("#token") == ""  # the field does not keep it
    await page.wait_for_selector("#socket-state.ok")


async def _create_session(page: Page, url: str) -> tuple[str, str]:
    await page.click("[data-testid=tab-new]")
    await page.fill("#new-candidate", "Ada <img src=x onerror=alert(1)>")  # shown as text
    await page.fill("#new-job-title", "Site Reliability Engineer")
    await page.fill("#new-skills", "Linux, on-call")
    await page.click("#new-start")
    await page.wait_for_selector("#new-result:not([hidden])")
    join = await page.input_value("#join-url")
    sid = await page.get_attribute("#new-session-id", "data-session-id")
    assert sid and join.startswith(f"{url}/#session={sid}&token=")
    await page.click("#copy-join")
    await page.wait_for_selector("#copy-state:has-text('Copied')")
    assert await page.evaluate("navigator.clipboard.readText()") == join
    return sid, join


async def test_a_proctor_runs_an_interview_from_the_console(
    console_server: RunningServer, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    url = console_server.url
    async with launch_browser(_camera(tmp_path), tmp_path / "profile") as context:
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        console = context.pages[0] if context.pages else await context.new_page()
        watch = ConsoleWatch().attach(console)
        requests: list[tuple[str, dict[str, str]]] = []
        console.on("request", lambda r: requests.append((r.url, r.headers)))
        # Who the test is: a proctor with the operator token.
        await _sign_in(console, url)
        sid, join = await _create_session(console, url)
        await console.click("[data-testid=tab-live]")
        row = console.locator(f"[data-testid=live-session][data-session-id='{sid}']")
        await row.wait_for()
        assert "<img" in await row.locator("td").first.inner_text()  # text, never markup
        assert await console.locator("img[src=x]").count() == 0

        # The candidate opens the link in their own page (the fake camera) and joins.
        candidate = await context.new_page()
        await candidate.goto(join)
        await candidate.wait_for_function("window.proctorPage.marks.camera_ready !== undefined")
        await candidate.click("#connect-btn")
        await candidate.wait_for_function("document.body.dataset.state === 'live'", timeout=20_000)
        # The session the proctor made is now a WebRTC one (the sessions list refreshes).
        await row.locator("td:nth-child(4):has-text('webrtc')").wait_for(timeout=15_000)

        # Nobody in front of the camera for 2 s: the alert arrives in the feed.
        feed_alert = console.locator("[data-testid=feed-alert][data-type=no_face_detected]")
        await feed_alert.first.wait_for(timeout=30_000)
        assert sid == await feed_alert.first.get_attribute("data-session-id")
        assert "Ada" in await feed_alert.first.inner_text()
        episode = await feed_alert.first.get_attribute("data-episode-id")

        # Its evidence and numbers: the snapshot decodes in the page.
        await feed_alert.first.locator("button").click()
        await console.wait_for_selector("#alert-detail:not([hidden])")
        await console.wait_for_selector("#detail-evidence[data-decoded=true]", timeout=15_000)
        size = await console.eval_on_selector(
            "#detail-evidence", "img => [img.naturalWidth, img.naturalHeight, img.src]"
        )
        assert size[0] > 0 and size[1] > 0 and size[2].startswith("blob:")
        numbers = await console.inner_text("#detail-numbers")
        assert "No face detected" in numbers and "Required dwell s" in numbers
        # Dismissed, with a note.
        await console.fill("#detail-note", "Bent down to pick up a pen")
        await console.click("#detail-dismiss")
        await console.wait_for_selector("#detail-review[data-verdict=dismissed]")
        await console.click("#detail-close")
        await console.wait_for_selector(
            f"[data-testid=feed-alert][data-episode-id='{episode}'][data-verdict=dismissed]"
        )

        # The session view: live metrics and the chart, its bands the alert episodes.
        await row.click()
        await console.wait_for_selector("body[data-view=session]", state="attached")
        chart = console.locator("[data-testid=chart-live]")
        await chart.locator("canvas").wait_for()
        await console.wait_for_function(
            "() => Number(document.querySelector('[data-testid=chart-live]').dataset.bands) >= 1",
            timeout=20_000,
        )
        # Its time axis spans the last minute or so (the episodes in view), not ten.
        assert int(await chart.get_attribute("data-span-s") or 0) <= 120
        reviewed = console.locator(f"[data-testid=session-alert][data-episode-id='{episode}']")
        await reviewed.wait_for()
        assert await reviewed.get_attribute("data-verdict") == "dismissed"
        await console.wait_for_selector(
            "[data-testid=evidence-thumb]:not([hidden])", timeout=15_000
        )
        await console.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)

        # The proctor ends it and reads the report.
        await console.click("#session-end")
        await console.click("#session-end")  # the second click confirms
        await console.wait_for_selector("#session-report:not([hidden])", timeout=30_000)
        await console.click("#session-report")
        await console.wait_for_selector("body[data-report=ready]", state="attached", timeout=30_000)
        history = console.locator(f"[data-testid=report-alert][data-episode-id='{episode}']")
        review = history.locator("[data-testid=report-alert-review]")
        assert await review.get_attribute("data-verdict") == "dismissed"
        assert "Bent down to pick up a pen" in await review.inner_text()
        episodes = int(await console.get_attribute("#report", "data-episodes") or 0)
        rows = await console.locator("[data-testid=report-alert]").count()
        assert episodes == rows >= 1
        metrics_chart = console.locator("[data-testid=chart-metrics]")
        assert await metrics_chart.get_attribute("data-bands") == str(episodes)  # one each
        assert await console.locator("[data-testid=chart-alerts]").get_attribute(
            "data-bands"
        ) == str(episodes)
        for testid in ("chart-metrics", "chart-emotions", "chart-alerts"):
            assert await _coloured_pixels(console, testid) > 500, testid
        await console.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        # Printable: the console's own chrome is not printed.
        await console.emulate_media(media="print")
        assert not await console.is_visible("nav.tabs")
        assert await console.is_visible("#report")
        await console.emulate_media(media="screen")

        # The candidate's page (CANDIDATE_VIEW=results) shows the same renderer's report.
        await candidate.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
        await candidate.wait_for_selector("#report [data-testid=chart-metrics] canvas")

        # The token stayed in the page: in no URL, no cookie, no storage; sent as a header.
        assert all(OPERATOR not in u for u, _h in requests)
        sent = [h.get("authorization") for u, h in requests if "/api/" in u]
        assert sent.count("Bearer not-the-token") == 1  # the wrong one, tried once
        assert len(sent) > 5 and set(sent) == {f"Bearer {OPERATOR}", "Bearer not-the-token"}
        assert await context.cookies() == []
        assert await console.evaluate("localStorage.length + sessionStorage.length") == 0
        assert _clean(watch) == []


async def _coloured_pixels(page: Page, testid: str) -> int:
    count: int = await page.evaluate(
        """(id) => {
            const c = document.querySelector(`[data-testid=${id}] canvas`);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) {
                if (d[i + 3] > 0 && !(d[i] > 230 && d[i + 1] > 230 && d[i + 2] > 230)) n++;
            }
            return n;
        }""",
        testid,
    )
    return count


async def test_development_mode_needs_no_sign_in(tmp_path: Path) -> None:
    require_chromium()
    server = await start_server(make_settings(tmp_path, analyser_backend="local"))
    try:
        async with launch_browser(None, tmp_path / "profile") as context:
            page = context.pages[0] if context.pages else await context.new_page()
            watch = ConsoleWatch().attach(page)
            await page.goto(f"{server.url}/console")
            await _state(page, "ready")
            assert await page.is_hidden("#signin")
            assert "development" in await page.inner_text("#mode")
            await page.click("[data-testid=tab-new]")
            await page.fill("#new-job-title", "Analyst")
            await page.click("#new-start")
            await page.wait_for_selector("#new-result:not([hidden])")
            assert re.search(r"#session=[\w-]+&token=", await page.input_value("#join-url"))
            await page.click("[data-testid=tab-live]")
            await page.wait_for_selector("[data-testid=live-session]")
            assert watch.errors == []
    finally:
        await server.stop()


async def test_the_console_page_allows_only_its_own_scripts(
    server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{server.url}/console") as r:
        assert r.status == 200
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["X-Frame-Options"] == "DENY"
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["default-src"] == "'none'"
    assert "unsafe" not in csp and directives["frame-ancestors"] == "'none'"
    # Every script is a file of this server's: none inline, none from elsewhere.
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        async with http.get(f"{server.url}{path}") as r:
            assert r.status == 200, path
