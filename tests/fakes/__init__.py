"""Local fakes of cloud services speaking their real wire protocols, for tests and
benchmarks. Everything listens on 127.0.0.1 only."""

from tests.fakes.rekognition import (
    Call,
    FakeRekognition,
    ScriptedError,
    error,
    fake_face,
    fake_label,
    fake_text,
)

__all__ = [
    "Call",
    "FakeRekognition",
    "ScriptedError",
    "error",
    "fake_face",
    "fake_label",
    "fake_text",
]
