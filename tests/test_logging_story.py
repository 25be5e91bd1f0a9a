"""The server's INFO log tells the story of each session, read from a real `proctor serve`
process's stderr: started, connected (WebRTC peer or Socket.IO socket), first analysis,
alert onsets, ended, report written, a line on shutdown; lines about a session carry its
short id, other lines no tag; library chatter (aioice's ICE checks…) stays out at INFO."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import socketio

from tests.media import face_data_url
from tests.netns import require_netns
from tests.rtc_client import RtcTestClient, SyntheticCamera, alert_events, face_blank_scenes

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<rest>.*)$")

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path, log_level: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RTC_"))}
    env.update({
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_PROFILE": "",
        "ANALYSER_BACKEND": "local", "LLM_PROVIDER": "none", "API_TOKEN": "",
        "DATABASE_PATH": str(tmp_path / "proctor.sqlite3"), "LOG_LEVEL": log_level,
        "RTC_HOST_ADDRESSES": '["127.0.0.1"]', "RTC_REMOTE_CANDIDATE_ADDRESSES": '["127.0.0.1"]',
        "PYTHONPATH": str(ROOT),
    })
    return env


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the server exited during start-up"
            try:
                async with http.get(f"{url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the server did not come up")


def _tagged(lines: list[str], sid: str) -> list[str]:
    return [ln for ln in lines if f"[session={sid[:8]}]" in ln]


def _in_order(lines: list[str], steps: list[str]) -> None:
    at = 0
    for step in steps:
        found = next((i for i in range(at, len(lines)) if step in lines[i]), None)
        assert found is not None, f"no {step!r} after line {at} in:\n" + "\n".join(lines)
        at = found + 1


async def test_info_log_tells_each_sessions_story(tmp_path: Path) -> None:
    require_netns()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
            cwd=tmp_path, env=_env(tmp_path, "INFO"), stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        await _wait_healthy(url, proc)
        # WebRTC: a face, then none until no_face_detected opens, then the page ends it.
        camera = SyntheticCamera(face_blank_scenes(), "face")
        rtc = RtcTestClient(url, camera)
        try:
            await rtc.connect({"jobTitle": "Engineer"})
            await rtc.opened()
            await rtc.wait_for("frame_analysis", within=30)
            camera.show("blank")
            await rtc.wait_for(
                "alerts", lambda m: bool(alert_events(m, "no_face_detected", "onset")), within=30
            )
            rtc.send({"type": "end_session"})
            await rtc.wait_for("session_ended", within=30)
        finally:
            await rtc.close()
        rtc_sid = rtc.session_id

        # Socket.IO: start, one frame, end, disconnect.
        sio = socketio.AsyncClient()
        await sio.connect(url)
        started = await sio.call("start_session", {"job_data": {}}, timeout=20)
        sio_sid = started["session_id"]
        await sio.call("analyze_frame", {"session_id": sio_sid, "frame": face_data_url()},
                       timeout=30)
        await sio.call("end_session", {"session_id": sio_sid}, timeout=30)
        await sio.disconnect()

        # REST: a session still live at shutdown.
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/api/sessions/start", json={"job_data": {}}) as r:
                rest_sid = (await r.json())["session_id"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
    lines = stderr.read_text(encoding="utf-8").splitlines()
    text = "\n".join(lines)
    ours = [m for ln in lines if (m := LINE.match(ln))]
    assert len(ours) > 15, text  # the format this test reads is the server's

    _in_order(_tagged(lines, rtc_sid), [
        f"session {rtc_sid[:8]} started (webrtc",  # ids are capabilities: never in full
        "WebRTC offer answered",
        "WebRTC peer",  # … connected
        "first analysis: 1 face",
        "alert no_face_detected (warning)",
        "session ended (client)",
        "report written",
    ])
    assert any("connected" in ln and "WebRTC peer" in ln for ln in _tagged(lines, rtc_sid))
    _in_order(_tagged(lines, sio_sid), [
        "started (socketio", "socket", "first analysis", "session ended (client)",
        "report written",
    ])
    assert any("socket" in ln and "connected to the session" in ln
               for ln in _tagged(lines, sio_sid))
    _in_order(lines, ["ready: open http://", "shutting down: ending 1 live session", "stopped"])
    _in_order(_tagged(lines, rest_sid), ["started (rest", "session ended (server_shutdown)",
                                         "report written"])

    assert "[session=-]" not in text
    untagged = [m for m in ours if "[session=" not in m["rest"]]
    assert any("ready: open" in m["rest"] for m in untagged), "start-up lines carry no tag"
    # Only our own loggers speak at INFO; no ICE check, no aiortc or access chatter.
    chatter = [m.group(0) for m in ours if not m["name"].startswith(("server", "proctor"))]
    assert not chatter, chatter
    assert "CandidatePair" not in text


def test_library_chatter_only_at_debug() -> None:
    """LOG_LEVEL=INFO keeps library loggers at WARNING; LOG_LEVEL=DEBUG lets them all speak."""
    probe = (
        "import logging, sys; from server.observability import configure_logging; "
        "configure_logging(sys.argv[1]); "
        "[logging.getLogger(n).info('%s says hello', n) for n in "
        "('aioice.ice', 'aiortc.rtcrtpreceiver', 'aiohttp.access', 'engineio.server', "
        "'socketio.server', 'botocore.hooks', 'httpx', 'server.session.manager', 'proctor')]; "
        "logging.getLogger('aioice.ice').warning('aioice warns')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(level: str) -> str:
        out = subprocess.run([sys.executable, "-c", probe, level], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stderr

    libraries = ("aioice.ice", "aiortc.rtcrtpreceiver", "aiohttp.access", "engineio.server",
                 "socketio.server", "botocore.hooks", "httpx")
    info = run("INFO")
    assert "server.session.manager says hello" in info and "proctor says hello" in info
    assert "aioice warns" in info  # warnings still show
    for lib in libraries:
        assert f"{lib} says hello" not in info, info
    debug = run("DEBUG")
    for lib in libraries:
        assert f"{lib} says hello" in debug, debug
