"""Alert rules as episodes, with the contract's default thresholds pinned exactly."""

from __future__ import annotations

from server.analysis.observation import (
    Box,
    Checks,
    Face,
    Label,
    Observation,
    Pose,
    Quality,
    TextLine,
)
from server.analysis.rules import AlertEngine, FrameFacts, rules_from_settings
from server.analysis.scoring import Scorer
from server.config import Settings

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]


def face(
    yaw: float = 0.0,
    pitch: float = 0.0,
    emotions: dict[str, float] | None = None,
    left: float = 0.3,
) -> Face:
    return Face(
        box=Box(left, 0.2, 0.3, 0.4),
        confidence=99.0,
        pose=Pose(yaw, pitch, 0.0),
        emotions=emotions if emotions is not None else {"CALM": 90.0, "SAD": 10.0},
    )


def obs(
    faces: tuple[Face, ...] | None = (),
    labels: tuple[Label, ...] | None = None,
    text: tuple[TextLine, ...] | None = None,
    quality: Quality | None = None,
) -> Observation:
    return Observation(
        backend="test",
        checks=Checks(True, labels is not None, text is not None),
        faces=faces,
        labels=labels,
        text=text,
        quality=quality,
    )


class Harness:
    def __init__(self) -> None:
        self.engine = AlertEngine(rules_from_settings(SETTINGS))
        self.scorer = Scorer()
        self.index = 0
        self.events: list[dict] = []

    def feed(self, observation: Observation, times: int = 1) -> list[dict]:
        new = []
        for _ in range(times):
            metrics = self.scorer.score(observation)
            out = self.engine.evaluate(
                FrameFacts(self.index, 1000.0 + self.index, observation, metrics)
            )
            self.index += 1
            new += out
        self.events += new
        return new

    def of(self, type_: str, status: str | None = None) -> list[dict]:
        return [
            e
            for e in self.events
            if e["type"] == type_ and (status is None or e["status"] == status)
        ]


def test_no_face_two_frames_nothing_three_frames_one_alert() -> None:
    h = Harness()
    assert h.feed(obs(faces=()), times=2) == []
    onset = h.feed(obs(faces=()))
    assert [e["type"] for e in onset] == ["no_face_detected"]
    assert onset[0]["severity"] == "warning" and onset[0]["status"] == "onset"
    assert onset[0]["frame_index"] == 2
    assert onset[0]["started_at"] == 1000.0  # the behaviour began with the first faceless frame
    # Holding: no repeat.
    assert h.feed(obs(faces=()), times=20) == []
    ended = h.feed(obs(faces=(face(),)))
    assert [(e["type"], e["status"]) for e in ended] == [("no_face_detected", "ended")]
    assert ended[0]["duration_s"] == 23.0  # frames 0..23, one second apart


def test_face_between_faceless_frames_resets_the_streak() -> None:
    h = Harness()
    h.feed(obs(faces=()), times=2)
    h.feed(obs(faces=(face(),)))
    assert h.feed(obs(faces=()), times=2) == []
    assert len(h.feed(obs(faces=()))) == 1


def test_unknown_frames_neither_advance_nor_reset() -> None:
    h = Harness()
    h.feed(obs(faces=()), times=2)
    h.feed(obs(faces=None), times=5)  # the faces check failed (e.g. throttled)
    h.feed(obs(faces=(), quality=Quality(insufficient=True, reason="too_dark")), times=5)
    assert h.of("no_face_detected") == []
    assert len(h.feed(obs(faces=()))) == 1


def test_looking_away_four_frames_nothing_five_one_alert() -> None:
    h = Harness()
    assert h.feed(obs(faces=(face(yaw=35),)), times=4) == []
    out = h.feed(obs(faces=(face(yaw=35),)))
    assert [e["type"] for e in out] == ["looking_away"]
    assert out[0]["details"]["yaw"] == 35.0
    h.feed(obs(faces=(face(yaw=35),)), times=10)
    assert len(h.of("looking_away", "onset")) == 1


def test_looking_away_thresholds_are_strict_and_pitch_counts() -> None:
    h = Harness()
    h.feed(obs(faces=(face(yaw=30, pitch=25),)), times=10)  # at the thresholds: not away
    assert h.of("looking_away") == []
    h.feed(obs(faces=(face(pitch=-26),)), times=5)
    assert len(h.of("looking_away", "onset")) == 1


