"""The offline backend's models on images that ship with scikit-image, and frames made
from them. Models load once per module."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

pytest.importorskip("skimage")
from skimage import data

from server.analysis.local_models import head_pose as hp
from server.analysis.local_models import quality
from server.analysis.local_models.expression import ExpressionModel
from server.analysis.local_models.faces import CascadeFaces, DetectedFace, MediapipeFaces
from server.analysis.local_models.objects import ObjectDetector, label_name
from server.analysis.local_models.ocr import TextReader
from server.analysis.observation import Box, Checks, Face, Observation, Pose, Quality
from server.analysis.pose_baseline import PoseBaseline

# --- images -----------------------------------------------------------------------------


def astronaut() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def astronaut_head(height: int = 220) -> np.ndarray:
    head = astronaut()[20:320, 110:370]
    return cv2.resize(head, (round(height * 260 / 300), height), interpolation=cv2.INTER_AREA)


def lfw_frame(image: np.ndarray, size: int = 200) -> np.ndarray:
    """A 25×25 lfw_subset image upscaled to `size` px in the middle of a grey 640×480 frame."""
    grey = (image * 255).astype(np.uint8)
    up = cv2.resize(grey, (size, size), interpolation=cv2.INTER_CUBIC)
    frame = np.full((480, 640, 3), 128, np.uint8)
    y, x = (480 - size) // 2, (640 - size) // 2
    frame[y : y + size, x : x + size] = cv2.cvtColor(up, cv2.COLOR_GRAY2BGR)
    return frame


@pytest.fixture(scope="module")
def faces() -> MediapipeFaces:
    return MediapipeFaces()


@pytest.fixture(scope="module")
def lfw() -> np.ndarray:
    return data.lfw_subset()  # 100 faces, then 100 non-faces, 25×25


def primary(found: list[DetectedFace]) -> DetectedFace:
    assert found, "no face found"
    return max(found, key=lambda f: f.area)


def pose_of(faces: MediapipeFaces, image: np.ndarray) -> tuple[float, float, float]:
    face = primary(faces.detect(image))
    assert face.landmarks is not None
    pose = hp.head_pose(face.landmarks)
    assert pose is not None
    return pose


# --- faces ------------------------------------------------------------------------------


def test_astronaut_has_one_face_with_landmarks(faces: MediapipeFaces) -> None:
    found = faces.detect(astronaut())
    assert len(found) == 1
    face = found[0]
    assert face.score > 0.85
    # Her face is at about x 175–270, y 80–180 in the 512×512 image.
    assert 160 < face.left + face.width / 2 < 260 and 90 < face.top + face.height / 2 < 190
    assert face.landmarks is not None and face.landmarks.shape == (468, 3)
    # The nose tip lies inside the box.
    nx, ny = face.landmarks[1, :2]
    assert face.left < nx < face.left + face.width and face.top < ny < face.top + face.height


def test_lfw_faces_found_and_non_faces_rejected(faces: MediapipeFaces, lfw: np.ndarray) -> None:
    found = sum(1 for image in lfw[:100] if faces.detect(lfw_frame(image)))
    false = sum(len(faces.detect(lfw_frame(image))) for image in lfw[100:])
    assert found >= 95, f"{found}/100 faces found"
    assert false <= 2, f"{false} false faces in 100 non-faces"


def test_mirrored_face_flips_yaw(faces: MediapipeFaces, lfw: np.ndarray) -> None:
    # The five most turned lfw faces (|yaw| 18–30°); a mirror image turns the other way.
    turned = [lfw[i] for i in (75, 47, 99, 74, 57)]
    for image in turned:
        frame = lfw_frame(image)
        yaw = pose_of(faces, frame)[0]
        mirrored = pose_of(faces, np.ascontiguousarray(frame[:, ::-1]))[0]
        assert abs(yaw) > 12
        assert np.sign(mirrored) == -np.sign(yaw)
        assert abs(abs(mirrored) - abs(yaw)) < 10


def test_turned_face_reads_yaw_in_the_documented_direction(faces: MediapipeFaces) -> None:
    # The cameraman looks towards the image's right: positive yaw.
    image = cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2BGR)
    assert pose_of(faces, image)[0] > 25


@pytest.mark.parametrize("degrees", [-25.0, 20.0])
def test_rotated_face_changes_roll_by_the_rotation(
    faces: MediapipeFaces, degrees: float
) -> None:
    image = astronaut()
    base_roll = pose_of(faces, image)[2]
    # OpenCV's positive angle turns the image counter-clockwise; our roll is clockwise.
    m = cv2.getRotationMatrix2D((220, 130), degrees, 1.0)
    rotated = cv2.warpAffine(image, m, (512, 512), borderMode=cv2.BORDER_REPLICATE)
    yaw, _pitch, roll = pose_of(faces, rotated)
    assert roll - base_roll == pytest.approx(-degrees, abs=6)
    assert abs(yaw) < 10


def test_frontal_face_reads_near_zero_pose(faces: MediapipeFaces) -> None:
    yaw, pitch, roll = pose_of(faces, astronaut())
    assert abs(yaw) < 8 and abs(pitch) < 10 and abs(roll) < 8


def test_two_faces_side_by_side(faces: MediapipeFaces) -> None:
    frame = np.full((480, 640, 3), 90, np.uint8)
    head = astronaut_head(220)
    h, w = head.shape[:2]
    frame[100 : 100 + h, 60 : 60 + w] = head
    frame[100 : 100 + h, 380 : 380 + w] = head
    found = faces.detect(frame)
    assert len(found) == 2
    assert {f.left < 320 for f in found} == {True, False}
    assert all(f.landmarks is not None for f in found)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_frame_has_no_face(faces: MediapipeFaces, value: int) -> None:
    assert faces.detect(np.full((480, 640, 3), value, np.uint8)) == []


def test_eyes_open_and_mouth_closed_on_astronaut(faces: MediapipeFaces) -> None:
    face = primary(faces.detect(astronaut()))
    assert face.landmarks is not None
    assert hp.eye_ratio(face.landmarks) >= hp.EYES_OPEN_MIN_RATIO
    assert hp.mouth_ratio(face.landmarks) < hp.MOUTH_OPEN_MIN_RATIO


def test_cascade_fallback_finds_the_astronaut() -> None:
    found = CascadeFaces().detect(astronaut())
    assert any(150 < f.left + f.width / 2 < 280 for f in found)
    assert all(0.5 <= f.score <= 0.99 for f in found)
    assert CascadeFaces().detect(np.full((480, 640, 3), 128, np.uint8)) == []


# --- expression -------------------------------------------------------------------------


def test_smiling_astronaut_reads_happy(faces: MediapipeFaces) -> None:
    image = astronaut()
    face = primary(faces.detect(image))
    emotions = ExpressionModel().emotions(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), face)
    assert set(emotions) == {"HAPPY", "SAD", "ANGRY", "CONFUSED", "DISGUSTED", "SURPRISED",
                             "CALM", "FEAR"}
    assert max(emotions, key=lambda k: emotions[k]) == "HAPPY"
    assert emotions["HAPPY"] > 80
    assert emotions["CONFUSED"] == 0.0
    assert sum(emotions.values()) == pytest.approx(100.0, abs=0.01)


# --- objects ----------------------------------------------------------------------------


def test_object_labels_use_rekognition_names() -> None:
    assert label_name(77) == "Cell Phone"
    assert label_name(84) == "Book"
    assert label_name(73) == "Laptop"
    assert label_name(72) == "Monitor"
    assert label_name(1) == "Person"
    assert label_name(47) == "Cup"
    assert label_name(12) is None  # a gap in COCO's ids


def test_objects_on_real_photos() -> None:
    detector = ObjectDetector()
    coffee = {lb.name: lb for lb in detector.labels(cv2.cvtColor(data.coffee(),
                                                                  cv2.COLOR_RGB2BGR))}
    assert coffee["Cup"].confidence > 80
    assert "Person" not in coffee
    people = {lb.name: lb for lb in detector.labels(astronaut())}
    assert people["Person"].confidence > 60 and people["Person"].instances == 1
    [person] = people["Person"].boxes  # the astronaut: a large box around the middle
    assert 0.2 < person.width < 1.0 and 0.3 < person.height <= 1.0
    assert person.left < 0.5 < person.left + person.width
    assert detector.labels(np.full((480, 640, 3), 128, np.uint8)) == ()


# --- text -------------------------------------------------------------------------------


def test_ocr_reads_rendered_text_exactly() -> None:
    frame = np.full((480, 640, 3), (200, 210, 220), np.uint8)
    cv2.putText(frame, "Answer key page 7", (40, 200), cv2.FONT_HERSHEY_SIMPLEX, 1.3,
                (20, 20, 20), 3, cv2.LINE_AA)
    cv2.putText(frame, "x = 42", (40, 300), cv2.FONT_HERSHEY_SIMPLEX, 1.3, (20, 20, 20), 3,
                cv2.LINE_AA)
    lines = TextReader().read(frame)
    assert [ln.text for ln in lines] == ["Answer key page 7", "x = 42"]
    assert all(ln.confidence > 80 for ln in lines)
    # Each line's box (ratios of the frame) holds the baseline the text was drawn at.
    for line, baseline_y in zip(lines, (200, 300), strict=True):
        assert line.box is not None
        assert line.box.top < baseline_y / 480 < line.box.top + line.box.height + 0.02
        assert line.box.left == pytest.approx(40 / 640, abs=0.03)


# --- quality ----------------------------------------------------------------------------


def test_quality_of_a_good_frame(faces: MediapipeFaces) -> None:
    image = astronaut()
    q = quality.assess(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), faces.detect(image))
    assert not q.insufficient and q.reason is None
    assert q.brightness is not None and 80 < q.brightness < 160
    assert q.face_size is not None and 0.15 < q.face_size < 0.25


def test_too_dark_frame_is_insufficient(faces: MediapipeFaces) -> None:
    dark = (astronaut() * 0.15).astype(np.uint8)
    q = quality.assess(cv2.cvtColor(dark, cv2.COLOR_BGR2GRAY), faces.detect(dark))
    assert q.insufficient and q.reason == "too_dark"
    # A covered camera (flat black) is a judgeable absence: it must raise no_face_detected.
    black = np.zeros((480, 640), np.uint8)
    covered = quality.assess(black, [])
    assert not covered.insufficient and covered.reason is None


def test_blurred_face_is_insufficient(faces: MediapipeFaces) -> None:
    blurred = cv2.GaussianBlur(astronaut(), (0, 0), 3)
    found = faces.detect(blurred)
    assert found  # still detected, but too soft to judge its pose and expression
    q = quality.assess(cv2.cvtColor(blurred, cv2.COLOR_BGR2GRAY), found)
    assert q.insufficient and q.reason == "too_blurred"


def test_blurred_frame_without_face_is_insufficient_but_flat_frame_is_not() -> None:
    scene = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2GRAY)
    assert not quality.assess(scene, []).insufficient
    assert quality.assess(cv2.GaussianBlur(scene, (0, 0), 6), []).reason == "too_blurred"
    wall = np.full((480, 640), 140, np.uint8)
    assert not quality.assess(wall, []).insufficient  # nothing there: a judgeable absence


def test_tiny_face_is_insufficient(faces: MediapipeFaces) -> None:
    frame = np.full((480, 640, 3), 90, np.uint8)
    head = astronaut_head(220)
    frame[100 : 100 + head.shape[0], 200 : 200 + head.shape[1]] = head
    found = faces.detect(frame)
    assert found
    small = [replace(found[0], height=30.0, width=30.0)]
    q = quality.assess(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), small)
    assert q.reason == "face_too_small"


# --- pose baseline ----------------------------------------------------------------------


def obs_with_pose(yaw: float, pitch: float, roll: float = 0.0, *, poor: bool = False,
                  extra_face: bool = False) -> Observation:
    face = Face(Box(0.3, 0.2, 0.3, 0.4), 95.0, Pose(yaw, pitch, roll))
    faces: tuple[Face, ...] = (face,)
    if extra_face:
        faces += (Face(Box(0.8, 0.1, 0.1, 0.15), 80.0, Pose(yaw + 1, pitch + 1, roll)),)
    return Observation(
        backend="local", checks=Checks(), faces=faces,
        quality=Quality(insufficient=poor, reason="too_dark" if poor else None),
    )


def no_face() -> Observation:
    return Observation(backend="local", checks=Checks(), faces=(), quality=Quality())


def primary_pose(obs: Observation) -> Pose:
    face = obs.primary_face
    assert face is not None and face.pose is not None
    return face.pose


def test_baseline_passes_through_until_calibrated_then_subtracts() -> None:
    b = PoseBaseline()
    # An off-axis camera: the candidate looking at the screen reads yaw 28°, pitch −20°.
    first = b.apply(obs_with_pose(28.0, -20.0, 3.0), 0.0)
    assert primary_pose(first) == Pose(28.0, -20.0, 3.0)
    b.apply(obs_with_pose(30.0, -21.0, 2.0), 0.5)
    assert not b.calibrated
    b.apply(obs_with_pose(29.0, -19.0, 3.0), 1.0)
    assert b.calibrated and b.baseline == Pose(29.0, -20.0, 3.0)
    # Looking at the screen is now ~0; looking 35° further right reads +35°.
    assert primary_pose(b.apply(obs_with_pose(29.0, -20.0, 3.0), 1.5)).yaw == pytest.approx(0)
    away = primary_pose(b.apply(obs_with_pose(64.0, -20.0, 3.0), 2.0))
    assert away.yaw == pytest.approx(35.0) and away.pitch == pytest.approx(0.0)


def test_baseline_only_changes_the_primary_face() -> None:
    b = PoseBaseline()
    for t in (0.0, 0.5, 1.0):
        b.apply(obs_with_pose(10.0, 5.0), t)
    out = b.apply(obs_with_pose(10.0, 5.0, extra_face=True), 1.5)
    assert out.faces is not None
    assert out.faces[0].pose == Pose(0.0, 0.0, 0.0)
    assert out.faces[1].pose == Pose(11.0, 6.0, 0.0)


def test_baseline_ignores_unstable_poor_and_extreme_samples() -> None:
    b = PoseBaseline()
    # Moving around: each pose differs by more than the stability limit from the last.
    for t, yaw in ((0.0, 0.0), (0.5, 15.0), (1.0, -5.0), (1.5, 12.0)):
        b.apply(obs_with_pose(yaw, 0.0), t)
    assert not b.calibrated
    for t in (2.0, 2.5, 3.0, 3.5):  # stable but too dark to trust
        b.apply(obs_with_pose(5.0, 0.0, poor=True), t)
    assert not b.calibrated
    for t in (4.0, 4.5, 5.0, 5.5):  # stable but turned far away
        b.apply(obs_with_pose(70.0, 0.0), t)
    assert not b.calibrated
    # Settles: calibrated on the settled pose once it has lasted a second.
    for t in (6.0, 6.5):
        b.apply(obs_with_pose(4.0, 2.0), t)
    assert not b.calibrated
    b.apply(obs_with_pose(6.0, 2.0), 7.0)
    assert b.baseline == Pose(4.0, 2.0, 0.0)


def test_baseline_retaken_after_a_long_absence() -> None:
    b = PoseBaseline()
    for t in (0.0, 0.5, 1.0):
        b.apply(obs_with_pose(10.0, 0.0), t)
    assert b.baseline is not None and b.baseline.yaw == 10.0
    # 20 s away is not long: the baseline stays.
    assert b.apply(no_face(), 10.0).faces == ()
    b.apply(obs_with_pose(10.0, 0.0), 21.0)
    assert b.calibrated
    # 40 s without a face: someone (or the camera) may have moved; learn again.
    out = b.apply(obs_with_pose(-15.0, 0.0), 61.5)
    assert not b.calibrated and primary_pose(out).yaw == -15.0
    for t in (62.0, 62.5):
        b.apply(obs_with_pose(-15.0, 0.0), t)
    assert b.baseline is not None and b.baseline.yaw == -15.0


def test_baseline_cannot_absorb_a_sustained_35_degree_yaw() -> None:
    """A candidate turned 35° from the very first frame (a second screen beside the
    camera) is looking away, and stays so however long it lasts; also after a
    re-calibration."""
    from server.analysis.backends import pose_calibration_factory
    from server.analysis.local_backend import LocalAnalyser
    from server.analysis.rules import AlertEngine, FrameFacts, rules_from_settings
    from server.analysis.scoring import Scorer
    from server.config import Settings

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    factory = pose_calibration_factory(LocalAnalyser(settings), settings)
    assert factory is not None
    baseline = factory()
    engine = AlertEngine(rules_from_settings(settings), dwell_interval_s=1.0)
    scorer = Scorer()
    onsets: list[tuple[float, str]] = []

    def feed(o: Observation, t: float) -> Observation:
        out = baseline.apply(o, t)
        for ev in engine.evaluate(FrameFacts(int(t * 2), t, out, scorer.score(out))):
            onsets.append((t, ev["type"] + ":" + ev["status"]))
        return out

    for i in range(40):  # 20 s, two frames a second, as steady as can be
        out = feed(obs_with_pose(35.0, -3.0, 1.0), i / 2)
        assert primary_pose(out).yaw == 35.0  # never made relative to itself
    assert not baseline.calibrated  # type: ignore[attr-defined]
    assert onsets == [(4.0, "looking_away:onset")]
    # A glance at the screen ends the episode; then gone for a minute (the baseline is
    # learnt again), back at 35°: the re-calibration cannot take it either.
    feed(obs_with_pose(0.0, 0.0), 20.0)
    assert onsets[-1] == (20.0, "looking_away:ended")
    feed(no_face(), 25.0)
    for i in range(20):
        out = feed(obs_with_pose(35.0, -3.0, 1.0), 90.0 + i / 2)
        assert primary_pose(out).yaw == 35.0
    assert onsets[-1] == (94.0, "looking_away:onset")


def test_baseline_stays_inside_the_thresholds() -> None:
    b = PoseBaseline(max_yaw_deg=20.0, max_pitch_deg=15.0)
    for t in (0.0, 0.5, 1.0):  # steady, but just past the yaw threshold
        b.apply(obs_with_pose(21.0, 0.0), t)
    assert not b.calibrated
    for t in (2.0, 2.5, 3.0):  # inside: calibrated, and within the limits
        b.apply(obs_with_pose(19.0, -14.0), t)
    assert b.baseline == Pose(19.0, -14.0, 0.0)
    # The worst the baseline can hide is the thresholds themselves: 41° reads as 22° (> 20).
    assert primary_pose(b.apply(obs_with_pose(41.0, -14.0), 3.5)).yaw == pytest.approx(22.0)
