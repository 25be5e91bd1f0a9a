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