def test_multiple_faces_is_critical_at_once() -> None:
    h = Harness()
    out = h.feed(obs(faces=(face(), face(left=0.0))))
    assert [(e["type"], e["severity"]) for e in out] == [("multiple_faces_detected", "critical")]
    assert out[0]["details"]["faces"] == 2


def test_low_engagement_nine_frames_nothing_ten_one_alert() -> None:
    h = Harness()
    bored = face(yaw=28, emotions={"SAD": 90.0, "CALM": 10.0})  # engagement ≈ 0.6*53+0.4*10 < 40
    assert h.feed(obs(faces=(bored,)), times=9) == []
    out = h.feed(obs(faces=(bored,)))
    assert [e["type"] for e in out] == ["low_engagement"]
    assert out[0]["severity"] == "info"
    assert out[0]["details"]["engagement"] < 40


def test_a_phone_seen_for_60_frames_is_one_episode() -> None:
    h = Harness()
    phone = (Label("Mobile Phone", 92.0),)
    h.feed(obs(faces=(face(),), labels=phone), times=60)
    onsets = h.of("suspicious_object", "onset")
    assert len(onsets) == 1 and onsets[0]["object"] == "Mobile Phone"
    # Frames where labels were not checked keep the episode open.
    h.feed(obs(faces=(face(),), labels=None), times=5)
    assert h.of("suspicious_object", "ended") == []
    h.feed(obs(faces=(face(),), labels=()))
    ended = h.of("suspicious_object", "ended")
    assert len(ended) == 1 and ended[0]["duration_s"] == 65.0


def test_suspicious_object_needs_more_than_70_percent_and_a_listed_label() -> None:
    h = Harness()
    h.feed(obs(faces=(face(),), labels=(Label("Mobile Phone", 70.0), Label("Chair", 99.0))))
    assert h.of("suspicious_object") == []
    h.feed(obs(faces=(face(),), labels=(Label("Book", 70.1), Label("Mobile Phone", 80.0))))
    assert sorted(e["object"] for e in h.of("suspicious_object", "onset")) == [
        "Book",
        "Mobile Phone",
    ]


def test_a_second_person_is_suspicious_but_the_candidate_is_not() -> None:
    h = Harness()
    h.feed(obs(faces=(face(),), labels=(Label("Person", 99.0, instances=1),)))
    assert h.of("suspicious_object") == []
    h.feed(obs(faces=(face(),), labels=(Label("Person", 99.0, instances=2),)))
    assert [e["object"] for e in h.of("suspicious_object", "onset")] == ["Person"]


def test_text_detected_needs_significant_confident_text() -> None:
    h = Harness()
    h.feed(
        obs(faces=(face(),), text=(TextLine("ok", 99.0), TextLine("def solve(x): return", 40.0)))
    )
    assert h.of("text_detected") == []
    out = h.feed(obs(faces=(face(),), text=(TextLine("def solve(x):", 95.0),)))
    assert [(e["type"], e["severity"]) for e in out] == [("text_detected", "info")]


def test_close_all_ends_open_episodes_with_a_reason() -> None:
    h = Harness()
    h.feed(obs(faces=()), times=3)
    closing = h.engine.close_all(2000.0, 3)
    assert [(e["type"], e["status"], e["end_reason"]) for e in closing] == [
        ("no_face_detected", "ended", "session_ended")
    ]
    assert h.engine.active() == []


def test_pending_reports_streaks_under_way() -> None:
    h = Harness()
    h.feed(obs(faces=()))
    assert h.engine.pending() == ["no_face_detected"]
    assert h.engine.active() == []


def test_thresholds_come_from_settings() -> None:
    settings = Settings(_env_file=None, no_face_frames=1, looking_away_yaw_deg=10)  # type: ignore[call-arg]
    engine = AlertEngine(rules_from_settings(settings))
    out = engine.evaluate(FrameFacts(0, 0.0, obs(faces=()), Scorer().score(obs(faces=()))))
    assert [e["type"] for e in out] == ["no_face_detected"]


