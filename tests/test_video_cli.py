"""`proctor analyze`: the recorded-video pipeline from the command line, its JSON report,
and its self-contained HTML report opened in headless Chromium (charts drawn)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.browser_kit import ConsoleWatch, launch_browser, require_chromium
from tests.fakes.rekognition import FakeRekognition
from tests.video_media import make_video
from tests.video_server import VideoHost

ROOT = Path(__file__).resolve().parent.parent


async def run_cli(
    args: list[str], fake: FakeRekognition, cwd: Path, **env: str
) -> tuple[int, str, str]:
    environment = {
        **os.environ,
        **fake.env(),
        "PYTHONPATH": str(ROOT),
        "ANALYSER_BACKEND": "rekognition",
        "LABELS_INTERVAL_S": "0",
        "TEXT_INTERVAL_S": "0",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "analyze",
        *args,
        cwd=cwd,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.browser
async def test_cli_writes_json_and_html_reports(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    require_chromium()
    rekognition.faces_from_image = True
    video = make_video(tmp_path / "interview.mp4", [(3, "face"), (5, "blank"), (4, "face")])
    out, page_file = tmp_path / "report.json", tmp_path / "report.html"
    code, _stdout, stderr = await run_cli(
        [
            str(video),
            "--interval",
            "1",
            "--out",
            str(out),
            "--html",
            str(page_file),
            "--job-data",
            '{"jobTitle": "Data Analyst"}',
        ],
        rekognition,
        tmp_path,
    )
    assert code == 0, stderr
    assert "12/12 frames" in stderr and "00:12/00:12" in stderr  # the progress bar
    assert video.exists()  # the user's file is read in place, never removed
    report = json.loads(out.read_text())
    assert report["summary"]["frames_analysed"] == 12
    assert report["summary"]["transport"] == "video"
    assert report["job_data"] == {"jobTitle": "Data Analyst"}
    assert [(a["type"], a["video_time_start"], a["video_time_end"]) for a in report["alerts"]] == [
        ("no_face_detected", "00:03", "00:08")
    ]
    assert report["emotion_timeline"] and report["token_usage"]["total_tokens"] == 0

    html = page_file.read_text()
    assert "<script src" not in html and "http://" not in html.split("report-data")[0]
    async with launch_browser(None, tmp_path / "profile") as context:
        page = await context.new_page()
        watch = ConsoleWatch().attach(page)
        # Offline: the page must not ask for anything.
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        await page.goto(page_file.as_uri())
        await page.wait_for_selector("body[data-rendered=true]")
        assert await page.locator("[data-testid=chart-alerts] canvas").count() == 1
        assert await page.locator("[data-testid=chart-emotions] canvas").count() == 1
        # Drawn: each chart's canvas has many coloured pixels.
        for chart in ("chart-alerts", "chart-emotions"):
            coloured = await page.evaluate(
                """(id) => {
                    const c = document.querySelector(`[data-testid=${id}] canvas`);
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 0; i < d.length; i += 4) {
                        if (d[i + 3] > 0 && !(d[i] > 230 && d[i + 1] > 230 && d[i + 2] > 230)) n++;
                    }
                    return n;
                }""",
                chart,
            )
            assert coloured > 500, (chart, coloured)
        # The alert lane is labelled and the history shows video time.
        assert "No face detected" in await page.locator("[data-testid=chart-alerts]").inner_text()
        row = page.locator("[data-testid=report-alert]")
        assert await row.count() == 1
        assert "00:03" in await row.inner_text() and "00:08" in await row.inner_text()
        assert "12 frames analysed" in await page.locator("#video-facts").inner_text()
        await page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert watch.errors == []
        assert [u for u in requests if not u.startswith("file://")] == []


async def test_cli_from_a_url_and_its_failures(
    tmp_path: Path, rekognition: FakeRekognition
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    make_video(served / "clip.webm", [(4, "face")], codec="vp9")
    (served / "junk.mp4").write_bytes(b"not a video" * 500)
    host = VideoHost(served)
    await host.start()
    try:
        code, stdout, stderr = await run_cli(
            [f"{host.url}/v/clip.webm", "--interval", "2", "--quiet"],
            rekognition,
            tmp_path,
            VIDEO_URL_ALLOW='["127.0.0.1"]',
        )
        assert code == 0, stderr
        report = json.loads(stdout)  # no --out: the JSON goes to stdout
        assert report["summary"]["frames_analysed"] == 2
        assert report["video"]["codec"] == "vp9" and report["video"]["source"] == "url"
        # Loopback without the allow-list is refused before any request.
        before = len(host.requests)
        code, _out, stderr = await run_cli(
            [f"{host.url}/v/clip.webm", "--quiet"], rekognition, tmp_path
        )
        assert code == 1 and "invalid_url" in stderr
        assert len(host.requests) == before
        code, _out, stderr = await run_cli(
            [str(served / "junk.mp4"), "--quiet"], rekognition, tmp_path
        )
        assert code == 1 and "unreadable_video" in stderr
        code, _out, stderr = await run_cli([str(tmp_path / "nope.mp4")], rekognition, tmp_path)
        assert code == 2 and "no such file" in stderr
    finally:
        await host.stop()
