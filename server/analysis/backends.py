"""Choosing the analyser backend from settings: Rekognition when AWS credentials are
configured (or it is asked for), otherwise the offline local backend."""

from __future__ import annotations

import functools
from collections.abc import Callable

from server.analysis.analyser import Analyser, PoseCalibration
from server.config import Settings
from server.observability import Instruments


def make_analyser(settings: Settings, instruments: Instruments) -> Analyser:
    if settings.resolved_backend == "rekognition":
        from server.analysis.rekognition import RekognitionAnalyser

        return RekognitionAnalyser(settings, instruments)
    from server.analysis.local_backend import LocalAnalyser

    return LocalAnalyser(settings, instruments)


def pose_calibration_factory(
    analyser: Analyser, settings: Settings | None = None
) -> Callable[[], PoseCalibration] | None:
    """Backends whose head pose comes from a generic 3-D face model need a per-candidate
    baseline; Rekognition's pose does not. The baseline learns only from poses inside the
    looking-away thresholds, so it can never absorb looking away."""
    if not getattr(analyser, "needs_pose_baseline", False):
        return None
    from server.analysis.pose_baseline import PoseBaseline

    if settings is None:
        return PoseBaseline
    return functools.partial(
        PoseBaseline,
        max_yaw_deg=settings.looking_away_yaw_deg,
        max_pitch_deg=settings.looking_away_pitch_deg,
    )
