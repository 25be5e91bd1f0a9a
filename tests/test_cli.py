"""The `proctor` command as a user runs it (a subprocess): --help lists every command,
`doctor` with and without AWS variables and with things missing, `sample-frame`."""

from __future__ import annotations

import argparse
import os
import pty
import re
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from server.analysis.local_backend import LocalAnalyser
from server.analysis.observation import Checks
from server.cli import build_parser
from server.config import Settings
from server.media.frames import Frame
from server.observability import Instruments

ROOT = Path(__file__).resolve().parent.parent
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proctor(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "OPENAI_", "ANTHROPIC_", "RTC_", "LLM_"))}
    base.update({
        # Empty, not unset: `proctor` exports the checkout's .env without overriding. (Not
        # AWS_PROFILE: boto3 would look for a profile named "".)
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
        "AWS_CONFIG_FILE": str(cwd / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(cwd / "no-aws-credentials"),
        "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "API_TOKEN": "", "HOST": "127.0.0.1",
        "ANALYSER_BACKEND": "auto", "LLM_PROVIDER": "auto",
        "DATABASE_PATH": str(cwd / "data" / "proctor.sqlite3"),
        "RTC_HOST_ADDRESSES": '["127.0.0.1"]', "PYTHONPATH": str(ROOT),
    })
    base["PORT"] = str(_free_port())
    base.update(env)
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=120)


def _line(out: str, check: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith("[") and f"] {check}" in ln)


def test_help_lists_every_command(tmp_path: Path) -> None:
    (commands,) = [a for a in build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction)]
    assert {"serve", "doctor", "sample-frame"} <= set(commands.choices)
    out = proctor(["--help"], tmp_path)
    assert out.returncode == 0
    listed = re.findall(r"^    (\S+)", out.stdout, re.M)
    # argparse lists only commands registered with a help text: each must have one.
    assert listed == list(commands.choices), out.stdout
    for name in commands.choices:
        assert proctor([name, "--help"], tmp_path).returncode == 0


def test_doctor_without_aws_variables(tmp_path: Path) -> None:
    out = proctor(["doctor"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    backend = _line(out.stdout, "backend")
    assert backend.startswith("[ok]") and "offline local backend" in backend
    assert "no AWS credentials" in backend
    assert "hint: to use AWS Rekognition instead, set AWS_ACCESS_KEY_ID" in out.stdout
    assert "found   mediapipe" in out.stdout  # the model packages are installed
    assert "[--] llm" in out.stdout and "set OPENAI_API_KEY or ANTHROPIC_API_KEY" in out.stdout
    assert str(tmp_path / "data" / "proctor.sqlite3") in _line(out.stdout, "database")
    listen = _line(out.stdout, "listen")
    assert "this machine only (HOST=127.0.0.1)" in listen
    assert "host candidates 127.0.0.1 (RTC_HOST_ADDRESSES)" in _line(out.stdout, "ice")
    assert "ICE servers: none" in out.stdout
    assert _line(out.stdout, "tests")  # Chromium found or not, it is reported
    assert out.stdout.rstrip().endswith("no problems found")


def test_doctor_with_aws_variables(tmp_path: Path) -> None:
    out = proctor(["doctor"], tmp_path, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                  AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="eu-west-1",
                  OPENAI_API_KEY="sk-test", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    assert out.returncode == 0, out.stdout + out.stderr
    backend = _line(out.stdout, "backend")
    assert backend.startswith("[ok]") and "AWS Rekognition: AWS credentials found" in backend
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment" in out.stdout
    assert "region: eu-west-1" in out.stdout
    assert "endpoint: https://rekognition.eu-west-1.amazonaws.com" in out.stdout
    assert "ANALYSER_BACKEND=local" in out.stdout  # the way back to the offline backend
    assert SECRET not in out.stdout + out.stderr
    llm = _line(out.stdout, "llm")
    assert llm.startswith("[ok]") and "openai, model gpt-4o-mini" in llm
    assert "OPENAI_BASE_URL: http://127.0.0.1:9/v1" in out.stdout

    local = proctor(["doctor"], tmp_path, AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE",
                    AWS_SECRET_ACCESS_KEY=SECRET,
                    AWS_ENDPOINT_URL_REKOGNITION="http://127.0.0.1:9")
    assert "endpoint: http://127.0.0.1:9 (from AWS_ENDPOINT_URL*)" in local.stdout
    assert "region: us-east-1" in local.stdout  # the default AWS_REGION


def test_doctor_names_each_problem_with_a_fix(tmp_path: Path) -> None:
    with socket.socket() as busy:  # something else on the port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = proctor(["doctor"], tmp_path, AWS_PROFILE="no-such-profile",
                      LLM_PROVIDER="anthropic", PORT=str(port), RTC_ICE_SERVERS='[{"x": 1}]')
    assert out.returncode == 1
    lines = out.stdout.splitlines()

    def fix_after(check: str) -> str:
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"[!!] {check}"))
        return next(ln for ln in lines[i + 1:] if "fix:" in ln)

    assert "profile 'no-such-profile' does not exist" in _line(out.stdout, "backend")
    assert "AWS_PROFILE" in fix_after("backend")
    assert "LLM_PROVIDER=anthropic but ANTHROPIC_API_KEY is not set" in _line(out.stdout, "llm")
    assert "set ANTHROPIC_API_KEY" in fix_after("llm")
    assert "another process uses the port" in _line(out.stdout, "listen")
    assert "PORT=" in fix_after("listen")
    assert "RTC_ICE_SERVERS" in _line(out.stdout, "ice") and "urls" in fix_after("ice")
    assert out.stdout.rstrip().endswith("4 problem(s)")

    exposed = proctor(["doctor"], tmp_path, HOST="0.0.0.0")
    assert exposed.returncode == 1
    assert "with no API_TOKEN" in _line(exposed.stdout, "listen")
    assert "set API_TOKEN" in exposed.stdout
    secured = proctor(["doctor"], tmp_path, HOST="0.0.0.0", API_TOKEN="t0ken")
    assert "(API_TOKEN set)" in _line(secured.stdout, "listen")


