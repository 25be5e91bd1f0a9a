"""The candidate page in secured mode, in real headless Chromium: opened at the operator's
`join_url`, it joins that session over WebRTC with the candidate token from the URL
fragment (sent as Authorization on the offer, never in a URL); without a join link it
cannot start a session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.browser_kit import ConsoleWatch, launch_browser
from tests.conftest import RunningServer
from tests.fakes.rekognition import FakeRekognition
from tests.test_public_page_browser import _camera, page_server  # noqa: F401 - fixture

pytestmark = [pytest.mark.browser, pytest.mark.netns]
OPERATOR = "join-operator-token"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_token": OPERATOR, "candidate_view": "results"}


async def test_page_joins_the_operators_session_from_its_join_url(
    page_server: RunningServer,  # noqa: F811
    rekognition: FakeRekognition,
    tmp_path: Path,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{page_server.url}/api/sessions/start",
            json={"job_data": {"jobTitle": "Data Engineer"}},
            headers={"Authorization": f"Bearer {OPERATOR}"},
        ) as r:
            started = await r.json()
    sid, token = started["session_id"], started["candidate_token"]
    async with launch_browser(_camera(tmp_path), tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        ConsoleWatch().attach(page)
        requests: list[tuple[str, dict[str, str], Any]] = []
        page.on(
            "request",
            lambda req: requests.append((req.url, req.headers, req.post_data_json))
            if "/api/" in req.url
            else None,
        )
        await page.goto(started["join_url"])
        await page.wait_for_function("window.proctorPage.marks.camera_ready !== undefined")
        assert not await page.is_visible("#job-title")  # the operator set the job data
        await page.click("#connect-btn")
        await page.wait_for_function("document.body.dataset.state === 'live'", timeout=20_000)
        assert (await page.inner_text("#session-id")).strip() == sid
        assert [s.id for s in page_server.manager.live_sessions()] == [sid]  # no new session
        [(_url, headers, body)] = [r for r in requests if r[0].endswith("/api/rtc/offer")]
        assert headers["authorization"] == f"Bearer {token}"
        assert body["session_id"] == sid and "job_data" not in body
        assert all(token not in u for u, _, _ in requests)  # the fragment stays in the page
        await page.wait_for_function(
            "Number(document.getElementById('frames-analysed').textContent) >= 1",
            timeout=20_000,
        )
        await page.click("#end-btn")
        await page.wait_for_function("document.body.dataset.state === 'ended'", timeout=30_000)
        assert "Session ended" in await page.inner_text("#status-line")


async def test_page_without_a_join_link_cannot_start_a_session_in_secured_mode(
    page_server: RunningServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with launch_browser(_camera(tmp_path), tmp_path / "profile") as context:
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(f"{page_server.url}/")
        await page.wait_for_function("document.body.dataset.state === 'idle'")
        await page.wait_for_function("window.proctorPage.marks.camera_ready !== undefined")
        await page.click("#connect-btn")
        banner = page.locator("#error-banner-text")
        await banner.wait_for(timeout=20_000)
        text = await banner.inner_text()
        assert "401" in text and "unauthorized" in text
        assert page_server.manager.live_sessions() == []