def test_cadence_asks_slow_checks_at_their_interval_and_retries_busy_ones() -> None:
    from server.analysis.cadence import CheckCadence

    c = CheckCadence(labels_interval_s=5.0, text_interval_s=10.0)
    assert c.next(0.0) == Checks(True, True, True)  # first frame: everything
    assert c.next(1.0) == Checks(True, False, False)
    assert c.next(5.0) == Checks(True, True, False)
    assert c.next(6.0, scene_changed=True) == Checks(True, True, True)
    assert c.next(7.0) == Checks(True, False, False)
    c.missed(("text:busy",))
    assert c.next(8.0) == Checks(True, False, True)


# --- capture time (WebRTC, recorded video) -----------------------------------------------------


class CaptureHarness(Harness):
    """Frames analysed at `fps` in capture-time mode (RULE_FRAME_INTERVAL_S = 1.0)."""

    def __init__(self, fps: float = 5.0, interval: float | None = 1.0) -> None:
        super().__init__()
        self.engine = AlertEngine(rules_from_settings(SETTINGS), dwell_interval_s=interval)
        self.fps = fps
        self.t = 0.0

    def feed(self, observation: Observation, times: int = 1) -> list[dict]:
        new = []
        for _ in range(times):
            facts = FrameFacts(self.index, self.t, observation, self.scorer.score(observation))
            new += self.engine.evaluate(facts)
            self.index += 1
            self.t = round(self.t + 1.0 / self.fps, 6)
        self.events += new
        return new


def test_capture_time_no_face_not_before_two_seconds_at_five_frames_a_second() -> None:
    h = CaptureHarness(fps=5)
    assert h.feed(obs(faces=()), times=10) == []  # t = 0.0 … 1.8 s
    assert h.engine.pending() == ["no_face_detected"]
    assert h.engine.pending_due_at() == 2.0
    [onset] = h.feed(obs(faces=()))  # t = 2.0 s: (3 − 1) × 1.0 s have passed
    assert (onset["type"], onset["frame_index"], onset["started_at"]) == ("no_face_detected", 10, 0.0)
    assert onset["details"]["dwell_s"] == 2.0 and onset["details"]["required_dwell_s"] == 2.0
    assert onset["details"]["consecutive_frames"] == 11
    assert onset["category"] == "behaviour"
    assert h.engine.pending_due_at() is None  # nothing pending once the episode is open


def test_capture_time_looking_away_not_before_four_seconds() -> None:
    h = CaptureHarness(fps=5)
    away = obs(faces=(face(yaw=35),))
    assert h.feed(away, times=20) == []  # up to 3.8 s
    assert h.engine.pending_due_at() == 4.0
    out = h.feed(away)
    assert [(e["type"], e["frame_index"]) for e in out] == [("looking_away", 20)]


def test_capture_time_multiple_faces_is_instant() -> None:
    h = CaptureHarness(fps=5)
    out = h.feed(obs(faces=(face(), face(left=0.0))))
    assert [(e["type"], e["frame_index"]) for e in out] == [("multiple_faces_detected", 0)]
    assert "required_dwell_s" not in out[0]["details"]


def test_capture_time_a_face_returning_during_the_dwell_resets_it() -> None:
    h = CaptureHarness(fps=5)
    h.feed(obs(faces=()), times=9)  # 0.0 … 1.6 s
    h.feed(obs(faces=(face(),)))  # 1.8 s: back
    assert h.engine.pending() == []
    assert h.feed(obs(faces=()), times=10) == []  # 2.0 … 3.8 s: a new streak from 2.0
    assert h.engine.pending_due_at() == 4.0
    [onset] = h.feed(obs(faces=()))
    assert onset["frame_index"] == 20 and onset["started_at"] == 2.0


def test_capture_time_needs_two_analysed_frames_and_unknowns_neither_advance_nor_reset() -> None:
    h = CaptureHarness(fps=5)
    h.feed(obs(faces=()))  # t = 0: the streak begins
    h.feed(obs(faces=None), times=20)  # faces unanswered (throttled) until 4.0 s
    assert h.of("no_face_detected") == []  # one judged frame is not a dwell
    [onset] = h.feed(obs(faces=()))  # 4.2 s: a second judged frame, 4.2 s after the first
    assert onset["type"] == "no_face_detected" and onset["details"]["consecutive_frames"] == 2
    assert onset["started_at"] == 0.0