async def test_sample_frame_is_a_real_face(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "server.cli", "sample-frame"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    image = cv2.imdecode(np.frombuffer(out.stdout, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (480, 640, 3)
    settings = Settings(_env_file=None, analyser_backend="local")  # type: ignore[call-arg]
    analyser = LocalAnalyser(settings, Instruments())
    await analyser.start()
    try:
        frame = Frame.from_encoded(out.stdout, "image/jpeg")
        obs = await analyser.analyse(frame, Checks(faces=True))
    finally:
        await analyser.close()
    assert obs.faces is not None and len(obs.faces) == 1
    assert obs.primary_face is not None and obs.primary_face.dominant_emotion == "HAPPY"


def test_sample_frame_refuses_a_terminal_and_bad_sizes(tmp_path: Path) -> None:
    bad = proctor(["sample-frame", "--width", "5"], tmp_path)
    assert bad.returncode == 2 and "16–4096" in bad.stderr and bad.stdout == ""
    leader, follower = pty.openpty()  # stdout a terminal: no JPEG bytes on the screen
    try:
        tty = subprocess.run([sys.executable, "-m", "server.cli", "sample-frame"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=follower,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert tty.returncode == 2 and "proctor sample-frame > face.jpg" in tty.stderr


def test_doctor_reads_the_sqlite_schema_version(tmp_path: Path) -> None:
    import sqlite3

    from server.doctor import check_database
    from server.session.migrations import LATEST, migrate

    path = tmp_path / "proctor.sqlite3"
    settings = Settings(_env_file=None, database_path=path)  # type: ignore[call-arg]
    conn = sqlite3.connect(path)
    migrate(conn)
    conn.close()
    current = check_database(settings)
    assert current.status == "ok" and f"schema v{LATEST} (this server's)" in current.summary
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 0, 0)", (LATEST + 1,))
    conn.commit()
    conn.close()
    newer = check_database(settings)
    assert newer.status == "problem" and "will refuse to start" in newer.summary
    path.write_bytes(b"not a database" * 100)
    damaged = check_database(settings)
    assert damaged.status == "problem" and "cannot read it" in damaged.summary


def test_an_unknown_database_url_is_refused_at_start(tmp_path: Path) -> None:
    refused = proctor(["serve"], tmp_path, DATABASE_URL="mysql://app@db/proctor")
    assert refused.returncode == 2
    assert "DATABASE_URL" in refused.stderr and "postgresql://" in refused.stderr
    assert "Traceback" not in refused.stderr
