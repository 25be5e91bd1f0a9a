"""Running aggregates of a session's frame summaries, in O(1) memory per metric.

The same class serves live metrics (fed frame by frame) and the final report (fed from
the store), so both always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from server.analysis.scoring import METRICS

TREND_SLOPE_PER_MIN = 2.0  # points per minute before a trend is called improving/declining


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _items(value: Any) -> list[tuple[Any, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


@dataclass
class RunningStat:
    n: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")
    last: float | None = None
    # Least-squares accumulators for the slope against time (minutes since start).
    st: float = 0.0
    stt: float = 0.0
    sv: float = 0.0
    stv: float = 0.0

    def add(self, value: float, t_min: float) -> None:
        self.n += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.last = value
        self.st += t_min
        self.stt += t_min * t_min
        self.sv += value
        self.stv += t_min * value

    @property
    def average(self) -> float | None:
        return None if self.n == 0 else self.total / self.n

    @property
    def slope_per_min(self) -> float | None:
        if self.n < 3:
            return None
        denom = self.n * self.stt - self.st * self.st
        if not math.isfinite(denom) or denom <= 1e-9:
            return None
        slope = (self.n * self.stv - self.st * self.sv) / denom
        return slope if math.isfinite(slope) else None  # absurd timestamps overflow

    @property
    def trend(self) -> str:
        slope = self.slope_per_min
        if slope is None:
            return "insufficient_data"
        if slope > TREND_SLOPE_PER_MIN:
            return "improving"
        if slope < -TREND_SLOPE_PER_MIN:
            return "declining"
        return "stable"

    def to_json(self) -> dict[str, Any]:
        avg, slope = self.average, self.slope_per_min
        return {
            "average": None if avg is None else round(avg, 1),
            "min": None if self.n == 0 else round(self.low, 1),
            "max": None if self.n == 0 else round(self.high, 1),
            "current": None if self.last is None else round(self.last, 1),
            "samples": self.n,
            "trend": self.trend,
            "slope_per_min": None if slope is None else round(slope, 2) + 0.0,
        }


@dataclass
class SessionAggregate:
    started_at: float
    metrics: dict[str, RunningStat] = field(
        default_factory=lambda: {m: RunningStat() for m in METRICS}
    )
    frames: int = 0
    frames_with_face: int = 0
    insufficient: int = 0
    degraded: int = 0
    dominant_counts: dict[str, int] = field(default_factory=dict)
    emotion_sums: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, t: float, summary: dict[str, Any]) -> None:
        """Values that are not finite numbers are skipped: a damaged stored row must not
        turn every average into NaN."""
        self.frames += 1
        t_min = (t - self.started_at) / 60.0 if math.isfinite(t) else 0.0
        for name, value in _items(summary.get("metrics")):
            v = _finite(value)
            if v is not None and name in self.metrics:
                self.metrics[name].add(v, t_min)
        if summary.get("faces"):
            self.frames_with_face += 1
        if summary.get("insufficient"):
            self.insufficient += 1
        if summary.get("degraded"):
            self.degraded += 1
        dom = summary.get("dominant_emotion")
        if isinstance(dom, str) and dom:
            self.dominant_counts[dom] = self.dominant_counts.get(dom, 0) + 1
        for name, value in _items(summary.get("emotions")):
            v = _finite(value)
            if v is not None and v >= 0:
                self.emotion_sums[str(name)] = self.emotion_sums.get(str(name), 0.0) + v
        for op, n in _items(summary.get("calls")):
            calls = _finite(n)
            if calls is not None and calls >= 0:
                self.calls[str(op)] = self.calls.get(str(op), 0) + int(calls)

    def emotion_distribution(self) -> dict[str, float]:
        total = sum(self.emotion_sums.values())
        if total <= 0:
            return {}
        return {
            k: round(v / total, 4)
            for k, v in sorted(self.emotion_sums.items(), key=lambda kv: -kv[1])
        }

    def scores_json(self) -> dict[str, Any]:
        return {name: stat.to_json() for name, stat in self.metrics.items()}