def test_pending_due_at_is_the_earliest_dwell_and_none_when_counting_frames() -> None:
    h = CaptureHarness(fps=5)
    assert h.engine.pending_due_at() is None
    bored_away = face(yaw=40, emotions={"SAD": 95.0, "CALM": 5.0})
    h.feed(obs(faces=(bored_away,)))
    # looking_away (5 frames → 4 s) and low_engagement (10 frames → 9 s) both pending.
    assert sorted(h.engine.pending()) == ["looking_away", "low_engagement"]
    assert h.engine.pending_due_at() == 4.0
    push = Harness()
    push.feed(obs(faces=()))
    assert push.engine.pending() == ["no_face_detected"] and push.engine.pending_due_at() is None


def test_push_mode_keeps_counting_frames_whatever_their_pace() -> None:
    h = CaptureHarness(fps=5, interval=None)
    h.feed(obs(faces=()), times=2)
    [onset] = h.feed(obs(faces=()))  # third frame, 0.4 s in
    assert onset["frame_index"] == 2 and "required_dwell_s" not in onset["details"]
    assert onset["message"] == "No face detected for 3 or more consecutive frames"


def test_describe_states_how_the_engine_judges() -> None:
    capture = AlertEngine(rules_from_settings(SETTINGS), dwell_interval_s=1.0).describe()
    assert capture["timing"] == "capture" and capture["rule_frame_interval_s"] == 1.0
    rules = capture["rules"]
    assert rules["no_face_detected"]["onset_frames"] == 3
    assert rules["no_face_detected"]["dwell_s"] == 2.0
    assert rules["looking_away"]["dwell_s"] == 4.0 and rules["looking_away"]["yaw_deg"] == 30.0
    assert rules["low_engagement"]["dwell_s"] == 9.0
    assert rules["multiple_faces_detected"]["dwell_s"] is None
    assert rules["video_unusable"] == {
        "severity": "warning",
        "category": "technical",
        "onset_frames": 2,
        "dwell_s": 10.0,
        "reasons": ["too_blurred", "too_bright", "too_dark"],
    }
    assert "Laptop" in rules["suspicious_object"]["second_device_labels"]
    assert "Laptop" not in rules["suspicious_object"]["labels"]
    push = AlertEngine(rules_from_settings(SETTINGS)).describe()
    assert push["timing"] == "frames" and push["rules"]["no_face_detected"]["dwell_s"] is None
    assert push["rules"]["video_unusable"]["dwell_s"] == 10.0  # capture time everywhere


# --- video_unusable ------------------------------------------------------------------------------

DARK = Quality(brightness=12.0, sharpness=40.0, insufficient=True, reason="too_dark")
BLURRED = Quality(brightness=90.0, sharpness=2.0, insufficient=True, reason="too_blurred")
SMALL = Quality(brightness=90.0, sharpness=200.0, insufficient=True, reason="face_too_small")


def test_video_unusable_after_ten_seconds_of_dark_or_blurred_frames_on_any_transport() -> None:
    for interval in (None, 1.0):
        h = CaptureHarness(fps=1, interval=interval)
        h.feed(obs(faces=(), quality=DARK), times=6)
        h.feed(obs(faces=(), quality=BLURRED), times=4)  # up to 9 s
        h.feed(obs(faces=None, quality=SMALL))  # 10 s: neither advances nor resets
        assert h.of("video_unusable") == []
        [onset] = h.feed(obs(faces=(), quality=DARK))  # 11 s
        assert (onset["type"], onset["severity"], onset["category"]) == (
            "video_unusable", "warning", "technical"
        )
        assert onset["started_at"] == 0.0 and onset["details"]["reason"] == "too_dark"
        # Nothing else was judged on those frames: no behaviour flag for a dark camera.
        assert [e["type"] for e in h.events] == ["video_unusable"]
        [ended] = h.feed(obs(faces=(face(),), quality=Quality(brightness=100.0)))
        assert (ended["type"], ended["status"], ended["duration_s"]) == (
            "video_unusable", "ended", 12.0
        )


