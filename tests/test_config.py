"""Settings: every one is documented in .env.example, and the environment drives them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_listed_in_env_example() -> None:
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    missing = {name.upper() for name in Settings.model_fields} - listed
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_backend_is_local_without_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "ANALYSER_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    assert Settings(_env_file=None).resolved_backend == "local"  # type: ignore[call-arg]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    assert Settings(_env_file=None).resolved_backend == "rekognition"  # type: ignore[call-arg]


def test_thresholds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_FACE_FRAMES", "7")
    monkeypatch.setenv("SUSPICIOUS_LABELS", '["Phone"]')
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.no_face_frames == 7 and s.suspicious_labels == ["Phone"]
    assert s.port == 5001 and s.host == "127.0.0.1" and s.max_frame_bytes == 5 * 1024 * 1024
