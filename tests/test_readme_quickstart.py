"""The README's quick start, as a new user pastes it.

Every fenced block marked `<!-- paste -->` in README.md runs, in README order, in one bash
shell (variables carry over, as in a terminal) inside a checkout-like directory whose
`.venv` is this test's environment, against a server started as `make run` starts it: the
`proctor serve` line of the Makefile's `run` recipe, minus installing. The block marked
`<!-- paste: server -->` is that `make run`. Port 5001, the README's, is free inside the
loopback-only namespace the suite runs in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.netns import require_netns

ROOT = Path(__file__).resolve().parent.parent
PORT = 5001
BLOCK = re.compile(
    r"^<!-- paste(?:: (?P<kind>[a-z]+))? -->\n```(?:sh|bash)\n(?P<body>.*?)^```$", re.M | re.S
)
SEPARATOR = "@@ README block {} done @@"

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def readme_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(m["kind"] or "", m["body"]) for m in BLOCK.finditer(text)]


def make_run_command() -> list[str]:
    """The server command of the Makefile's `run` recipe (after its `install` step)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "the Makefile has no run recipe"
    lines = [ln.strip() for ln in recipe.group(1).splitlines() if "proctor serve" in ln]
    assert len(lines) == 1, f"expected one `proctor serve` line in `make run`: {lines}"
    return shlex.split(lines[0].replace("$(VENV)", ".venv"))


def json_documents(text: str) -> list[Any]:
    """Every JSON object printed in `text` (curl prints them without newlines)."""
    decoder = json.JSONDecoder()
    docs, i = [], 0
    while (i := text.find("{", i)) != -1:
        try:
            doc, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        docs.append(doc)
        i = end
    return docs


def new_user_env(checkout: Path) -> dict[str, str]:
    """A shell without this machine's AWS, LLM or server settings: a fresh user's."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("AWS_", "OPENAI_", "ANTHROPIC_", "RTC_", "SAMPLER_"))
    }
    env.update({
        # Empty, not unset: the server exports the checkout's .env without overriding.
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_PROFILE": "",
        "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "API_TOKEN": "",
        "HOST": "127.0.0.1", "PORT": str(PORT), "LOG_LEVEL": "INFO",
        "DATABASE_PATH": str(checkout / "data" / "proctor.sqlite3"),
        # The namespace has only `lo`, which aioice skips by default.
        "RTC_HOST_ADDRESSES": '["127.0.0.1"]',
        "PYTHONPATH": str(ROOT),
        "NO_PROXY": "*",
    })
    return env


def wait_healthy(proc: subprocess.Popen[str], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not answer /health")


def test_readme_marks_the_quick_start_blocks() -> None:
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds[0] == "server", "the first pasted block must be the one starting the server"
    assert "make run" in readme_blocks()[0][1]
    assert kinds.count("") >= 2, "the proctor and REST blocks are marked to be pasted"


def test_readme_blocks_work_as_pasted(tmp_path: Path) -> None:
    require_netns()
    proctor = Path(sys.prefix) / "bin" / "proctor"
    assert proctor.exists(), f"{proctor} is missing: install the project (make install-test)"
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(sys.prefix)
    env = new_user_env(checkout)

    blocks = readme_blocks()
    server_block, pasted = blocks[0][1], [body for kind, body in blocks[1:] if kind == ""]
    assert "make run" in server_block
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            make_run_command(), cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_healthy(server)
        script = "set -euo pipefail\n" + "".join(
            f"{body}\necho; echo '{SEPARATOR.format(i)}'\n" for i, body in enumerate(pasted)
        )
        shell = subprocess.run(
            ["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
            timeout=180,
        )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    log = log_path.read_text()
    assert shell.returncode == 0, (
        f"a README block failed (exit {shell.returncode})\nstdout:\n{shell.stdout[-3000:]}\n"
        f"stderr:\n{shell.stderr[-3000:]}\nserver log:\n{log[-3000:]}"
    )
    outputs = re.split(r"@@ README block \d+ done @@", shell.stdout)
    assert len(outputs) == len(pasted) + 1, shell.stdout

    # The proctor block: doctor finds nothing wrong; the sample frame is a real JPEG.
    doctor_out = next(o for o, body in zip(outputs, pasted, strict=False) if "doctor" in body)
    assert "no problems found" in doctor_out, doctor_out
    assert "[ok] backend" in doctor_out and "offline local backend" in doctor_out
    face = checkout / "face.jpg"
    assert face.read_bytes()[:3] == b"\xff\xd8\xff", "face.jpg is not a JPEG"

    # The REST block: start → the frame analysed with one face → metrics → the report.
    rest_out = next(o for o, body in zip(outputs, pasted, strict=False) if "/api/sessions/" in body)
    docs = json_documents(rest_out)
    errors = [d for d in docs if "error" in d]
    assert not errors, errors
    started = next(d for d in docs if "started_at" in d and "session_id" in d)
    sid = started["session_id"]
    assert started["backend"] == "local"
    frame = next(d for d in docs if d.get("status") == "analysed")
    assert frame["session_id"] == sid
    assert frame["result"]["faces_count"] == 1, frame
    assert frame["result"]["dominant_emotion"] == "HAPPY", frame
    assert frame["result"]["metrics"]["eye_contact"] > 80, frame
    report = next(d for d in docs if "report_version" in d)
    assert report["session_id"] == sid and report["status"] == "ended"
    assert report["summary"]["frames_analysed"] == 1

    # And the server told that session's story.
    tag = f"[session={sid[:8]}]"
    story = [ln for ln in log.splitlines() if tag in ln]
    for step in ("started", "first analysis: 1 face", "session ended", "report written"):
        assert any(step in ln for ln in story), f"no {step!r} line for {tag}:\n{log}"