def test_video_unusable_needs_the_dark_to_last() -> None:
    h = CaptureHarness(fps=1, interval=None)
    h.feed(obs(faces=(), quality=DARK), times=8)
    h.feed(obs(faces=(face(),), quality=Quality(brightness=100.0)))  # judgeable: resets
    h.feed(obs(faces=(), quality=DARK), times=8)
    assert h.of("video_unusable") == []


def test_a_covered_lens_is_an_absence_not_unusable_video() -> None:
    h = CaptureHarness(fps=1, interval=1.0)
    flat = Quality(brightness=3.0, sharpness=0.0)  # flat: judgeable however dark
    h.feed(obs(faces=(), quality=flat), times=15)
    assert [e["type"] for e in h.events] == ["no_face_detected"]


def test_every_event_has_a_category() -> None:
    h = Harness()
    h.feed(obs(faces=(face(), face(left=0.0)), labels=(Label("Book", 90.0),)))
    assert {(e["type"], e["category"]) for e in h.events} == {
        ("multiple_faces_detected", "behaviour"),
        ("suspicious_object", "behaviour"),
    }


# --- labels: second devices ------------------------------------------------------------------------


def test_own_equipment_flags_only_as_a_second_device() -> None:
    h = Harness()
    own = (
        Label("Laptop", 95.0, instances=1),
        Label("Computer", 97.0, instances=1),
        Label("Electronics", 98.0),  # a parent label, no boxes
        Label("Monitor", 90.0, instances=1),
        Label("Screen", 90.0),
    )
    h.feed(obs(faces=(face(),), labels=own), times=3)
    assert h.of("suspicious_object") == []
    [onset] = h.feed(obs(faces=(face(),), labels=(Label("Monitor", 91.0, instances=2),)))
    assert onset["object"] == "Monitor" and onset["details"]["instances"] == 2
    assert onset["details"]["second_device"] is True
    assert onset["message"] == "Second device in view: 2 × Monitor"
    # Below the confidence, two boxes are not enough either.
    h.feed(obs(faces=(face(),), labels=(Label("Laptop", 60.0, instances=3),)))
    assert [e["object"] for e in h.of("suspicious_object", "onset")] == ["Monitor"]


def test_phones_books_and_paper_flag_as_today_and_both_lists_are_settings() -> None:
    h = Harness()
    h.feed(
        obs(
            faces=(face(),),
            labels=(Label("Cell Phone", 90.0), Label("Paper", 85.0), Label("Headphones", 88.0)),
        )
    )
    assert sorted(e["object"] for e in h.of("suspicious_object", "onset")) == [
        "Cell Phone", "Headphones", "Paper"
    ]
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, suspicious_labels=["Laptop"], second_device_labels=["Tablet Computer"]
    )
    engine = AlertEngine(rules_from_settings(settings))
    labels = (Label("Laptop", 90.0, instances=1), Label("Tablet Computer", 90.0, instances=1))
    frame = obs(faces=(face(),), labels=labels)
    out = engine.evaluate(FrameFacts(0, 0.0, frame, Scorer().score(frame)))
    assert [e["object"] for e in out] == ["Laptop"]


# --- eye_contact from EyeDirection -----------------------------------------------------------------


def test_eye_contact_uses_eye_direction_when_confident() -> None:
    from server.analysis.observation import Gaze

    def eye(gaze: Gaze | None, yaw: float = 0.0) -> float | None:
        f = Face(box=Box(0.3, 0.2, 0.3, 0.4), confidence=99.0, pose=Pose(yaw, 0.0, 0.0),
                 gaze=gaze)
        return Scorer(gaze_min_confidence=50.0).score(obs(faces=(f,))).eye_contact

    assert eye(None) == 100.0  # head pose only
    # Head frontal, eyes 30° to the side (reading a second screen): at the threshold.
    assert eye(Gaze(30.0, 0.0, 95.0)) == 50.0
    assert eye(Gaze(0.0, -25.0, 95.0)) == 50.0
    # Head turned 30° but the eyes turned back onto the screen: looking at it.
    assert eye(Gaze(-30.0, 0.0, 95.0), yaw=30.0) == 100.0
    # An unsure eye direction is ignored.
    assert eye(Gaze(30.0, 0.0, 20.0)) == 100.0
